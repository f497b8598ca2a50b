"""The daemon's configuration: every setting declared once, validated on load, immutable.

Each setting is a dataclass field whose metadata carries its converter and help text
(gunicorn's one-class-per-setting idea); loading, validation messages and the reference
table in docs/configuration.md all follow from these declarations.
"""

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moltbotd.wire.operations import DEFAULT_LIMITS
from moltbotd.wire.protocol import PRIORITIES
from moltbotd.wire.units import parse_duration, parse_percent, parse_size

DEFAULT_CONFIG_PATH = Path("/etc/moltbot/moltbotd.yaml")
DEFAULT_SOCKET = Path("/run/moltbot/moltbotd.sock")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


class ConfigError(Exception):
    """A config problem, phrased for the operator: which file, which key, what was expected."""


Converter = Callable[[Any], Any]


def setting(default: Any, convert: Converter, help: str) -> Any:
    return field(default=default, metadata={"convert": convert, "help": help})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"section": cls, "help": help})


# --- converters -----------------------------------------------------------------------


def choice(*options: str) -> Converter:
    def convert(value: Any) -> str:
        if value is False and "off" in options:
            return "off"  # YAML 1.1 reads a bare `off` as false
        if not isinstance(value, str) or value.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return value.lower()

    convert.__doc__ = "one of " + ", ".join(options)
    return convert


def integer(low: int, high: int) -> Converter:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value!r}")
        return value

    convert.__doc__ = f"integer {low}..{high}"
    return convert


def path(value: Any) -> Path:
    """path"""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value)


def optional_path(value: Any) -> Path | None:
    """path, or null"""
    return None if value is None else path(value)


def file_mode(value: Any) -> int:
    """octal mode, e.g. "0660\""""
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise ValueError(f'expected an octal file mode in quotes such as "0660", got {value!r}')


def name(value: Any) -> str:
    """model or version name"""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ValueError(f"expected a name of {NAME_RULE}, got {value!r}")
    return value


def duration(value: Any) -> float:
    """duration: 30s, 500ms, 2m"""
    return parse_duration(value)


def unlimited_or(convert: Converter, doc: str) -> Converter:
    """None or 'max' mean no limit; anything else goes through `convert`."""

    def wrapped(value: Any) -> Any:
        return None if value is None or value == "max" else convert(value)

    wrapped.__doc__ = f"{doc}, or max"
    return wrapped


AUTO = "auto"  # a memory limit derived from the host's memory (moltbotd.isolation.limits.resolve)


def auto_or(convert: Converter) -> Converter:
    """'auto' stays 'auto' (resolved when a worker's limits are computed), else `convert`."""

    def wrapped(value: Any) -> Any:
        return AUTO if value == AUTO else convert(value)

    wrapped.__doc__ = f"{convert.__doc__}, or auto"
    return wrapped


def cpu_share(value: Any) -> float:
    """'150%' or 1.5 -> 1.5 CPUs."""
    expected = "a CPU share such as 150% or 1.5 (CPUs), from 1% to 100000%"
    return parse_percent(value, expected, lambda cpus: 0.01 <= cpus <= 1000)


def rate(value: Any) -> int:
    """'10MB/s' -> bytes per second."""
    text = value[:-2] if isinstance(value, str) and value.endswith("/s") else value
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"expected a rate such as 10MB/s or 512KiB/s, got {value!r}") from None


def cpu_period(value: Any) -> float:
    """duration from 1ms to 1s"""
    seconds = parse_duration(value)
    if not 0.001 <= seconds <= 1.0:
        raise ValueError(f"expected a period from 1ms to 1s, got {value!r}")
    return seconds


def threads(value: Any) -> int | None:
    """integer 1..256, or auto"""
    if value == "auto":
        return None
    try:
        return integer(1, 256)(value)
    except ValueError:
        raise ValueError(f"expected an integer from 1 to 256 or auto, got {value!r}") from None


def io_device(value: Any) -> str:
    """auto, or a block device path"""
    if value == "auto" or (isinstance(value, str) and value.startswith("/")):
        return value
    raise ValueError(f"expected auto or a device path such as /dev/vda, got {value!r}")


def fraction(value: Any) -> float:
    """share: 20% or 0.2"""
    expected = "a share such as 20% or 0.2, above 0% and at most 100%"
    return parse_percent(value, expected, lambda share: 0 < share <= 1)


def boolean(value: Any) -> bool:
    """true or false"""
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def size(value: Any) -> int:
    """size: 64MiB, 4GiB"""
    return parse_size(value)


def milliseconds(value: Any) -> float:
    """milliseconds, 0..60000"""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 60000:
        raise ValueError(f"expected a number of milliseconds from 0 to 60000, got {value!r}")
    return float(value)


def batch_sizes(value: Any) -> tuple[int, ...]:
    """list of batch sizes"""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in value
    ):
        raise ValueError(f"expected a list of batch sizes from 1 to 4096, got {value!r}")
    return tuple(sorted(set(value)))


def listen_address(value: Any) -> tuple[str, int] | None:
    """HOST:PORT, [::1]:PORT for IPv6, or null (port 0: one the kernel picks, logged)"""
    if value is None:
        return None
    text = str(value)
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8474) or null, got {text!r}")
    return host, int(port)


def optional_count(value: Any) -> int | None:
    """integer 1.., or null (no limit)"""
    return None if value is None else integer(1, 2**62)(value)


def optional_amount(value: Any) -> float | None:
    """number above 0, or null (no limit)"""
    return None if value is None else amount(value)


def amount(value: Any) -> float:
    """number, 0 or more"""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e18:
        raise ValueError(f"expected a number from 0, got {value!r}")
    return float(value)


