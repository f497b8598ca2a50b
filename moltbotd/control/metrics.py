"""The daemon's Prometheus metrics, read from the supervisor's pools at each scrape.

Nothing here counts: the pools and their workers already do (each worker sends its
counts and histograms in its periodic report, serving/pool.py adds them up), and a
collector turns what they hold into series when /metrics or `moltctl metrics` asks.
prometheus_client writes the exposition format. docs/observability.md lists the series.
"""

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from moltbotd import __version__
from moltbotd.control.budgets import Budgets
from moltbotd.isolation.limits import Usage
from moltbotd.serving.circuit import CircuitState
from moltbotd.serving.pool import Pool

if TYPE_CHECKING:
    from moltbotd.control.supervisor import Model, Supervisor

LABELS = ["model", "version"]
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PHASE_SERIES = {
    "request": ("moltbot_request_latency_seconds",
                "From a request's arrival at its worker to its answer."),
    "queue": ("moltbot_queue_wait_seconds",
              "From a request's arrival at its worker to a lane taking it into a batch."),
    "batch": ("moltbot_batch_wait_seconds",
              "A lane's wait for the request's batch to fill (batching.timeout_ms); 0"
              " without batching."),
    "compute": ("moltbot_compute_seconds", "From the start of a request's run to its outcome."),
    "transfer": ("moltbot_transfer_seconds",
                 "In the worker: reading and checking a request (its inputs copied out of a"
                 " shared region), and framing its answer."),
}  # fmt: skip


class PoolCollector:
    """Every loaded version's series (active, canary, pinned), by model and version."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        pools = [(model.name, role, pool) for model in self.supervisor.models.values()
                 for role, pool in _roles(model)]  # fmt: skip
        yield _info()
        yield _versions(pools)
        yield _requests(pools)
        yield from _phases(pools)
        yield _batches(pools)
        yield from _gauges(pools)
        yield from _workers(pools)
        yield from _cgroups(pools)
        yield from _sessions(pools)
        yield from _caches(pools)
        yield from _circuits(pools)
        yield from _canaries(self.supervisor)


def _roles(model: "Model") -> Iterator[tuple[str, Pool]]:
    for pool in model.loaded().values():
        canary = "canary" if pool is model.canary_pool else "pinned"
        yield ("active" if pool is model.active else canary), pool


Pools = list[tuple[str, str, Pool]]


def _info() -> Metric:
    info = InfoMetricFamily("moltbot_build", "The daemon's version.")
    info.add_metric([], {"version": __version__})
    return info


def _versions(pools: Pools) -> Metric:
    family = GaugeMetricFamily("moltbot_model_version_info",
                               "1 for each loaded version: its role, execution providers and"
                               " model file's sha256 (empty until hashed).",
                               labels=[*LABELS, "role", "providers", "sha256"])  # fmt: skip
    for model, role, pool in pools:
        providers = ",".join(pool.primary.providers) if pool.workers else ""
        family.add_metric([model, pool.spec.version, role, providers, pool.sha256 or ""], 1)
    return family


def _requests(pools: Pools) -> Metric:
    family = CounterMetricFamily("moltbot_requests",
                                 "Requests answered, by code (OK or the error's code).",
                                 labels=[*LABELS, "code"])  # fmt: skip
    for model, _, pool in pools:
        for code, count in sorted(pool.stats.codes.items()):
            family.add_metric([model, pool.spec.version, code], count)
    return family


def _phases(pools: Pools) -> Iterator[Metric]:
    for phase, (name, help_text) in PHASE_SERIES.items():
        family = HistogramMetricFamily(name, help_text, labels=LABELS)
        for model, _, pool in pools:
            histogram = pool.stats.phases[phase]
            family.add_metric([model, pool.spec.version], histogram.cumulative(), histogram.sum)
        yield family


def _batches(pools: Pools) -> Metric:
    family = HistogramMetricFamily("moltbot_batch_size", "Requests per batch run.",
                                   labels=LABELS)  # fmt: skip
    for model, _, pool in pools:
        sizes = pool.stats.sizes
        buckets = [(str(bound), sum(n for size, n in sizes.items() if size <= bound))
                   for bound in BATCH_BUCKETS]  # fmt: skip
        buckets.append(("+Inf", sum(sizes.values())))
        total = sum(size * n for size, n in sizes.items())
        family.add_metric([model, pool.spec.version], buckets, total)
    return family


def _gauges(pools: Pools) -> Iterator[Metric]:
    series = {
        "moltbot_queue_depth": ("Requests waiting to run, in moltbotd and its workers.",
                                lambda p: p.depth),
        "moltbot_inflight_requests": ("Socket requests moltbotd holds, queued or relayed.",
                                      lambda p: p.inflight),
        "moltbot_instances": ("Worker processes of the version.", lambda p: len(p.workers)),
        "moltbot_direct_channels": ("Direct channels open to the version's workers.",
                                    lambda p: sum(w.channels for w in p.workers)),
    }  # fmt: skip
    for name, (help_text, value) in series.items():
        family = GaugeMetricFamily(name, help_text, labels=LABELS)
        for model, _, pool in pools:
            family.add_metric([model, pool.spec.version], value(pool))
        yield family


def _workers(pools: Pools) -> Iterator[Metric]:
    series = {"starts": "Worker processes started for the version, restarts included.",
              "restarts": "Worker processes restarted after they ended unasked."}  # fmt: skip
    for name, help_text in series.items():
        family = CounterMetricFamily(f"moltbot_worker_{name}", help_text, labels=LABELS)
        for model, _, pool in pools:
            family.add_metric([model, pool.spec.version], pool.stats.total(pool.workers, name))
        yield family


# (series, help, key in the worker's sessions report, counter?): a stateful version's
SESSION_SERIES = (
    ("moltbot_sessions_hot", "Sessions whose state is in the worker's memory.", "hot", False),
    ("moltbot_sessions_hot_bytes", "Bytes of the hot sessions' states.", "hot_bytes", False),
    ("moltbot_sessions_spilled", "Sessions on disk (as the worker last counted them).",
     "spilled", False),
    ("moltbot_sessions_lost", "Sessions lost with a worker that died holding them.",
     "lost", False),
    ("moltbot_sessions_disk_bytes", "Bytes of the sessions on disk.", "disk_bytes", False),
    ("moltbot_session_spills", "Sessions written to disk (idle, or out of the hot budget).",
     "spilled", True),
    ("moltbot_session_restores", "Sessions read back from disk.", "restored", True),
    ("moltbot_session_expiries", "Sessions gone after the ttl.", "expired", True),
    ("moltbot_session_drops", "Sessions gone to keep the disk within sessions.disk_bytes.",
     "dropped", True),
)  # fmt: skip


def _sessions(pools: Pools) -> Iterator[Metric]:
    """A stateful version's sessions, as its worker reports them (counters count from its
    worker's start: a restart is a counter reset)."""
    reports = [(model, pool.spec.version, report) for model, _, pool in pools
               for report in [pool.primary.sessions] if report]  # fmt: skip
    for name, help_text, key, counter in SESSION_SERIES:
        kind = CounterMetricFamily if counter else GaugeMetricFamily
        family = kind(name, help_text, labels=LABELS)
        for model, version, report in reports:
            value = report["counts"][key] if counter else report[key]
            family.add_metric([model, version], value)
        yield family


