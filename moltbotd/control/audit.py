"""The audit trail: who changed what, with which parameters, how it ended, how long it took.

Every operation that changes what serves (switch, canary, promote, rollback, deploy and
the upload it opens, scale, reload) is recorded when it ends, refused ones included, as
one JSON line appended to `audit.file` and fsynced, in a thread of its own: the event
loop never waits for the disk. When moltbotd logs to the journal, each record goes
there too, with its own MESSAGE_ID (journal.AUDIT_MESSAGE_ID). The file is rotated past
`audit.max_bytes`, keeping `audit.keep` older files. `moltctl audit` reads them back
(the `audit` operation).
"""

import asyncio
import concurrent.futures
import contextlib
import json
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moltbotd.control.access import Peer
from moltbotd.journal import Journal, audit_entry
from moltbotd.logs import get_logger
from moltbotd.wire.protocol import MoltError

log = get_logger("audit")

SHOWN_CHARS = 200  # a longer string parameter is cut, and says so
SHOWN_ENTRIES = 32  # a larger list or map is recorded as its size
SHOWN_DEPTH = 4  # deeper values (a refused request may nest 1000 levels) as their type
# Records waiting for the disk. A client repeating a refused request as fast as it can
# must not grow the queue without end: past this, records are counted, and the count
# is recorded once the disk has caught up.
MAX_PENDING = 1000


def shown(value: Any, depth: int = 0) -> Any:
    """A parameter as the record keeps it: bytes as their size, long values shortened,
    large or deep containers as their size or type. Bounded whatever a client sent: at
    most SHOWN_ENTRIES ** SHOWN_DEPTH values of at most SHOWN_CHARS characters each."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": len(value)}
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return value[:SHOWN_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, dict | list | tuple):
        if depth >= SHOWN_DEPTH:
            return {"nested": type(value).__name__}
        if len(value) > SHOWN_ENTRIES:
            return {"entries" if isinstance(value, dict) else "items": len(value)}
        if isinstance(value, dict):
            return {str(k)[:SHOWN_CHARS]: shown(v, depth + 1) for k, v in value.items()}
        return [shown(v, depth + 1) for v in value]
    return value


class AuditLog:
    """Records appended one at a time by one thread; queries answered by the same thread,
    so a query never reads a line half written."""

    def __init__(self, path: Path, max_bytes: int, keep: int,
                 journal: Journal | None = None) -> None:  # fmt: skip
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self.journal = journal  # each record is sent there too, when moltbotd logs there
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._writes: set[asyncio.Future[None]] = set()
        self.dropped = 0  # records not written since the last summary (MAX_PENDING)

    def watch(self, op: str, params: dict[str, Any], peer: Peer,
              outcome: "asyncio.Future[Any]") -> None:  # fmt: skip
        """Record the operation once `outcome` is settled (its parameters as they came:
        shown() keeps no reference to a large one)."""
        entry = {"time": time.time(), "op": op, "params": shown(params), "who": peer.identity(),
                 "outcome": "ok", "ms": 0.0}  # fmt: skip
        started = time.monotonic()
        outcome.add_done_callback(lambda done: self.record(entry, done, started))

    def record(self, entry: dict[str, Any], done: "asyncio.Future[Any]", started: float) -> None:
        entry["ms"] = round((time.monotonic() - started) * 1e3, 3)
        if done.cancelled():  # moltbotd stopped under it
            entry.update(outcome="CANCELLED", error="moltbotd stopped before it ended")
        elif (error := done.exception()) is not None:
            entry["outcome"] = error.code.value if isinstance(error, MoltError) else "INTERNAL"
            entry["error"] = error.message if isinstance(error, MoltError) else repr(error)
        if len(self._writes) < MAX_PENDING:
            self._queue(entry)
        else:
            self.dropped += 1

    def _queue(self, entry: dict[str, Any]) -> None:
        write = asyncio.get_running_loop().run_in_executor(self._thread, self._append, entry)
        self._writes.add(write)
        write.add_done_callback(self._written)

    def _written(self, write: "asyncio.Future[None]") -> None:
        self._writes.discard(write)
        if write.exception() is not None:  # the change was made: say the record is missing
            log.error("an audit record could not be written to {file}: {error}",
                      file=str(self.path), error=str(write.exception()))  # fmt: skip
        if self.dropped and not self._writes:  # caught up: say what is missing
            why = (f"{self.dropped} records came while {MAX_PENDING} waited for the disk;"
                   f" they were not written")  # fmt: skip
            log.error("audit records lost: {why}", why=why, dropped=self.dropped)
            me = Peer(os.getpid(), os.getuid(), os.getgid()).identity()
            self._queue({"time": time.time(), "op": "audit", "params": {"dropped": self.dropped},
                         "who": me, "outcome": "DROPPED", "error": why, "ms": 0.0})  # fmt: skip
            self.dropped = 0

    async def query(self, since: float | None, until: float | None, op: str | None,
                    limit: int) -> list[dict[str, Any]]:  # fmt: skip
        """The newest `limit` records in the time range, oldest first."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._select, since, until, op, limit)

    async def close(self) -> None:
        """Once every record is written."""
        await asyncio.gather(*self._writes, return_exceptions=True)
        self._thread.shutdown(wait=False)

    # --- in the audit thread -------------------------------------------------------------

    def _append(self, entry: dict[str, Any]) -> None:
        who = entry["who"]
        with contextlib.suppress(KeyError):
            who["user"] = pwd.getpwuid(who["uid"]).pw_name
        if self.journal:  # first: a record the disk refuses is still there
            self.journal.send(audit_entry(entry))
        data = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size + len(data) > self.max_bytes:
                self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        """audit.jsonl becomes audit.jsonl.1, .1 becomes .2, ...; the one past keep goes."""
        for number in range(self.keep, 0, -1):
            older = self._rotated(number)
            if number == self.keep:
                older.unlink(missing_ok=True)
            elif older.exists():
                older.rename(self._rotated(number + 1))
        if self.keep:
            self.path.rename(self._rotated(1))
        else:
            self.path.unlink()
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def _rotated(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def _select(self, since: float | None, until: float | None, op: str | None,
                limit: int) -> list[dict[str, Any]]:  # fmt: skip
        found: list[dict[str, Any]] = []
        for entry in self._entries():
            when = entry.get("time", 0)
            early, late = since is not None and when < since, until is not None and when > until
            if not (early or late) and op in (None, entry.get("op")):
                found.append(entry)
                del found[:-limit]
        return found

    def _entries(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first; a line that is not one (a torn write) is skipped."""
        files = [self._rotated(n) for n in range(self.keep, 0, -1)] + [self.path]
        for file in files:
            try:
                lines = file.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict):
                        yield entry
