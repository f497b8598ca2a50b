"""Latency histograms as the worker counts them and the daemon adds them up.

A worker counts each request's phases into fixed buckets and sends only the counts in
its periodic stats report (hub.py), never a message per request; the daemon adds the
reports into its own histograms, which /metrics exposes (control/metrics.py).
"""

from typing import Any

import numpy as np

# Upper bounds in seconds, 10 us to 30 s: a tiny model's run sits at the bottom, a cold
# start or a stuck queue at the top. Prometheus's histogram_quantile interpolates within one.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BOUNDS = np.array(LATENCY_BUCKETS)
# arrival to answer; arrival to a lane taking it; a lane's wait for its batch to fill;
# the run; reading and checking the request, framing its answer (worker/hub.py)
PHASES = ("request", "queue", "batch", "compute", "transfer")


class Histogram:
    """Counts per bucket (the last one past every bound) and the sum of what was counted."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe_many(self, seconds: np.ndarray) -> None:
        """Count each value in its bucket: the first whose bound is >= it (a bound counts
        in its own bucket), past the last bound the +Inf one."""
        if not len(seconds):
            return
        found = np.bincount(np.searchsorted(_BOUNDS, seconds, side="left"),
                            minlength=len(self.counts))  # fmt: skip
        self.counts = [a + int(b) for a, b in zip(self.counts, found, strict=True)]
        self.sum += float(seconds.sum())

    def add(self, wire: Any) -> None:
        """Add a report's counts; a report of another shape is ignored (not ours)."""
        if not (isinstance(wire, dict) and isinstance(wire.get("counts"), list)):
            return
        counts = wire["counts"]
        if len(counts) == len(self.counts) and all(type(n) is int for n in counts):
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
            self.sum += float(wire.get("sum", 0.0))

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, requests at or below it) as Prometheus wants them, +Inf last."""
        bounds = [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
        running, out = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def to_wire(self) -> dict[str, Any]:
        return {"counts": self.counts, "sum": self.sum}

    def __bool__(self) -> bool:
        return any(self.counts)
