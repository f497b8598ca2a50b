"""One model version's worker processes: routing, scaling and what status shows.

A Pool owns the version's instances (WorkerProcesses, all in the version's cgroup). It
does not form batches: each instance has one queue (worker/hub.py) for its direct
channels' requests and the socket's alike, and that queue batches, orders by priority,
bounds and answers deadlines. The pool relays each socket request to the serving
instance with the fewest in flight, and gives each instance its share of the version's
max_queue. Requests wait here, in a scheduler.Queue (bounded, by priority, answered at
their deadline), only while no instance can take them: none serves yet (a start, a
restart), or a version that may scale out holds a window of requests in each instance
(enough for every lane to form full batches), so that an instance added under pressure
gets its share of what waits rather than nothing.
"""

import asyncio
import contextlib
import dataclasses
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from moltbotd.config import Batching, Scheduling, WorkerSettings
from moltbotd.isolation.cgroups import Group
from moltbotd.logs import get_logger
from moltbotd.scheduler import Pending, Queue, Reply, deadline_exceeded
from moltbotd.serving.checks import HealthChecks
from moltbotd.serving.circuit import Breaker, CircuitState, Transition
from moltbotd.serving.exits import Exits
from moltbotd.serving.process import Counters, WorkerProcess, WorkerSpec
from moltbotd.serving.states import WorkerState
from moltbotd.wire.histogram import PHASES, Histogram
from moltbotd.wire.protocol import MoltError
from moltbotd.wire.signature import Signature
from moltbotd.wire.units import plural

log = get_logger("pool")
S = WorkerState
ONE_BY_ONE = Batching(max_batch_size=1)  # what the pool takes from its queue to relay
SCALE_EVERY = 0.25  # seconds between looks at the queue for autoscaling
GONE = (S.STOPPING, S.STOPPED, S.FATAL)  # instances that will not serve again
LEAVING = (S.DRAINING, S.STOPPING, S.STOPPED)  # instances that no longer count


class Relayed(Pending):
    """A socket request on its way to an instance: its params go as they came (the worker
    checks them, as it checks a direct channel's)."""

    __slots__ = ("params",)

    def __init__(self, params: dict[str, Any], priority: str, deadline: float | None,
                 arrived: float, reply: Reply) -> None:  # fmt: skip
        super().__init__({}, None, priority, deadline, arrived, reply)
        self.params = params


class Stats:
    """Batch sizes and queue times, for status; answers by code and the phases'
    histograms since the pool started, for metrics."""

    def __init__(self) -> None:
        self.batches = 0
        self.sizes: Counter[int] = Counter()  # requests per batch -> batches
        self.waits: deque[float] = deque(maxlen=2048)  # seconds in the queue, latest
        self.codes: Counter[str] = Counter()  # answers: "OK" or the error's code
        self.retired = Counters()  # of instances scaled away: the metrics never go down
        self.phases = {phase: Histogram() for phase in PHASES}

    def retire(self, counters: Counters) -> None:
        for f in dataclasses.fields(Counters):
            setattr(self.retired, f.name, getattr(self.retired, f.name) + getattr(counters, f.name))

    def total(self, workers: list[WorkerProcess], name: str) -> int:
        """A count (restarts, starts) over the instances, those scaled away included."""
        return getattr(self.retired, name) + sum(getattr(w.counters, name) for w in workers)

    def add(self, stats: dict[str, Any]) -> None:
        """A worker's report (hub.Counts)."""
        sizes = {int(size): n for size, n in stats["sizes"].items()}
        self.batches += sum(sizes.values())
        self.sizes.update(sizes)
        self.waits.extend(stats["waits"])
        self.codes.update(stats.get("codes", {}))
        for name, wire in stats.get("phases", {}).items():
            if name in self.phases:
                self.phases[name].add(wire)

    def view(self) -> dict[str, Any]:
        waits = sorted(self.waits)
        ms: dict[str, float | None] = dict.fromkeys(("p50", "p99", "max"))
        if waits:
            p99 = waits[int(0.99 * (len(waits) - 1))]
            ms = {"p50": statistics.median(waits) * 1e3, "p99": p99 * 1e3, "max": waits[-1] * 1e3}
        requests = sum(size * n for size, n in self.sizes.items())
        return {
            "batches": self.batches,
            "mean_batch": requests / self.batches if self.batches else None,
            "batch_sizes": dict(sorted(self.sizes.items())),
            "queue_ms": ms,
        }


