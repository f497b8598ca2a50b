"""Active health checks: the daemon's own request to each serving instance of a version.

Every `health_check.interval` each serving instance is sent the version's warm-up input
(its model.yaml `samples:` in turn, else zeros shaped by its signature, dynamic dimensions
as 1: what the worker ran before it said ready), relayed as a socket request is, at low
priority, with the check's timeout as its deadline and at most one in flight per
instance: a check takes one batch slot, never more. It is left out of the instance's
counters and idle time (WorkerProcess.relay's `counted`), so status's requests, scaling
down and unloading an idle version ignore it; the worker still counts its answer by code
and in its histograms, as it counts every answer (moltbot_health_checks says how many).

A check passes on an answer; it says nothing when it never ran for reasons of load or
life cycle (it waited past its timeout behind user requests, found the queue full, the
instance stopped); any other error fails it: the version is unhealthy until that instance
passes one, `on_failure` opens its circuit, and `restart_after` failures in a row restart
the instance. A version without samples whose warm-up on zeros failed has no checks.
"""

import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from moltbotd.config import HealthCheckSettings
from moltbotd.logs import get_logger
from moltbotd.serving.process import WorkerProcess, WorkerSpec
from moltbotd.wire.protocol import STRING_DTYPE, WIRE_DTYPES, ErrorCode, MoltError
from moltbotd.wire.signature import Signature

log = get_logger("checks")
PASSED, FAILED, SILENT = "passed", "failed", "inconclusive"
# the check did not get to run: neither health nor sickness
NOT_RUN = frozenset({ErrorCode.OVERLOADED, ErrorCode.MODEL_UNAVAILABLE, ErrorCode.SHUTTING_DOWN})
REQUEST_ID = "health-check"  # how a check shows in the slow-request log


def zeros(signature: Signature) -> dict[str, Any] | None:
    """The worker's warm-up input as tensor maps (none: an input is not a tensor)."""
    inputs: dict[str, Any] = {}
    for spec in signature.inputs:
        if spec.dtype is None:
            return None
        shape = [d if isinstance(d, int) else 1 for d in spec.shape or ()]
        count = math.prod(shape)
        data: bytes | list[str] = (
            [""] * count
            if spec.dtype == STRING_DTYPE
            else bytes(count * WIRE_DTYPES[spec.dtype].itemsize)
        )
        inputs[spec.name] = {"dtype": spec.dtype, "shape": shape, "data": data}
    return inputs


def verdict(outcome: bytes | MoltError) -> tuple[str, str]:
    """(PASSED, FAILED or SILENT, why) for a check's answer."""
    if not isinstance(outcome, MoltError):
        return PASSED, "answered"
    queued = outcome.code is ErrorCode.DEADLINE_EXCEEDED and not outcome.details.get("ran")
    if queued or outcome.code in NOT_RUN:
        return SILENT, f"it did not run: {outcome.message}"
    return FAILED, f"{outcome.code}: {outcome.message}"


@dataclass
class _Failing:
    streak: int  # failed checks in a row (since the last restart for them)
    why: str  # the latest failure


