"""Log entries as `moltctl logs` and the daemon's text format show them: levels, their
aliases, and one entry as a line.

An entry's event is a fixed template ("model {model}: now serving {version}"): the same
for every entry of its kind, so that it names the kind (the journal's MESSAGE_ID is made
from it), with the variable parts in fields. The line shows the template filled in,
then the fields it did not use as key=value.
"""

import datetime
import functools
import json
import string
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")
LEVEL_ALIASES = {"warn": "warning", "err": "error", "crit": "critical", "fatal": "critical"}


def parse_level(text: str) -> str:
    level = LEVEL_ALIASES.get(text.lower(), text.lower())
    if level not in LEVELS:
        raise ValueError(f"unknown log level {text!r} (known: {', '.join(LEVELS)})")
    return level


def render_text(ts: float, level: str, logger: str, event: str, fields: dict[str, Any]) -> str:
    return line(ts, level, logger, render_message(event, fields))


def line(ts: float, level: str, logger: str, message: str) -> str:
    """`[ts] [LEVEL] [logger] message`: the form of every entry, from the ring or the
    journal (whose MESSAGE is render_message's)."""
    stamp = datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    return f"[{stamp}] [{level.upper()}] [{logger}] {message}"


def render_message(event: str, fields: dict[str, Any]) -> str:
    """The entry without its time, level and logger: the event filled in, the other
    fields as key=value, and a traceback (the field `exception`) on the lines after."""
    message, used = fill(event, fields)
    exception = fields.get("exception")
    pairs = " ".join(
        f"{k}={_quote(v)}" for k, v in fields.items() if k != "exception" and k not in used
    )
    line = message + (f" {pairs}" if pairs else "")
    return f"{line}\n{exception}" if exception else line


def fill(template: str, fields: dict[str, Any]) -> tuple[str, set[str]]:
    """The template with its {name} and {name:spec} filled from fields, and the names
    used. A name the fields lack, or a value its spec does not fit, stays as written."""
    parts, used = [], set()
    for literal, name, spec, conversion in _parse(template):
        parts.append(literal)
        if name is None:
            continue
        try:
            parts.append(format(fields[name], spec or ""))
            used.add(name)
        except (KeyError, ValueError, TypeError):
            parts.append("{" + name + (f"!{conversion}" if conversion else "")
                         + (f":{spec}" if spec else "") + "}")  # fmt: skip
    return "".join(parts), used


@functools.lru_cache(maxsize=1024)
def _parse(template: str) -> tuple[tuple[str, str | None, str | None, str | None], ...]:
    try:
        return tuple(string.Formatter().parse(template))
    except ValueError:  # a lone brace: the template is shown as it is
        return ((template, None, None, None),)


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text
