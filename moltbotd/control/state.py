"""State that survives restarts: per model its active version, its history, a canary
and an instance count set by hand.

One JSON file in the state directory, replaced atomically (write a temporary file,
fsync it, rename it over the old one, fsync the directory), so a crash at any point
leaves either the old state or the new one on disk, never a mix.
"""

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moltbotd.durable import SPACE_ERRORS, atomic_write
from moltbotd.logs import get_logger

log = get_logger("state")
STATE_FILE = "state.json"
SCHEMA = 1
HISTORY = 20  # previously active versions kept per model, for rollback


@dataclass
class Canary:
    version: str
    share: float  # 0 < share < 1 of the model's requests
    started: float = field(default_factory=time.time)


@dataclass
class ModelState:
    active: str | None = None
    history: list[str] = field(default_factory=list)  # earlier active versions, newest last
    config_pin: str | None = None  # models.NAME.version when `active` was chosen
    canary: Canary | None = None
    instances: int | None = None  # set by `moltctl scale`; None: the config's autoscaling

    def activate(self, version: str, config_pin: str | None) -> None:
        if self.active and self.active != version:
            self.history = [*self.history, self.active][-HISTORY:]
        self.active, self.config_pin, self.canary = version, config_pin, None

    def return_to(self, version: str, config_pin: str | None) -> None:
        """A rollback to an earlier version: it and what came after it leave the history."""
        newest = len(self.history) - 1 - self.history[::-1].index(version)
        self.history = self.history[:newest]
        self.active, self.config_pin, self.canary = version, config_pin, None


@dataclass
class State:
    models: dict[str, ModelState] = field(default_factory=dict)

    def model(self, name: str) -> ModelState:
        return self.models.setdefault(name, ModelState())

    def to_json(self) -> bytes:
        body = {"schema": SCHEMA, "written": time.time(),
                "models": {n: asdict(m) for n, m in sorted(self.models.items())}}  # fmt: skip
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, text: bytes) -> "State":
        body = json.loads(text)
        schema = body.get("schema") if isinstance(body, dict) else None
        if schema != SCHEMA or not isinstance(body.get("models"), dict):
            raise ValueError(f"expected a map with schema {SCHEMA} and models, got {text[:80]!r}")
        return cls({name: _model_state(name, raw) for name, raw in body["models"].items()})


def _model_state(name: str, raw: Any) -> ModelState:
    if not isinstance(raw, dict):
        raise ValueError(f"models.{name}: expected a map, got {raw!r}")
    for key in ("active", "config_pin"):
        if not isinstance(raw.get(key), str | None):
            raise ValueError(f"models.{name}.{key}: expected a version, got {raw[key]!r}")
    history = raw.get("history", [])
    if not isinstance(history, list) or not all(isinstance(v, str) for v in history):
        raise ValueError(f"models.{name}.history: expected a list of versions, got {history!r}")
    canary = raw.get("canary")
    if canary is not None:
        canary = Canary(str(canary["version"]), float(canary["share"]), float(canary["started"]))
    instances = raw.get("instances")
    if not (instances is None or (type(instances) is int and instances > 0)):
        raise ValueError(f"models.{name}.instances: expected a count, got {instances!r}")
    return ModelState(raw.get("active"), history, raw.get("config_pin"), canary, instances)


class StateStore:
    """The state directory: load once at start, save after every change."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE

    def load(self) -> State:
        """The saved state; an unreadable file is set aside (never lost) and ignored."""
        for tmp in self.path.parent.glob(f".{STATE_FILE}.*.tmp"):  # a write that a crash cut
            with contextlib.suppress(OSError):
                tmp.unlink()
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            log.error("cannot read the state file {file}: {error}; starting from the config",
                      file=str(self.path), error=str(exc))  # fmt: skip
            return State()
        try:
            return State.from_json(text)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{time.time_ns()}")
            try:
                self.path.rename(aside)
                kept = f"the file was kept as {aside}"
            except OSError as rename_error:
                kept = f"it could not be set aside: {rename_error}"
            log.error("state file {file} is unreadable ({error}); starting from the config"
                      " ({kept})", file=str(self.path), error=str(exc), kept=kept)  # fmt: skip
            return State()

    def save(self, data: bytes) -> None:
        """Write a State's to_json(); blocking (fsyncs): the daemon calls it in a thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)

    def save_even_if_full(self, data: bytes) -> None:
        """save, or on a full disk overwrite the file in place when the new state is no
        larger: that needs no free block. For a change that must not be lost (a canary
        rolled back must not come back at the next start), at the price of a torn file
        if the host crashes within that one write, which load sets aside."""
        try:
            self.save(data)
        except OSError as exc:
            if exc.errno not in SPACE_ERRORS or len(data) > _size(self.path):
                raise
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, data)
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            log.warning("{file}: the disk is full; state rewritten in place", file=str(self.path))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1