def optional_text(value: Any) -> str | None:
    """text, or null"""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string or null, got {value!r}")
    return value


def optional_name(value: Any) -> str | None:
    """model name, or none"""
    return None if value is None or value == "none" else name(value)


PRINCIPAL = re.compile(r"^(?:(?:user|group):(?:\d+|[A-Za-z_][A-Za-z0-9._-]{0,63}\$?)|everyone)$")
MODEL_GLOB = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,64}$")


@dataclass(frozen=True)
class Grant:
    """An entry of an `access:` list: who (user:NAME or UID, group:NAME or GID, or
    everyone) and, for infer, the model names it covers (globs; None: every model)."""

    who: str
    models: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return (
            self.who if self.models is None else f"{{who: {self.who}, models: {list(self.models)}}}"
        )


def grants(with_models: bool) -> Converter:
    entry = "user:NAME, group:NAME or everyone" + (" (or {who, models})" if with_models else "")

    def convert(value: Any) -> tuple[Grant, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {entry}, got {value!r}")
        return tuple(_grant(item, with_models, entry) for item in value)

    convert.__doc__ = f"list of {entry}"
    return convert


def _grant(item: Any, with_models: bool, entry: str) -> Grant:
    if isinstance(item, dict) and with_models and set(item) <= {"who", "models"} and "who" in item:
        models = item.get("models")
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and MODEL_GLOB.match(m) for m in models)
        ):
            raise ValueError(
                f"models of {item['who']!r}: expected a list of model names or globs"
                f" (letters, digits, '.', '_', '-', '*', '?', [...]), got {models!r}"
            )
        return Grant(_principal(item["who"], entry), tuple(models))
    return Grant(_principal(item, entry))


def _principal(value: Any, entry: str) -> str:
    if not isinstance(value, str) or not PRINCIPAL.match(value):
        raise ValueError(f"expected {entry}, got {value!r}")
    return value


# --- the settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class SessionSettings:
    """How one model version's onnxruntime session is built."""

    device: str = setting(
        "cpu",
        choice("cpu", "cuda"),
        "cpu, or cuda: the CUDA execution provider with CPU fallback where CUDA cannot start",
    )
    intra_op_threads: int | None = setting(
        None,
        threads,
        "threads inside one operator (onnxruntime intra_op_num_threads); auto: the CPU quota"
        " rounded up (150% -> 2), 1 without a quota",
    )
    inter_op_threads: int = setting(
        1, integer(1, 256), "threads across operators (onnxruntime inter_op_num_threads)"
    )
    graph_optimization: str = setting(
        "all", choice("disable", "basic", "extended", "all"), "onnxruntime graph optimization level"
    )
    channel_threads: int = setting(
        1,
        integer(1, 64),
        "threads in each worker that run its requests (the socket's and its direct"
        " channels', from one queue), all on the one session: N runs compute on N cores"
        " with one copy of the weights",
    )
    spinning: bool = setting(
        False,
        boolean,
        "onnxruntime's threads spin while they wait for work (allow_spinning): operators"
        " start sooner, but idle threads burn cores other models could use",
    )


@dataclass(frozen=True)
class CpuLimits:
    quota: float | None = setting(
        None, unlimited_or(cpu_share, "CPU share: 150% or 1.5"), "CPU time per period (cpu.max)"
    )
    period: float = setting(0.1, cpu_period, "the period of the quota (cpu.max)")
    weight: int | None = setting(
        None,
        unlimited_or(integer(1, 10000), "integer 1..10000"),
        "share under contention (cpu.weight)",
    )


@dataclass(frozen=True)
class MemoryLimits:
    limit: int | str | None = setting(
        AUTO,
        auto_or(unlimited_or(size, "size")),
        "hard limit: the worker is OOM-killed above it (memory.max); auto: 80% of the host's"
        " memory shared equally by the models served",
    )
    high: int | None = setting(
        None,
        unlimited_or(size, "size"),
        "throttled and reclaimed above it (memory.high); unset, a model over its limit is"
        " OOM-killed and restarted rather than slowed to a crawl",
    )
    swap: int | None = setting(
        None, unlimited_or(size, "size"), "swap it may use (memory.swap.max)"
    )


@dataclass(frozen=True)
class IoLimits:
    read_bps: int | None = setting(
        None, unlimited_or(rate, "rate: 10MB/s"), "read bytes/s (io.max)"
    )
    write_bps: int | None = setting(
        None, unlimited_or(rate, "rate: 10MB/s"), "written bytes/s (io.max)"
    )
    read_iops: int | None = setting(
        None, unlimited_or(integer(1, 10**9), "integer"), "read operations/s (io.max)"
    )
    write_iops: int | None = setting(
        None, unlimited_or(integer(1, 10**9), "integer"), "write operations/s (io.max)"
    )
    device: str = setting(
        "auto", io_device, "the disk limited: auto is the one holding the model repository"
    )


@dataclass(frozen=True)
class PidsLimits:
    max: int | None = setting(
        None, unlimited_or(integer(1, 4194304), "integer"), "processes and threads (pids.max)"
    )


@dataclass(frozen=True)
class Limits:
    """Kernel-enforced limits of one model version's cgroup."""

    cpu: CpuLimits = section(CpuLimits, "CPU")
    memory: MemoryLimits = section(MemoryLimits, "memory")
    io: IoLimits = section(IoLimits, "disk IO")
    pids: PidsLimits = section(PidsLimits, "processes")


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = setting(
        1, integer(1, 4096), "requests run together as one batch (first dimension); 1: off"
    )
    timeout_ms: float = setting(
        2.0,
        milliseconds,
        "while every instance is busy, a batch that is not full waits at most this long for"
        " more requests (an idle instance takes what is queued at once)",
    )
    preferred_sizes: tuple[int, ...] = setting(
        (), batch_sizes, "a batch that reaches one of these sizes goes at once, without waiting"
    )


