"""Logging: text and JSON lines, the in-memory ring, and the ring's filters."""

import datetime
import io
import json
import re
from collections.abc import Iterator

import pytest
import structlog

from moltbotd.logs import Entry, Ring, configure, get_logger
from moltbotd.wire.loglines import LEVELS, parse_level, render_text

TEXT_LINE = re.compile(
    r"^\[(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\] \[([A-Z]+)\] \[([^\]]+)\] (.*)$"
)


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """structlog's configuration is global: give it back as it was after each test."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- configure() -----------------------------------------------------------------------------


def test_text_lines():
    stream = io.StringIO()
    configure("text", "info", 100, stream)
    log = get_logger("supervisor")
    log.info("Model demo v2.0 loaded", model="demo", version="v2.0", pid=42)
    log.warning("worker slow", model="demo", note="two words")
    (first, second) = lines(stream)
    match = TEXT_LINE.match(first)
    assert match, first
    stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    assert abs((datetime.datetime.now() - stamp).total_seconds()) < 3600
    assert match.group(2) == "INFO"
    assert match.group(3) == "supervisor"
    assert match.group(4) == "Model demo v2.0 loaded model=demo version=v2.0 pid=42"
    # values with spaces are quoted so key=value stays readable
    assert second.endswith('] [WARNING] [supervisor] worker slow model=demo note="two words"')


def test_text_line_without_fields():
    stream = io.StringIO()
    configure("text", "debug", 100, stream)
    get_logger("server").debug("listening")
    (line,) = lines(stream)
    assert TEXT_LINE.match(line)
    assert line.endswith("] [DEBUG] [server] listening")


def test_exception_traceback_follows_the_line():
    stream = io.StringIO()
    configure("text", "info", 100, stream)
    try:
        raise KeyError("lost")
    except KeyError:
        get_logger("server").exception("internal error", op="infer")
    text = stream.getvalue()
    first = text.splitlines()[0]
    assert first.endswith("] [ERROR] [server] internal error op=infer")
    assert "Traceback (most recent call last)" in text
    assert "KeyError: 'lost'" in text


def test_json_lines():
    stream = io.StringIO()
    configure("json", "info", 100, stream)
    log = get_logger("worker")
    log.info("ready", model="demo", pid=7)
    log.error("died", model="iris", code=-9)
    objs = [json.loads(line) for line in lines(stream)]
    assert len(objs) == 2
    first = objs[0]
    assert first["level"] == "info"
    assert first["component"] == "worker"
    assert first["event"] == "ready"
    assert first["model"] == "demo"
    assert first["pid"] == 7
    parsed = datetime.datetime.fromisoformat(first["time"])
    assert parsed.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.UTC) - parsed).total_seconds()) < 3600
    assert re.search(r"T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$", first["time"])
    assert objs[1]["level"] == "error"
    assert objs[1]["code"] == -9


def test_json_line_with_an_unserialisable_field():
    stream = io.StringIO()
    configure("json", "info", 100, stream)
    get_logger("x").info("odd", thing=object)
    (line,) = lines(stream)
    assert json.loads(line)["thing"] == str(object)


def test_level_filter_applies_to_stream_and_ring():
    stream = io.StringIO()
    ring = configure("text", "warning", 100, stream)
    log = get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line.split("] ", 3)[-1] for line in lines(stream)] == ["w", "e"]
    assert [e.event for e in ring.entries] == ["w", "e"]


def test_warn_is_stored_as_warning():
    ring = configure("text", "debug", 100, io.StringIO())
    get_logger("t").warn("old spelling")
    assert ring.entries[-1].level == "warning"


def test_ring_collects_entries():
    stream = io.StringIO()
    ring = configure("text", "debug", 100, stream)
    log = get_logger("supervisor")
    log.info("loaded", model="demo", version="v1.0")
    log.error("failed", model="iris", error=ValueError("bad"))
    assert ring.seq == 2
    first, second = ring.entries
    assert isinstance(first, Entry)
    assert first.seq == 1
    assert first.level == "info"
    assert first.logger == "supervisor"
    assert first.event == "loaded"
    assert first.fields == {"model": "demo", "version": "v1.0"}
    assert second.seq == 2
    assert second.fields == {"model": "iris", "error": "bad"}  # exotic values as str()
    assert second.time >= first.time
    assert first.text() == lines(stream)[0]


def test_entry_to_wire():
    entry = Entry(3, 12.5, "info", "server", "hello {name}", {"name": "demo", "a": 1})
    assert entry.to_wire() == {
        "seq": 3,
        "time": 12.5,
        "level": "info",
        "logger": "server",
        "event": "hello {name}",
        "message": "hello demo",
        "fields": {"name": "demo", "a": 1},
    }
    assert entry.text().endswith("[INFO] [server] hello demo a=1")


def test_get_logger_before_configure_follows_the_later_configuration():
    log = get_logger("early")  # modules take theirs at import time
    stream = io.StringIO()
    ring = configure("text", "info", 100, stream)
    log.info("after configure")
    assert lines(stream)[0].endswith("] [INFO] [early] after configure")
    assert ring.entries[0].logger == "early"


# --- Ring.query -------------------------------------------------------------------------------


def filled_ring(size: int = 100) -> Ring:
    ring = Ring(size)
    events = [
        (100.0, "debug", "d1", {"model": "demo"}),
        (110.0, "info", "loaded demo", {"model": "demo", "version": "v1.0"}),
        (120.0, "warning", "slow start", {"model": "iris"}),
        (130.0, "error", "worker died", {"model": "demo", "code": -9}),
        (140.0, "critical", "giving up", {}),
        (150.0, "info", "switch done", {"model": "iris", "version": "v2"}),
    ]
    for ts, level, event, fields in events:
        ring.add({"time": ts, "level": level, "event": event, "component": "sup", **fields})
    return ring


def events(entries: list[Entry]) -> list[str]:
    return [e.event for e in entries]


def test_query_everything_in_order():
    ring = filled_ring()
    got = ring.query()
    assert [e.seq for e in got] == [1, 2, 3, 4, 5, 6]
    assert events(got)[0] == "d1"


def test_query_level_range():
    ring = filled_ring()
    assert events(ring.query(min_level="warning")) == ["slow start", "worker died", "giving up"]
    assert events(ring.query(max_level="info")) == ["d1", "loaded demo", "switch done"]
    assert events(ring.query(min_level="warning", max_level="error")) == [
        "slow start",
        "worker died",
    ]
    assert events(ring.query(min_level="error", max_level="error")) == ["worker died"]


def test_query_since_and_until_are_inclusive():
    ring = filled_ring()
    assert events(ring.query(since=130.0)) == ["worker died", "giving up", "switch done"]
    assert events(ring.query(until=110.0)) == ["d1", "loaded demo"]
    assert events(ring.query(since=115.0, until=135.0)) == ["slow start", "worker died"]
    assert ring.query(since=200.0) == []


def test_query_model():
    ring = filled_ring()
    assert events(ring.query(model="iris")) == ["slow start", "switch done"]
    assert events(ring.query(model="demo")) == ["d1", "loaded demo", "worker died"]
    assert ring.query(model="other") == []


def test_query_contains_searches_the_rendered_line():
    ring = filled_ring()
    assert events(ring.query(contains="died")) == ["worker died"]
    assert events(ring.query(contains="version=v2")) == ["switch done"]  # a field
    assert events(ring.query(contains="[CRITICAL]")) == ["giving up"]  # the level
    assert ring.query(contains="nothing like this") == []


def test_query_after_sequence():
    ring = filled_ring()
    assert [e.seq for e in ring.query(after=4)] == [5, 6]
    assert ring.query(after=6) == []
    ring.add({"time": 160.0, "level": "info", "event": "new", "component": "sup"})
    assert events(ring.query(after=6)) == ["new"]


def test_query_limit_keeps_the_newest():
    ring = filled_ring()
    assert [e.seq for e in ring.query(limit=2)] == [5, 6]
    assert [e.seq for e in ring.query(limit=100)] == [1, 2, 3, 4, 5, 6]
    assert events(ring.query(model="demo", limit=2)) == ["loaded demo", "worker died"]


def test_query_limit_zero_returns_nothing():
    # "at most this many of the newest entries": at most 0 is none
    assert filled_ring().query(limit=0) == []


def test_query_filters_combine():
    ring = filled_ring()
    got = ring.query(min_level="info", since=105.0, model="demo", after=1, limit=5)
    assert events(got) == ["loaded demo", "worker died"]


def test_ring_maxlen_drops_the_oldest():
    ring = filled_ring(size=3)
    assert ring.seq == 6
    assert [e.seq for e in ring.entries] == [4, 5, 6]
    assert events(ring.query()) == ["worker died", "giving up", "switch done"]
    assert [e.seq for e in ring.query(after=2)] == [4, 5, 6]


def test_ring_entry_without_component_is_moltbotd():
    ring = Ring(10)
    ring.add({"time": 1.0, "level": "info", "event": 42, "extra": [1, 2]})
    (entry,) = ring.entries
    assert entry.logger == "moltbotd"
    assert entry.event == "42"
    assert entry.fields == {"extra": "[1, 2]"}


# --- helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "level"),
    [("info", "info"), ("WARN", "warning"), ("err", "error"), ("crit", "critical"),
     ("fatal", "critical"), ("Debug", "debug")],
)  # fmt: skip
def test_parse_level(text, level):
    assert parse_level(text) == level


def test_parse_level_unknown():
    with pytest.raises(ValueError, match="unknown log level") as info:
        parse_level("loud")
    assert str(info.value) == f"unknown log level 'loud' (known: {', '.join(LEVELS)})"


def test_render_text_quotes_empty_and_special_values():
    ts = datetime.datetime(2026, 11, 21, 14, 30, 22).timestamp()
    line = render_text(ts, "info", "c", "ev", {"a": "", "b": 'say "hi"', "c": "k=v", "d": 1})
    assert line == '[2026-11-21 14:30:22] [INFO] [c] ev a="" b="say \\"hi\\"" c="k=v" d=1'


# --- bounds (issue 14) ------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_long_and_deep_fields_are_cut_in_the_ring_and_the_line(log_format):
    stream = io.StringIO()
    ring = configure(log_format, "debug", 100, stream)
    ring.field_chars = 100
    deep: object = 1
    for _ in range(1000):
        deep = [deep]
    get_logger("t").info("x" * 5000, version="v" * 10_000_000, files=deep)
    (entry,) = ring.entries
    assert len(entry.event) < 200
    assert entry.fields["version"].endswith("(9999900 characters cut)")
    assert entry.fields["files"] == "[[[[[[[...]]]]]]]"
    assert len(stream.getvalue()) < 1000


def test_a_traceback_keeps_its_end():
    ring = configure("text", "debug", 100, io.StringIO())
    ring.field_chars = 100
    try:
        raise ValueError("the cause " + "y" * 5000 + " the end")
    except ValueError:
        get_logger("t").exception("failed")
    text = ring.entries[-1].fields["exception"]
    assert text.endswith(" the end")
    assert len(text) < 500


def test_snapshot_after_copies_only_the_newer_entries():
    ring = Ring(10)
    for n in range(25):
        ring.add({"time": float(n), "level": "info", "event": f"e{n}"})
    assert [e.seq for e in ring.snapshot(22)] == [23, 24, 25]
    assert [e.seq for e in ring.snapshot()] == list(range(16, 26))  # only what the ring holds
    assert ring.snapshot(25) == []
    assert ring.snapshot(99) == []
