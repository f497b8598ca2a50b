"""Limits: config parsing, the cgroup files they write, the disk lookup, and usage counters."""

import os
from pathlib import Path

import pytest

from moltbotd.config import (
    ConfigError,
    CpuLimits,
    IoLimits,
    Limits,
    MemoryLimits,
    Overrides,
    PidsLimits,
    load,
    parse_model_yaml,
    parse_overrides,
)
from moltbotd.isolation.cgroups import Group
from moltbotd.isolation.limits import (
    Usage,
    describe,
    disk_of,
    files_for,
    has_io_limits,
    host_memory,
    intra_op_threads,
    memory_limit_text,
    resolve,
)
from moltbotd.wire.units import plural

MiB = 2**20
GiB = 2**30

UNLIMITED = Limits(memory=MemoryLimits(limit=None, high=None))  # max everywhere
FULL = Limits(
    cpu=CpuLimits(quota=1.5, period=0.1, weight=200),
    memory=MemoryLimits(limit=512 * MiB, high=400 * MiB, swap=0),
    io=IoLimits(read_bps=10_000_000, write_bps=5_000_000, read_iops=None, write_iops=100),
    pids=PidsLimits(max=64),
)


# --- files_for() ------------------------------------------------------------------------------


def test_files_for_unlimited_writes_max_everywhere():
    assert files_for(UNLIMITED, None) == {
        "cpu.max": "max 100000",
        "cpu.weight": "100",
        "memory.max": "max",
        "memory.high": "max",
        "memory.swap.max": "max",
        "memory.oom.group": "1",
        "pids.max": "max",
    }


def test_files_for_defaults_with_a_device_writes_unlimited_io():
    assert files_for(UNLIMITED, "254:0")["io.max"] == (
        "254:0 rbps=max wbps=max riops=max wiops=max"
    )


def test_files_for_a_full_config():
    assert files_for(FULL, "254:0") == {
        "cpu.max": "150000 100000",
        "cpu.weight": "200",
        "memory.max": "536870912",
        "memory.high": str(400 * MiB),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "64",
        "io.max": "254:0 rbps=10000000 wbps=5000000 riops=max wiops=100",
    }


def test_files_for_without_a_device_has_no_io_max():
    assert "io.max" not in files_for(FULL, None)


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        (0.2, 0.1, "20000 100000"),
        (1.5, 0.05, "75000 50000"),
        (None, 0.05, "max 50000"),
        (0.01, 0.001, "10 1000"),
        (4.0, 1.0, "4000000 1000000"),
    ],
)
def test_cpu_max(quota, period, expected):
    limits = Limits(cpu=CpuLimits(quota=quota, period=period), memory=UNLIMITED.memory)
    assert files_for(limits, None)["cpu.max"] == expected


def test_has_io_limits():
    assert not has_io_limits(Limits())
    assert not has_io_limits(Limits(io=IoLimits(device="/dev/vda")))
    assert has_io_limits(FULL)
    assert has_io_limits(Limits(io=IoLimits(read_bps=1)))
    assert has_io_limits(Limits(io=IoLimits(write_bps=1)))
    assert has_io_limits(Limits(io=IoLimits(read_iops=1)))
    assert has_io_limits(Limits(io=IoLimits(write_iops=1)))


# --- intra_op_threads() -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "quota", "expected"),
    [
        (3, 1.5, 3),  # an explicit setting wins
        (8, None, 8),
        (None, 1.5, 2),
        (None, 2.0, 2),
        (None, 0.2, 1),
        (None, 0.01, 1),
        (None, None, 1),
    ],
)
def test_intra_op_threads(configured, quota, expected):
    assert intra_op_threads(configured, Limits(cpu=CpuLimits(quota=quota))) == expected


# --- describe(), memory_limit_text() ----------------------------------------------------------


def test_describe_unlimited():
    assert describe(UNLIMITED) == {
        "memory_auto": None,
        "cpu_quota_percent": None,
        "cpu_period_ms": 100.0,
        "cpu_weight": None,
        "memory_max": None,
        "memory_high": None,
        "memory_swap_max": None,
        "io_read_bps": None,
        "io_write_bps": None,
        "io_read_iops": None,
        "io_write_iops": None,
        "pids_max": None,
    }


