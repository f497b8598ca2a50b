"""Isolation modes against a fake delegated cgroup, a fake /proc and a fake /sys."""

import asyncio
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from moltbotd.config import CpuLimits, IoLimits, Limits, MemoryLimits
from moltbotd.isolation import policy as isolation_module
from moltbotd.isolation.cgroups import CgroupError, Group
from moltbotd.isolation.limits import files_for, resolve
from moltbotd.isolation.policy import Isolation, release
from moltbotd.logs import configure

ADVICE = "run moltbotd under systemd with Delegate=yes (the shipped unit does)"
SERVICE = "system.slice/moltbotd.service"


def resolved(**sections: object) -> Limits:
    """Limits as the supervisor hands them on: auto memory made bytes (4 GiB, 2 models)."""
    return resolve(Limits(**sections), 4 * 2**30, 2)[0]  # type: ignore[arg-type]


IO_LIMITS = resolved(io=IoLimits(read_bps=10_000_000, write_iops=100, device="auto"))


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """structlog's configuration is global: give it back as it was after each test."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def logs() -> io.StringIO:
    stream = io.StringIO()
    configure("text", "debug", 100, stream)
    return stream


def levels(stream: io.StringIO, level: str) -> list[str]:
    """The messages logged at `level` (the part after '[LEVEL] [component] ')."""
    tag = f"] [{level}] [isolation] "
    return [line.split(tag, 1)[1] for line in stream.getvalue().splitlines() if tag in line]


class Host:
    """A fake cgroupfs mounted at root/cgroupfs, /proc naming the daemon's group, /sys."""

    def __init__(self, root: Path, controllers: str = "cpuset cpu io memory pids") -> None:
        self.mount = root / "cgroupfs"
        self.group = self.mount / SERVICE
        self.group.mkdir(parents=True)
        (self.group / "cgroup.controllers").write_text(controllers + "\n")
        (self.group / "cgroup.subtree_control").write_text("")
        (self.group / "cgroup.procs").write_text("4242\n")
        self.proc = root / "proc"
        (self.proc / "self").mkdir(parents=True)
        (self.proc / "self" / "mountinfo").write_text(
            "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
            f"30 24 0:26 / {self.mount} rw,nosuid,nodev,noexec,relatime shared:4"
            " - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
        )
        (self.proc / "self" / "cgroup").write_text(f"0::/{SERVICE}\n")
        self.sys = root / "sys"
        (self.sys / "dev" / "block").mkdir(parents=True)
        self.models_dir = root / "models"
        self.models_dir.mkdir()

    def establish(self, mode: str) -> Isolation:
        return Isolation.establish(mode, self.models_dir, proc=self.proc, sys_root=self.sys)

    def add_disk(self, disk: str = "259:99") -> str:
        """Put models_dir on a partition of the fake disk `disk`; returns the disk number."""
        dev = os.stat(self.models_dir).st_dev
        number = f"{os.major(dev)}:{os.minor(dev)}"
        vda = self.sys / "devices" / "virtual" / "block" / "vda"
        (vda / "vda1").mkdir(parents=True)
        (vda / "dev").write_text(f"{disk}\n")
        (vda / "vda1" / "dev").write_text(f"{number}\n")
        (vda / "vda1" / "partition").write_text("1\n")
        links = self.sys / "dev" / "block"
        (links / number).symlink_to(os.path.relpath(vda / "vda1", links))
        return disk


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def partial_host(tmp_path: Path) -> Host:
    return Host(tmp_path, controllers="pids")


# --- establish() ------------------------------------------------------------------------------


def test_off_never_reads_proc(tmp_path, logs):
    isolation = Isolation.establish("off", tmp_path, proc=tmp_path / "no-proc")
    assert not isolation.enforced
    assert isolation.subtree is None
    assert isolation.reason == "isolation is off in the config"
    assert isolation.status() == {
        "mode": "off",
        "enforced": False,
        "reason": "isolation is off in the config",
        "cgroup": None,
    }
    assert logs.getvalue() == ""


