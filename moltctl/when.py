"""Points in time as people type them for --since/--until/--last (journalctl's spellings)."""

import datetime
import re

from moltbotd.wire.units import parse_duration

_RELATIVE = re.compile(r"^-?\s*(?P<amount>\d+(?:\.\d+)?\s*[a-z]+)(?:\s+ago)?$")
_DAYS = {"today": 0, "yesterday": 1}


def parse_when(text: str, now: float) -> float:
    """'1h', '30m ago', '-2d', 'today', 'yesterday', 'now', '2026-11-21 14:00[:05]' -> UNIX time.

    A bare duration counts back from now, so `--since 1h` and `--last 1h` mean the same.
    """
    spoken = text.strip().lower()
    if spoken == "now":
        return now
    if spoken in _DAYS:
        day = datetime.date.fromtimestamp(now) - datetime.timedelta(days=_DAYS[spoken])
        return datetime.datetime.combine(day, datetime.time()).timestamp()
    match = _RELATIVE.match(spoken)
    if match:
        try:
            return now - parse_duration(match.group("amount").replace(" ", ""))
        except ValueError:
            pass
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a time: use a duration back from now (30m, 1h, 2d),"
            " 'today', 'yesterday', or a date such as '2026-11-21 14:00'"
        ) from None
