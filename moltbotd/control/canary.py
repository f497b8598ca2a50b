"""A canary: which requests go to the candidate version, and when it has failed too often.

Pure bookkeeping, no I/O: the supervisor asks `takes_next()` per request and reports
each outcome with `record()`, which says when the error rate over the window crossed
the threshold. The share is exact rather than random (a running sum, like weighted
round-robin), so 10 % means every tenth request and tests can count on it.
"""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from moltbotd.config import CanarySettings


@dataclass
class CanaryRoute:
    version: str
    share: float  # 0 < share < 1
    settings: CanarySettings
    started: float = field(default_factory=time.time)
    clock: Callable[[], float] = time.monotonic
    _credit: Fraction = Fraction(0)  # exact: 0.1 added ten times in floats is below 1.0
    _outcomes: deque[tuple[float, bool]] = field(default_factory=deque)  # (when, failed)
    requests: int = 0
    errors: int = 0
    suspended: bool = False  # a promote is recording itself: no share, no outcomes
    _step: Fraction = field(init=False)

    def __post_init__(self) -> None:
        self._step = Fraction(self.share).limit_denominator(10**6)

    def takes_next(self) -> bool:
        """True when the next request goes to the canary."""
        self._credit += self._step
        if self._credit >= 1:
            self._credit -= 1
            return True
        return False

    def record(self, failed: bool) -> str | None:
        """Count one canary outcome; returns why the canary must roll back, or None."""
        now = self.clock()
        self.requests += 1
        self.errors += failed
        self._outcomes.append((now, failed))
        while self._outcomes and self._outcomes[0][0] < now - self.settings.window:
            self._outcomes.popleft()
        return self._verdict()

    def _verdict(self) -> str | None:
        total = len(self._outcomes)
        failed = sum(f for _, f in self._outcomes)
        if total < self.settings.min_requests or failed / total <= self.settings.max_error_rate:
            return None
        return (
            f"{failed} of its last {total} requests failed ({failed / total:.0%}, more than"
            f" {self.settings.max_error_rate:.0%}) within {self.settings.window:g}s"
        )

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "share": self.share,
            "started": self.started,
            "requests": self.requests,
            "errors": self.errors,
        }
