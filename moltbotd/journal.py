"""systemd's journal, spoken natively (systemd.io/JOURNAL_NATIVE_PROTOCOL): each entry is
one datagram of FIELD=value lines to journald's socket, so that its fields can be
matched: `journalctl -u moltbotd MODEL=demo`.

Entries of one kind share a MESSAGE_ID, made from the event's fixed template, so it
stays the same across releases as long as the template does.
"""

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "moltbotd"
# MESSAGE_ID = uuid5(NAMESPACE, template): fixed, so the ids are too.
NAMESPACE = uuid.UUID("5b0e8a8e-4f4c-4c3e-9a57-6d6f6c74626f")
AUDIT_MESSAGE_ID = uuid.uuid5(NAMESPACE, "audit record").hex
PRIORITIES = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3, "critical": 2}
# Fields journald or journalctl give a meaning to: a log field of that name is renamed.
SPECIAL = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID",
                     "SYSLOG_FACILITY", "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "CODE_FILE",
                     "CODE_LINE", "CODE_FUNC", "ERRNO", "COMPONENT", "EVENT",
                     "DOCUMENTATION", "TID", "INVOCATION_ID", "UNIT",
                     "USER_UNIT"})  # fmt: skip
_NOT_NAME = re.compile(r"[^A-Z0-9_]")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def stderr_is_journal() -> bool:
    """Whether systemd connected stderr to the journal (it sets JOURNAL_STREAM to the
    stream's device:inode; a child whose stderr was redirected does not match)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return dev.isdigit() and ino.isdigit() and (info.st_dev, info.st_ino) == (int(dev), int(ino))


def message_id(template: str) -> str:
    return uuid.uuid5(NAMESPACE, template).hex


def field_name(key: str) -> str:
    """A log field's key as a journal field name: upper case, letters, digits and '_',
    not starting with '_' (journald's own) or a digit, at most 64 characters."""
    name = _NOT_NAME.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit() or name in SPECIAL:
        name = f"F_{name}"
    return name[:64]


def encode(fields: Mapping[str, Any]) -> bytes:
    """One entry as the datagram's payload. A value with a newline goes as its length
    (64-bit little-endian) and its bytes."""
    out = bytearray()
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode(errors="replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def decode(payload: bytes) -> dict[str, bytes]:
    """The fields of one payload (encode's inverse; for tests and tools)."""
    fields, at = {}, 0
    while at < len(payload):
        end = payload.index(b"\n", at)
        line = payload[at:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            at = end + 1
        else:
            key, (size,) = line, struct.unpack_from("<Q", payload, end + 1)
            value = payload[end + 9 : end + 9 + size]
            at = end + 9 + size + 1
        fields[key.decode()] = value
    return fields


class Journal:
    """A connected datagram socket to journald. A send never blocks the event loop: an
    entry journald has no room for is counted as lost, and the count is sent with the
    next entry that goes through."""

    def __init__(self, path: Path = SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.lost = 0

    def send(self, fields: Mapping[str, Any]) -> bool:
        if self.lost:
            fields = {**fields, "MOLTBOT_LOST_BEFORE": self.lost}
        payload = encode(fields)
        try:
            self._send(payload)
        except OSError:
            self.lost += 1
            return False
        self.lost = 0
        return True

    def _send(self, payload: bytes) -> None:
        try:
            self.sock.send(payload)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        """An entry larger than a datagram: in a sealed memfd, passed with SCM_RIGHTS."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = array.array("i", [fd])
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def entry(event: str, message: str, level: str, component: str,
          fields: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """A log entry's journal fields: the standard ones, then every field by its name."""
    out: dict[str, Any] = {
        "MESSAGE": message,
        "MESSAGE_ID": message_id(event),
        "PRIORITY": PRIORITIES.get(level, 6),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "COMPONENT": component,
        "EVENT": event,
    }
    for key, value in fields.items():
        if key != "exception" and value is not None:
            out[field_name(key)] = value
    return out


def audit_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """An audit record's journal fields (`journalctl MESSAGE_ID=<AUDIT_MESSAGE_ID>`)."""
    who = record.get("who") or {}
    params = record.get("params") or {}
    outcome = record.get("outcome", "ok")
    name = who.get("user") or f"uid {who.get('uid')}"
    message = f"audit: {record.get('op')} by {name} (pid {who.get('pid')}): {outcome}"
    if record.get("error"):
        message += f": {record['error']}"
    out: dict[str, Any] = {
        "MESSAGE": message,
        "MESSAGE_ID": AUDIT_MESSAGE_ID,
        "PRIORITY": PRIORITIES["notice" if outcome == "ok" else "warning"],
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "COMPONENT": "audit",
        "OP": record.get("op"),
        "OUTCOME": outcome,
        "MS": record.get("ms"),
        "PARAMS": json.dumps(params, default=str),
    }
    for key in ("uid", "gid", "pid", "user", "exe"):
        if who.get(key) is not None:
            out[f"CLIENT_{key.upper()}"] = who[key]
    for key in ("model", "version"):
        if isinstance(params.get(key), str):
            out[key.upper()] = params[key]
    return out
