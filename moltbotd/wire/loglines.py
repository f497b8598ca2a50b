"""Log entries as `moltctl logs` and the daemon's text format show them: levels, their
aliases, and one entry as a line."""

import datetime
import json
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")
LEVEL_ALIASES = {"warn": "warning", "err": "error", "crit": "critical", "fatal": "critical"}


def parse_level(text: str) -> str:
    level = LEVEL_ALIASES.get(text.lower(), text.lower())
    if level not in LEVELS:
        raise ValueError(f"unknown log level {text!r} (known: {', '.join(LEVELS)})")
    return level


def render_text(ts: float, level: str, logger: str, event: str, fields: dict[str, Any]) -> str:
    stamp = datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    exception = fields.get("exception")
    pairs = " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if k != "exception")
    line = f"[{stamp}] [{level.upper()}] [{logger}] {event}" + (f" {pairs}" if pairs else "")
    return f"{line}\n{exception}" if exception else line


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text
