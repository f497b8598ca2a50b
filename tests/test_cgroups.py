"""The cgroup v2 file interface, against a fake cgroupfs and a fake /proc in tmp_path.

The host running the tests has no usable cgroup v2 controllers, so every file the kernel
would provide (cgroup.controllers, cgroup.procs, ...) is a plain file made by the test.
"""

import errno
import os
from pathlib import Path

import pytest

from moltbotd.isolation import cgroups
from moltbotd.isolation.cgroups import CgroupError, Group, Subtree, group_name, own_group, problems

ADVICE = "run moltbotd under systemd with Delegate=yes (the shipped unit does)"
SERVICE = "system.slice/moltbotd.service"


def fake_proc(root: Path, mount: Path, cgroup_line: str = f"0::/{SERVICE}") -> Path:
    """/proc/self/mountinfo with a cgroup v1 and a cgroup2 mount, and /proc/self/cgroup."""
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
        "25 22 0:23 / /sys/fs/cgroup/cpu rw,nosuid shared:9 - cgroup cgroup rw,cpu\n"
        f"30 24 0:26 / {mount} rw,nosuid,nodev,noexec,relatime shared:4"
        " - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
        "31 22 254:0 / /srv rw,relatime shared:1 - ext4 /dev/vda rw\n"
    )
    (proc / "self" / "cgroup").write_text(f"1:name=systemd:/{SERVICE}\n{cgroup_line}\n")
    return proc


def fake_group(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> Path:
    """The daemon's own group in a fake cgroupfs mounted at root/cgroupfs."""
    group = root / "cgroupfs" / SERVICE
    group.mkdir(parents=True)
    (group / "cgroup.controllers").write_text(controllers + "\n")
    (group / "cgroup.subtree_control").write_text("")
    (group / "cgroup.procs").write_text("")
    return group


# --- own_group() ------------------------------------------------------------------------------


def test_own_group_joins_the_cgroup2_mount_and_the_0_line(tmp_path):
    mount = tmp_path / "cgroupfs"
    proc = fake_proc(tmp_path, mount)
    assert own_group(proc) == mount / "system.slice" / "moltbotd.service"


def test_own_group_of_another_process_reads_its_cgroup_file(tmp_path):
    mount = tmp_path / "cgroupfs"
    proc = fake_proc(tmp_path, mount)
    (proc / "4242").mkdir()
    (proc / "4242" / "cgroup").write_text(f"0::/{SERVICE}/model-demo-v1\n")
    assert own_group(proc, pid=4242) == mount / SERVICE / "model-demo-v1"
    (proc / "4243").mkdir()
    (proc / "4243" / "cgroup").write_text("1:name=systemd:/\n")
    with pytest.raises(CgroupError, match=r"/4243/cgroup has no cgroup v2 entry"):
        own_group(proc, pid=4243)


def test_own_group_in_the_root_group_is_the_mount_point(tmp_path):
    mount = tmp_path / "cgroupfs"
    proc = fake_proc(tmp_path, mount, cgroup_line="0::/")
    assert own_group(proc) == mount


def test_own_group_without_a_cgroup2_mount(tmp_path):
    proc = fake_proc(tmp_path, tmp_path / "cgroupfs")
    mountinfo = proc / "self" / "mountinfo"
    v1_only = [line for line in mountinfo.read_text().splitlines() if "cgroup2" not in line]
    mountinfo.write_text("\n".join(v1_only) + "\n")
    with pytest.raises(CgroupError) as caught:
        own_group(proc)
    assert str(caught.value) == (
        "no cgroup v2 hierarchy is mounted (this needs a unified cgroup v2 host)"
    )


def test_own_group_without_a_0_line(tmp_path):
    proc = fake_proc(tmp_path, tmp_path / "cgroupfs")
    (proc / "self" / "cgroup").write_text(f"1:name=systemd:/{SERVICE}\n4:memory:/{SERVICE}\n")
    with pytest.raises(CgroupError) as caught:
        own_group(proc)
    assert str(caught.value) == f"{proc}/self/cgroup has no cgroup v2 entry (0::)"


def test_own_group_without_proc_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        own_group(tmp_path / "no-proc")


# --- problems() -------------------------------------------------------------------------------


def test_no_problems_with_every_controller_and_writable_files(tmp_path):
    assert problems(fake_group(tmp_path)) == []


@pytest.mark.parametrize(
    ("controllers", "missing"),
    [
        ("pids", "the cpu, memory and io controllers are"),
        ("io pids", "the cpu and memory controllers are"),
        ("cpu memory pids", "the io controller is"),
        ("", "the cpu, memory, io and pids controllers are"),
    ],
)
def test_missing_controllers_make_one_message_naming_them(tmp_path, controllers, missing):
    group = fake_group(tmp_path, controllers=controllers)
    assert problems(group) == [f"{missing} not available to moltbotd's cgroup {group}: {ADVICE}"]


def test_only_the_needed_controllers_count(tmp_path):
    group = fake_group(tmp_path, controllers="memory")
    assert problems(group, needed=("memory",)) == []


def test_unreadable_controllers_file(tmp_path):
    group = fake_group(tmp_path)
    (group / "cgroup.controllers").unlink()
    (group / "cgroup.procs").unlink()  # only the first problem: nothing else can be judged
    assert problems(group) == [
        f"cannot read {group}/cgroup.controllers (No such file or directory): {ADVICE}"
    ]


def test_controllers_file_that_is_a_directory(tmp_path):
    group = fake_group(tmp_path)
    (group / "cgroup.controllers").unlink()
    (group / "cgroup.controllers").mkdir()
    assert problems(group) == [f"cannot read {group}/cgroup.controllers (Is a directory): {ADVICE}"]


# The tests run as root, for whom os.access(W_OK) is True even on a 0o444 file
# (CAP_DAC_OVERRIDE), so an unwritable interface file is simulated by a missing one.


def test_unwritable_cgroup_procs(tmp_path):
    group = fake_group(tmp_path)
    (group / "cgroup.procs").unlink()
    assert problems(group) == [f"moltbotd may not write cgroup.procs in {group}: {ADVICE}"]


def test_unwritable_subtree_control_and_procs(tmp_path):
    group = fake_group(tmp_path)
    (group / "cgroup.procs").unlink()
    (group / "cgroup.subtree_control").unlink()
    assert problems(group) == [
        f"moltbotd may not write cgroup.subtree_control or cgroup.procs in {group}: {ADVICE}"
    ]


def test_missing_controllers_and_unwritable_files_are_both_reported(tmp_path):
    group = fake_group(tmp_path, controllers="cpu memory pids")
    (group / "cgroup.subtree_control").unlink()
    assert problems(group) == [
        f"the io controller is not available to moltbotd's cgroup {group}: {ADVICE}",
        f"moltbotd may not write cgroup.subtree_control in {group}: {ADVICE}",
    ]


# --- group_name() -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [
        ("demo", "v1.0", "model-demo-v1.0"),
        ("a/b", "v1", "model-a_b-v1"),
        ("My_Model", "2024-01", "model-My_Model-2024--01"),
        ("x y", "v 1\n", "model-x_y-v_1_"),
        ("../..", "v1", "model-.._..-v1"),
    ],
)
def test_group_name(model, version, expected):
    assert group_name(model, version) == expected


