"""cgroup v2 through its file interface: the daemon's delegated subtree and one group per model.

Layout (design.md): the daemon's own group G (a systemd service with Delegate=) gets
  G/supervisor/                the daemon itself: the "no internal processes" rule forbids
                               processes in a group whose children have controllers on
  G/model-<name>-<version>/    one per loaded model version, its worker(s) inside
  G/model-<name>-<version>-convert/  a conversion job of that version (moltctl quantize)
Every path is a parameter, so the tests run the same code against a folder of files.
"""

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("cpu", "memory", "io", "pids")
SUPERVISOR = "supervisor"
GROUP_PREFIX = "model-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class CgroupError(Exception):
    """The cgroup hierarchy cannot be used as needed; the message says what to do."""


def own_group(proc: Path = Path("/proc"), pid: int | str = "self") -> Path:
    """The directory of this process's cgroup v2 group, or pid's (from mountinfo and
    /proc/PID/cgroup)."""
    mount = None
    for line in (proc / "self" / "mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            mount = Path(fields[0].split()[4])
            break
    if mount is None:
        raise CgroupError("no cgroup v2 hierarchy is mounted (this needs a unified cgroup v2 host)")
    for line in (proc / str(pid) / "cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    raise CgroupError(f"{proc}/{pid}/cgroup has no cgroup v2 entry (0::)")


def problems(group: Path, needed: tuple[str, ...] = CONTROLLERS) -> list[str]:
    """Why moltbotd could not manage `group` (empty when it can), each phrased for operators."""
    advice = "run moltbotd under systemd with Delegate=yes (the shipped unit does)"
    try:
        available = set((group / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return [f"cannot read {group}/cgroup.controllers ({exc.strerror}): {advice}"]
    found = []
    missing = [c for c in needed if c not in available]
    if missing:
        what = (
            f"the {missing[0]} controller is"
            if len(missing) == 1
            else (f"the {', '.join(missing[:-1])} and {missing[-1]} controllers are")
        )
        found.append(f"{what} not available to moltbotd's cgroup {group}: {advice}")
    unwritable = [n for n in ("cgroup.subtree_control", "cgroup.procs")
                  if not os.access(group / n, os.W_OK)]  # fmt: skip
    if unwritable:
        found.append(f"moltbotd may not write {' or '.join(unwritable)} in {group}: {advice}")
    return found


def group_name(model: str, version: str) -> str:
    """A stable, safe directory name: model-<name>-<version>.

    A '-' inside the model or version is doubled, so the single '-' between them is
    unambiguous: model a-b v c and model a v b-c must never share (and kill) a group.
    """
    model, version = (_UNSAFE.sub("_", part).replace("-", "--") for part in (model, version))
    return f"{GROUP_PREFIX}{model}-{version}"


@dataclass(frozen=True)
class Subtree:
    """The daemon's delegated group: where it puts itself and its model groups."""

    path: Path

    def take_over(self, controllers: tuple[str, ...] = CONTROLLERS) -> None:
        """Move every process of the group into supervisor/, enable controllers below."""
        leaf = self.path / SUPERVISOR
        leaf.mkdir(exist_ok=True)
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                _write(leaf / "cgroup.procs", pid)
        _write(self.path / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))

    def stale_groups(self) -> list["Group"]:
        """Model groups a previous daemon left behind (it was killed before it could clean up)."""
        return [Group(p) for p in sorted(self.path.glob(GROUP_PREFIX + "*")) if p.is_dir()]

    def group(self, model: str, version: str, job: str = "") -> "Group":
        """A version's group; with `job`, a sibling for a job on the version (a third
        '-' part, which no version's group name has: they never meet)."""
        path = self.path / (group_name(model, version) + (f"-{job}" if job else ""))
        path.mkdir(exist_ok=True)
        return Group(path)


@dataclass(frozen=True)
class Group:
    path: Path

    def write(self, files: dict[str, str]) -> None:
        for name, value in files.items():
            try:
                _write(self.path / name, value)
            except OSError as exc:
                raise CgroupError(
                    f"cannot set {self.path}/{name} to {value!r}: {exc.strerror}"
                ) from None

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def flat(self, name: str) -> dict[str, int]:
        """A 'key value' per line file (cpu.stat, memory.events) as a dict."""
        pairs = (line.split() for line in self.read(name).splitlines() if line.strip())
        return {key: int(value) for key, value in pairs}

    def oom_kills(self) -> int:
        try:
            return self.flat("memory.events").get("oom_kill", 0)
        except OSError:
            return 0

    def remove(self) -> None:
        """Kill what is left inside (cgroup.kill, Linux 5.14+), then remove the directory."""
        kill = self.path / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                _write(kill, "1")
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove {self.path}: {exc.strerror}") from None
            raise CgroupError(f"cannot remove {self.path}: processes are still inside") from None


def _write(file: Path, value: str) -> None:
    # One write() per value: the kernel parses each write as one command.
    with file.open("w") as f:
        f.write(value)