def _caches(pools: Pools) -> Iterator[Metric]:
    """Result caches (versions with cache.max_bytes above 0, or that held answers)."""
    shown = [(model, pool.spec.version, pool.cache_status()) for model, _, pool in pools
             if pool.scheduling.cache.max_bytes or pool.cache_status()["hits"]]  # fmt: skip
    series = (
        ("moltbot_cache_hits", "Requests the result cache answered.", "hits", True),
        ("moltbot_cache_misses", "Requests the result cache had no answer for.", "misses", True),
        ("moltbot_cache_bytes", "Bytes the result cache holds.", "bytes", False),
    )
    for name, help_text, key, counter in series:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, help_text,
                                                                         labels=LABELS)  # fmt: skip
        for model, version, cache in shown:
            family.add_metric([model, version], cache[key])
        yield family


# (series, help, key in Usage.read, counter?): the version's cgroup, as the kernel counts
CGROUP_SERIES = (
    ("moltbot_cgroup_cpu_seconds", "CPU time of the version's cgroup.",
     "cpu_usage_seconds", True),
    ("moltbot_cgroup_cpu_throttled_seconds", "Time the cgroup's CPU quota held it back.",
     "cpu_throttled_seconds", True),
    ("moltbot_cgroup_memory_bytes", "Memory the cgroup uses now (memory.current).",
     "memory_current", False),
    ("moltbot_cgroup_memory_peak_bytes", "The most memory the cgroup used (memory.peak).",
     "memory_peak", False),
    ("moltbot_cgroup_oom_kills", "Processes of the cgroup the kernel's OOM killer ended.",
     "oom_kills", True),
    ("moltbot_cgroup_io_read_bytes", "Bytes the cgroup read from block devices.",
     "io_read_bytes", True),
    ("moltbot_cgroup_io_write_bytes", "Bytes the cgroup wrote to block devices.",
     "io_write_bytes", True),
    ("moltbot_cgroup_pids", "Processes and threads in the cgroup.", "pids_current", False),
)  # fmt: skip


