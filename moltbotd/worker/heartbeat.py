"""The worker's heartbeat: a thread that tells the daemon it is alive, and how long its
oldest run has taken, over the handoff socket (control, apart from the data path).

A hung onnxruntime run releases the GIL, so the beat goes on and reports the run's age:
the daemon kills the worker past run_timeout. A stopped process (SIGSTOP) or a thread
that holds the GIL for good sends nothing: the daemon kills it after hung_after.
"""

import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import msgpack

T = TypeVar("T")


class Runs:
    """When each lane's current run began."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}

    def track(self, run: Callable[..., T]) -> Callable[..., T]:
        def tracked(*args: object) -> T:
            me = threading.get_ident()
            self._started[me] = time.monotonic()  # one key per thread: no lock needed
            try:
                return run(*args)
            finally:
                del self._started[me]

        return tracked

    def oldest(self) -> float | None:
        """Seconds the longest run under way has taken, or None when nothing runs."""
        started = list(self._started.values())
        return time.monotonic() - min(started) if started else None


def beat_forever(sock: socket.socket, runs: Runs, every: float) -> None:
    """One datagram per beat until the daemon closes the socket. A beat that finds the
    socket full is dropped: the daemon reads only the latest."""
    while True:
        try:
            sock.send(msgpack.packb({"beat": runs.oldest()}), socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        except OSError:  # the daemon closed its end: we are stopping
            return
        time.sleep(every)


def start(sock: socket.socket, runs: Runs, every: float) -> None:
    threading.Thread(target=beat_forever, args=(sock, runs, every), name="heartbeat",
                     daemon=True).start()  # fmt: skip
