"""From Limits settings to cgroup v2 interface files, and from the kernel's counters to usage.

Pure functions (the disk lookup reads /sys, a parameter in tests): what a given config
writes is decided here and tested without a kernel.
"""

import dataclasses
import math
import os
import stat
from pathlib import Path
from typing import Any

from moltbotd.config import AUTO, Limits
from moltbotd.isolation.cgroups import Group
from moltbotd.wire.units import format_size, plural

MODELS_SHARE = 0.8  # of the host's memory, for the models together: the rest is the system's
MiB = 2**20


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's physical memory (MemTotal) in bytes."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{meminfo} has no MemTotal line")


def resolve(limits: Limits, host_bytes: int, models: int) -> tuple[Limits, str | None]:
    """Limits with an `auto` memory limit made a number, and how (None: it was not auto).

    auto gives each of `models` served models an equal share of MODELS_SHARE of the
    host's memory, so that no model can take the memory the others and the system need.
    """
    if limits.memory.limit != AUTO:
        return limits, None
    limit = round(host_bytes * MODELS_SHARE / max(1, models)) // MiB * MiB
    how = (f"auto: {MODELS_SHARE:.0%} of the host's {format_size(host_bytes)}"
           f" over {plural(models, 'model')}")  # fmt: skip
    memory = dataclasses.replace(limits.memory, limit=limit)
    return dataclasses.replace(limits, memory=memory), how


def files_for(limits: Limits, io_device: str | None) -> dict[str, str]:
    """The cgroup files and values that put `limits` in force; unset limits write 'max'."""
    cpu, mem, io = limits.cpu, limits.memory, limits.io
    if mem.limit == AUTO:
        raise ValueError("the memory limit still says auto: resolve() it first")
    period_us = round(cpu.period * 1e6)
    quota = "max" if cpu.quota is None else str(round(cpu.quota * period_us))
    files = {
        "cpu.max": f"{quota} {period_us}",
        "cpu.weight": str(cpu.weight or 100),  # 100 is the kernel's default weight
        "memory.max": _value(mem.limit),
        "memory.high": _value(mem.high),
        "memory.swap.max": _value(mem.swap),
        "memory.oom.group": "1",  # an OOM kill takes the whole worker, not one thread
        "pids.max": _value(limits.pids.max),
    }
    if io_device is not None:
        files["io.max"] = (
            f"{io_device} rbps={_value(io.read_bps)} wbps={_value(io.write_bps)}"
            f" riops={_value(io.read_iops)} wiops={_value(io.write_iops)}"
        )
    return files


def has_io_limits(limits: Limits) -> bool:
    io = limits.io
    return any(v is not None for v in (io.read_bps, io.write_bps, io.read_iops, io.write_iops))


def _value(limit: int | None) -> str:
    return "max" if limit is None else str(limit)


def intra_op_threads(configured: int | None, limits: Limits) -> int:
    """An explicit setting wins; else the CPU quota rounded up (150% -> 2), else 1."""
    if configured is not None:
        return configured
    return max(1, math.ceil(limits.cpu.quota)) if limits.cpu.quota else 1


def disk_of(path: Path, sys_root: Path = Path("/sys")) -> str:
    """MAJ:MIN of the whole disk holding `path`, or behind the device node `path` (/dev/vda).

    io.max takes whole disks, not partitions.
    """
    info = os.stat(path)
    dev = info.st_rdev if stat.S_ISBLK(info.st_mode) else info.st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    block = sys_root / "dev" / "block" / number
    if not block.exists():
        raise ValueError(f"{path} is not on a block device ({number}): io limits need a disk")
    if (block / "partition").exists():
        return (block.resolve().parent / "dev").read_text().strip()
    return number


def describe(limits: Limits, memory_how: str | None = None) -> dict[str, Any]:
    """The limits in force, as status shows them (None: unlimited); memory_how: resolve's."""
    cpu, mem, io = limits.cpu, limits.memory, limits.io
    return {
        "memory_auto": memory_how,
        "cpu_quota_percent": None if cpu.quota is None else round(cpu.quota * 100, 1),
        "cpu_period_ms": cpu.period * 1e3,
        "cpu_weight": cpu.weight,
        "memory_max": mem.limit, "memory_high": mem.high, "memory_swap_max": mem.swap,
        "io_read_bps": io.read_bps, "io_write_bps": io.write_bps,
        "io_read_iops": io.read_iops, "io_write_iops": io.write_iops,
        "pids_max": limits.pids.max,
    }  # fmt: skip


def memory_limit_text(limits: Limits) -> str:
    return format_size(limits.memory.limit) if limits.memory.limit else "max"


class Usage:
    """Reads a group's counters; CPU % is measured between two reads."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self._last: tuple[float, int] | None = None

    def read(self, now: float) -> dict[str, Any]:
        cpu = self._flat("cpu.stat")
        used = cpu.get("usage_usec", 0)
        percent = None
        if self._last and now > self._last[0]:
            percent = round((used - self._last[1]) / 1e6 / (now - self._last[0]) * 100, 1)
        self._last = (now, used)
        events = self._flat("memory.events")
        return {
            "cpu_percent": percent,
            "cpu_usage_seconds": used / 1e6,
            "cpu_throttled_count": cpu.get("nr_throttled", 0),
            "cpu_throttled_seconds": cpu.get("throttled_usec", 0) / 1e6,
            "memory_current": self._number("memory.current"),
            "memory_peak": self._number("memory.peak"),
            "oom_kills": events.get("oom_kill", 0),
            "memory_high_events": events.get("high", 0),
            **self._io(),
            "pids_current": self._number("pids.current"),
        }

    def _flat(self, name: str) -> dict[str, int]:
        try:
            return self.group.flat(name)
        except (OSError, ValueError):
            return {}

    def _number(self, name: str) -> int | None:
        try:
            return int(self.group.read(name))
        except (OSError, ValueError):
            return None  # e.g. memory.peak before Linux 5.19

    def _io(self) -> dict[str, int]:
        totals = {"io_read_bytes": 0, "io_write_bytes": 0}
        try:
            text = self.group.read("io.stat")
        except OSError:
            return totals
        for line in text.splitlines():
            stats = dict(item.split("=", 1) for item in line.split()[1:])
            totals["io_read_bytes"] += int(stats.get("rbytes", 0))
            totals["io_write_bytes"] += int(stats.get("wbytes", 0))
        return totals
