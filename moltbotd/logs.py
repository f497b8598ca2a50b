"""Logging: structlog events, kept in a ring and written as one line each on stderr
(text or JSON), or, under systemd, sent to the journal with their fields.

Text:  [2026-11-21 14:30:22] [INFO] [supervisor] Model demo v2.0 loaded pid=4242 ...
JSON:  {"time": "2026-11-21T14:30:22.123+00:00", "level": "info", "component": ..., ...}
Journal: MESSAGE (the text line's part after the logger), MESSAGE_ID (one per event
template), PRIORITY, COMPONENT, EVENT, and each field as MODEL=demo, VERSION=v2.0, ...
The ring serves `moltctl logs` when the journal cannot.
"""

import collections
import datetime
import itertools
import json
import logging
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from moltbotd.journal import Journal
from moltbotd.journal import entry as journal_entry
from moltbotd.wire.loglines import LEVELS, fill, render_message, render_text
from moltbotd.wire.protocol import clip, echo

# Longest log field kept, unless configured (clients.log_field_chars); a traceback keeps
# TRACEBACK_SHARE times as much.
FIELD_CHARS = 2048
TRACEBACK_SHARE = 4


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    time: float  # UNIX time
    level: str
    logger: str
    event: str
    fields: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "level": self.level,
            "logger": self.logger,
            "event": self.event,  # the template: the same for every entry of its kind
            "message": fill(self.event, self.fields)[0],
            "fields": self.fields,
        }

    def text(self) -> str:
        return render_text(self.time, self.level, self.logger, self.event, self.fields)


class Ring:
    """The newest N log entries, queried by `moltctl logs`. Fields longer than
    `field_chars` are cut before an entry is kept (and before the line is written)."""

    def __init__(self, size: int, field_chars: int = FIELD_CHARS) -> None:
        self.entries: collections.deque[Entry] = collections.deque(maxlen=size)
        self.seq = 0
        self.field_chars = field_chars
        self.journal: Journal | None = None  # where entries go instead of stderr, if set

    def add(self, event: dict[str, Any]) -> None:
        self.seq += 1
        fields = _fields(event)
        self.entries.append(
            Entry(
                self.seq,
                event["time"],
                event["level"],
                event.get("component", "moltbotd"),
                str(event["event"]),
                _plain_fields(fields),
            )
        )

    def snapshot(self, after: int = 0) -> list[Entry]:
        """The entries after sequence number `after`, as a list no later add() changes: for
        a query off the event loop. Sequence numbers have no gaps, so only those entries
        are copied (a follow's poll copies what is new, not the ring)."""
        count = self.seq - after
        if count >= len(self.entries):
            return list(self.entries)
        return list(itertools.islice(reversed(self.entries), max(count, 0)))[::-1]

    def query(self, after: int = 0, **filters: Any) -> list[Entry]:
        """select(filters) over the entries after sequence number `after`."""
        return select(self.snapshot(after), **filters)


def select(
    entries: list[Entry],
    min_level: str = "debug",
    max_level: str = "critical",
    since: float | None = None,
    until: float | None = None,
    model: str | None = None,
    contains: str | None = None,
    limit: int | None = None,
) -> list[Entry]:
    """The entries that pass the filters, the newest `limit` of them. A pure function of
    a snapshot: it may run in a thread while the loop logs on."""
    low, high = LEVELS.index(min_level), LEVELS.index(max_level)
    found = [
        e
        for e in entries
        if low <= LEVELS.index(e.level) <= high
        and (since is None or e.time >= since)
        and (until is None or e.time <= until)
        and (model is None or e.fields.get("model") == model)
        and (contains is None or contains in e.text())
    ]
    return found if limit is None else found[max(len(found) - limit, 0) :]


_RESERVED = {"time", "level", "component", "event"}


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    """An event's own fields: all but what structlog and stamp() put in every event."""
    return {k: v for k, v in event.items() if k not in _RESERVED}


def bound_fields(event: dict[str, Any], chars: int) -> dict[str, Any]:
    """The event with every field at most `chars` characters long (a traceback
    TRACEBACK_SHARE times as much, its end); containers shown by a bounded repr, so that
    no client value makes a line or a ring entry large, or recurses."""
    for key, value in event.items():
        if key == "exception" and isinstance(value, str):
            event[key] = clip(value, chars * TRACEBACK_SHARE, keep_end=True)
        elif isinstance(value, list | tuple | dict | set):
            event[key] = echo(value, chars)
        elif isinstance(value, str):
            event[key] = clip(value, chars)
    return event


def _plain_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as msgpack can carry them: anything exotic becomes its str()."""
    return {
        k: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
        for k, v in fields.items()
    }


def _render_json(_: Any, __: str, event: dict[str, Any]) -> str:
    stamp = (
        datetime.datetime.fromtimestamp(event["time"])
        .astimezone()
        .isoformat(timespec="milliseconds")
    )
    fields = _fields(event)
    message = fill(str(event["event"]), fields)[0]
    return json.dumps({**event, "time": stamp, "message": message}, default=str)


def _render_text(_: Any, __: str, event: dict[str, Any]) -> str:
    fields = _fields(event)
    component = event.get("component", "moltbotd")
    return render_text(event["time"], event["level"], component, str(event["event"]), fields)


def _to_journal(journal: Journal, fallback: Any) -> Any:
    """The last processor under the journal: send the entry; only one journald could not
    take is rendered for stderr."""

    def render(logger: Any, method: str, event: dict[str, Any]) -> str:
        fields = _fields(event)
        template, level = str(event["event"]), event["level"]
        component = event.get("component", "moltbotd")
        message = render_message(template, fields)
        if journal.send(journal_entry(template, message, level, component, fields)):
            return ""
        return str(fallback(logger, method, event))

    return render


class _Lines:
    """structlog's logger: writes each rendered line, if there is one, whole."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()  # the audit thread logs too

    def msg(self, line: str) -> None:
        if line:
            with self.lock:
                self.stream.write(line + "\n")
                self.stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = msg


def configure(log_format: str, level: str, ring_size: int, stream: TextIO = sys.stderr,
              journal: Journal | None = None) -> Ring:  # fmt: skip
    """Set up structlog for the daemon; returns the ring that `moltctl logs` reads (its
    field_chars bounds the fields of every line). With a journal, entries go there."""
    ring = Ring(ring_size)
    ring.journal = journal
    text = _render_json if log_format == "json" else _render_text
    lines = _Lines(stream)

    def stamp(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event["time"] = time.time()
        event["level"] = "warning" if method == "warn" else method
        if method == "exception":
            event["level"] = "error"
        return event

    def keep(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        ring.add(bound_fields(event, ring.field_chars))
        return event

    processors: Iterable[Any] = (
        stamp,
        structlog.processors.format_exc_info,
        keep,
        _to_journal(journal, text) if journal else text,
    )
    structlog.configure(
        processors=list(processors),
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_: lines,
        cache_logger_on_first_use=False,
    )
    return ring


def get_logger(name: str) -> Any:
    # A lazy proxy: modules take their logger at import time, before configure() runs.
    return structlog.get_logger(component=name)