@dataclass(frozen=True)
class Instances:
    min: int = setting(1, integer(1, 64), "worker processes per model version, at least")
    max: int = setting(1, integer(1, 64), "worker processes per model version, at most")
    scale_up_queue: int = setting(
        4, integer(1, 10**6), "scale up when more requests than this per instance wait..."
    )
    scale_up_after: float = setting(1.0, duration, "...for this long")
    scale_down_after: float = setting(
        60.0, duration, "an instance above `min` that ran nothing for this long stops"
    )


@dataclass(frozen=True)
class SessionStore:
    """Where a stateful model's sessions live (a model.yaml with `state:`): docs/sessions.md."""

    hot_bytes: int = setting(
        256 << 20,
        size,
        "session states kept in the worker's memory; the least recently used"
        " spill to disk past this",
    )
    spill_after: float = setting(
        1800.0, duration, "a session idle this long is compressed to disk (state_dir/sessions)"
    )
    ttl: float = setting(86400.0, duration, "a session idle this long is gone")
    disk_bytes: int = setting(
        4 << 30,
        size,
        "spilled sessions per model on disk; past it the least recently used are gone",
    )


@dataclass(frozen=True)
class ResultCacheSettings:
    """A version's result cache, in its worker: docs/sessions.md."""

    max_bytes: int = setting(
        0,
        size,
        "answers kept for requests whose inputs come again, least recently used"
        " first (0: no cache)",
    )
    ttl: float = setting(60.0, duration, "an answer is given from the cache this long at most")


@dataclass(frozen=True)
class Budget:
    """What one request may ask and what a caller may spend (control/budgets.py)."""

    max_tokens: int | None = setting(
        None,
        optional_count,
        "a request's size along tokens_dim of tokens_input, at most;"
        " more: BUDGET_EXCEEDED (null: no limit)",
    )
    tokens_input: str | None = setting(
        None,
        optional_text,
        "the input whose dimension counts tokens (null: the request's first input)",
    )
    tokens_dim: int = setting(1, integer(0, 31), "which dimension of it counts tokens")
    cost_limit: float | None = setting(
        None,
        optional_amount,
        "what a caller (its uid, or its token's subject) may spend per"
        " period; then BUDGET_EXCEEDED, or the fallback answers (null: no limit)",
    )
    period: str = setting("month", choice("month", "day", "hour"),
                          "the cost_limit's period, a calendar one in UTC")  # fmt: skip
    per_caller: bool = setting(
        True, boolean, "each caller has its own cost_limit (false: one for the whole model)"
    )
    cost_per_request: float = setting(1.0, amount, "what each request costs...")
    cost_per_token: float = setting(0.0, amount, "...plus this per token...")
    cost_per_element: float = setting(0.0, amount, "...plus this per input element")
    reserve: float = setting(
        0.01,
        fraction,
        "the share of cost_limit written ahead to the ledger at a time: a"
        " crash can cost a caller at most this much, never let it spend more",
    )

    @property
    def on(self) -> bool:
        return self.max_tokens is not None or self.cost_limit is not None


@dataclass(frozen=True)
class CircuitSettings:
    """When a version's own failures open its circuit (serving/circuit.py)."""

    max_failure_rate: float = setting(
        0.2,
        fraction,
        "the circuit opens when more of the version's requests than this fail within"
        " `window` (its own failures: a client's bad input never counts; 100%: never opens)",
    )
    min_requests: int = setting(
        20, integer(1, 10**9), "requests answered within the window before the share is judged"
    )
    window: float = setting(60.0, duration, "the failure share is measured over this window")
    cooldown: float = setting(
        30.0, duration, "an open circuit lets probe requests through again after this long"
    )
    probes: int = setting(
        3,
        integer(1, 1000),
        "requests a half-open circuit lets through: as many successes close it, one failure"
        " opens it again",
    )
    deadlines: bool = setting(
        False,
        boolean,
        "DEADLINE_EXCEEDED counts as a failure (queued or running: the workers' counts do"
        " not tell them apart, and a client's own short deadlines would count)",
    )


@dataclass(frozen=True)
class HealthCheckSettings:
    """The daemon's own requests to each serving instance (serving/checks.py)."""

    interval: float = setting(
        30.0,
        duration,
        "each serving instance runs the version's warm-up input (model.yaml samples, else"
        " zeros) this often, at low priority, one at a time (0: no checks)",
    )
    timeout: float = setting(
        10.0, duration, "a check still running this long after it was sent has failed"
    )
    restart_after: int = setting(
        3, integer(0, 1000), "failed checks in a row that restart the instance (0: never)"
    )