class HealthChecks:
    """One version's checks: when each instance is due, which ones run, their outcomes."""

    def __init__(self, spec: WorkerSpec, settings: HealthCheckSettings,
                 on_failure: Callable[[str], None]) -> None:  # fmt: skip
        self.spec = spec
        self.settings = settings
        self.on_failure = on_failure  # why: the version's circuit opens
        self.on_event: Callable[[str, str], None] | None = None  # (kind, message) for status
        self.outcomes: Counter[str] = Counter()  # PASSED, FAILED, SILENT
        self.log = log.bind(model=spec.model, version=spec.version)
        self._samples: Iterator[Mapping[str, Any]] | None = (
            itertools.cycle(spec.samples) if spec.samples else None
        )
        self._zeros: dict[str, Any] | None = None
        self._sent: dict[WorkerProcess, float] = {}  # instance -> when its last check left
        self._running: set[WorkerProcess] = set()
        self._failing: dict[WorkerProcess, _Failing] = {}

    def tick(self, now: float, workers: list[WorkerProcess], signature: Signature | None) -> None:
        """Send a check to each serving instance that is due and has none in flight."""
        self._forget(workers)
        if not self.settings.interval or signature is None:
            return
        for worker in workers:
            since = max(self._sent.get(worker, 0.0), worker.started_at or now)
            due = now >= since + self.settings.interval
            if due and worker.serving and worker not in self._running:
                self._send(worker, now, signature)

    def _forget(self, workers: list[WorkerProcess]) -> None:
        """Instances scaled away or retired take their records with them."""
        for gone in self._sent.keys() - set(workers):
            del self._sent[gone]
            self._failing.pop(gone, None)

    def _send(self, worker: WorkerProcess, now: float, signature: Signature) -> None:
        inputs = self._input(worker, signature)
        if inputs is None:
            return
        params = {"model": self.spec.model, "version": self.spec.version, "inputs": inputs,
                  "priority": "low", "timeout_ms": self.settings.timeout * 1e3,
                  "request_id": REQUEST_ID, "cache": False}  # fmt: skip
        try:
            worker.relay(params, functools.partial(self._answered, worker),
                         functools.partial(self._not_run, worker), counted=False)  # fmt: skip
        except MoltError:  # it stopped serving since: the next tick looks again
            return
        self._sent[worker] = now
        self._running.add(worker)

    def _input(self, worker: WorkerProcess, signature: Signature) -> Mapping[str, Any] | None:
        if self._samples:
            return next(self._samples)
        if worker.ready_info.get("warmup_error"):
            return None  # the model rejects zeros: they cannot tell health from sickness
        if self._zeros is None:
            self._zeros = zeros(signature)
        return self._zeros

    def _not_run(self, worker: WorkerProcess) -> None:
        """The instance died before its check started."""
        self._running.discard(worker)
        self.outcomes[SILENT] += 1

    def _answered(self, worker: WorkerProcess, outcome: bytes | MoltError) -> None:
        """Told from the relay's reader: a failure here must not end the relay."""
        self._running.discard(worker)
        try:
            self._judged(worker, *verdict(outcome))
        except Exception:
            self.log.exception("model {model} {version}: judging a health check failed")

    def _judged(self, worker: WorkerProcess, outcome: str, why: str) -> None:
        self.outcomes[outcome] += 1
        if outcome == SILENT:
            self.log.debug("model {model} {version}: health check inconclusive: {why}",
                           pid=worker.pid, why=why)  # fmt: skip
            return
        if outcome == PASSED:
            if self._failing.pop(worker, None):
                self.log.info("model {model} {version}: worker pid {pid} passed its health"
                              " check again", pid=worker.pid)  # fmt: skip
            return
        failing = self._failing.setdefault(worker, _Failing(0, why))
        failing.streak, failing.why = failing.streak + 1, why
        self.log.warning("model {model} {version}: worker pid {pid} failed its health check"
                         " ({streak} in a row): {why}", pid=worker.pid, streak=failing.streak,
                         why=why)  # fmt: skip
        message = f"{self.spec.label}: health check of pid {worker.pid} failed: {why}"
        if self.on_event:
            self.on_event("health-check-failed", message)
        self.on_failure(f"its health check failed: {why}")
        if self.settings.restart_after and failing.streak >= self.settings.restart_after:
            failing.streak = 0  # unhealthy still, until the new process passes one
            pid = worker.pid
            restarted = worker.restart(f"{self.settings.restart_after} health checks failed"
                                       f" in a row, the latest: {why}")  # fmt: skip
            if restarted and self.on_event:
                self.on_event("health-restart", f"{self.spec.label}: pid {pid} restarted"
                              f" after {self.settings.restart_after} failed health checks"
                              " in a row")  # fmt: skip

    def unhealthy(self) -> str | None:
        """Why the version is unhealthy: an instance whose latest check failed."""
        return next((f.why for f in self._failing.values()), None)

    def status(self, workers: list[WorkerProcess]) -> dict[str, Any]:
        no_zeros = not self.spec.samples and any(w.ready_info.get("warmup_error") for w in workers)
        return {
            "interval": self.settings.interval,
            "timeout": self.settings.timeout,
            "input": "samples" if self.spec.samples else "zeros",
            "off": "its warm-up on zeros failed" if no_zeros else (
                "interval 0" if not self.settings.interval else None),
            "unhealthy": self.unhealthy(),
            "failing": {str(w.pid): f.streak for w, f in self._failing.items()},
            "outcomes": {k: self.outcomes[k] for k in (PASSED, FAILED, SILENT)},
        }  # fmt: skip