def test_group_names_of_different_versions_never_collide():
    assert group_name("a-b", "c") == "model-a--b-c"
    assert group_name("a", "b-c") == "model-a-b--c"


def test_a_job_group_is_beside_its_version_and_never_a_version_group(tmp_path):
    subtree = Subtree(fake_group(tmp_path))
    job = subtree.group("a", "v1", "convert")
    assert job.path.name == "model-a-v1-convert"
    assert group_name("a", "v1-convert") == "model-a-v1--convert"  # a version never meets it
    assert job in subtree.stale_groups()  # a killed daemon's job group is removed at start


def test_group_name_is_one_directory_level():
    assert "/" not in group_name("../../etc", "v/1")


# --- Subtree ----------------------------------------------------------------------------------


def test_take_over_moves_every_process_and_enables_controllers(tmp_path, monkeypatch):
    group = fake_group(tmp_path)
    (group / "cgroup.procs").write_text("101\n202\n")
    writes: list[tuple[Path, str]] = []
    real_write = cgroups._write

    def record(file: Path, value: str) -> None:
        writes.append((file, value))
        real_write(file, value)

    monkeypatch.setattr(cgroups, "_write", record)
    Subtree(group).take_over()
    supervisor = group / "supervisor"
    assert supervisor.is_dir()
    # one write per pid, in order, then the controllers in one write
    assert writes == [
        (supervisor / "cgroup.procs", "101"),
        (supervisor / "cgroup.procs", "202"),
        (group / "cgroup.subtree_control", "+cpu +memory +io +pids"),
    ]
    # a plain file keeps only the last write (the kernel would have moved both)
    assert (supervisor / "cgroup.procs").read_text() == "202"
    assert (group / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"


def test_take_over_twice_reuses_supervisor(tmp_path):
    group = fake_group(tmp_path)
    (group / "cgroup.procs").write_text("7\n")
    Subtree(group).take_over()
    Subtree(group).take_over(controllers=("cpu", "memory"))
    assert (group / "supervisor" / "cgroup.procs").read_text() == "7"
    assert (group / "cgroup.subtree_control").read_text() == "+cpu +memory"


def test_take_over_ignores_processes_that_exited(tmp_path, monkeypatch):
    group = fake_group(tmp_path)
    (group / "cgroup.procs").write_text("101\n202\n")
    written: list[str] = []
    real_write = cgroups._write

    def vanishing(file: Path, value: str) -> None:
        if value == "101":
            raise ProcessLookupError(errno.ESRCH, "No such process")
        written.append(value)
        real_write(file, value)

    monkeypatch.setattr(cgroups, "_write", vanishing)
    Subtree(group).take_over()
    assert written == ["202", "+cpu +memory +io +pids"]


def test_stale_groups_are_the_model_directories_only(tmp_path):
    group = fake_group(tmp_path)
    for name in ("model-b-v2", "model-a-v1", "supervisor", "other", "models"):
        (group / name).mkdir()
    (group / "model-file").write_text("not a group")
    assert Subtree(group).stale_groups() == [
        Group(group / "model-a-v1"),
        Group(group / "model-b-v2"),
    ]


def test_no_stale_groups(tmp_path):
    assert Subtree(fake_group(tmp_path)).stale_groups() == []


def test_subtree_group_creates_the_directory(tmp_path):
    group = fake_group(tmp_path)
    made = Subtree(group).group("a/b", "v1")
    assert made == Group(group / "model-a_b-v1")
    assert made.path.is_dir()
    assert Subtree(group).group("a/b", "v1") == made  # exists already: fine


# --- Group ------------------------------------------------------------------------------------


def test_write_sets_each_file(tmp_path):
    group = Group(tmp_path)
    group.write({"cpu.max": "150000 100000", "memory.max": "max"})
    assert (tmp_path / "cpu.max").read_text() == "150000 100000"
    assert (tmp_path / "memory.max").read_text() == "max"


def test_write_error_names_the_file_and_value(tmp_path):
    where = tmp_path / "gone" / "model-demo-v1.0"
    with pytest.raises(CgroupError) as caught:
        Group(where).write({"cpu.max": "150000 100000"})
    assert str(caught.value) == (
        f"cannot set {where}/cpu.max to '150000 100000': No such file or directory"
    )


def test_write_stops_at_the_first_failing_file(tmp_path):
    (tmp_path / "memory.max").mkdir()  # opening it for writing fails
    with pytest.raises(CgroupError) as caught:
        Group(tmp_path).write({"cpu.max": "max 100000", "memory.max": "1024", "pids.max": "8"})
    assert str(caught.value) == f"cannot set {tmp_path}/memory.max to '1024': Is a directory"
    assert (tmp_path / "cpu.max").read_text() == "max 100000"
    assert not (tmp_path / "pids.max").exists()


def test_add_and_read(tmp_path):
    group = Group(tmp_path)
    group.add(4242)
    assert group.read("cgroup.procs") == "4242"


def test_flat(tmp_path):
    (tmp_path / "cpu.stat").write_text(
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n\nnr_throttled 3\n"
    )
    assert Group(tmp_path).flat("cpu.stat") == {
        "usage_usec": 1500000,
        "user_usec": 1000000,
        "system_usec": 500000,
        "nr_throttled": 3,
    }


def test_flat_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Group(tmp_path).flat("cpu.stat")


def test_oom_kills(tmp_path):
    (tmp_path / "memory.events").write_text(
        "low 0\nhigh 12\nmax 4\noom 3\noom_kill 2\noom_group_kill 1\n"
    )
    assert Group(tmp_path).oom_kills() == 2


def test_oom_kills_without_the_file_is_zero(tmp_path):
    assert Group(tmp_path).oom_kills() == 0


def test_oom_kills_without_the_key_is_zero(tmp_path):
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\n")
    assert Group(tmp_path).oom_kills() == 0


def test_remove_an_empty_group(tmp_path):
    where = tmp_path / "model-demo-v1.0"
    where.mkdir()
    Group(where).remove()
    assert not where.exists()


def test_remove_a_missing_group_is_fine(tmp_path):
    Group(tmp_path / "model-demo-v1.0").remove()
    assert not (tmp_path / "model-demo-v1.0").exists()


def test_remove_writes_cgroup_kill_first(tmp_path):
    # A fake group keeps its files, so rmdir fails (ENOTEMPTY) after the kill is written.
    where = tmp_path / "model-demo-v1.0"
    where.mkdir()
    (where / "cgroup.kill").write_text("")
    with pytest.raises(CgroupError) as caught:
        Group(where).remove()
    assert (where / "cgroup.kill").read_text() == "1"
    assert str(caught.value) == f"cannot remove {where}: {os.strerror(errno.ENOTEMPTY)}"
    assert "processes are still inside" not in str(caught.value)


def test_remove_without_cgroup_kill_does_not_create_it(tmp_path):
    where = tmp_path / "model-demo-v1.0"
    where.mkdir()
    Group(where).remove()
    assert not where.exists()
    assert not (tmp_path / "cgroup.kill").exists()


def test_remove_ignores_a_failing_kill(tmp_path):
    where = tmp_path / "model-demo-v1.0"
    (where / "cgroup.kill").mkdir(parents=True)  # the write fails; rmdir then says why
    with pytest.raises(CgroupError) as caught:
        Group(where).remove()
    assert str(caught.value) == f"cannot remove {where}: {os.strerror(errno.ENOTEMPTY)}"


def test_remove_busy_group_says_processes_are_inside(tmp_path, monkeypatch):
    where = tmp_path / "model-demo-v1.0"
    where.mkdir()

    def busy(self: Path) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))

    monkeypatch.setattr(Path, "rmdir", busy)
    with pytest.raises(CgroupError) as caught:
        Group(where).remove()
    assert str(caught.value) == f"cannot remove {where}: processes are still inside"