class Pool:
    def __init__(self, spec: WorkerSpec, settings: WorkerSettings, scheduling: Scheduling,
                 cgroup: Group | None = None, exits: Exits | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.exits = exits
        self.settings = settings
        self.scheduling = scheduling
        self.cgroup = cgroup
        self.workers: list[WorkerProcess] = []
        self.queue = Queue(scheduling.max_queue)  # requests waiting for an instance to serve
        self.manual: int | None = None  # instances set by `moltctl scale`; None: autoscale
        self.sha256: str | None = None  # of the model file, once hashed (metrics' info)
        self.stats = Stats()
        self.on_phase: Callable[[str], None] | None = None  # the first instance's phases
        self.on_event: Callable[[str, str], None] | None = None  # (kind, message) for status
        self.log = log.bind(model=spec.model, version=spec.version)
        self.circuit = Breaker(scheduling.circuit, self._circuit_changed)
        self.checks = HealthChecks(spec, scheduling.health_check, self._check_failed)
        self.checks.on_event = self._event
        self._closed = False
        self._signature: Signature | None = None
        self._crowded_since: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._scaler: asyncio.Task[None] | None = None
        self._retiring: set[WorkerProcess] = set()  # a STARTING one being retired stays STARTING

    # --- what rollout and status read, as of a single worker ----------------------------

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def primary(self) -> WorkerProcess:
        return self.workers[0]

    @property
    def state(self) -> WorkerState:
        """READY while any instance serves; else the first instance's state."""
        if any(w.serving for w in self.workers):
            return S.READY
        return self.primary.shown_state

    @property
    def signature(self) -> Signature | None:
        """The version's signature once an instance loaded it (kept across restarts)."""
        if self._signature is None:
            self._signature = next((w.signature for w in self.workers if w.signature), None)
        return self._signature

    @property
    def error(self) -> str | None:
        return self.primary.error

    @property
    def inflight(self) -> int:
        return len(self.queue) + sum(w.inflight for w in self.workers)

    @property
    def depth(self) -> int:
        """Requests waiting to run: here, and in the instances' queues (as last reported)."""
        return len(self.queue) + sum(w.queued for w in self.workers)

    @property
    def last_used(self) -> float:
        return max(w.last_used for w in self.workers)

    @property
    def started_at(self) -> float | None:
        return self.primary.started_at

    def unavailable(self) -> MoltError:
        return self.primary.unavailable()

    def set_spec(self, spec: WorkerSpec) -> None:
        """New limits or path for every instance (the process keeps running)."""
        self.spec = spec
        for worker in self.workers:
            worker.spec = spec

    def set_scheduling(self, scheduling: Scheduling) -> None:
        self.scheduling = scheduling
        self.queue.limit = scheduling.max_queue
        self.circuit.configure(scheduling.circuit)
        self.checks.settings = scheduling.health_check
        self._share_queue()
        if not scheduling.direct or scheduling.fallback:
            self.close_channels("direct channels were turned off")

    def _share_queue(self) -> None:
        """Each live instance's scheduling, with its share of max_queue: the version's
        bound holds over all its queues."""
        live = [w for w in self.workers if w.state not in LEAVING]
        share = math.ceil(self.scheduling.max_queue / max(1, len(live)))
        for worker in live:
            worker.set_scheduling(dataclasses.replace(self.scheduling, max_queue=share))

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        # a count set by hand (remembered across restarts) is ready with the daemon
        for _ in range(self.manual or self.scheduling.instances.min):
            self._add_instance()
        self._scaler = asyncio.get_running_loop().create_task(self._scale_forever())

    def _add_instance(self) -> WorkerProcess:
        worker = WorkerProcess(self.spec, self.settings, cgroup=self.cgroup)
        worker.scheduling, worker.exits = self.scheduling, self.exits
        worker.on_state = self._instance_changed
        worker.on_stats = self._worker_stats
        worker.on_failed = self._counted
        if not self.workers:
            worker.on_phase = self._phase
        self.workers.append(worker)
        worker.start()
        self._share_queue()
        return worker

    def _phase(self, phase: str) -> None:
        if self.on_phase:
            self.on_phase(phase)

    def _instance_changed(self, worker: WorkerProcess) -> None:
        if worker.state is S.READY:
            self._pump()
        elif worker.state is S.FATAL and not any(w.state not in GONE for w in self.workers):
            self._fail_queue(self.unavailable())

    async def wait_ready(self, timeout: float) -> None:
        """Wait for every instance starting now; raise if none of them serves."""
        results = await asyncio.gather(
            *(w.wait_ready(timeout) for w in self.workers), return_exceptions=True
        )
        if self.state is not S.READY:
            raise next(r for r in results if isinstance(r, MoltError))

    async def drain(self, timeout: float) -> bool:
        """Run what waits and what runs (no new requests come: routing moved on); False
        if the deadline passed first."""
        deadline = time.monotonic() + timeout
        if self._scaler:
            self._scaler.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        left = max(0.0, deadline - time.monotonic())
        drained = await asyncio.gather(*(w.drain(left) for w in self.workers))
        return all(drained) and not self.queue

    async def stop(self) -> list[Pending]:
        """Stop every instance; the requests still queued (never run) are returned."""
        self._closed = True
        if self._scaler:
            self._scaler.cancel()
        await asyncio.gather(*(w.stop() for w in self.workers))
        return self.queue.drain()

    # --- requests -------------------------------------------------------------------------

    def submit(self, item: Relayed) -> None:
        """Relay a request to the serving instance with the fewest in flight; while none
        serves, it waits here (OVERLOADED when that queue is full)."""
        if self._closed or self.failed():  # no instance will serve again: it would wait forever
            raise self.unavailable()
        self._idle.clear()
        worker = self._least_loaded()
        if worker is not None and not self.queue:
            self._relay(worker, item)
            return
        try:
            self.queue.push(item, self.label)
        except MoltError as exc:  # OVERLOADED
            self._counted(exc)
            raise
        finally:
            self._check_idle()
        if item.deadline is not None:
            delay = item.deadline - time.monotonic()
            item.timer = asyncio.get_running_loop().call_later(delay, self._expire, item)

    def overloaded(self) -> bool:
        """Whether a request would be refused here (none serves, and the wait is full)."""
        return len(self.queue) >= self.queue.limit

    def failed(self) -> bool:
        return all(w.state in GONE for w in self.workers)

    def _pump(self) -> None:
        """Relay what waits here, highest priority first, while an instance can take it."""
        while self.queue and (worker := self._least_loaded()):
            taken, _ = self.queue.take(ONE_BY_ONE, time.monotonic())
            if not taken:
                return  # only expired ones wait: their timers answer them
            [item] = taken
            if item.timer is not None:
                item.timer.cancel()
                item.timer = None
            self._relay(worker, item)  # type: ignore[arg-type]

    def _least_loaded(self) -> WorkerProcess | None:
        """The serving instance with the fewest relayed requests, below the window."""
        window = self._window()
        ready = [w for w in self.workers if w.serving and w.inflight < window]
        return min(ready, key=lambda w: w.inflight, default=None)

    def _window(self) -> float:
        """Relayed requests one instance may hold: all of them for a version that runs
        one instance; else two full batches per lane."""
        if self.scheduling.instances.max == 1 and self.manual is None:
            return math.inf
        lanes = self.spec.session.channel_threads
        return 2 * lanes * self.scheduling.batching.max_batch_size

    def _relay(self, worker: WorkerProcess, item: Relayed) -> None:
        now = time.monotonic()
        params = {**item.params, "model": self.spec.model, "version": self.spec.version,
                  "priority": item.priority}  # fmt: skip
        if item.deadline is not None:
            if item.deadline <= now:
                item.answer(self._counted(deadline_exceeded(self.label, item, now, queued=True)))
                self._check_idle()
                return
            params["timeout_ms"] = (item.deadline - now) * 1e3
        item.started = now
        try:
            worker.relay(params, lambda outcome: self._done(item, outcome),
                         lambda: self._orphaned(item))  # fmt: skip
        except MoltError as exc:
            self._done(item, self._counted(exc))

    def _orphaned(self, item: Relayed) -> None:
        """A relayed request whose worker died before it ran: it waits here for another
        instance or the restart, within its deadline, first among its priority."""
        if self._closed or self.failed():
            self._done(item, self._counted(self.unavailable()))
            return
        self.queue.put_back(item)
        if item.deadline is not None:
            delay = item.deadline - time.monotonic()
            item.timer = asyncio.get_running_loop().call_later(delay, self._expire, item)
        self._pump()

    def _done(self, item: Relayed, outcome: bytes | MoltError) -> None:
        item.answer(outcome)
        if self.queue and not self._closed:
            self._pump()
        self._check_idle()

    # --- direct channels ------------------------------------------------------------------

    def channel(self) -> WorkerProcess:
        """The instance a new direct channel goes to: the serving one with the fewest."""
        ready = [w for w in self.workers if w.serving]
        if not ready:
            raise self.unavailable()
        return min(ready, key=lambda w: w.channels)

    def close_channels(self, why: str) -> None:
        for worker in self.workers:
            worker.close_channels(why, self.settings.stop_timeout)

    def _worker_stats(self, stats: dict[str, Any]) -> None:
        self.stats.add(stats)
        self.circuit.record(time.monotonic(), stats.get("codes", {}))
        for slow in stats.get("slow", []):
            self.log.warning("slow request", **slow)
        if stats.get("slow_more"):
            self.log.warning("slow requests not described", count=stats["slow_more"])

    def _counted(self, error: MoltError) -> MoltError:
        """An error moltbotd answers a request with itself, counted for metrics (a worker
        counts the answers it gives)."""
        self.stats.codes[error.code.value] += 1
        self.circuit.record(time.monotonic(), {error.code.value: 1})
        return error

    def _expire(self, item: Pending) -> None:
        queued = self.queue.remove(item)
        item.answer(self._counted(deadline_exceeded(self.label, item, time.monotonic(), queued)))
        self._check_idle()

    def _fail_queue(self, error: MoltError) -> None:
        for item in self.queue.drain():
            item.answer(self._counted(error))
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.queue and not any(w.inflight for w in self.workers):
            self._idle.set()

    # --- scaling --------------------------------------------------------------------------

    def scale(self, instances: int | None) -> None:
        """Set the number of instances by hand; None gives it back to autoscaling."""
        self.manual = instances
        self.rescale(time.monotonic())

    async def _scale_forever(self) -> None:
        """Autoscaling, the circuit's cooldown and the health checks, every SCALE_EVERY."""
        while True:
            await asyncio.sleep(SCALE_EVERY)
            now = time.monotonic()
            try:
                self.rescale(now)
                self.circuit.tick(now)
                self.checks.tick(now, self.workers, self.signature)
            except Exception:  # a bug here must not end them for good
                self.log.exception("model {model} {version}: scaling or health checks failed")

    def rescale(self, now: float) -> None:
        # A FATAL instance keeps its place: replacing it would restart what cannot start.
        live = [w for w in self.workers if w.state not in LEAVING and w not in self._retiring]
        target = self.manual if self.manual is not None else self._autoscale(live, now)
        while len(live) < target:
            live.append(self._add_instance())
            self._scaled("scale-up", len(live))
        idle = [w for w in live[1:] if not w.inflight and not w.queued]
        while len(live) > target and idle:
            worker = idle.pop()
            live.remove(worker)
            self._retiring.add(worker)  # before the task runs: the next look must skip it
            asyncio.get_running_loop().create_task(self._retire(worker))
            self._scaled("scale-down", len(live))
            self._share_queue()

    def _autoscale(self, live: list[WorkerProcess], now: float) -> int:
        """The seeds' policy within one host: up by one when the queue stays above
        scale_up_queue per instance for scale_up_after; down by one per idle instance."""
        policy = self.scheduling.instances
        count = max(len(live), policy.min)
        if self.depth > policy.scale_up_queue * max(1, len(live)):
            self._crowded_since = self._crowded_since or now
            if now - self._crowded_since >= policy.scale_up_after and count < policy.max:
                self._crowded_since = None
                return count + 1
            return count
        self._crowded_since = None
        idle = [w for w in live[1:] if now - w.last_used >= policy.scale_down_after]
        return max(policy.min, min(count, policy.max) - len(idle))

    def _why(self) -> str:
        if self.manual is not None:
            return "set by hand"
        return f"queue {self.depth}, autoscaling {self.scheduling.instances.min}-" \
               f"{self.scheduling.instances.max}"  # fmt: skip

    async def _retire(self, worker: WorkerProcess) -> None:
        try:
            await worker.drain(self.settings.stop_timeout)
            await worker.stop()
        finally:
            self._retiring.discard(worker)
            if worker in self.workers:  # pool.stop may have stopped and kept it meanwhile
                self.workers.remove(worker)
                self.stats.retire(worker.counters)

    def _scaled(self, kind: str, count: int) -> None:
        why = self._why()
        self.log.info("model {model} {version}: {count} instances ({why})", count=count,
                      why=why, change=kind)  # fmt: skip
        self._event(kind, f"{self.label}: {plural(count, 'instance')} ({why})")

    def _event(self, kind: str, message: str) -> None:
        if self.on_event:
            self.on_event(kind, message)

    # --- the circuit ----------------------------------------------------------------------

    def admits(self) -> bool:
        """Whether the version's circuit lets a request through now (a probe, half-open);
        a closed one without reading the clock, as it is asked for every request."""
        return self.circuit.state is CircuitState.CLOSED or self.circuit.admit(time.monotonic())

    def circuit_open(self) -> MoltError:
        return self.circuit.refusal(time.monotonic(), self.spec.model, self.spec.version)

    def unhealthy(self) -> str | None:
        """Why an instance failed its latest health check; None when none did."""
        return self.checks.unhealthy()

    def _check_failed(self, why: str) -> None:
        self.circuit.trip(time.monotonic(), why)

    def _circuit_changed(self, change: Transition) -> None:
        """Log and show each move; an open circuit sends the direct channels' clients to
        the socket, where routing sees their requests (channels stay refused until it
        closes: Supervisor.channel)."""
        if change.new is CircuitState.OPEN:
            self.log.warning("model {model} {version}: circuit opened: {why}; its requests"
                             " fail fast or go to its fallback for {cooldown:g}s",
                             why=change.why,
                             cooldown=self.circuit.settings.cooldown)  # fmt: skip
            self.close_channels("its circuit opened")
        else:
            self.log.info("model {model} {version}: circuit {state}: {why}",
                          state=str(change.new), why=change.why)  # fmt: skip
        self._event(f"circuit-{change.new}", f"{self.label}: circuit {change.new}: {change.why}")

    # --- status ---------------------------------------------------------------------------

    def _depths(self) -> dict[str, int]:
        depths = Counter(self.queue.depths())
        for worker in self.workers:
            depths.update(worker.queued_by_priority)
        return {priority: depths[priority] for priority in self.queue.depths()}

    def cache_status(self) -> dict[str, Any]:
        """The result cache of every instance together: settings, hits, bytes held."""
        hits = sum(w.counters.cache_hits for w in self.workers)
        misses = sum(w.counters.cache_misses for w in self.workers)
        return {"max_bytes": self.scheduling.cache.max_bytes, "ttl": self.scheduling.cache.ttl,
                "hits": hits, "misses": misses,
                "hit_ratio": hits / (hits + misses) if hits + misses else None,
                "bytes": sum(w.cache_held[0] for w in self.workers),
                "entries": sum(w.cache_held[1] for w in self.workers)}  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The first instance's status (what a single worker showed), with every instance,
        the queue, batching and scaling."""
        policy = self.scheduling.instances
        return {
            **self.primary.status(),
            "state": self.state.value,
            "inflight": self.inflight,
            "channels": sum(w.channels for w in self.workers),
            "requests": sum(w.counters.requests for w in self.workers),
            "errors": sum(w.counters.errors for w in self.workers),
            "restarts": sum(w.counters.restarts for w in self.workers),
            "instances": [w.status() for w in self.workers],
            "scaling": {"min": policy.min, "max": policy.max, "manual": self.manual},
            "queue": {
                "depth": self.depth,
                "max": self.queue.limit,
                "by_priority": self._depths(),
            },
            "batching": {
                "max_batch_size": self.scheduling.batching.max_batch_size,
                "timeout_ms": self.scheduling.batching.timeout_ms,
                **self.stats.view(),
            },
            "priority": self.scheduling.priority,
            "fallback": self.scheduling.fallback,
            "cache": self.cache_status(),
            "circuit": self.circuit.status(time.monotonic()),
            "health_check": self.checks.status(self.workers),
        }