def _cgroups(pools: Pools) -> Iterator[Metric]:
    """Only versions in a cgroup of their own (isolation on) have these series."""
    grouped = [(model, pool, Usage(pool.cgroup).read(0.0)) for model, _, pool in pools
               if pool.cgroup is not None]  # fmt: skip
    for name, help_text, key, counter in CGROUP_SERIES:
        kind = CounterMetricFamily if counter else GaugeMetricFamily
        family = kind(name, help_text, labels=LABELS)
        for model, pool, usage in grouped:
            if usage.get(key) is not None:
                family.add_metric([model, pool.spec.version], usage[key])
        yield family
    limit = GaugeMetricFamily("moltbot_cgroup_memory_limit_bytes",
                              "The cgroup's memory.max (absent: unlimited).",
                              labels=LABELS)  # fmt: skip
    for model, pool, _ in grouped:
        if pool.spec.limits.memory.limit:
            limit.add_metric([model, pool.spec.version], pool.spec.limits.memory.limit)
    yield limit


def _circuits(pools: Pools) -> Iterator[Metric]:
    state = GaugeMetricFamily("moltbot_circuit_state",
                              "1 for the state the version's circuit is in, 0 for the others.",
                              labels=[*LABELS, "state"])  # fmt: skip
    moved = CounterMetricFamily("moltbot_circuit_transitions",
                                "Changes of the version's circuit, by the state entered.",
                                labels=[*LABELS, "state"])  # fmt: skip
    checks = CounterMetricFamily("moltbot_health_checks",
                                 "The daemon's health checks of the version, by outcome: passed,"
                                 " failed, inconclusive (it did not get to run). The workers"
                                 " count their answers in moltbot_requests too.",
                                 labels=[*LABELS, "outcome"])  # fmt: skip
    for model, _, pool in pools:
        labels = [model, pool.spec.version]
        for each in CircuitState:
            state.add_metric([*labels, each.value], float(pool.circuit.state is each))
            moved.add_metric([*labels, each.value], pool.circuit.transitions[each])
        for outcome, count in sorted(pool.checks.outcomes.items()):
            checks.add_metric([*labels, outcome], count)
    yield from (state, moved, checks)


def _canaries(supervisor: "Supervisor") -> Iterator[Metric]:
    share = GaugeMetricFamily("moltbot_canary_share",
                              "The share of a model's requests its canary version gets.",
                              labels=LABELS)  # fmt: skip
    answered = CounterMetricFamily("moltbot_canary_requests",
                                   "Requests the running canary answered, by outcome.",
                                   labels=[*LABELS, "outcome"])  # fmt: skip
    events = CounterMetricFamily("moltbot_model_events",
                                 "Events of a model: switch, promote, rollback, deploy (a"
                                 " version activated), reload (a restart), canary (started),"
                                 " canary-rollback, scale, scale-up, scale-down, circuit-open,"
                                 " circuit-half-open, circuit-closed, health-check-failed,"
                                 " health-restart.",
                                 labels=["model", "kind"])  # fmt: skip
    for model in supervisor.models.values():
        if model.canary:
            route, labels = model.canary, [model.name, model.canary.version]
            share.add_metric(labels, route.share)
            answered.add_metric([*labels, "ok"], route.requests - route.errors)
            answered.add_metric([*labels, "failed"], route.errors)
        for kind, count in sorted(model.counts.items()):
            events.add_metric([model.name, kind], count)
    yield from (share, answered, events)


class SocketCollector:
    """What moltbotd's socket answered, by operation and outcome."""

    def __init__(self, answers: Counter[tuple[str, str]]) -> None:
        self.answers = answers

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "moltbot_socket_requests",
            "Requests moltbotd's socket answered, by operation and outcome: infer's too"
            " (those refused before reaching a model, as MODEL_NOT_FOUND or"
            " PERMISSION_DENIED, are counted only here).",
            labels=["op", "code"],
        )
        for (op, code), count in sorted(self.answers.items()):
            family.add_metric([op, code], count)
        yield family


class BudgetCollector:
    """What each caller spent of each model's cost_limit this period (control/budgets.py)."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "caller", "period"]
        spent = GaugeMetricFamily(
            "moltbot_budget_spent",
            "What the caller spent this period (*: a model whose limit all callers share).",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "moltbot_budget_limit", "The model's cost_limit per caller and period.", labels=labels
        )
        for row in self.budgets.report(None)["usage"]:
            key = [row["model"], row["caller"], row["period"]]
            spent.add_metric(key, row["spent"])
            if row["limit"] is not None:
                limit.add_metric(key, row["limit"])
        yield from (spent, limit)


class Metrics:
    """The registry behind /metrics and the `metrics` operation."""

    def __init__(self, supervisor: "Supervisor", answers: Counter[tuple[str, str]],
                 budgets: Budgets) -> None:  # fmt: skip
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(supervisor))  # type: ignore[arg-type]
        self.registry.register(SocketCollector(answers))  # type: ignore[arg-type]
        self.registry.register(BudgetCollector(budgets))  # type: ignore[arg-type]

    def render(self) -> bytes:
        return generate_latest(self.registry)
