"""One model version's worker processes and its queue: dispatch, batching and scaling.

A Pool owns the version's instances (Workers, all in the version's cgroup) and its
scheduler.Queue. Requests wait in the queue, not in a worker's socket: an instance gets
at most PIPELINE batches at a time, so priorities and deadlines apply to everything
still waiting, and the next batch goes to the least-loaded ready instance.
"""

import asyncio
import contextlib
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from moltbotd.config import Scheduling, WorkerSettings
from moltbotd.isolation.cgroups import Group
from moltbotd.logs import get_logger
from moltbotd.scheduler import Pending, Queue, deadline_exceeded
from moltbotd.serving.process import WorkerProcess, WorkerSpec
from moltbotd.serving.states import WorkerState
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltbotd.wire.signature import Signature
from moltbotd.wire.units import plural

log = get_logger("pool")
S = WorkerState
# Batches one instance holds at once: one running and one on its way, so it never idles
# for a round trip; the rest wait in the queue, where priorities and deadlines still act.
PIPELINE = 2
# Without batching, requests still travel to an instance in bundles (run one by one),
# as many as fit in BUNDLE_SECONDS of its measured run time, at most BUNDLE_MAX: one
# message each way instead of one per request, which is most of a tiny model's cost.
BUNDLE_SECONDS = 0.0005
BUNDLE_MAX = 16
SCALE_EVERY = 0.25  # seconds between looks at the queue for autoscaling
GONE = (S.STOPPING, S.STOPPED, S.FATAL)  # instances that will not serve again
LEAVING = (S.DRAINING, S.STOPPING, S.STOPPED)  # instances that no longer count