@dataclass(frozen=True)
class Scheduling:
    """How requests for one model queue, batch and spread over its worker processes."""

    priority: str = setting(
        "normal", choice(*PRIORITIES), "the model's requests' priority, unless one sets its own"
    )
    max_queue: int = setting(
        1000,
        integer(1, 10**7),
        "requests waiting per model version (each instance holds its share); more get OVERLOADED",
    )
    fallback: str | None = setting(
        None, optional_name, "the model that answers when this one is overloaded or failed"
    )
    batching: Batching = section(Batching, "dynamic batching")
    instances: Instances = section(Instances, "worker processes per version, and autoscaling")
    sessions: SessionStore = section(SessionStore, "sessions of stateful models")
    cache: ResultCacheSettings = section(ResultCacheSettings, "the result cache")
    budget: Budget = section(Budget, "request size and spending limits")
    direct: bool = setting(
        True,
        boolean,
        "clients may ask for a direct channel to a worker (one socket hop instead of two);"
        " never while a canary runs or with a fallback",
    )
    busy_poll_us: int = setting(
        0,
        integer(0, 100_000),
        "after each request a worker polls its channels this long before it sleeps: lower"
        " latency for a CPU busy meanwhile (0: sleep at once)",
    )
    run_timeout: float = setting(
        60.0,
        duration,
        "a run (one request or batch) longer than this is hung: its worker"
        " is killed and restarted, its requests get WORKER_HUNG",
    )
    max_channels: int = setting(
        64,
        integer(1, 100_000),
        "direct channels one worker serves at once (each holds a socket and a shared region"
        " of max_frame_bytes mapped in it); a client refused one uses the socket",
    )
    max_channels_per_uid: int = setting(
        16,
        integer(1, 100_000),
        "direct channels of one user (uid, from SO_PEERCRED) one worker serves at once,"
        " however many connections the user opened and closed since",
    )
    circuit: CircuitSettings = section(CircuitSettings, "the circuit breaker of each version")
    health_check: HealthCheckSettings = section(
        HealthCheckSettings, "active health checks of each serving instance"
    )

    def problems(self, model: str | None) -> list[str]:
        """Contradictions between settings, phrased for the config's reader (model None:
        the top-level defaults)."""
        prefix = f"models.{model}." if model else "scheduling."
        found = []
        if self.instances.min > self.instances.max:
            found.append(f"{prefix}instances: min {self.instances.min} is above"
                         f" max {self.instances.max} (set both)")  # fmt: skip
        too_big = [s for s in self.batching.preferred_sizes if s > self.batching.max_batch_size]
        if too_big:
            found.append(f"{prefix}batching: preferred_sizes {list(too_big)} exceed"
                         f" max_batch_size {self.batching.max_batch_size}")  # fmt: skip
        if model and self.fallback == model:
            found.append(f"{prefix}fallback: a model cannot fall back on itself")
        if not self.health_check.timeout:
            found.append(f"{prefix}health_check: timeout must be above 0 (a check's"
                         " deadline); to turn the checks off, set interval: 0")  # fmt: skip
        return found


SCHEDULING_KEYS = frozenset(f.name for f in dataclasses.fields(Scheduling))
BUDGET_SHORTHAND = frozenset({"max_tokens", "cost_limit"})  # under a model_pool entry


@dataclass(frozen=True)
class Overrides:
    """What a model.yaml or a models.<name> entry sets: session keys and limits, partially.

    Only a model.yaml has `samples`: inputs (name -> nested lists) the version must
    answer before it serves; without them it warms up on zeros. And `state`: the pairs
    of a stateful model (output -> the input it feeds on the session's next request).
    And `made`: how `moltctl quantize` or `optimize` made the version (a record only).
    """

    session: Mapping[str, Any] = field(default_factory=dict)
    limits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    scheduling: Mapping[str, Any] = field(default_factory=dict)
    samples: tuple[Mapping[str, Any], ...] = ()
    state: tuple[Mapping[str, Any], ...] = ()
    made: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RestartSettings:
    backoff: float = setting(0.5, duration, "delay before the first restart of a dead worker")
    backoff_max: float = setting(30.0, duration, "the delay doubles per failure up to this")
    max_failures: int = setting(
        5, integer(1, 1000), "consecutive failures before the worker is left FATAL"
    )
    stable_after: float = setting(
        10.0, duration, "a worker ready this long has its failure count reset"
    )


@dataclass(frozen=True)
class WorkerSettings:
    start_timeout: float = setting(
        120.0, duration, "time a worker has to load its model and report ready"
    )
    stop_timeout: float = setting(
        10.0, duration, "time a stopping worker has to exit before it is killed"
    )
    heartbeat: float = setting(
        1.0,
        duration,
        "how often a serving worker tells the daemon it is alive, and how long its runs have taken",
    )
    hung_after: float = setting(
        10.0, duration, "a worker silent this long (stopped, deadlocked) is killed as hung"
    )
    restart: RestartSettings = section(RestartSettings, "restart policy for dead workers")


@dataclass(frozen=True)
class ClientLimits:
    """What one client, or all of them together, may hold of the daemon: no client can
    exhaust its memory, descriptors or event loop (issue 14)."""

    max_connections: int = setting(
        1024,
        integer(1, 1_000_000),
        "connections open at once; more are refused with RESOURCE_EXHAUSTED",
    )
    max_connections_per_uid: int = setting(
        512, integer(1, 1_000_000), "connections one user (uid, from SO_PEERCRED) may have open"
    )
    reserved_fds: int = setting(
        256,
        integer(16, 1_000_000),
        "file descriptors kept for workers and direct channels:"
        " a connection that would leave fewer free is refused",
    )
    refusal_log_interval: float = setting(
        10.0, duration, "refused connections are logged once per interval, with their count"
    )
    unsent_pause_bytes: int = setting(
        2**20,
        size,
        "a connection holding this much of answers its client has not read is"
        " not read from until they are",
    )
    max_unsent_bytes: int = setting(
        64 * 2**20, size, "a connection holding more than this of unread answers is closed (logged)"
    )
    max_partial_bytes: int = setting(
        256 * 2**20,
        size,
        "frames not yet whole, all connections together; a connection"
        " that would pass it gets RESOURCE_EXHAUSTED and is closed",
    )
    frame_timeout: float = setting(
        30.0,
        duration,
        "a frame must arrive whole this long after its first byte; else"
        " BAD_FRAME and the connection is closed",
    )
    max_name_chars: int = setting(
        DEFAULT_LIMITS.max_name_chars,
        integer(16, 1_000_000),
        "longest request id, operation or name parameter (model, version, upload token, log level)",
    )
    max_text_chars: int = setting(
        DEFAULT_LIMITS.max_text_chars,
        integer(16, 100_000_000),
        "longest other string parameter (upload's path,"
        " deploy's source, logs' contains, hello's client)",
    )
    max_items: int = setting(
        DEFAULT_LIMITS.max_items,
        integer(1, 100_000_000),
        "most entries in a list or map parameter (inputs, outputs, files)",
    )
    log_field_chars: int = setting(
        2048,
        integer(80, 100_000_000),
        "longer log fields are cut, in the ring and on"
        " stderr (a traceback keeps 4 times as much, its end)",
    )


