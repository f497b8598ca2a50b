"""How worker processes ended, for the clients of their direct channels.

A direct channel's client reads only EOF when its worker dies; moltbotd's socket would
have answered the requests in flight with the error the daemon took from the death
(RESOURCE_EXHAUSTED for its memory limit, WORKER_HUNG, WORKER_FAILED). The client asks
(`channel_ended`) and gets that same error from here.
"""

import asyncio
import contextlib
from collections import OrderedDict

from moltbotd.wire.protocol import MoltError

KEPT = 256  # the latest deaths remembered: a client asks within moments of the EOF


class Exits:
    """The latest worker processes' deaths, by pid, and the clients waiting to hear one."""

    def __init__(self) -> None:
        self._ended: OrderedDict[int, tuple[str, MoltError]] = OrderedDict()
        self._waiting: dict[int, list[asyncio.Future[None]]] = {}

    def record(self, model: str, pid: int, error: MoltError) -> None:
        """Process `pid` serving `model` died: its requests in flight got `error`."""
        self._ended[pid] = (model, error)
        self._ended.move_to_end(pid)
        while len(self._ended) > KEPT:
            self._ended.popitem(last=False)
        for future in self._waiting.pop(pid, []):
            if not future.done():
                future.set_result(None)

    async def why(self, model: str, pid: int, wait: float) -> MoltError | None:
        """The error process `pid` of `model` ended with, waiting up to `wait` seconds
        for moltbotd to reap it (the client may see EOF first); None if it did not end."""
        if pid not in self._ended:
            future = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(pid, []).append(future)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await future
            finally:
                self._forget(pid, future)
        ended = self._ended.get(pid)
        return ended[1] if ended and ended[0] == model else None

    def _forget(self, pid: int, future: "asyncio.Future[None]") -> None:
        waiting = self._waiting.get(pid, [])
        if future in waiting:
            waiting.remove(future)
        if not waiting:
            self._waiting.pop(pid, None)
