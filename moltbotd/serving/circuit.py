"""A version's circuit breaker: when its own failures pass a share, stop sending it requests.

Pure bookkeeping, no I/O and no asyncio (canary.py's model): the pool feeds it the
version's answers by code (`record`: the counts the metrics show, which the workers report
for both paths and moltbotd adds for the errors it answers itself), asks it before each
request (`admit`), moves it on in time (`tick`) and forces it open when a health check
fails (`trip`). Every time is a number passed in, so tests drive it with numbers. Every
change of state is checked against TRANSITIONS and told to `on_change`.

    CLOSED ─share of failures over max_failure_rate─▶ OPEN ─cooldown─▶ HALF_OPEN
      ▲                (or a failed health check)      ▲                  │
      └──────────────── `probes` successes ────────────┼──────────────────┤
                                                       └── one failure ───┘
"""

import enum
import math
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moltbotd.config import CircuitSettings
from moltbotd.serving.states import IllegalTransition
from moltbotd.wire.protocol import ErrorCode, MoltError


class CircuitState(enum.StrEnum):
    CLOSED = "closed"  # requests flow; their failures are counted in the window
    OPEN = "open"  # requests are refused (or go to the fallback) until the cooldown ends
    HALF_OPEN = "half-open"  # `probes` requests go through: their outcomes decide


C = CircuitState
TRANSITIONS: dict[CircuitState, frozenset[CircuitState]] = {
    C.CLOSED: frozenset({C.OPEN}),
    C.OPEN: frozenset({C.HALF_OPEN}),
    C.HALF_OPEN: frozenset({C.OPEN, C.CLOSED}),
}


