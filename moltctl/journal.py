"""moltbotd's log in the journal, read with journalctl for `moltctl logs`: the entries of
earlier runs too, filtered as the daemon's ring is and shown in its form."""

import grp
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

from moltbotd.wire.loglines import LEVELS, line

UNIT = "moltbotd.service"
# Groups whose members journald lets read the system journal.
READERS = ("adm", "systemd-journal", "wheel")
_SYSLOG_NAMES = {"debug": "debug", "info": "info", "warning": "warning", "error": "err",
                 "critical": "crit"}  # fmt: skip
_FROM_SYSLOG = {0: "critical", 1: "critical", 2: "critical", 3: "error", 4: "warning",
                5: "info", 6: "info", 7: "debug"}  # fmt: skip
# What moltbotd's journal entries carry besides their own fields (journal.entry()).
_NOT_FIELDS = {"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY",
               "SYSLOG_PID", "SYSLOG_TIMESTAMP", "COMPONENT", "EVENT", "CODE_FILE",
               "CODE_LINE", "CODE_FUNC", "UNIT", "INVOCATION_ID"}  # fmt: skip


def why_unreadable() -> str | None:
    """None when this user can read moltbotd's entries in the journal; else why not."""
    if shutil.which("journalctl") is None:
        return "journalctl is not installed"
    if os.geteuid() == 0:
        return None
    names = set()
    for gid in os.getgroups():
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    if names & set(READERS):
        return None
    return f"your user is in none of the groups {', '.join(READERS)}, which read the journal"


def has_entries() -> bool:
    """Whether the journal holds anything of moltbotd's (it ran under systemd here)."""
    argv = ["journalctl", "--unit", UNIT, "--output", "json", "--quiet", "--lines", "1"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(done.stdout.strip())


def command(min_level: str, since: float | None, until: float | None, model: str | None,
            lines: int | None, follow: bool) -> list[str]:  # fmt: skip
    argv = ["journalctl", "--unit", UNIT, "--output", "json", "--no-pager", "--quiet",
            "--priority", _SYSLOG_NAMES[min_level]]  # fmt: skip
    if since is not None:
        argv += ["--since", f"@{int(since)}"]
    if until is not None:
        argv += ["--until", f"@{int(until) + 1}"]  # whole seconds: the filter trims it
    if lines is not None:
        argv += ["--lines", str(lines)]
    if follow:
        argv.append("--follow")
    if model is not None:
        argv.append(f"MODEL={model}")
    return argv


def entries(min_level: str, max_level: str, since: float | None, until: float | None,
            model: str | None, contains: str | None, lines: int | None,
            follow: bool) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The entries as `moltctl logs` shows them, oldest first (then new ones as they
    come, when following). Filters journalctl has no flag for are applied here, so
    `lines` is given to journalctl only when it would not cut matches."""
    exact = max_level == LEVELS[-1] and contains is None and until is None
    argv = command(min_level, since, until, model, lines if exact or follow else None, follow)
    high = LEVELS.index(max_level)
    found: list[dict[str, Any]] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as journalctl:
        assert journalctl.stdout is not None
        for line in journalctl.stdout:
            entry = to_entry(json.loads(line))
            if not _passes(entry, high, contains, until):
                continue
            if follow:
                yield entry
            else:
                found.append(entry)
    yield from found[-lines:] if lines else found


def _passes(entry: dict[str, Any], high: int, contains: str | None, until: float | None) -> bool:
    return (
        LEVELS.index(entry["level"]) <= high
        and (contains is None or contains in entry["message"])
        and (until is None or entry["time"] <= until)
    )


def to_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A journalctl JSON record as a log entry: time, level, logger, event, message, the
    fields (by their names in the daemon's log), and where it came from."""
    fields = {k.lower(): _text(v) for k, v in record.items()
              if not k.startswith("_") and k not in _NOT_FIELDS}  # fmt: skip
    return {
        "time": int(record.get("__REALTIME_TIMESTAMP", 0)) / 1e6,
        "level": _FROM_SYSLOG.get(int(record.get("PRIORITY", 6)), "info"),
        "logger": _text(record.get("COMPONENT") or record.get("SYSLOG_IDENTIFIER", "journal")),
        "event": _text(record.get("EVENT") or record.get("MESSAGE", "")),
        "message": _text(record.get("MESSAGE", "")),
        "fields": fields,
        "pid": int(record.get("_PID", 0)),
        "cursor": record.get("__CURSOR"),
    }


def render(entry: dict[str, Any]) -> str:
    """The ring's text form: the message already holds the fields it did not fill in."""
    return line(entry["time"], entry["level"], entry["logger"], entry["message"])


def _text(value: Any) -> str:
    """journalctl shows a value that is not UTF-8 as a list of byte values."""
    if isinstance(value, list):
        return bytes(value).decode(errors="replace")
    return str(value)
