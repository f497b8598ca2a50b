"""Lanes: the threads of one worker that serve direct channels beside its main loop.

With `channel_threads: N` a worker serves its direct channels on N loops: its main loop
(which also answers the daemon) and N - 1 lanes, each a thread with a Direct of its own:
its channels, its queue, its counts. A channel stays on the loop it was given to. Every
loop runs the worker's one onnxruntime session (its run is thread-safe and releases the
GIL), so N clients keep N cores computing with one copy of the weights: two processes
holding a 12 MB MLP each ran 30-50 % slower than two threads sharing one session
(docs/performance.md). The main loop speaks to a lane only through the lane's inbox.
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
    """The main loop's Direct and the lanes: where a new channel goes, orders for all,
    and the worker's count of channels in every report."""

    def __init__(self, main: Direct, others: list[Direct], send: Send) -> None:
        self.main = main
        self.directs = [main, *others]
        self.lanes = [Lane(direct, lambda report: send(self.stamp(report)), number)
                      for number, direct in enumerate(others, 1)]  # fmt: skip

    def attach(self, socks: list[socket.socket]) -> None:
        """Give each new channel to the loop with the fewest."""
        load = [len(direct.streams) for direct in self.directs]
        for sock in socks:
            least = load.index(min(load))
            load[least] += 1
            self._tell(least, methodcaller("attach", sock))

    def tell_all(self, order: Order) -> None:
        for number in range(len(self.directs)):
            self._tell(number, order)

    def stamp(self, report: dict[str, Any]) -> dict[str, Any]:
        """A loop's report, with the channels of the whole worker (the daemon keeps the
        latest count it was sent)."""
        report["stats"]["channels"] = sum(len(direct.streams) for direct in self.directs)
        return report

    def stop(self) -> None:
        """Let each lane finish the run it is in, then end its thread."""
        for lane in self.lanes:
            lane.tell(None)
        for lane in self.lanes:
            lane.thread.join()

    def _tell(self, number: int, order: Order) -> None:
        if number == 0:
            order(self.main)
        else:
            self.lanes[number - 1].tell(order)