def check_transition(old: CircuitState, new: CircuitState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a circuit cannot go from {old} to {new}")


# The version's own failures. Not failures, nor successes: a client's mistakes
# (INVALID_INPUT, BAD_REQUEST: a client sending garbage must not open the circuit for
# everyone), load (OVERLOADED: max_queue and the fallback answer it), a version not
# serving (MODEL_UNAVAILABLE: routing already skips it), moltbotd's own bugs (INTERNAL),
# and DEADLINE_EXCEEDED unless `deadlines` says otherwise.
FAILURES = frozenset(code.value for code in (ErrorCode.INFERENCE_FAILED, ErrorCode.WORKER_FAILED,
                                              ErrorCode.WORKER_HUNG,
                                              ErrorCode.RESOURCE_EXHAUSTED))  # fmt: skip
SUCCESS = "OK"
BUCKETS = 10  # the window moves on by a tenth of its span


@dataclass(frozen=True)
class Transition:
    old: CircuitState
    new: CircuitState
    why: str


@dataclass
class _Bucket:
    index: int  # floor(time / width)
    answered: int = 0
    failed: int = 0


class Window:
    """Answers and failures of the last `span` seconds, to a tenth of it, in buckets: a
    worker's report brings many answers at once, and each costs the same whatever the
    rate of requests."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._width = span / BUCKETS
        self._buckets: deque[_Bucket] = deque()

    def add(self, now: float, answered: int, failed: int) -> None:
        index = math.floor(now / self._width)
        if not self._buckets or self._buckets[-1].index != index:
            self._buckets.append(_Bucket(index))
        self._buckets[-1].answered += answered
        self._buckets[-1].failed += failed

    def totals(self, now: float) -> tuple[int, int]:
        """(answered, failed) within the span."""
        oldest = math.floor((now - self.span) / self._width)  # partly out: all of it out
        while self._buckets and self._buckets[0].index <= oldest:
            self._buckets.popleft()
        return sum(b.answered for b in self._buckets), sum(b.failed for b in self._buckets)


def _ignore(_: Transition) -> None:
    pass


class Breaker:
    def __init__(self, settings: CircuitSettings,
                 on_change: Callable[[Transition], None] = _ignore) -> None:  # fmt: skip
        self.settings = settings
        self.on_change = on_change
        self.state = C.CLOSED
        self.window = Window(settings.window)
        self.why: str | None = None  # why it last opened
        self.since: float | None = None  # when it entered its state (None: it never moved)
        # the cooldown runs from here: when it opened (or a check failed since), and when
        # half-open, when the latest probe went through (see admit)
        self._cooling_from: float | None = None
        self.opened_with = (0, 0)  # (answered, failed) in the window when it opened
        self.transitions: Counter[CircuitState] = Counter()  # by the state entered
        self._admitted = 0  # half-open: probes let through and not yet answered
        self._passed = 0  # half-open: successes since

    @property
    def retry_at(self) -> float | None:
        """When an open circuit half-opens; when a half-open one gives up its probes."""
        if self.state is C.CLOSED or self._cooling_from is None:
            return None
        return self._cooling_from + self.settings.cooldown

    def configure(self, settings: CircuitSettings) -> None:
        """New settings (a reload: a new cooldown counts at once); a new window span
        starts the count over."""
        if settings.window != self.settings.window:
            self.window = Window(settings.window)
        self.settings = settings

    def admit(self, now: float) -> bool:
        """Whether a request may go to the version now; a half-open circuit counts it as
        one of its probes. A probe whose outcome never comes (it ended neither way, and
        said nothing) is given up a cooldown after the latest one was let through."""
        self.tick(now)
        if self.state is C.CLOSED:
            return True
        if self.state is C.OPEN:
            return False
        if self.retry_at is not None and now >= self.retry_at:
            self._admitted = 0
        if self._admitted >= self.settings.probes:
            return False
        self._admitted += 1
        self._cooling_from = now
        return True

    def tick(self, now: float) -> None:
        """An open circuit whose cooldown passed half-opens."""
        if self.state is C.OPEN and self.retry_at is not None and now >= self.retry_at:
            self._move(C.HALF_OPEN, now, f"its cooldown of {self.settings.cooldown:g}s passed;"
                       f" {self.settings.probes} probe requests may go through")  # fmt: skip

    def record(self, now: float, codes: Mapping[str, int]) -> None:
        """Answers of the version by code ("OK" or the error's), as the metrics count them."""
        failed = sum(n for code, n in codes.items() if self._fails(code))
        passed = codes.get(SUCCESS, 0)
        if self.state is C.CLOSED and passed + failed:
            self.window.add(now, passed + failed, failed)
            self._judge(now)
        elif self.state is C.HALF_OPEN:
            self._probed(now, codes, passed, failed)

    def trip(self, now: float, why: str) -> None:
        """Open at once (a health check failed); an open circuit starts its cooldown over."""
        if self.state is C.OPEN:
            self.why, self._cooling_from = why, now
            return
        self.opened_with = self.window.totals(now)
        self._move(C.OPEN, now, why)

    def _fails(self, code: str) -> bool:
        return code in FAILURES or (
            self.settings.deadlines and code == ErrorCode.DEADLINE_EXCEEDED.value
        )

    def _judge(self, now: float) -> None:
        answered, failed = self.window.totals(now)
        most = self.settings.max_failure_rate
        if answered < self.settings.min_requests or failed / answered <= most:
            return
        self.opened_with = (answered, failed)
        self._move(C.OPEN, now, f"{failed} of its last {answered} requests failed"
                   f" ({failed / answered:.0%}, more than {most:.0%}) within"
                   f" {self.settings.window:g}s")  # fmt: skip

    def _probed(self, now: float, codes: Mapping[str, int], passed: int, failed: int) -> None:
        if failed:
            which = ", ".join(sorted(code for code in codes if self._fails(code)))
            self.opened_with = (passed + failed, failed)
            self._move(C.OPEN, now, f"a probe request failed ({which})")
            return
        neither = sum(codes.values()) - passed
        self._admitted = max(0, self._admitted - neither)  # its slot goes to another probe
        self._passed += passed
        if self._passed >= self.settings.probes:
            self._move(C.CLOSED, now, f"{self._passed} probe requests succeeded")

    def _move(self, new: CircuitState, now: float, why: str) -> None:
        check_transition(self.state, new)
        old, self.state, self.since = self.state, new, now
        self.transitions[new] += 1
        if new is C.OPEN:
            self.why, self._cooling_from = why, now
        elif new is C.HALF_OPEN:
            self._admitted, self._passed, self._cooling_from = 0, 0, None
        else:
            self.window = Window(self.settings.window)
            self.why, self._cooling_from = None, None
        self.on_change(Transition(old, new, why))

    def retry_in(self, now: float) -> float | None:
        """Seconds until the version takes requests again (None: it takes them now)."""
        retry_at = self.retry_at
        return None if retry_at is None else max(0.0, retry_at - now)

    def refusal(self, now: float, model: str, version: str) -> MoltError:
        """CIRCUIT_OPEN for a request `admit` refused."""
        answered, failed = self.opened_with
        retry = self.retry_in(now) or 0.0
        if self.state is C.HALF_OPEN:
            why = (f"its {self.settings.probes} probe requests are under way (it opened"
                   f" because {self.why})")  # fmt: skip
        else:
            why = self.why
        return MoltError(
            ErrorCode.CIRCUIT_OPEN,
            f"model {model} {version}: circuit {self.state}: {why}; it is tried again"
            f" in {retry:.1f}s",
            {"model": model, "version": version, "state": self.state.value,
             "failures": failed, "requests": answered,
             "failure_rate": failed / answered if answered else None,
             "window": self.settings.window, "retry_after": retry},
        )  # fmt: skip

    def status(self, now: float) -> dict[str, Any]:
        answered, failed = self.window.totals(now)
        return {
            "state": self.state.value,
            "since": None if self.since is None else now - self.since,
            "why": self.why,
            "retry_in": self.retry_in(now),
            "requests": answered,  # in the window (closed only: it restarts at each close)
            "failures": failed,
            "window": self.settings.window,
            "max_failure_rate": self.settings.max_failure_rate,
            "min_requests": self.settings.min_requests,
            "transitions": {state.value: self.transitions[state] for state in CircuitState},
        }
