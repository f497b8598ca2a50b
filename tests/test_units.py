"""Human-readable durations and sizes, and moltctl's points in time."""

import datetime
import math

import pytest

from moltbotd.wire.units import format_duration, format_size, parse_duration, parse_size
from moltctl.when import parse_when

DURATION_HINT = "expected a duration such as 30s, 500ms, 2m or 1h"
SIZE_HINT = "expected a size such as 512KiB, 64MiB or 4GiB"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (2.5, 2.5),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("250us", 0.00025),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        (" 10 S ", 10.0),
        ("2M", 120.0),
    ],
)
def test_parse_duration_accepted(value, seconds):
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize("value", [-1, -0.5])
def test_parse_duration_negative_number(value):
    with pytest.raises(ValueError, match="negative number") as info:
        parse_duration(value)
    assert str(info.value) == f"{DURATION_HINT}, got a negative number {value!r}"


@pytest.mark.parametrize("value", ["-5s", "5 weeks", "fast", "", "1.2.3s", "s"])
def test_parse_duration_refused_text(value):
    with pytest.raises(ValueError, match=r"^expected a duration") as info:
        parse_duration(value)
    assert str(info.value) == f"{DURATION_HINT}, got {value!r}"


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_bool(value):
    with pytest.raises(ValueError, match=r"^expected a duration") as info:
        parse_duration(value)
    assert str(info.value) == f"{DURATION_HINT}, got {value!r}"


def test_parse_duration_refuses_nan():
    # YAML reads `.nan` as a float: it is no duration and must not reach a timeout
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("512", 512),
        ("512b", 512),
        ("1KB", 1000),
        ("10MB", 10_000_000),
        ("2GB", 2 * 10**9),
        ("1TB", 10**12),
        ("512k", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("64MiB", 64 * 2**20),
        ("64m", 64 * 2**20),
        ("4GiB", 4 * 2**30),
        ("4g", 4 * 2**30),
        ("1TiB", 2**40),
        ("1.5KiB", 1536),
        (" 8 mib ", 8 * 2**20),
    ],
)
def test_parse_size_accepted(value, size):
    result = parse_size(value)
    assert isinstance(result, int)
    assert result == size


def test_parse_size_negative_number():
    with pytest.raises(ValueError, match=r"^expected a size") as info:
        parse_size(-1)
    assert str(info.value) == f"{SIZE_HINT}, got a negative number -1"


@pytest.mark.parametrize("value", [True, False, "-5MiB", "12 parsecs", "MiB", "", "1,5GiB"])
def test_parse_size_refused(value):
    with pytest.raises(ValueError, match=r"^expected a size") as info:
        parse_size(value)
    assert str(info.value) == f"{SIZE_HINT}, got {value!r}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0µs"),
        (0.0005, "500µs"),
        (0.25, "250ms"),
        (1.0, "1.0s"),
        (59.94, "59.9s"),
        (119.0, "119.0s"),
        (120.0, "2m"),
        (3600.0, "60m"),
        (7200.0, "2h"),
        (36 * 3600.0, "36h"),
        (172800.0, "2d"),
        (10 * 86400.0, "10d"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (1536, "1.5KiB"),
        (64 * 2**20, "64.0MiB"),
        (3 * 2**30, "3.0GiB"),
        (2 * 2**40, "2.0TiB"),
        (5000 * 2**40, "5000.0TiB"),
    ],
)
def test_format_size(size, text):
    assert format_size(size) == text


def test_format_size_round_trips_through_parse_size():
    for size in (512, 1536, 64 * 2**20, 3 * 2**30):
        assert parse_size(format_size(size)) == size


# --- moltctl --since/--until ---------------------------------------------------------------

NOW = datetime.datetime(2026, 11, 21, 14, 30, 15).timestamp()


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("1h", 3600),
        ("30m ago", 1800),
        ("30m  ago", 1800),
        ("-2d", 2 * 86400),
        ("- 2d", 2 * 86400),
        ("90s", 90),
        ("1.5h", 5400),
        ("10 m ago", 600),
        ("1H", 3600),
        ("  15m  ", 900),
    ],
)
def test_parse_when_relative(text, back):
    assert parse_when(text, NOW) == pytest.approx(NOW - back)


@pytest.mark.parametrize("text", ["now", "NOW", " now "])
def test_parse_when_now(text):
    assert parse_when(text, NOW) == NOW


def test_parse_when_today_and_yesterday_are_local_midnights():
    assert parse_when("today", NOW) == datetime.datetime(2026, 11, 21).timestamp()
    assert parse_when("Yesterday", NOW) == datetime.datetime(2026, 11, 20).timestamp()


def test_parse_when_iso_date_and_datetime():
    assert parse_when("2026-11-01", NOW) == datetime.datetime(2026, 11, 1).timestamp()
    assert parse_when("2026-11-21 14:00", NOW) == datetime.datetime(2026, 11, 21, 14).timestamp()
    assert (
        parse_when("2026-11-21T14:00:05", NOW)
        == datetime.datetime(2026, 11, 21, 14, 0, 5).timestamp()
    )
    aware = datetime.datetime(2026, 11, 21, 12, tzinfo=datetime.UTC).timestamp()
    assert parse_when("2026-11-21 12:00+00:00", NOW) == aware


@pytest.mark.parametrize("text", ["whenever", "5 fortnights", "2026-13-01", "", "ago"])
def test_parse_when_bad_value(text):
    with pytest.raises(ValueError, match=r"^cannot read") as info:
        parse_when(text, NOW)
    message = str(info.value)
    assert message.startswith(f"cannot read {text!r} as a time: ")
    assert "30m, 1h, 2d" in message
    assert "'today', 'yesterday'" in message
    assert "'2026-11-21 14:00'" in message


def test_plain_number_string_is_seconds_like_a_plain_number():
    assert parse_duration("30") == parse_duration(30) == 30.0
