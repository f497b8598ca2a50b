"""The queue of one model version: priorities, its bound, deadlines and batch forming.

Pure logic over plain objects and clock values (no asyncio, no processes), so the tests
drive it with numbers; each worker's hub (worker/hub.py) runs it for the requests it
holds, and a pool (serving/pool.py) for those no instance can take yet. A batch is formed
from the oldest request of the highest priority waiting (the head) and the requests of
every priority that can be concatenated with it: same input names, dtypes and
dimensions after the first, and the same outputs asked for.
"""

from collections import deque
from collections.abc import Callable
from typing import Any

from moltbotd.config import Batching
from moltbotd.wire.protocol import PRIORITIES, ErrorCode, MoltError
from moltbotd.wire.units import plural

Reply = Callable[[Any], None]  # called once: the packed result (bytes) or a MoltError
BatchKey = tuple[Any, ...] | None  # None: this request is never batched with another


class Pending:
    """One request for a model version, from its arrival to its answer."""

    __slots__ = (
        "answered",
        "arrived",
        "cache_key",
        "conversation",
        "deadline",
        "inputs",
        "key",
        "on_start",
        "outputs",
        "place",
        "priority",
        "received",
        "reply",
        "rows",
        "started",
        "taken",
        "timer",
        "trace",
    )  # fmt: skip

    def __init__(self, inputs: dict[str, Any], outputs: list[str] | None, priority: str,
                 deadline: float | None, arrived: float, reply: Reply) -> None:  # fmt: skip
        self.inputs = inputs
        self.outputs = outputs
        self.priority = priority
        self.deadline = deadline  # monotonic seconds, or None
        self.arrived = arrived
        self.reply = reply
        self.key, self.rows = batch_key(inputs, outputs)
        self.timer: Any = None  # the deadline's timer handle, cancelled once answered
        self.received = arrived  # when its bytes were read (a worker: before its checks)
        # when a lane took it (or, for a batch held back to fill, when the holding began)
        self.taken: float | None = None
        self.started: float | None = None  # when it went to a worker
        self.answered = False
        self.on_start: Callable[[], None] | None = None  # told when it starts to run
        # lays out its outputs before they are packed (a direct channel's shared region)
        self.place: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.trace: str | None = None  # the caller's request_id, for the log of a slow one
        self.conversation: Any = None  # its session, for a stateful model (worker/sessions.py)
        self.cache_key: bytes | None = None  # its inputs' digest, where a cache is on

    def live(self, now: float) -> bool:
        """Whether its deadline (if any) is still ahead; expired ones wait for their timer."""
        return self.deadline is None or self.deadline > now

    def answer(self, outcome: Any) -> None:
        """Answer once: a deadline and a late result may both try."""
        if self.answered:
            return
        self.answered = True
        if self.timer is not None:
            self.timer.cancel()
        self.reply(outcome)


def batch_key(inputs: dict[str, Any], outputs: list[str] | None) -> tuple[BatchKey, int]:
    """What must match for requests to share a batch, and this request's rows (its first
    dimension); a request whose inputs disagree on the first dimension runs alone."""
    key, rows = [], None
    for name, tensor in sorted(inputs.items()):
        shape = tensor["shape"]
        if not shape or tensor["dtype"] == "string" or rows not in (None, shape[0]):
            return None, 1
        rows = shape[0]
        key.append((name, tensor["dtype"], *shape[1:]))
    if rows is None:
        return None, 1
    return (tuple(key), tuple(outputs or ())), rows


def request_options(params: dict[str, Any]) -> tuple[str | None, float | None]:
    """An infer request's priority and timeout_ms, checked (the operation table checked
    their types)."""
    priority, timeout = params.get("priority"), params.get("timeout_ms")
    if priority is not None and priority not in PRIORITIES:
        raise MoltError(ErrorCode.BAD_REQUEST, f"priority must be high, normal or low,"
                        f" got {priority!r}"[:200])  # fmt: skip
    if timeout is not None and not timeout > 0:
        raise MoltError(ErrorCode.BAD_REQUEST, f"timeout_ms must be above 0, got {timeout!r}")
    return priority, timeout


def deadline_exceeded(label: str, item: Pending, now: float, queued: bool) -> MoltError:
    waited = (now - item.arrived) * 1e3
    if queued:
        why = f"waited {waited:.1f}ms in the queue of {label}; it was not run"
    else:
        why = f"{label} did not answer within {waited:.1f}ms (it was running)"
    return MoltError(ErrorCode.DEADLINE_EXCEEDED, f"deadline exceeded: {why}",
                     {"waited_ms": waited, "ran": not queued})  # fmt: skip