@dataclass(frozen=True)
class CanarySettings:
    max_error_rate: float = setting(
        0.2, fraction, "a canary failing more of its requests than this is rolled back"
    )
    window: float = setting(60.0, duration, "the error rate is measured over this window")
    min_requests: int = setting(
        20, integer(1, 10**9), "requests in the window before the error rate is judged"
    )


@dataclass(frozen=True)
class ConversionSettings:
    """`moltctl quantize` and `moltctl optimize`: the accuracy gate a converted version
    must pass before it is published (a request may set its own bounds), and how long
    the conversion job may take."""

    min_top1_agreement: float = setting(
        0.99,
        fraction,
        "share of rows whose top-1 class must stay the source's, for classifier-shaped"
        " outputs ([N, classes] from Softmax, Gemm, MatMul or Add)",
    )
    max_relative_error: float = setting(
        0.05,
        fraction,
        "for every other output: mean absolute error over the source output's mean magnitude",
    )
    timeout: float = setting(
        1800.0, duration, "a conversion job still running after this long is killed"
    )


@dataclass(frozen=True)
class UploadSettings:
    """Bounds on what `moltctl deploy` may send: a full disk must not stop the daemon from
    recording its state, nor one upload starve the others."""

    max_file_bytes: int = setting(4 * 2**30, size, "largest file of a version being deployed")
    max_version_bytes: int = setting(
        8 * 2**30, size, "largest version being deployed, all its files together"
    )
    keep_free: int = setting(
        512 * 2**20,
        size,
        "free space an upload must leave on models_dir's file system, checked before every"
        " chunk (and before the first against the total the client announces, if it does)",
    )
    abandoned_after: float = setting(
        3600.0, duration, "an upload that received nothing for this long is removed"
    )


@dataclass(frozen=True)
class MetricsSettings:
    listen: tuple[str, int] | None = setting(
        None,
        listen_address,
        "HOST:PORT serving Prometheus metrics at /metrics over HTTP (null: off;"
        " `moltctl metrics` works either way)",
    )
    histograms: bool = setting(
        True,
        boolean,
        "count each request's phases into the latency histograms (false: only the counts"
        " by outcome; saves the workers under a microsecond of CPU per request)",
    )
    slow_request: float = setting(
        1.0,
        duration,
        "a request that takes longer from its arrival at the worker to its answer is logged"
        " (once, with its request_id and phases; 0: never)",
    )


@dataclass(frozen=True)
class AuditSettings:
    file: Path | None = setting(
        None,
        optional_path,
        "the audit trail of every change (JSON lines, appended and fsynced; null:"
        " audit.jsonl in state_dir)",
    )
    max_bytes: int = setting(16 * 2**20, size, "the file is rotated once it would pass this")
    keep: int = setting(
        4, integer(0, 1000), "rotated files kept (FILE.1 the newest); older ones are deleted"
    )


def optional_paths(value: Any) -> tuple[Path, ...]:
    """list of file paths"""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of file paths, got {value!r}")
    return tuple(Path(v) for v in value)


@dataclass(frozen=True)
class TokenSettings:
    """JWT bearer tokens on the network listeners (network/tokens.py)."""

    keys: tuple[Path, ...] = setting(
        (),
        optional_paths,
        "files of the keys that verify tokens: a PEM public key (RSA: RS256, EC P-256:"
        " ES256) or a secret of 32 bytes or more (HS256); empty: no tokens, every network"
        " client may read and infer",
    )
    issuer: str | None = setting(None, optional_text, "the `iss` a token must carry")
    audience: str | None = setting(None, optional_text, "the `aud` a token must carry")
    leeway: float = setting(30.0, duration, "clock skew allowed on exp and nbf")