def test_off_places_nothing(tmp_path):
    isolation = Isolation.establish("off", tmp_path, proc=tmp_path / "no-proc")
    assert isolation.place("demo", "v1.0", resolved(cpu=CpuLimits(quota=1.5))) is None


def test_best_effort_without_controllers_warns_once(partial_host, logs):
    isolation = partial_host.establish("best-effort")
    reason = (
        "the cpu, memory and io controllers are not available to moltbotd's cgroup"
        f" {partial_host.group}: {ADVICE}"
    )
    assert not isolation.enforced
    assert isolation.reason == reason
    assert isolation.status() == {
        "mode": "best-effort",
        "enforced": False,
        "reason": reason,
        "cgroup": None,
    }
    assert levels(logs, "WARNING") == [
        f"running without resource limits (isolation: best-effort): {reason}"
    ]
    assert len(logs.getvalue().splitlines()) == 1
    # nothing was touched
    assert not (partial_host.group / "supervisor").exists()
    assert (partial_host.group / "cgroup.subtree_control").read_text() == ""
    assert isolation.place("demo", "v1.0", resolved()) is None


def test_best_effort_joins_several_problems(partial_host, logs):
    (partial_host.group / "cgroup.procs").unlink()  # root may write anything: see test_cgroups
    isolation = partial_host.establish("best-effort")
    assert isolation.reason == (
        "the cpu, memory and io controllers are not available to moltbotd's cgroup"
        f" {partial_host.group}: {ADVICE}; moltbotd may not write cgroup.procs in"
        f" {partial_host.group}: {ADVICE}"
    )
    assert len(levels(logs, "WARNING")) == 1


def test_best_effort_without_a_cgroup2_mount(host, logs):
    (host.proc / "self" / "mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n"
    )
    isolation = host.establish("best-effort")
    assert not isolation.enforced
    assert isolation.reason == (
        "no cgroup v2 hierarchy is mounted (this needs a unified cgroup v2 host)"
    )
    assert len(levels(logs, "WARNING")) == 1


def test_best_effort_without_proc(tmp_path, logs):
    isolation = Isolation.establish("best-effort", tmp_path, proc=tmp_path / "no-proc")
    assert not isolation.enforced
    assert isolation.reason is not None
    assert "No such file or directory" in isolation.reason
    assert str(tmp_path / "no-proc" / "self" / "mountinfo") in isolation.reason
    assert len(levels(logs, "WARNING")) == 1


def test_strict_without_controllers_refuses(partial_host, logs):
    with pytest.raises(CgroupError) as caught:
        partial_host.establish("strict")
    assert str(caught.value) == (
        "isolation: strict, but the cpu, memory and io controllers are not available to"
        f" moltbotd's cgroup {partial_host.group}: {ADVICE}"
    )
    assert not (partial_host.group / "supervisor").exists()


def test_strict_without_a_cgroup_v2_entry_refuses(host):
    (host.proc / "self" / "cgroup").write_text(f"1:name=systemd:/{SERVICE}\n")
    with pytest.raises(CgroupError) as caught:
        host.establish("strict")
    assert str(caught.value) == (
        f"isolation: strict, but {host.proc}/self/cgroup has no cgroup v2 entry (0::)"
    )


