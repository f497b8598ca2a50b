"""The daemon's control plane: the socket server, the supervisor (which pool serves a
model), rollouts, canaries, the state file and the `versions` catalog."""