@dataclass(frozen=True)
class NetworkSettings:
    """The Open Inference Protocol listeners (docs/network.md); both off by default."""

    http: tuple[str, int] | None = setting(
        None,
        listen_address,
        "HOST:PORT serving the Open Inference Protocol over HTTP (e.g. 0.0.0.0:8080; null:"
        " off, or the socket moltbotd-http.socket passes)",
    )
    grpc: tuple[str, int] | None = setting(
        None, listen_address, "HOST:PORT serving it over gRPC (e.g. 0.0.0.0:8001; null: off)"
    )
    tls_cert: Path | None = setting(
        None,
        optional_path,
        "PEM certificate chain: TLS 1.2 or newer on both listeners (without it, only a"
        " loopback address may listen)",
    )
    tls_key: Path | None = setting(None, optional_path, "PEM private key of tls_cert")
    tls_client_ca: Path | None = setting(
        None, optional_path, "PEM CA bundle: clients must present a certificate it signed (mTLS)"
    )
    tokens: TokenSettings = section(TokenSettings, "JWT bearer tokens and their scopes")
    max_connections: int = setting(
        256, integer(1, 100_000), "HTTP connections open at once; more are answered 503"
    )
    idle_timeout: float = setting(
        60.0, duration, "an HTTP connection idle this long between requests is closed"
    )
    max_streams: int = setting(
        1024, integer(1, 1_000_000), "gRPC calls in progress at once; more get RESOURCE_EXHAUSTED"
    )

    def problems(self) -> list[str]:
        """Settings that contradict each other, each naming the setting to change."""
        found = []
        if (self.tls_cert is None) != (self.tls_key is None):
            found.append("network.tls_cert and network.tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            found.append("network.tls_client_ca needs network.tls_cert and network.tls_key")
        for key in ("http", "grpc"):
            where = getattr(self, key)
            if where and not self.tls_cert and not is_loopback(where[0]):
                found.append(
                    f"network.{key}: plain TCP on {where[0]} would send requests and tokens"
                    " in the clear; listen on a loopback address or set network.tls_cert and"
                    " network.tls_key"
                )
        return found


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can reach it."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


MEMBERS = (Grant("group:moltbot"), Grant("group:moltbot-admin"))
ADMINS = (Grant("group:moltbot-admin"),)


@dataclass(frozen=True)
class AccessSettings:
    """Who may do what (control/access.py): root and the user moltbotd runs as may do
    everything; anyone else gets the roles whose list names their uid or one of their
    groups, as the kernel reports them for the socket (SO_PEERCRED, SO_PEERGROUPS)."""

    read: tuple[Grant, ...] = setting(
        MEMBERS, grants(False), "may see status, models, versions, logs, metrics and the audit"
    )
    infer: tuple[Grant, ...] = setting(
        MEMBERS,
        grants(True),
        "may run models; an entry {who: ..., models: [GLOB, ...]} covers only those models",
    )
    operate: tuple[Grant, ...] = setting(
        ADMINS, grants(False), "may switch, canary, promote, roll back, scale and reload"
    )
    deploy: tuple[Grant, ...] = setting(ADMINS, grants(False), "may upload and deploy versions")


@dataclass(frozen=True)
class ModelConfig:
    """A model's entry under `models:`: its active version, session settings and limits."""

    version: str | None = None
    overrides: Overrides = field(default_factory=Overrides)
    on_demand: bool = False  # load a pinned version that is not loaded, instead of refusing


@dataclass(frozen=True)
class Config:
    socket: Path = setting(DEFAULT_SOCKET, path, "Unix socket clients connect to")
    socket_mode: int = setting(
        0o666,
        file_mode,
        "permissions of the socket: every local user may connect, and `access:` decides what"
        " each may do (0660: only root and moltbotd's group may connect at all)",
    )
    models_dir: Path = setting(
        Path("/var/lib/moltbot/models"), path, "model repository: MODEL/VERSION/model.onnx"
    )
    log_format: str = setting("text", choice("text", "json"), "log line format on stderr")
    log_target: str = setting(
        "auto",
        choice("auto", "journal", "stderr"),
        "journal: each entry with its fields to journald's native socket (journalctl -u"
        " moltbotd MODEL=demo); auto: the journal when systemd connected stderr to it",
    )
    journal_socket: Path = setting(
        Path("/run/systemd/journal/socket"), path, "journald's native socket"
    )
    log_level: str = setting(
        "info", choice("debug", "info", "warning", "error"), "lowest level logged"
    )
    log_ring_size: int = setting(
        10000, integer(100, 10_000_000), "log entries kept in memory for `moltctl logs`"
    )
    max_frame_bytes: int = setting(64 * 2**20, size, "largest request frame accepted")
    max_inflight_per_connection: int = setting(
        1024, integer(1, 1_000_000), "pipelined requests one connection may have open"
    )
    clients: ClientLimits = section(
        ClientLimits, "bounds on connections, their buffers and request sizes"
    )
    drain_timeout: float = setting(
        30.0, duration, "time in-flight requests get to finish at stop or version switch"
    )
    state_dir: Path = setting(
        Path("/var/lib/moltbot/state"),
        path,
        "where active versions and canaries are kept across restarts",
    )
    on_demand_idle: float = setting(
        600.0, duration, "a version loaded on demand is unloaded after this long unused"
    )
    canary: CanarySettings = section(CanarySettings, "automatic rollback of a canary")
    metrics: MetricsSettings = section(MetricsSettings, "the Prometheus endpoint")
    audit: AuditSettings = section(AuditSettings, "the audit trail of every change")
    access: AccessSettings = section(AccessSettings, "roles: who may read, infer, operate, deploy")
    network: NetworkSettings = section(
        NetworkSettings, "the Open Inference Protocol over HTTP and gRPC, TLS, tokens"
    )
    uploads: UploadSettings = section(UploadSettings, "deploys on their way in: sizes, free space")
    conversion: ConversionSettings = section(
        ConversionSettings, "quantize and optimize: the accuracy gate, the job's time"
    )
    scheduling: Scheduling = section(
        Scheduling, "queues, priorities, batching, instances (models.NAME overrides)"
    )
    isolation: str = setting(
        "best-effort",
        choice("strict", "best-effort", "off"),
        "strict: refuse to start without cgroup v2 delegation; best-effort: warn and run"
        " without limits; off: never use cgroups",
    )
    limits: Limits = section(Limits, "limits for every model (model.yaml and models: override)")
    workers: WorkerSettings = section(WorkerSettings, "worker process lifecycle")
    defaults: SessionSettings = section(
        SessionSettings, "session settings for every model (model.yaml and models: override)"
    )
    models: Mapping[str, ModelConfig] = field(
        default_factory=dict,
        metadata={"help": "per-model entries: `version` (the active one) and session settings"},
    )

    def session_settings(self, model: str, model_yaml: Overrides) -> SessionSettings:
        """defaults < the version's model.yaml < the config's models.<name>."""
        entry = self.models.get(model, ModelConfig()).overrides
        return dataclasses.replace(self.defaults, **{**model_yaml.session, **entry.session})

    def limits_for(self, model: str, model_yaml: Overrides) -> Limits:
        """limits < the version's model.yaml limits < the config's models.<name>.limits."""
        entry = self.models.get(model, ModelConfig()).overrides
        return _merged(self.limits, model_yaml.limits, entry.limits)

    def scheduling_for(self, model: str, model_yaml: Overrides) -> Scheduling:
        """scheduling < the version's model.yaml < the config's models.<name>; raises
        ConfigError when the result contradicts itself."""
        entry = self.models.get(model, ModelConfig()).overrides
        merged = _merged(self.scheduling, model_yaml.scheduling, entry.scheduling)
        problems = merged.problems(model)
        if problems:
            raise ConfigError("; ".join(problems))
        return merged


def _merged(base: Any, *partials: Mapping[str, Any]) -> Any:
    """A settings dataclass with partial overrides applied in order, sections key by key."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(base):
        given = [p[f.name] for p in partials if f.name in p]
        if not given:
            continue
        if "section" in f.metadata:
            changes[f.name] = _merged(getattr(base, f.name), *given)
        else:
            changes[f.name] = given[-1]
    return dataclasses.replace(base, **changes)


# --- loading --------------------------------------------------------------------------


def load(config_path: Path | None) -> Config:
    """Read and validate a config file; None means the built-in defaults."""
    if config_path is None:
        return Config()
    try:
        text = config_path.read_text()
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read the config file: {exc.strerror}") from None
    data = _model_pool(_parse_yaml(config_path, text), str(config_path))
    config = _build(Config, data, str(config_path), "", base=config_path.parent)
    problems = config.scheduling.problems(None) + config.network.problems()
    for name in config.models:
        try:
            config.scheduling_for(name, Overrides())
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"{config_path}: {'; '.join(problems)}")
    return config


def _model_pool(data: Any, where: str) -> Any:
    """The product's documents spell `models:` as `model_pool:`, with `max_tokens` and
    `cost_limit` directly under a model's name: both are read as they are written."""
    if not isinstance(data, dict) or "model_pool" not in data:
        return data
    if "models" in data:
        raise ConfigError(f"{where}: model_pool and models are one setting: use one of them")
    data = {("models" if key == "model_pool" else key): value for key, value in data.items()}
    for entry in (data["models"] or {}).values():
        if isinstance(entry, dict) and entry.keys() & BUDGET_SHORTHAND:
            budget = entry.setdefault("budget", {})
            if isinstance(budget, dict):
                budget.update({key: entry.pop(key) for key in BUDGET_SHORTHAND & entry.keys()})
    return data


def parse_overrides(data: Any, where: str, prefix: str = "") -> Overrides:
    """Validate a model.yaml or a models.<name> entry: session keys and `limits`, partially."""
    if data is None:
        return Overrides()
    _require_map(data, where, prefix)
    session = {k: v for k, v in data.items() if k != "limits" and k not in SCHEDULING_KEYS}
    scheduling = {k: v for k, v in data.items() if k in SCHEDULING_KEYS}
    return Overrides(
        _partial(SessionSettings, session, where, prefix, extra=("limits", *SCHEDULING_KEYS)),
        _partial(Limits, data.get("limits"), where, prefix + "limits."),
        _partial(Scheduling, scheduling, where, prefix),
    )


def _partial(cls: type, data: Any, where: str, prefix: str, extra: tuple[str, ...] = ()) -> dict:
    """Only the keys given, converted; sections as nested dicts."""
    if data is None:
        return {}
    _require_map(data, where, prefix)
    known = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(data, {**known, **dict.fromkeys(extra)}, where, prefix)
    return {
        key: _partial(known[key].metadata["section"], raw, where, f"{prefix}{key}.")
        if "section" in known[key].metadata
        else _convert(known[key], raw, where, prefix + key)
        for key, raw in data.items()
        if key in known
    }


def parse_model_yaml(file: Path) -> Overrides:
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    data = _parse_yaml(file, text)
    samples = data.pop("samples", None) if isinstance(data, dict) else None
    state = data.pop("state", None) if isinstance(data, dict) else None
    made = data.pop("made", None) if isinstance(data, dict) else None
    if made is not None and not isinstance(made, dict):
        raise ConfigError(f"{file}: made: expected a map (written by moltctl quantize), got"
                          f" {made!r}"[:300])  # fmt: skip
    overrides = parse_overrides(data, str(file))
    return dataclasses.replace(overrides, samples=_samples(samples, str(file)),
                               state=_state(state, str(file)), made=made)  # fmt: skip


def _samples(data: Any, where: str) -> tuple[Mapping[str, Any], ...]:
    """A list of maps from input name to a value; the worker checks them against the model."""
    if data is None:
        return ()
    expected = "a list of maps from input name to a value (nested lists)"
    if not isinstance(data, list) or not all(
        isinstance(s, dict) and s and all(isinstance(k, str) for k in s) for s in data
    ):
        raise ConfigError(f"{where}: samples: expected {expected}, got {data!r}"[:300])
    return tuple(data)


def _state(data: Any, where: str) -> tuple[Mapping[str, Any], ...]:
    """State pairs: {input, output, shape (optional)}; the worker checks them against the
    model."""
    if data is None:
        return ()
    expected = ("a list of {input: NAME, output: NAME, shape: [dims] (optional: the first"
                " value's, zeros)}")  # fmt: skip
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: state: expected {expected}, got {data!r}"[:300])
    for pair in data:
        ok = (isinstance(pair, dict) and set(pair) <= {"input", "output", "shape"}
              and all(isinstance(pair.get(k), str) for k in ("input", "output"))
              and _dims(pair.get("shape")))  # fmt: skip
        if not ok:
            raise ConfigError(f"{where}: state: expected {expected}, got {pair!r}"[:300])
    inputs = [pair["input"] for pair in data]
    if len(set(inputs)) < len(inputs):
        raise ConfigError(f"{where}: state: an input is fed by two pairs: {inputs}"[:300])
    return tuple(data)


def _dims(shape: Any) -> bool:
    return shape is None or (isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape))  # fmt: skip