@pytest.mark.parametrize("mode", ["strict", "best-effort"])
def test_a_delegated_group_is_taken_over(host, logs, mode):
    (host.group / "model-old-v1").mkdir()  # left by a daemon that was killed
    (host.group / "other").mkdir()
    isolation = host.establish(mode)
    assert isolation.enforced
    assert isolation.reason is None
    assert isolation.subtree is not None
    assert isolation.subtree.path == host.group
    assert (host.group / "supervisor").is_dir()
    assert (host.group / "supervisor" / "cgroup.procs").read_text() == "4242"
    assert (host.group / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"
    assert not (host.group / "model-old-v1").exists()
    assert (host.group / "other").is_dir()
    assert isolation.status() == {
        "mode": mode,
        "enforced": True,
        "reason": None,
        "cgroup": str(host.group),
    }
    assert levels(logs, "WARNING") == [
        f"removing {host.group / 'model-old-v1'}, left by a daemon that did not stop cleanly"
    ]
    assert levels(logs, "INFO") == [f"resource limits enforced in {host.group}"]


def test_best_effort_when_taking_over_fails(host, logs):
    """best-effort promises a WARNING and no limits, not a crash, whatever goes wrong.

    problems() only checks os.access(), which is True for root on any file: a write that
    still fails (here subtree_control is a directory) must not escape as an OSError.
    """
    (host.group / "cgroup.subtree_control").unlink()
    (host.group / "cgroup.subtree_control").mkdir()
    isolation = host.establish("best-effort")
    assert not isolation.enforced
    assert isolation.reason is not None
    assert "cgroup.subtree_control" in isolation.reason
    assert len(levels(logs, "WARNING")) == 1


def test_strict_when_taking_over_fails(host):
    """daemon.py turns only a CgroupError into 'cannot start: ...' and its exit status."""
    (host.group / "cgroup.subtree_control").unlink()
    (host.group / "cgroup.subtree_control").mkdir()
    with pytest.raises(CgroupError) as caught:
        host.establish("strict")
    assert str(caught.value).startswith("isolation: strict, but ")
    assert "cgroup.subtree_control" in str(caught.value)


# --- place(), apply() -------------------------------------------------------------------------


def test_place_writes_the_limits(host):
    isolation = host.establish("strict")
    limits = resolved(cpu=CpuLimits(quota=1.5), memory=MemoryLimits(limit=512 * 2**20))
    group = isolation.place("demo", "v1.0", limits)
    assert group == Group(host.group / "model-demo-v1.0")
    assert group.path.is_dir()
    expected = files_for(limits, None)
    assert {name: (group.path / name).read_text() for name in expected} == expected
    assert (group.path / "cpu.max").read_text() == "150000 100000"
    assert (group.path / "memory.max").read_text() == "536870912"
    assert not (group.path / "io.max").exists()


def test_place_sanitizes_the_name(host):
    isolation = host.establish("strict")
    group = isolation.place("a/b", "v1", resolved())
    assert group is not None
    assert group.path == host.group / "model-a_b-v1"
    assert (group.path / "cpu.max").read_text() == "max 100000"


def test_apply_rewrites_the_limits(host):
    isolation = host.establish("strict")
    group = isolation.place("demo", "v1.0", resolved(cpu=CpuLimits(quota=1.5)))
    assert group is not None
    isolation.apply(group, resolved(cpu=CpuLimits(quota=0.2)))
    assert (group.path / "cpu.max").read_text() == "20000 100000"


@pytest.mark.parametrize("mode", ["strict", "best-effort"])
def test_place_with_io_limits_on_the_models_disk(host, mode):
    host.add_disk("259:99")
    isolation = host.establish(mode)
    group = isolation.place("demo", "v1.0", IO_LIMITS)
    assert group is not None
    assert (group.path / "io.max").read_text() == (
        "259:99 rbps=10000000 wbps=max riops=max wiops=100"
    )


def test_io_limits_off_a_block_device_in_best_effort(host, logs):
    isolation = host.establish("best-effort")
    group = isolation.place("demo", "v1.0", IO_LIMITS)
    assert group is not None
    assert not (group.path / "io.max").exists()
    assert (group.path / "cpu.max").read_text() == "max 100000"  # the rest is in force
    dev = os.stat(host.models_dir).st_dev
    assert levels(logs, "WARNING") == [
        f"io limits not applied: {host.models_dir} is not on a block device"
        f" ({os.major(dev)}:{os.minor(dev)}): io limits need a disk"
    ]


def test_io_limits_off_a_block_device_in_strict(host):
    isolation = host.establish("strict")
    with pytest.raises(CgroupError) as caught:
        isolation.place("demo", "v1.0", IO_LIMITS)
    dev = os.stat(host.models_dir).st_dev
    assert str(caught.value) == (
        f"cannot apply io limits: {host.models_dir} is not on a block device"
        f" ({os.major(dev)}:{os.minor(dev)}): io limits need a disk"
    )


def test_io_limits_on_a_missing_device_in_strict(host):
    isolation = host.establish("strict")
    limits = resolved(io=IoLimits(read_bps=1, device=str(host.models_dir / "no-such-device")))
    with pytest.raises(CgroupError, match=r"^cannot apply io limits: .*No such file"):
        isolation.place("demo", "v1.0", limits)


def test_no_io_limits_need_no_disk(host, logs):
    isolation = host.establish("strict")
    group = isolation.place("demo", "v1.0", resolved(io=IoLimits(device="/dev/nowhere")))
    assert group is not None
    assert not (group.path / "io.max").exists()
    assert levels(logs, "WARNING") == []


# --- usage(), forget(), release() -------------------------------------------------------------


def test_usage_measures_cpu_between_calls(host, monkeypatch):
    isolation = host.establish("strict")
    group = isolation.place("demo", "v1.0", resolved())
    assert group is not None
    (group.path / "cpu.stat").write_text("usage_usec 1000000\nnr_throttled 2\n")
    (group.path / "memory.current").write_text("4096\n")
    (group.path / "memory.events").write_text("high 3\noom_kill 1\n")
    (group.path / "pids.current").write_text("5\n")
    clock = iter([100.0, 101.0])
    monkeypatch.setattr(isolation_module.time, "monotonic", lambda: next(clock))
    first = isolation.usage(group)
    assert first == {
        "cpu_percent": None,
        "cpu_usage_seconds": 1.0,
        "cpu_throttled_count": 2,
        "cpu_throttled_seconds": 0.0,
        "memory_current": 4096,
        "memory_peak": None,
        "oom_kills": 1,
        "memory_high_events": 3,
        "io_read_bytes": 0,
        "io_write_bytes": 0,
        "pids_current": 5,
    }
    (group.path / "cpu.stat").write_text("usage_usec 1500000\nnr_throttled 2\n")
    assert isolation.usage(group)["cpu_percent"] == 50.0


def test_forget_removes_the_group(host):
    isolation = host.establish("strict")
    assert isolation.subtree is not None
    group = isolation.subtree.group("demo", "v1.0")  # empty: a fake dir with files stays
    isolation.usage(group)
    assert group.path in isolation._usage
    asyncio.run(isolation.forget(group))
    assert not group.path.exists()
    assert isolation._usage == {}


def test_forget_a_group_already_gone(host):
    isolation = host.establish("strict")
    asyncio.run(isolation.forget(Group(host.group / "model-demo-v1.0")))
    assert not (host.group / "model-demo-v1.0").exists()


def test_release_leaves_a_group_a_new_worker_was_placed_in(tmp_path):
    """A version spawned again while its old group was being removed: the group is left
    alone, its new worker not killed (cgroup.kill is never written)."""
    where = tmp_path / "model-demo-v1.0"
    where.mkdir()
    (where / "cgroup.kill").write_text("")
    asyncio.run(release(Group(where), unused=lambda: False))
    assert (where / "cgroup.kill").read_text() == ""


def test_release_gives_up_with_an_error(tmp_path, logs):
    where = tmp_path / "model-demo-v1.0"
    where.mkdir()
    (where / "cgroup.kill").write_text("")
    asyncio.run(release(Group(where), patience=-1.0))  # past the deadline at the first failure
    assert where.is_dir()
    assert (where / "cgroup.kill").read_text() == "1"
    assert levels(logs, "ERROR") == [
        f"giving up on a cgroup: cannot remove {where}: Directory not empty"
    ]