def test_describe_full():
    limits = Limits(
        cpu=CpuLimits(quota=1.5, period=0.05, weight=200),
        memory=FULL.memory,
        io=FULL.io,
        pids=FULL.pids,
    )
    assert describe(limits, "auto: how") == {
        "memory_auto": "auto: how",
        "cpu_quota_percent": 150.0,
        "cpu_period_ms": 50.0,
        "cpu_weight": 200,
        "memory_max": 512 * MiB,
        "memory_high": 400 * MiB,
        "memory_swap_max": 0,
        "io_read_bps": 10_000_000,
        "io_write_bps": 5_000_000,
        "io_read_iops": None,
        "io_write_iops": 100,
        "pids_max": 64,
    }


def test_describe_rounds_the_quota_percent():
    assert describe(Limits(cpu=CpuLimits(quota=1 / 3)))["cpu_quota_percent"] == 33.3


def test_auto_memory_is_an_equal_share_of_80_percent_of_the_host():
    limits, how = resolve(Limits(), 10 * GiB, 4)
    assert limits.memory == MemoryLimits(limit=2 * GiB, high=None, swap=None)
    assert how == "auto: 80% of the host's 10.0GiB over 4 models"
    assert files_for(limits, None)["memory.max"] == str(2 * GiB)
    assert resolve(Limits(), 10 * GiB, 0)[0].memory.limit == 8 * GiB  # one model at least
    assert resolve(Limits(), 3 * GiB + 12345, 1)[0].memory.limit % MiB == 0  # whole MiB


def test_an_explicit_or_unlimited_memory_limit_is_left_as_it_is():
    explicit = Limits(memory=MemoryLimits(limit=1 * GiB, high=900 * MiB))
    assert resolve(explicit, 64 * GiB, 2) == (explicit, None)
    assert resolve(UNLIMITED, 64 * GiB, 2) == (UNLIMITED, None)


def test_files_for_refuses_limits_left_auto():
    with pytest.raises(ValueError, match="resolve"):
        files_for(Limits(), None)


def test_memory_auto_max_or_a_size_load(tmp_path):
    text = "limits:\n  memory: {limit: max, high: 1GiB}\nmodels:\n  a:\n    limits:\n" \
           "      memory: {limit: auto}\n"  # fmt: skip
    config = load(write_config(tmp_path, text))
    assert (config.limits.memory.limit, config.limits.memory.high) == (None, GiB)
    assert Limits().memory.high is None  # memory.high unset: killed at the limit, not slowed
    assert config.limits_for("a", Overrides()).memory.limit == "auto"
    with pytest.raises(ConfigError, match=r"limits.memory.limit: expected a size"):
        load(write_config(tmp_path, "limits:\n  memory: {limit: lots}\n"))


