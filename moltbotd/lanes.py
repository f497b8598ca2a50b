"""Lanes: the threads of one worker that serve its direct channels.

With `channel_threads: N` a worker serves its direct channels on N lanes, each a thread
with a Direct of its own: its channels, its queue, its counts; a channel stays on the
lane it was given to. The worker's main loop answers the daemon (its batches, the
handoff of new channels, orders): a long run on a channel never holds a new channel's
handoff. Every lane runs the worker's one onnxruntime session (its run is thread-safe
and releases the GIL), so N clients keep N cores computing with one copy of the weights:
two processes holding a 12 MB MLP each ran 30-50 % slower than two threads sharing one
session (docs/performance.md). The main loop speaks to a lane only through its inbox.
"""

import os
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from operator import methodcaller
from typing import Any

from moltbotd.direct import Direct

Order = Callable[[Direct], None]  # what a lane's thread does to its Direct
Send = Callable[[dict[str, Any]], None]  # a message to the daemon (thread-safe)


class Lane:
    """A thread serving the direct channels given to it, until told to stop."""

    def __init__(self, direct: Direct, send: Send, number: int) -> None:
        self.direct = direct
        self.send = send
        self.inbox: deque[Order | None] = deque()
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        direct.selector.register(self.wake, selectors.EVENT_READ, self)
        self.thread = threading.Thread(target=self._serve, name=f"lane-{number}", daemon=True)
        self.thread.start()

    def tell(self, order: Order | None) -> None:
        """Have the lane's thread carry out `order` on its Direct; None stops it."""
        self.inbox.append(order)
        os.eventfd_write(self.wake, 1)

    def _serve(self) -> None:
        direct = self.direct
        while True:
            for source in direct.wait(direct.timeout()):
                if source is not self:
                    direct.ready(source)
                elif not self._obey():
                    return
            direct.run()
            direct.flush()
            if report := direct.report():
                self.send(report)

    def _obey(self) -> bool:
        """Carry out the orders that came; False once told to stop."""
        os.eventfd_read(self.wake)
        while self.inbox:
            if (order := self.inbox.popleft()) is None:
                return False
            order(self.direct)
        return True


class Loops:
    """The main loop's Direct (which holds no channel: its selector and polling serve
    the daemon's channel) and the lanes: where a new channel goes, orders for all, and
    the worker's count of channels in every report."""

    def __init__(self, main: Direct, lanes: list[Direct], send: Send) -> None:
        self.main = main
        self.lanes = [Lane(direct, lambda report: send(self.stamp(report)), number)
                      for number, direct in enumerate(lanes, 1)]  # fmt: skip

    def attach(self, socks: list[socket.socket]) -> None:
        """Give each new channel to the lane with the fewest."""
        load = [len(lane.direct.streams) for lane in self.lanes]
        for sock in socks:
            least = load.index(min(load))
            load[least] += 1
            self.lanes[least].tell(methodcaller("attach", sock))

    def tell_all(self, order: Order) -> None:
        order(self.main)
        for lane in self.lanes:
            lane.tell(order)

    def stamp(self, report: dict[str, Any]) -> dict[str, Any]:
        """A lane's report, with the channels of the whole worker (the daemon keeps the
        latest count it was sent)."""
        report["stats"]["channels"] = sum(len(lane.direct.streams) for lane in self.lanes)
        return report

    def stop(self) -> None:
        """Let each lane finish the run it is in, then end its thread."""
        for lane in self.lanes:
            lane.tell(None)
        for lane in self.lanes:
            lane.thread.join()