class Stats:
    """Batch sizes and queue times, for status."""

    def __init__(self) -> None:
        self.batches = 0
        self.sizes: Counter[int] = Counter()  # requests per batch -> batches
        self.waits: deque[float] = deque(maxlen=2048)  # seconds in the queue, latest

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
                 cgroup: Group | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.settings = settings
        self.scheduling = scheduling
        self.cgroup = cgroup
        self.workers: list[WorkerProcess] = []
        self.queue = Queue(scheduling.max_queue)
        self.manual: int | None = None  # instances set by `moltctl scale`; None: autoscale
        self.stats = Stats()
        self.on_phase: Callable[[str], None] | None = None  # the first instance's phases
        self.on_event: Callable[[str, str], None] | None = None  # (kind, message) for status
        self.log = log.bind(model=spec.model, version=spec.version)
        self._closed = False
        self._wake: asyncio.Handle | None = None  # a look at a batch that waits to fill
        self._wake_when = 0.0
        self._run_seconds = 0.0  # per request, averaged
        self._signature: Signature | None = None
        self._pump_soon = False
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
        for worker in self.workers:
            worker.set_scheduling(scheduling)
        if not scheduling.direct or scheduling.fallback:
            self.close_channels("direct channels were turned off")
        self._pump()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        # a count set by hand (remembered across restarts) is ready with the daemon
        for _ in range(self.manual or self.scheduling.instances.min):
            self._add_instance()
        self._scaler = asyncio.get_running_loop().create_task(self._scale_forever())

    def _add_instance(self) -> WorkerProcess:
        worker = WorkerProcess(
            self.spec, self.settings, cgroup=self.cgroup, scheduling=self.scheduling
        )
        worker.on_state = self._instance_changed
        worker.on_stats = self._direct_stats
        if not self.workers:
            worker.on_phase = self._phase
        self.workers.append(worker)
        worker.start()
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
        if self._wake:
            self._wake.cancel()
        await asyncio.gather(*(w.stop() for w in self.workers))
        return self.queue.drain()

    # --- requests -------------------------------------------------------------------------

    def submit(self, item: Pending) -> None:
        """Queue a request (OVERLOADED when the queue is full) and dispatch what can go."""
        if self._closed or self.failed():  # no instance will serve again: it would wait forever
            raise self.unavailable()
        self._make_room()
        self.queue.push(item, self.label)
        self._idle.clear()
        if item.deadline is not None:
            delay = item.deadline - time.monotonic()
            item.timer = asyncio.get_running_loop().call_later(delay, self._expire, item)
        if not any(w.inflight for w in self.workers):
            self._pump()  # nothing runs: no reason to wait for the end of the loop turn
        elif not self._pump_soon:  # after the requests that arrived together: one bundle
            self._pump_soon = True
            asyncio.get_running_loop().call_soon(self._pump)

    def overloaded(self) -> bool:
        self._make_room()
        return len(self.queue) >= self.queue.limit

    def _make_room(self) -> None:
        """A queue that looks full dispatches at once what arrived this turn: only requests
        that must wait count against max_queue, not those waiting for the turn's end."""
        if self._pump_soon and len(self.queue) >= self.queue.limit:
            self._pump()

    def failed(self) -> bool:
        return all(w.state in GONE for w in self.workers)

    def _pump(self) -> None:
        self._pump_soon = False
        now = time.monotonic()
        while self.queue:
            worker = self._least_loaded()
            if worker is None:
                return
            idle = not worker.inflight
            batch, wake = self.queue.take(self.scheduling.batching, now, self._bundle(), idle)
            if not batch:
                self._wake_at(wake)
                return
            self._run(worker, batch, now)

    def _bundle(self) -> int:
        if self._run_seconds <= 0:
            return 1
        return max(1, min(BUNDLE_MAX, int(BUNDLE_SECONDS / self._run_seconds)))

    def _least_loaded(self) -> WorkerProcess | None:
        ready = [w for w in self.workers if w.serving and w.inflight < PIPELINE]
        return min(ready, key=lambda w: w.inflight, default=None)

    def _wake_at(self, when: float | None) -> None:
        if when is None or (self._wake and self._wake_when <= when):
            return
        if self._wake:
            self._wake.cancel()
        loop = asyncio.get_running_loop()
        self._wake = loop.call_later(max(0.0, when - time.monotonic()), self._woken)
        self._wake_when = when

    def _woken(self) -> None:
        self._wake = None
        self._pump()

    def _run(self, worker: WorkerProcess, batch: list[Pending], now: float) -> None:
        concat = self.scheduling.batching.max_batch_size > 1
        if concat:
            self.stats.batches += 1
            self.stats.sizes[len(batch)] += 1
        for item in batch:
            item.started = now
            self.stats.waits.append(now - item.arrived)
        inputs = [(i.inputs, i.outputs) for i in batch]
        try:
            worker.send(inputs, concat, lambda reply: self._done(batch, reply))
        except MoltError as exc:
            self._done(batch, exc)

    def _done(self, batch: list[Pending], reply: dict[str, Any] | MoltError) -> None:
        if isinstance(reply, MoltError):
            for item in batch:
                item.answer(reply)
        else:
            # a moving average of the run time per request, for the size of bundles
            seconds = reply["run_ms"] / 1e3 / len(batch)
            self._run_seconds += (seconds - self._run_seconds) * 0.1
            for item, result in zip(batch, reply["results"], strict=True):
                item.answer(result if isinstance(result, bytes) else self._error(result))
        if not self._closed:
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

    def _direct_stats(self, stats: dict[str, Any]) -> None:
        sizes = {int(size): n for size, n in stats["sizes"].items()}
        self.stats.batches += sum(sizes.values())
        self.stats.sizes.update(sizes)
        self.stats.waits.extend(stats["waits"])

    def _error(self, error: dict[str, Any]) -> MoltError:
        return MoltError(ErrorCode(error["code"]), f"{self.label}: {error['message']}")

    def _expire(self, item: Pending) -> None:
        queued = self.queue.remove(item)
        item.answer(deadline_exceeded(self.label, item, time.monotonic(), queued))
        self._check_idle()

    def _fail_queue(self, error: MoltError) -> None:
        for item in self.queue.drain():
            item.answer(error)
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
        while True:
            await asyncio.sleep(SCALE_EVERY)
            self.rescale(time.monotonic())

    def rescale(self, now: float) -> None:
        # A FATAL instance keeps its place: replacing it would restart what cannot start.
        live = [w for w in self.workers if w.state not in LEAVING and w not in self._retiring]
        target = self.manual if self.manual is not None else self._autoscale(live, now)
        while len(live) < target:
            live.append(self._add_instance())
            self._event(
                "scale-up", f"{self.label}: {plural(len(live), 'instance')} ({self._why()})"
            )
        idle = [w for w in live[1:] if not w.inflight]
        while len(live) > target and idle:
            worker = idle.pop()
            live.remove(worker)
            self._retiring.add(worker)  # before the task runs: the next look must skip it
            asyncio.get_running_loop().create_task(self._retire(worker))
            self._event(
                "scale-down", f"{self.label}: {plural(len(live), 'instance')} ({self._why()})"
            )

    def _autoscale(self, live: list[WorkerProcess], now: float) -> int:
        """The seeds' policy within one host: up by one when the queue stays above
        scale_up_queue per instance for scale_up_after; down by one per idle instance."""
        policy = self.scheduling.instances
        count = max(len(live), policy.min)
        if len(self.queue) > policy.scale_up_queue * max(1, len(live)):
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
        return f"queue {len(self.queue)}, autoscaling {self.scheduling.instances.min}-" \
               f"{self.scheduling.instances.max}"  # fmt: skip

    async def _retire(self, worker: WorkerProcess) -> None:
        try:
            await worker.drain(self.settings.stop_timeout)
            await worker.stop()
        finally:
            self._retiring.discard(worker)
            if worker in self.workers:  # pool.stop may have stopped and kept it meanwhile
                self.workers.remove(worker)

    def _event(self, kind: str, message: str) -> None:
        self.log.info(message, instances=len(self.workers))
        if self.on_event:
            self.on_event(kind, message)

    # --- status ---------------------------------------------------------------------------

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
                "depth": len(self.queue),
                "max": self.queue.limit,
                "by_priority": self.queue.depths(),
            },
            "batching": {
                "max_batch_size": self.scheduling.batching.max_batch_size,
                "timeout_ms": self.scheduling.batching.timeout_ms,
                **self.stats.view(),
            },
            "priority": self.scheduling.priority,
            "fallback": self.scheduling.fallback,
        }
