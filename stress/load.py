"""Tagged requests whose every answer is checked, counted by outcome per client kind.

Outcomes: "ok" (the right answer for the version that answered), "wrong" (another
version's answer, another request's, a model that was not asked), "error CODE",
"unanswered" (no answer in time, or the connection lost before it), "duplicated" (a
second answer for one request).
"""

import asyncio
import contextlib
import itertools
import select
import socket as socket_module
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moltbotd.wire.protocol import FrameDecoder, MoltError, encode_frame, request, response_result
from moltctl.client import (
    MAX_RESPONSE_BYTES,
    AsyncClient,
    Client,
    ConnectError,
    Outputs,
    ProtocolError,
    decode_outputs,
    encode_inputs,
)
from stress.models import right_answer, tagged

EXAMPLES = 3  # kept per outcome


@dataclass
class Tally:
    """Outcomes of one client kind; shared by its threads."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, example: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            kept = self.examples.setdefault(outcome, [])
            if example and len(kept) < EXAMPLES:
                kept.append(example)

    def total(self) -> int:
        return sum(self.counts.values())

    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if k.startswith("error ")}


def judge(model: str, x: np.ndarray, out: Outputs) -> tuple[str, str]:
    """The outcome of an answer to x and, when it is not ok, what came."""
    if out.model == model and right_answer(model, out.version, x, out.get("y")):
        return "ok", ""
    return "wrong", f"asked {model} with x={x.tolist()}, {out.model} {out.version} said {out!r}"


@dataclass
class Pace:
    """When to stop: a request budget, a deadline, a stop event; and a rate."""

    stop: threading.Event
    until: float  # time.monotonic()
    requests: int = 1 << 62
    interval: float = 0.0  # seconds between requests of one sender

    def running(self, sent: int) -> bool:
        return not self.stop.is_set() and sent < self.requests and time.monotonic() < self.until

    def go_on(self, sent: int) -> bool:
        """Wait the interval, then say whether to send another."""
        if self.interval:
            self.stop.wait(self.interval)
        return self.running(sent)


class BlockingLoad(threading.Thread):
    """One blocking Client (direct channels when `direct`) sending tagged infer requests
    one at a time, round-robin over `models`."""

    def __init__(self, socket: Path, models: list[str], tally: Tally, pace: Pace, number: int,
                 direct: bool = False, timeout: float = 30.0) -> None:  # fmt: skip
        super().__init__(name=f"blocking-{number}", daemon=True)
        self.client = Client(socket, timeout, direct=direct)
        self.models, self.tally, self.pace, self.number = models, tally, pace, number

    def run(self) -> None:
        with self.client:
            for seq in itertools.count():
                if not self.pace.go_on(seq):
                    return
                self.one(self.models[seq % len(self.models)], tagged(self.number, seq))

    def one(self, model: str, x: np.ndarray) -> None:
        try:
            out = self.client.infer(model, {"x": x})
        except MoltError as exc:
            self.tally.add(f"error {exc.code}", f"{model}: {exc.message}")
            return
        except (ProtocolError, ConnectError, OSError) as exc:
            # Also a stray answer (a duplicate) in place of ours: the blocking Client
            # raises the same ProtocolError, and only the raw clients see ids.
            self.tally.add("unanswered", f"{model}: {type(exc).__name__}: {exc}")
            self.client.close()  # the next call reconnects
            return
        self.tally.add(*judge(model, x, out))


def describe(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class RawLoad(threading.Thread):
    """Pipelined infer frames on a raw socket, up to `depth` unanswered at once, matched
    by id: the one client kind that sees a duplicated or stray answer."""

    def __init__(self, socket: Path, models: list[str], tally: Tally, pace: Pace, number: int,
                 depth: int, drain: float) -> None:  # fmt: skip
        super().__init__(name=f"raw-{number}", daemon=True)
        self.path, self.models, self.tally, self.pace = socket, models, tally, pace
        self.number, self.depth, self.drain = number, depth, drain
        self.waiting: dict[int, tuple[str, np.ndarray]] = {}
        self.sent = 0
        self.sock: socket_module.socket | None = None
        self.decoder = FrameDecoder(MAX_RESPONSE_BYTES)

    def run(self) -> None:
        due = time.monotonic()
        try:
            while self.pace.running(self.sent):
                if len(self.waiting) < self.depth and time.monotonic() >= due:
                    self.send()
                    due += self.pace.interval
                self.receive(max(0.0, min(due - time.monotonic(), 0.1)))
            until = time.monotonic() + self.drain
            while self.waiting and time.monotonic() < until:
                self.receive(0.1)
        finally:
            self.lose("no answer by the end of the bounded wait")

    def send(self) -> None:
        if self.sock is None:
            self.sock = socket_module.socket(socket_module.AF_UNIX)
            self.sock.connect(str(self.path))
            self.decoder = FrameDecoder(MAX_RESPONSE_BYTES)
        model, x = self.models[self.sent % len(self.models)], tagged(self.number, self.sent)
        self.sent += 1
        params = {"model": model, "inputs": encode_inputs({"x": x})}
        self.waiting[self.sent] = (model, x)
        try:
            self.sock.sendall(encode_frame(request(self.sent, "infer", params)))
        except OSError as exc:
            self.lose(f"sending failed: {exc}")

    def receive(self, wait: float) -> None:
        if self.sock is None or not select.select([self.sock], [], [], wait)[0]:
            return
        try:
            data = self.sock.recv(1 << 16)
        except OSError as exc:
            data, why = b"", f"receiving failed: {exc}"
        else:
            why = "the daemon closed the connection"
        if not data:
            self.lose(why)
            return
        for answer in self.decoder.feed(data):
            self.settle(answer)

    def settle(self, answer: dict[str, Any] | MoltError) -> None:
        req_id = answer.get("id") if isinstance(answer, dict) else None
        if req_id not in self.waiting:
            self.tally.add("duplicated", f"an answer for id {req_id!r}: {describe(answer)}")
            return
        model, x = self.waiting.pop(req_id)
        try:
            self.tally.add(*judge(model, x, decode_outputs(response_result(answer))))
        except MoltError as exc:
            self.tally.add(f"error {exc.code}", f"{model}: {exc.message}")

    def lose(self, why: str) -> None:
        """Every request still waiting is unanswered; the next send reconnects."""
        for model, _ in self.waiting.values():
            self.tally.add("unanswered", f"{model}: {why}")
        self.waiting.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class AsyncLoad(threading.Thread):
    """One AsyncClient shared by `concurrency` tasks: requests pipelined on its direct
    channels (moltbotd's socket while none is granted); a request still unanswered `drain`
    seconds after the end is unanswered."""

    def __init__(self, socket: Path, models: list[str], tally: Tally, pace: Pace, number: int,
                 concurrency: int, drain: float) -> None:  # fmt: skip
        super().__init__(name=f"async-{number}", daemon=True)
        self.path, self.models, self.tally, self.pace = socket, models, tally, pace
        self.number, self.concurrency, self.drain = number, concurrency, drain
        self.client = AsyncClient(socket)
        self.sequence = itertools.count()

    def run(self) -> None:
        asyncio.run(self.main())

    async def main(self) -> None:
        await self.client.connect()
        await asyncio.gather(*(self.sender() for _ in range(self.concurrency)))
        await self.client.close()

    async def sender(self) -> None:
        while self.pace.running(0):
            await asyncio.sleep(self.pace.interval)
            seq = next(self.sequence)
            model, x = self.models[seq % len(self.models)], tagged(self.number, seq)
            left = self.pace.until + self.drain - time.monotonic()
            await self.one(model, x, max(left, self.drain))

    async def one(self, model: str, x: np.ndarray, within: float) -> None:
        client = self.client
        try:
            out = await asyncio.wait_for(client.infer(model, {"x": x}), within)
        except MoltError as exc:
            self.tally.add(f"error {exc.code}", f"{model}: {exc.message}")
        except (ProtocolError, ConnectError, OSError, TimeoutError) as exc:
            self.tally.add("unanswered", f"{model}: {type(exc).__name__}: {exc}")
            if client is self.client:  # the first task to see it lost opens a new one
                await self.reconnect(client)
        else:
            self.tally.add(*judge(model, x, out))

    async def reconnect(self, lost: AsyncClient) -> None:
        """A new connection, opened before any task uses it: AsyncClient connects on its
        first call, and several tasks calling at once would open one each."""
        await lost.close()
        fresh = AsyncClient(self.path)
        with contextlib.suppress(ConnectError):  # the daemon is gone: calls fail, counted
            await fresh.connect()
        self.client = fresh
