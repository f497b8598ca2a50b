"""The model repository on disk: MODELS_DIR/<model>/<version>/model.onnx (+ model.yaml).

Read-only here: a scan lists models and their versions in natural order, and says why
any entry it skipped was skipped.
"""

from dataclasses import dataclass, field
from pathlib import Path

from moltbotd.config import NAME_PATTERN, NAME_RULE, ConfigError, Overrides, parse_model_yaml
from moltbotd.wire.files import MODEL_FILE, MODEL_YAML, sort_versions


@dataclass(frozen=True)
class RepoModel:
    name: str
    path: Path
    versions: tuple[str, ...]  # natural order, oldest first

    @property
    def latest(self) -> str:
        return self.versions[-1]

    def version_dir(self, version: str) -> Path:
        return self.path / version

    def model_yaml(self, version: str) -> Overrides:
        return read_model_yaml(self.version_dir(version))


def read_model_yaml(version_dir: Path) -> Overrides:
    """A version's validated model.yaml settings (none when it has no model.yaml)."""
    file = version_dir / MODEL_YAML
    return parse_model_yaml(file) if file.exists() else Overrides()


@dataclass(frozen=True)
class Scan:
    models: dict[str, RepoModel]
    skipped: list[str] = field(default_factory=list)  # "path: why", for the log


def scan(models_dir: Path) -> Scan:
    if not models_dir.is_dir():
        raise ConfigError(f"models_dir {models_dir} is not a directory")
    models, skipped = {}, []
    for model_dir in sorted(models_dir.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        if not NAME_PATTERN.match(model_dir.name):
            skipped.append(f"{model_dir}: model name must be {NAME_RULE}")
            continue
        versions = []
        for version_dir in model_dir.iterdir():
            why = _why_not_a_version(version_dir)
            if why:
                skipped.append(f"{version_dir}: {why}")
            elif why is None:
                versions.append(version_dir.name)
        if versions:
            models[model_dir.name] = RepoModel(
                model_dir.name, model_dir, tuple(sort_versions(versions))
            )
        else:
            skipped.append(f"{model_dir}: no version folder with a {MODEL_FILE}")
    return Scan(models, skipped)


def _why_not_a_version(version_dir: Path) -> str | None:
    """None for a version; '' for an entry to pass over quietly; else the reason."""
    if version_dir.name.startswith(".") or not version_dir.is_dir():
        return ""
    if not NAME_PATTERN.match(version_dir.name):
        return f"version name must be {NAME_RULE}"
    if not (version_dir / MODEL_FILE).is_file():
        return f"no {MODEL_FILE} in it"
    return None
