"""Shared fixtures: a model repository of real ONNX models, the real daemon, real moltctl."""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moltbotd.demo import save, write_demo_repository
from stress.daemon import Daemon
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


def start_moltctl(*args: str, socket: Path) -> subprocess.Popen[str]:
    """moltctl in the background, to be stopped as Ctrl-C stops it (SIGINT).

    A pytest started with SIGINT ignored (a background job of a non-interactive shell,
    as some CI runners start it) passes that on, and moltctl rightly keeps it, as every
    program keeps what a shell set for its background jobs; this moltctl stands for one
    started from a terminal. env resets it at exec: a preexec_fn would run Python in a
    forked copy of a process that may have threads."""
    argv = [sys.executable, "-m", "moltctl", "--socket", str(socket), *args]
    return subprocess.Popen(["env", "--default-signal=INT", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_until(condition, timeout: float = 10.0, what: str = "the condition"):
    """Poll condition() until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.05)
    return value


async def wait_until_async(condition: Callable[[], Awaitable[Any]], timeout: float = 10.0,
                           what: str = "the condition") -> Any:  # fmt: skip
    """wait_until for asyncio tests: condition() is awaited at each poll."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.02)
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
