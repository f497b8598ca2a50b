"""Versions on disk: the model repository, manifests, and deploys on their way in."""