def overloaded(label: str, depth: int, limit: int) -> MoltError:
    return MoltError(
        ErrorCode.OVERLOADED,
        f"{label} is overloaded: {plural(depth, 'request')} {'is' if depth == 1 else 'are'}"
        f" waiting (max_queue {limit});"
        " retry later, or raise max_queue or instances.max",
        {"queue_depth": depth, "max_queue": limit},
    )


class Queue:
    """Waiting requests by priority; bounded, so a flood costs an error, not memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.levels: dict[str, deque[Pending]] = {p: deque() for p in PRIORITIES}
        self.size = 0  # kept, not summed: it is read for every request

    def __len__(self) -> int:
        return self.size

    def depths(self) -> dict[str, int]:
        return {p: len(q) for p, q in self.levels.items()}

    def push(self, item: Pending, label: str, free: int = 0) -> None:
        """Queue a request; OVERLOADED if `limit` wait already, not counting the `free`
        ones that idle runners are about to take."""
        depth = len(self) - free
        if depth >= self.limit:
            raise overloaded(label, depth, self.limit)
        self.levels[item.priority].append(item)
        self.size += 1

    def put_back(self, item: Pending) -> None:
        """Return a request taken earlier to the front of its priority: it was admitted
        once, so the bound does not refuse it."""
        self.levels[item.priority].appendleft(item)
        self.size += 1

    def remove(self, item: Pending) -> bool:
        try:
            self.levels[item.priority].remove(item)
        except ValueError:
            return False
        self.size -= 1
        return True

    def drain(self) -> list[Pending]:
        """Everything waiting, oldest first within each priority; the queue is left empty."""
        items = [item for level in self.levels.values() for item in level]
        for level in self.levels.values():
            level.clear()
        self.size = 0
        return items

    def expired(self, now: float) -> list[Pending]:
        """Remove and return the requests whose deadline passed (for a caller without
        timers: it answers them)."""
        gone = [item for level in self.levels.values() for item in level if not item.live(now)]
        self._remove(gone)
        return gone

    def take(
        self, batching: Batching, now: float, idle: bool = False
    ) -> tuple[list[Pending], float | None]:
        """The next batch to run, or ([], when to look again) if it should wait to fill.

        A batch waits to fill only while something else runs (`idle` false): with
        nothing running it takes what is there at once, so batches grow with the load
        and a lone request never waits for company. Without batching, the head alone."""
        head = self._head(now)
        if head is None:
            return [], None
        if batching.max_batch_size == 1 or head.key is None:
            self._remove([head])
            return [head], None
        batch, rows = self._gather(head, batching.max_batch_size, now)
        oldest = min(item.arrived for item in batch)
        due = oldest + batching.timeout_ms / 1000
        if rows < batching.max_batch_size and now < due and not idle:
            preferred = [s for s in batching.preferred_sizes if s <= rows]
            if not preferred:
                return [], due
            batch = _first_rows(batch, preferred[-1])
        self._remove(batch)
        return batch, None

    def _head(self, now: float) -> Pending | None:
        """The oldest live request of the highest priority."""
        for level in self.levels.values():
            for item in level:
                if item.live(now):
                    return item
        return None

    def _gather(self, head: Pending, max_rows: int, now: float) -> tuple[list[Pending], int]:
        batch, rows = [head], head.rows
        for level in self.levels.values():
            for item in level:
                if rows >= max_rows:
                    return batch, rows
                fits = rows + item.rows <= max_rows
                if item is not head and item.key == head.key and item.live(now) and fits:
                    batch.append(item)
                    rows += item.rows
        return batch, rows

    def _remove(self, items: list[Pending]) -> None:
        self.size -= len(items)
        taken = {id(item) for item in items}
        for priority, level in self.levels.items():
            while level and id(level[0]) in taken:  # the usual case: a prefix
                taken.discard(id(level.popleft()))
            if taken and any(id(item) in taken for item in level):
                self.levels[priority] = deque(i for i in level if id(i) not in taken)


def _first_rows(batch: list[Pending], rows: int) -> list[Pending]:
    """The longest start of the batch (head first) that holds at most `rows` rows."""
    kept, total = [], 0
    for item in batch:
        if total + item.rows > rows:
            break
        kept.append(item)
        total += item.rows
    return kept or batch[:1]
