"""Shared fixtures: a model repository of real ONNX models, the real daemon, real moltctl."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moltbotd.demo import save, write_demo_repository
from moltctl.client import Client
from tests.models import multi_io_model, slow_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """demo v1.0 (2x) and v2.0 (10x), iris v1 (sequence-of-maps output), slow v1, multi v1."""
    repo = tmp_path / "models"
    write_demo_repository(repo)
    save(slow_model(), repo, "slow", "v1")
    save(multi_io_model(), repo, "multi", "v1")
    return repo


class Daemon:
    """moltbotd as a subprocess in its own process group, logging to a file."""

    def __init__(
        self,
        tmp_path: Path,
        models_dir: Path,
        config: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = tmp_path
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.socket = tmp_path / "moltbotd.sock"
        self.models_dir = models_dir
        self.state_dir = tmp_path / "state"
        self.log_path = tmp_path / "moltbotd.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = tmp_path / "moltbotd.yaml"
            self.config_path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "moltbotd", "--socket", str(self.socket),
                "--models-dir", str(self.models_dir), "--log-level", "debug",
                "--state-dir", str(self.state_dir)]  # fmt: skip
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        return argv + list(self.args)

    def start(self, wait: bool = True) -> "Daemon":
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.dir,
                                         env=self.env)  # fmt: skip
        if wait:
            self.wait_for_log("ready: serving")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"moltbotd exited ({self.proc.returncode}) before logging {text!r}:\n"
                            f"{self.log()}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail(f"moltbotd did not log {text!r} within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def client(self, timeout: float | None = 60) -> Client:
        return Client(self.socket, timeout).connect()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def group_alive(self) -> bool:
        """Is any process of the daemon's process group (the daemon, its workers) left?"""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self) -> None:
        if self.proc and self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def daemon_factory(tmp_path: Path, models_dir: Path) -> Iterator[type]:
    started: list[Daemon] = []

    def make(config: str | None = None, start: bool = True, wait: bool = True,
             args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Daemon:  # fmt: skip
        daemon = Daemon(tmp_path, models_dir, config, args, env)
        started.append(daemon)
        return daemon.start(wait) if start else daemon

    yield make  # type: ignore[misc]
    for daemon in started:
        if daemon.proc:
            daemon.stop()
            daemon.kill_group()


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    return daemon_factory()


def run_moltctl(*args: str, socket: Path | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MOLTBOT_SOCKET"}
    if socket is not None:
        env["MOLTBOT_SOCKET"] = str(socket)
    return subprocess.run([sys.executable, "-m", "moltctl", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)  # fmt: skip


def wait_until(condition, timeout: float = 10.0, what: str = "the condition"):
    """Poll condition() until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.05)
    return value


@pytest.fixture
def fsynced(monkeypatch) -> list[int]:
    """The inode of every file or folder os.fsync is called on, in order (fsync still runs)."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced
