"""Small pure converters for human-readable config values (supervisor's datatypes.py).

Each takes what YAML produced and returns the value in base units (seconds, bytes), or
raises ValueError with a sentence that says what was expected.
"""

import math
import re
from collections.abc import Callable
from typing import Any

_DURATION_UNITS = {"": 1.0, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: Any) -> float:
    """'30s', '100ms', '2m', '1h', '1d' or a plain number of seconds -> seconds."""
    expected = "a duration such as 30s, 500ms, 2m or 1h"
    if isinstance(value, bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    if isinstance(value, int | float):
        if not 0 <= value < math.inf:
            reason = "a negative number " if value < 0 else ""
            raise ValueError(f"expected {expected}, got {reason}{value!r}")
        return float(value)
    match = _NUMBER_UNIT.match(str(value))
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"expected {expected}, got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def parse_percent(value: Any, expected: str, fits: Callable[[float], bool]) -> float:
    """'150%' or 1.5 -> 1.5, if fits(it); else a ValueError saying what was expected."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"expected {expected}, got {value!r}") from None
    if isinstance(value, bool) or not fits(number):
        raise ValueError(f"expected {expected}, got {value!r}")
    return number


def parse_size(value: Any) -> int:
    """'64MiB', '4GiB', '10MB', '512k' or a plain number of bytes -> bytes."""
    expected = "a size such as 512KiB, 64MiB or 4GiB"
    if isinstance(value, bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected {expected}, got a negative number {value!r}")
        return value
    match = _NUMBER_UNIT.match(str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected {expected}, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TiB"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 model', '2 models'; many: the irregular plural ('entries')."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
