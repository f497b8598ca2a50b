"""The real daemon as a subprocess, and what /proc and its log say about it.

tests/conftest.py builds its fixtures on Daemon; the stress tools start one the same way
on a throwaway folder (running_daemon).
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from moltctl.client import Client

TRACEBACK = "Traceback (most recent call last)"
# The daemon keeps its newest log entries in memory (log_ring_size, 10,000 by default,
# about 1 kB each): filling that ring reads as 9 MB of RSS growth over 100,000 fuzz
# frames. A small ring is full after the warm-up, so the growth measured is the rest.
SMALL_LOG_RING = "log_ring_size: 200\n"


class DaemonError(AssertionError):
    """The daemon exited or did not log what was awaited; the message has its log.

    An AssertionError so that a test using Daemon fails as an assertion would."""


class Daemon:
    """moltbotd as a subprocess in its own process group, logging to a file."""

    def __init__(
        self,
        tmp_path: Path,
        models_dir: Path,
        config: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wrapper: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.dir = tmp_path
        self.args = args
        self.wrapper = wrapper  # a command that execs the daemon's (systemd-run --scope)
        self.pass_fds = pass_fds  # descriptors the wrapper gets (socket activation's)
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
        return [*self.wrapper, *argv, *self.args]

    def start(self, wait: bool = True) -> "Daemon":
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.dir,
                                         env=self.env, pass_fds=self.pass_fds)  # fmt: skip
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
                raise DaemonError(f"moltbotd exited ({self.proc.returncode}) before logging"
                                  f" {text!r}:\n{self.log()}")  # fmt: skip
            if time.monotonic() > deadline:
                raise DaemonError(f"moltbotd did not log {text!r} within {timeout}s:\n{self.log()}")
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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        """The daemon's live child processes: its workers."""
        return children(self.pid)


@contextlib.contextmanager
def running_daemon(
    fill: Callable[[Path], None],
    config: str | None = None,
    keep_log: Path | None = None,
    wrapper: tuple[str, ...] = (),
) -> Iterator[Daemon]:
    """A started daemon on a temporary folder whose model repository `fill` writes; the
    whole process group is killed on the way out, whatever happened, and its log is
    copied to keep_log."""
    with tempfile.TemporaryDirectory(prefix="moltbot-stress-") as tmp:
        models = Path(tmp) / "models"
        fill(models)
        daemon = Daemon(Path(tmp), models, config, wrapper=wrapper)
        try:
            yield daemon.start()
        finally:
            if daemon.proc and daemon.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.stop(timeout=30)
            daemon.kill_group()
            if keep_log:
                shutil.copyfile(daemon.log_path, keep_log)


# --- /proc --------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of a live process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def fds(pid: int) -> dict[str, int]:
    """Open descriptors of a process by kind (socket, pipe, anon_inode:[eventpoll], file)."""
    kinds: dict[str, int] = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            target = os.readlink(entry)
            kind = re.sub(r":\[\d+\]$", "", target) if not target.startswith("/") else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def quiet_fds(pid: int, within: float = 3.0) -> dict[str, int]:
    """The daemon's fds once the connections just closed are gone: the fewest seen
    within a few seconds (it closes its end when its loop gets to it)."""
    deadline, fewest = time.monotonic() + within, fds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = fds(pid)
        fewest = min(fewest, now, key=lambda kinds: sum(kinds.values()))
    return fewest


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is pid."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def tracebacks(log: str, lines: int = 24) -> list[str]:
    """Each traceback in a daemon log, with the lines before it (the event that logged it)
    and up to `lines` after."""
    text = log.splitlines()
    return [
        "\n".join(text[max(0, i - 2) : i + lines])
        for i, line in enumerate(text)
        if TRACEBACK in line
    ]
