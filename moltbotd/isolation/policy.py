"""Isolation: whether limits are enforced here, and each model version's group.

`isolation: strict` refuses to start without a delegated cgroup v2 subtree that has
every controller; `best-effort` logs one WARNING and runs without limits; `off` never
touches cgroups. Status always says which is in force, and why.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moltbotd.config import Limits
from moltbotd.isolation.cgroups import CgroupError, Group, Subtree, own_group, problems
from moltbotd.isolation.limits import Usage, disk_of, files_for, has_io_limits
from moltbotd.logs import get_logger

log = get_logger("isolation")


@dataclass
class Isolation:
    mode: str  # strict | best-effort | off
    models_dir: Path
    subtree: Subtree | None = None
    reason: str | None = None  # why limits are not enforced
    sys_root: Path = Path("/sys")
    _usage: dict[Path, Usage] = field(default_factory=dict)

    @classmethod
    def establish(cls, mode: str, models_dir: Path, proc: Path = Path("/proc"),
                  sys_root: Path = Path("/sys")) -> "Isolation":  # fmt: skip
        """Take over the daemon's own cgroup, or say why not (raising in strict mode)."""
        if mode == "off":
            return cls(mode, models_dir, reason="isolation is off in the config", sys_root=sys_root)
        try:
            group = own_group(proc)
            found = problems(group)
        except (CgroupError, OSError) as exc:
            found = [str(exc)]
        if not found:
            try:
                Subtree(group).take_over()
            except OSError as exc:  # root passes the access checks, yet a write may fail
                found = [f"cannot take over {group}: {exc}"]
        if found:
            if mode == "strict":
                raise CgroupError("isolation: strict, but " + "; ".join(found))
            log.warning("running without resource limits (isolation: best-effort): {why}",
                        why="; ".join(found))  # fmt: skip
            return cls(mode, models_dir, reason="; ".join(found), sys_root=sys_root)
        isolation = cls(mode, models_dir, Subtree(group), sys_root=sys_root)
        isolation.remove_stale()
        log.info("resource limits enforced in {cgroup}", cgroup=str(group))
        return isolation

    def remove_stale(self) -> None:
        assert self.subtree is not None
        for group in self.subtree.stale_groups():
            log.warning("removing {cgroup}, left by a daemon that did not stop cleanly",
                        cgroup=str(group.path))  # fmt: skip
            release_at_start(group)

    @property
    def enforced(self) -> bool:
        return self.subtree is not None

    def place(self, model: str, version: str, limits: Limits, job: str = "") -> Group | None:
        """The version's group (or, with `job`, its job's: the same limits, apart from
        the serving workers, so a job's OOM kill never takes them) with its limits
        written, or None where nothing is enforced."""
        if self.subtree is None:
            return None
        files = files_for(limits, self._io_device(limits))
        group = self.subtree.group(model, version, job)
        group.write(files)
        return group

    def apply(self, group: Group, limits: Limits) -> None:
        group.write(files_for(limits, self._io_device(limits)))

    def _io_device(self, limits: Limits) -> str | None:
        if not has_io_limits(limits):
            return None
        where = self.models_dir if limits.io.device == "auto" else Path(limits.io.device)
        try:
            return disk_of(where, self.sys_root)
        except (OSError, ValueError) as exc:
            if self.mode == "strict":
                raise CgroupError(f"cannot apply io limits: {exc}") from None
            log.warning("io limits not applied: {error}", error=str(exc))
            return None

    def usage(self, group: Group) -> dict[str, Any]:
        meter = self._usage.setdefault(group.path, Usage(group))
        return meter.read(time.monotonic())

    async def forget(self, group: Group, unused: Callable[[], bool] = lambda: True) -> None:
        self._usage.pop(group.path, None)
        await release(group, unused)

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "enforced": self.enforced, "reason": self.reason,
                "cgroup": str(self.subtree.path) if self.subtree else None}  # fmt: skip


RETRY = 0.02  # seconds between attempts to remove a group whose processes are exiting


def _removed(group: Group, deadline: float) -> bool:
    """One attempt: True once the group is gone, or when it is given up (logged)."""
    try:
        group.remove()
        return True
    except CgroupError as exc:
        if time.monotonic() > deadline:
            log.error("giving up on a cgroup: {error}", error=str(exc))
            return True
        return False


async def release(group: Group, unused: Callable[[], bool] = lambda: True,
                  patience: float = 2.0) -> None:  # fmt: skip
    """Remove a group once the processes inside are gone (killing what is left),
    waiting for them on the event loop, not in it; given up as soon as `unused()` says
    a new process was placed in it meanwhile."""
    deadline = time.monotonic() + patience
    while unused() and not _removed(group, deadline):
        await asyncio.sleep(RETRY)


def release_at_start(group: Group, patience: float = 2.0) -> None:
    """release() for a group a killed daemon left, before the socket serves anyone."""
    deadline = time.monotonic() + patience
    while not _removed(group, deadline):
        time.sleep(RETRY)