def _parse_yaml(file: Path, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: not valid YAML{where}: {problem}") from None


def _build(cls: type, data: Any, where: str, prefix: str, base: Path) -> Any:
    if data is None:
        data = {}
    _require_map(data, where, prefix)
    known = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(data, known, where, prefix)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        f, key_path = known[key], prefix + key
        if "section" in f.metadata:
            values[key] = _build(f.metadata["section"], raw, where, key_path + ".", base)
        elif key == "models" and cls is Config:
            values[key] = _build_models(raw, where)
        else:
            values[key] = _relative_to(base, _convert(f, raw, where, key_path))
    return cls(**values)


def _relative_to(base: Path, value: Any) -> Any:
    """A path setting, or a list of them, as absolute (relative to the config's folder)."""
    if isinstance(value, Path):
        return base / value
    if isinstance(value, tuple) and value and all(isinstance(v, Path) for v in value):
        return tuple(base / v for v in value)
    return value


def _build_models(data: Any, where: str) -> dict[str, ModelConfig]:
    if data is None:
        return {}
    _require_map(data, where, "models")
    models = {}
    for model, raw in data.items():
        prefix = f"models.{model}."
        try:
            name(model)
        except ValueError as exc:
            raise ConfigError(f"{where}: models: model name {model!r}: {exc}") from None
        entry = dict(raw) if isinstance(raw, dict) else raw
        version = entry.pop("version", None) if isinstance(entry, dict) else None
        if version is not None:
            version = _convert_value(name, version, where, prefix + "version")
        on_demand = entry.pop("on_demand", False) if isinstance(entry, dict) else False
        on_demand = _convert_value(boolean, on_demand, where, prefix + "on_demand")
        models[model] = ModelConfig(version, parse_overrides(entry, where, prefix), on_demand)
    return models


def _require_map(data: Any, where: str, prefix: str) -> None:
    if not isinstance(data, dict):
        key = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: {key}: expected a mapping of settings, got {data!r}")


def _reject_unknown(data: dict, known: Mapping[str, Any], where: str, prefix: str) -> None:
    for key in data:
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"{where}: {prefix}{key}: unknown setting (known here: {allowed})")


