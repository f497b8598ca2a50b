"""Handing a direct channel to a worker, seen from both ends: the datagram that carries
the channel's socket, the bounds on channels per worker (the daemon checks them before
it grants one, the worker again), and how refusals are reported."""

import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

# The datagram that hands a worker a channel's socket: the uid of the client it is for
# (SO_PEERCRED of the connection that asked), so the worker can bound channels per user.
HANDOFF = struct.Struct("=i")
REFUSALS_LOGGED_EVERY = 10.0  # seconds: a client asking again and again must not flood the log


def channel_refusal(uid: int, held: Counter[int], scheduling: dict[str, Any]) -> str | None:
    """Why one more channel for `uid` would pass the bounds of one worker (`held`: its
    channels by uid), or None: the daemon checks before it grants one, the worker again."""
    if (total := held.total()) >= scheduling["max_channels"]:
        return f"the worker serves {total} direct channels, its limit (max_channels)"
    if held[uid] >= scheduling["max_channels_per_uid"]:
        return (f"uid {uid} holds {held[uid]} direct channels to the worker, the limit per"
                " user (max_channels_per_uid)")  # fmt: skip
    return None


class Throttled:
    """Refusals reported once per REFUSALS_LOGGED_EVERY, the first at once and then how
    many more came: a client that asks in a loop must not flood the log."""

    def __init__(self, report: Callable[[str, int], None]) -> None:
        self.report = report  # (the latest reason, refusals since the last report)
        self.due = 0.0
        self.count = 0

    def add(self, why: str) -> None:
        self.count += 1
        if (now := time.monotonic()) >= self.due:
            self.report(why, self.count)
            self.due, self.count = now + REFUSALS_LOGGED_EVERY, 0