def test_host_memory_reads_memtotal(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2030580 kB\nMemFree:  1 kB\n")
    assert host_memory(meminfo) == 2030580 * 1024
    meminfo.write_text("MemFree:  1 kB\n")
    with pytest.raises(ValueError, match="has no MemTotal line"):
        host_memory(meminfo)
    assert host_memory() > 0  # this machine's


def test_memory_limit_text():
    assert memory_limit_text(UNLIMITED) == "max"
    assert memory_limit_text(FULL) == "512.0MiB"
    assert memory_limit_text(Limits(memory=MemoryLimits(limit=4 * GiB))) == "4.0GiB"


# --- disk_of() --------------------------------------------------------------------------------


def device_number(file: Path) -> str:
    dev = os.stat(file).st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def fake_sys(root: Path, number: str, partition: bool, disk: str = "259:99") -> Path:
    """/sys/dev/block/<number> as a link into /sys/devices, like the kernel's:
    254:1 -> ../../devices/.../block/vda/vda1, whose parent holds dev (the whole disk)."""
    sys_root = root / "sys"
    vda = sys_root / "devices" / "pci0000:00" / "0000:00:04.0" / "virtio2" / "block" / "vda"
    vda.mkdir(parents=True)
    (vda / "dev").write_text(f"{disk}\n")
    target = vda
    if partition:
        target = vda / "vda1"
        target.mkdir()
        (target / "partition").write_text("1\n")
        (target / "dev").write_text(f"{number}\n")
    links = sys_root / "dev" / "block"
    links.mkdir(parents=True)
    (links / number).symlink_to(os.path.relpath(target, links))
    return sys_root


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    file = tmp_path / "models" / "demo" / "v1" / "model.onnx"
    file.parent.mkdir(parents=True)
    file.write_bytes(b"onnx")
    return file


def test_disk_of_a_whole_disk(tmp_path, data_file):
    number = device_number(data_file)
    sys_root = fake_sys(tmp_path, number, partition=False)
    assert disk_of(data_file, sys_root) == number
    assert disk_of(data_file.parent, sys_root) == number


def test_disk_of_a_partition_is_its_disk(tmp_path, data_file):
    number = device_number(data_file)
    assert number != "259:99"
    sys_root = fake_sys(tmp_path, number, partition=True)
    assert (sys_root / "dev" / "block" / number).is_symlink()
    assert disk_of(data_file, sys_root) == "259:99"


def test_disk_of_a_non_block_device(tmp_path, data_file):
    number = device_number(data_file)
    sys_root = tmp_path / "sys"
    (sys_root / "dev" / "block").mkdir(parents=True)
    with pytest.raises(ValueError, match="io limits need a disk") as caught:
        disk_of(data_file, sys_root)
    assert str(caught.value) == (
        f"{data_file} is not on a block device ({number}): io limits need a disk"
    )


def test_disk_of_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        disk_of(tmp_path / "nowhere", tmp_path / "sys")


# --- Usage ------------------------------------------------------------------------------------


def write_counters(where: Path, usage_usec: int) -> None:
    (where / "cpu.stat").write_text(
        f"usage_usec {usage_usec}\nuser_usec 100\nsystem_usec 50\n"
        "nr_periods 40\nnr_throttled 7\nthrottled_usec 250000\n"
    )
    (where / "memory.current").write_text("104857600\n")
    (where / "memory.peak").write_text("209715200\n")
    (where / "memory.events").write_text(
        "low 0\nhigh 5\nmax 2\noom 1\noom_kill 1\noom_group_kill 1\n"
    )
    (where / "io.stat").write_text(
        "254:0 rbytes=1000 wbytes=2000 rios=10 wios=20 dbytes=0 dios=0\n"
        "8:16 rbytes=300 wbytes=40 rios=3 wios=4 dbytes=0 dios=0\n"
    )
    (where / "pids.current").write_text("9\n")


def test_usage_reads_every_counter(tmp_path):
    write_counters(tmp_path, usage_usec=2_000_000)
    assert Usage(Group(tmp_path)).read(now=10.0) == {
        "cpu_percent": None,
        "cpu_usage_seconds": 2.0,
        "cpu_throttled_count": 7,
        "cpu_throttled_seconds": 0.25,
        "memory_current": 104857600,
        "memory_peak": 209715200,
        "oom_kills": 1,
        "memory_high_events": 5,
        "io_read_bytes": 1300,
        "io_write_bytes": 2040,
        "pids_current": 9,
    }


def test_usage_cpu_percent_between_two_reads(tmp_path):
    write_counters(tmp_path, usage_usec=2_000_000)
    usage = Usage(Group(tmp_path))
    assert usage.read(now=10.0)["cpu_percent"] is None
    write_counters(tmp_path, usage_usec=2_500_000)
    second = usage.read(now=11.0)
    assert second["cpu_percent"] == 50.0
    assert second["cpu_usage_seconds"] == 2.5
    write_counters(tmp_path, usage_usec=5_500_000)
    assert usage.read(now=13.0)["cpu_percent"] == 150.0


def test_usage_cpu_percent_needs_time_to_pass(tmp_path):
    write_counters(tmp_path, usage_usec=2_000_000)
    usage = Usage(Group(tmp_path))
    usage.read(now=10.0)
    assert usage.read(now=10.0)["cpu_percent"] is None


def test_usage_without_memory_peak(tmp_path):
    write_counters(tmp_path, usage_usec=1)
    (tmp_path / "memory.peak").unlink()  # before Linux 5.19
    read = Usage(Group(tmp_path)).read(now=1.0)
    assert read["memory_peak"] is None
    assert read["memory_current"] == 104857600


def test_usage_of_an_empty_group(tmp_path):
    assert Usage(Group(tmp_path)).read(now=1.0) == {
        "cpu_percent": None,
        "cpu_usage_seconds": 0.0,
        "cpu_throttled_count": 0,
        "cpu_throttled_seconds": 0.0,
        "memory_current": None,
        "memory_peak": None,
        "oom_kills": 0,
        "memory_high_events": 0,
        "io_read_bytes": 0,
        "io_write_bytes": 0,
        "pids_current": None,
    }


def test_usage_with_an_empty_io_stat(tmp_path):
    (tmp_path / "io.stat").write_text("")
    read = Usage(Group(tmp_path)).read(now=1.0)
    assert (read["io_read_bytes"], read["io_write_bytes"]) == (0, 0)


# --- the `limits:` config section -------------------------------------------------------------

LIMITS_YAML = """\
limits:
  cpu: {quota: 150%, period: 100ms, weight: 200}
  memory: {limit: 4GiB, high: 3.5GiB, swap: 0}
  io: {read_bps: 10MB/s, write_bps: 5MB/s, read_iops: 100, write_iops: max, device: auto}
  pids: {max: 64}
"""


def write_config(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "moltbotd.yaml"
    file.write_text(text)
    return file


def test_load_limits(tmp_path):
    assert load(write_config(tmp_path, LIMITS_YAML)).limits == Limits(
        cpu=CpuLimits(quota=1.5, period=0.1, weight=200),
        memory=MemoryLimits(limit=4 * GiB, high=3758096384, swap=0),
        io=IoLimits(
            read_bps=10_000_000, write_bps=5_000_000, read_iops=100, write_iops=None, device="auto"
        ),
        pids=PidsLimits(max=64),
    )


def test_loaded_limits_write_the_expected_files(tmp_path):
    limits = load(write_config(tmp_path, LIMITS_YAML)).limits
    files = files_for(limits, "254:0")
    assert files["cpu.max"] == "150000 100000"
    assert files["memory.max"] == str(4 * GiB)
    assert files["memory.swap.max"] == "0"
    assert files["io.max"] == "254:0 rbps=10000000 wbps=5000000 riops=100 wiops=max"


def test_default_limits_are_unlimited(tmp_path):
    assert load(write_config(tmp_path, "log_level: info\n")).limits == Limits()
    assert load(None).limits == Limits()


def test_limits_other_spellings(tmp_path):
    limits = load(
        write_config(
            tmp_path,
            "limits:\n"
            "  cpu: {quota: 0.5, weight: max}\n"
            "  memory: {limit: max, high: 512MiB}\n"
            "  io: {read_bps: 512KiB/s, write_bps: 1000, device: /dev/vda}\n",
        )
    ).limits
    assert limits.cpu == CpuLimits(quota=0.5, period=0.1, weight=None)
    assert limits.memory == MemoryLimits(limit=None, high=512 * MiB, swap=None)
    assert limits.io == IoLimits(read_bps=512 * 1024, write_bps=1000, device="/dev/vda")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "limits: {cpu: {quota: lots}}",
            "limits.cpu.quota: expected a CPU share such as 150% or 1.5 (CPUs),"
            " from 1% to 100000%, got 'lots'",
        ),
        (
            "limits: {cpu: {quota: 0.5%}}",
            "limits.cpu.quota: expected a CPU share such as 150% or 1.5 (CPUs),"
            " from 1% to 100000%, got '0.5%'",
        ),
        (
            "limits: {cpu: {quota: true}}",
            "limits.cpu.quota: expected a CPU share such as 150% or 1.5 (CPUs),"
            " from 1% to 100000%, got True",
        ),
        (
            "limits: {cpu: {period: 2s}}",
            "limits.cpu.period: expected a period from 1ms to 1s, got '2s'",
        ),
        (
            "limits: {cpu: {weight: 0}}",
            "limits.cpu.weight: expected an integer from 1 to 10000, got 0",
        ),
        (
            "limits: {io: {read_bps: fast}}",
            "limits.io.read_bps: expected a rate such as 10MB/s or 512KiB/s, got 'fast'",
        ),
        (
            "limits: {io: {device: sda}}",
            "limits.io.device: expected auto or a device path such as /dev/vda, got 'sda'",
        ),
        (
            "limits: {memory: {max: 1GiB}}",
            "limits.memory.max: unknown setting (known here: high, limit, swap)",
        ),
        (
            "limits: {gpu: {max: 1}}",
            "limits.gpu: unknown setting (known here: cpu, io, memory, pids)",
        ),
        (
            "limits: {pids: 64}",
            "limits.pids: expected a mapping of settings, got 64",
        ),
    ],
)
def test_limits_errors_name_the_key(tmp_path, text, message):
    file = write_config(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as caught:
        load(file)
    assert str(caught.value) == f"{file}: {message}"


def test_model_entry_limit_errors_name_the_key(tmp_path):
    file = write_config(tmp_path, "models:\n  demo:\n    limits: {cpu: {quota: lots}}\n")
    with pytest.raises(ConfigError) as caught:
        load(file)
    assert str(caught.value) == (
        f"{file}: models.demo.limits.cpu.quota: expected a CPU share such as 150% or 1.5"
        " (CPUs), from 1% to 100000%, got 'lots'"
    )


def test_model_yaml_limit_errors_name_the_key(tmp_path):
    file = tmp_path / "model.yaml"
    file.write_text("limits:\n  memory:\n    max: 1GiB\n")
    with pytest.raises(ConfigError) as caught:
        parse_model_yaml(file)
    assert str(caught.value) == (
        f"{file}: limits.memory.max: unknown setting (known here: high, limit, swap)"
    )


def test_parse_overrides_keeps_only_the_given_limit_keys():
    overrides = parse_overrides(
        {"intra_op_threads": 2, "limits": {"memory": {"high": "800MiB"}, "pids": {"max": 8}}},
        "model.yaml",
    )
    assert overrides == Overrides(
        session={"intra_op_threads": 2},
        limits={"memory": {"high": 800 * MiB}, "pids": {"max": 8}},
    )


# --- Config.limits_for(): defaults < model.yaml < models.NAME.limits, key by key ------------

PRECEDENCE_YAML = """\
limits:
  memory: {limit: 1GiB}
  cpu: {quota: 50%, weight: 300}
  pids: {max: 100}
models:
  demo:
    limits:
      memory: {limit: 2GiB}
      pids: {max: 10}
"""


def test_limits_for_precedence_key_by_key(tmp_path):
    config = load(write_config(tmp_path, PRECEDENCE_YAML))
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text("limits:\n  memory: {high: 800MiB, limit: 3GiB}\n  cpu: {quota: 200%}\n")
    limits = config.limits_for("demo", parse_model_yaml(model_yaml))
    assert limits == Limits(
        cpu=CpuLimits(quota=2.0, period=0.1, weight=300),
        memory=MemoryLimits(limit=2 * GiB, high=800 * MiB, swap=None),
        io=IoLimits(),
        pids=PidsLimits(max=10),
    )


def test_limits_for_the_example_from_the_design(tmp_path):
    config = load(write_config(tmp_path, PRECEDENCE_YAML))
    model_yaml = parse_overrides({"limits": {"memory": {"high": "800MiB"}}}, "model.yaml")
    limits = config.limits_for("demo", model_yaml)
    assert limits.memory == MemoryLimits(limit=2 * GiB, high=800 * MiB, swap=None)


def test_limits_for_a_model_without_an_entry(tmp_path):
    config = load(write_config(tmp_path, PRECEDENCE_YAML))
    model_yaml = parse_overrides({"limits": {"memory": {"high": "800MiB"}}}, "model.yaml")
    limits = config.limits_for("other", model_yaml)
    assert limits.memory == MemoryLimits(limit=GiB, high=800 * MiB, swap=None)
    assert limits.cpu == CpuLimits(quota=0.5, period=0.1, weight=300)
    assert limits.pids == PidsLimits(max=100)


def test_limits_for_without_model_yaml(tmp_path):
    config = load(write_config(tmp_path, PRECEDENCE_YAML))
    limits = config.limits_for("demo", Overrides())
    assert limits == Limits(
        cpu=CpuLimits(quota=0.5, weight=300),
        memory=MemoryLimits(limit=2 * GiB),
        pids=PidsLimits(max=10),
    )


def test_limits_for_model_entry_can_lift_a_limit(tmp_path):
    config = load(
        write_config(tmp_path, PRECEDENCE_YAML + "  big:\n    limits: {memory: {limit: max}}\n")
    )
    assert config.limits_for("big", Overrides()).memory.limit is None


def test_plural():
    assert [plural(n, "model") for n in (0, 1, 2)] == ["0 models", "1 model", "2 models"]
    assert plural(1, "entry", "entries") == "1 entry"
    assert plural(3, "entry", "entries") == "3 entries"