def _convert(f: dataclasses.Field, value: Any, where: str, key_path: str) -> Any:
    return _convert_value(f.metadata["convert"], value, where, key_path)


def _convert_value(convert: Converter, value: Any, where: str, key_path: str) -> Any:
    try:
        return convert(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {key_path}: {exc}") from None


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Command-line flags win over the file; None means 'not given'."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **given)


def reference_markdown() -> str:
    """The settings table of docs/configuration.md, generated from the declarations."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(cls: type, prefix: str) -> None:
        defaults = cls()
        for f in dataclasses.fields(cls):
            if "section" in f.metadata:
                walk(f.metadata["section"], f"{prefix}{f.name}.")
            elif "convert" in f.metadata:
                convert = f.metadata["convert"]
                shown = _show(getattr(defaults, f.name), convert)
                kind = (convert.__doc__ or "").strip()
                rows.append(f"| `{prefix}{f.name}` | {kind} | `{shown}` | {f.metadata['help']} |")

    walk(Config, "")
    walk(SessionSettings, "models.NAME.")
    walk(Limits, "models.NAME.limits.")
    walk(Scheduling, "models.NAME.")
    rows.append(
        "| `models.NAME.version` | model or version name | highest on disk |"
        " the version served when the daemon starts (see below) |"
    )
    rows.append(
        "| `models.NAME.on_demand` | true or false | `false` | a request pinned to a version"
        " that is not loaded loads it (unloaded after `on_demand_idle`) instead of failing |"
    )
    return "\n".join(rows) + "\n"


def _show(value: Any, convert: Converter) -> str:
    """A default as one would write it in the file."""
    if value is None:
        shown = {threads: "auto", optional_name: "none", listen_address: "null",
                 optional_path: "null", optional_text: "null", optional_count: "null",
                 optional_amount: "null"}  # fmt: skip
        return shown.get(convert, "max")
    if convert in (duration, cpu_period):
        return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"
    if convert is fraction:
        return f"{value * 100:g}%"
    if convert is size and value % 2**30 == 0:
        return f"{value // 2**30}GiB"
    if convert is size:
        return f"{value // 2**20}MiB" if value % 2**20 == 0 else str(value)
    if convert is file_mode:
        return f'"0{value:o}"'
    if convert is batch_sizes:
        return str(list(value))
    if convert is optional_paths or (
        isinstance(value, tuple) and all(isinstance(v, Grant) for v in value)
    ):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
