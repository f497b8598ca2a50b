"""The journal's native protocol: entries encoded as journald reads them, sent over a real
datagram socket (in a sealed memfd when too large for one), entries journald has no room
for counted; and a real daemon logging there with its fields (MODEL, VERSION,
REQUEST_ID, CODE, a MESSAGE_ID per event kind) and its audit records.

This machine runs no journald: a datagram socket the test binds stands in for its
socket. The VM scenario (tests/e2e/guest.py, `journal`) reads the real journal."""

import array
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from moltbotd import journal
from moltbotd.journal import AUDIT_MESSAGE_ID, Journal, decode, encode, field_name, message_id
from moltctl import journal as reader
from tests.conftest import run_moltctl, wait_until
from tests.test_cli import ok

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class Journald:
    """A datagram socket where journald's would be: it keeps every entry it receives,
    read from the datagram or from the sealed memfd passed with it."""

    def __init__(self, path: Path, reading: bool = True) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.entries: list[dict[str, bytes]] = []
        self.seals: list[int] = []
        if reading:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                self.entries.append(self.receive())
            except OSError:
                return

    def receive(self) -> dict[str, bytes]:
        payload, ancillary, _, _ = self.sock.recvmsg(2**20, socket.CMSG_SPACE(4))
        for level, kind, data in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fd = array.array("i", data[:4])[0]
                self.seals.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
                with os.fdopen(fd, "rb") as memfd:  # journald maps it from its start
                    memfd.seek(0)
                    payload = memfd.read()
        return decode(payload)

    def wait_for(self, match: Callable[[dict[str, bytes]], bool], what: str) -> dict[str, bytes]:
        wait_until(lambda: any(match(e) for e in list(self.entries)), 60, what)
        return next(e for e in list(self.entries) if match(e))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journald(tmp_path):
    fake = Journald(tmp_path / "journal.sock")
    yield fake
    fake.close()


def test_an_entry_is_encoded_as_journald_reads_it():
    fields = {"MESSAGE": "two\nlines", "MODEL": "demo", "PRIORITY": 6}
    payload = encode(fields)
    assert payload.startswith(b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n")
    assert b"\nMODEL=demo\nPRIORITY=6\n" in payload
    assert decode(payload) == {"MESSAGE": b"two\nlines", "MODEL": b"demo", "PRIORITY": b"6"}


@pytest.mark.parametrize(
    ("key", "name"),
    [("request_id", "REQUEST_ID"), ("model", "MODEL"), ("a-b.c", "A_B_C"), ("_x", "X"),
     ("9lives", "F_9LIVES"), ("message", "F_MESSAGE"), ("priority", "F_PRIORITY"),
     ("x" * 80, "X" * 64)],
)  # fmt: skip
def test_field_names_are_journal_field_names(key, name):
    assert field_name(key) == name


def test_message_ids_are_fixed_per_template():
    # Pinned: operators' queries and alerts name these ids; a change breaks them.
    assert message_id("model {model}: now serving {version}") == (
        "0d34565cb484501eb077af02abeb5bf6"
    )
    assert AUDIT_MESSAGE_ID == "f3a51e26ac6f57b092a5c11a9f2ac241"
    assert len({message_id(t) for t in ("a {x}", "b {x}", "a {y}")}) == 3


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(journald):
    sender = Journal(journald.path)
    sender.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert sender.send({"MESSAGE": "x" * 300_000, "MODEL": "demo"})
    got = journald.wait_for(lambda e: e.get("MODEL") == b"demo", "the large entry")
    assert got["MESSAGE"] == b"x" * 300_000
    assert journald.seals == [SEALS]
    sender.close()


def test_entries_journald_has_no_room_for_are_counted_and_reported(tmp_path):
    quiet = Journald(tmp_path / "journal.sock", reading=False)  # reads nothing: it fills
    sender = Journal(quiet.path)
    sent = 0
    while sender.send({"MESSAGE": f"entry {sent}"}):
        sent += 1
    assert sender.send({"MESSAGE": "lost too"}) is False
    assert sender.lost == 2
    received = [quiet.receive() for _ in range(sent)]
    assert [e["MESSAGE"] for e in received] == [f"entry {n}".encode() for n in range(sent)]
    assert sender.send({"MESSAGE": "after"})
    assert quiet.receive() == {"MESSAGE": b"after", "MOLTBOT_LOST_BEFORE": b"2"}
    assert sender.lost == 0
    quiet.close()
    sender.close()


def test_a_journal_that_is_not_there_raises_for_the_daemon_to_say_so(tmp_path):
    with pytest.raises(FileNotFoundError):
        Journal(tmp_path / "nothing.sock")


CONFIG = """
log_target: journal
journal_socket: {path}
metrics:
  slow_request: 1us
"""


def test_the_daemon_logs_its_fields_to_the_journal(daemon_factory, journald):
    daemon = daemon_factory(CONFIG.format(path=journald.path), wait=False)
    ready = journald.wait_for(lambda e: e.get("EVENT", b"").endswith(b"ready: {summary}"), "ready")
    assert ready["SYSLOG_IDENTIFIER"] == b"moltbotd" and ready["COMPONENT"] == b"daemon"
    assert ready["MESSAGE"].startswith(b"moltbotd 0.1.0 ready: serving ")
    ok(run_moltctl("switch", "demo", "v1.0", socket=daemon.socket))
    serving = journald.wait_for(lambda e: e.get("EVENT") == b"model {model}: now serving {version}",
                                "now serving")  # fmt: skip
    assert serving["MESSAGE"] == b"model demo: now serving v1.0 previous=v2.0"
    assert (serving["MODEL"], serving["VERSION"], serving["PRIORITY"]) == (b"demo", b"v1.0", b"6")
    assert serving["MESSAGE_ID"] == message_id("model {model}: now serving {version}").encode()
    ok(run_moltctl("infer", "demo", "-i", "x=[[1,2,3,4]]", "--request-id", "trace-7",
                   socket=daemon.socket))  # fmt: skip
    slow = journald.wait_for(lambda e: e.get("REQUEST_ID") == b"trace-7", "the slow request")
    assert (slow["MODEL"], slow["CODE"], slow["PRIORITY"]) == (b"demo", b"OK", b"4")
    audited = journald.wait_for(lambda e: e.get("MESSAGE_ID") == AUDIT_MESSAGE_ID.encode(),
                                "the audit record")  # fmt: skip
    assert (audited["OP"], audited["OUTCOME"], audited["MODEL"]) == (b"switch", b"ok", b"demo")
    assert audited["CLIENT_UID"] == str(os.getuid()).encode()
    assert audited["MESSAGE"].startswith(b"audit: switch by root (pid ")
    assert "[INFO]" not in daemon.log()  # the journal has them, not stderr too
    answer = run_moltctl("logs", "--source", "daemon", "--filter", "now serving",
                         socket=daemon.socket)  # fmt: skip
    assert "model demo: now serving v1.0" in ok(answer)  # the ring keeps them as well


def test_the_daemon_says_so_when_the_journal_cannot_be_reached(daemon_factory, tmp_path):
    config = CONFIG.format(path=tmp_path / "no-journald.sock")
    daemon = daemon_factory(config)
    assert f"logging to stderr: cannot reach journald at {tmp_path / 'no-journald.sock'}" in (
        daemon.log())  # fmt: skip


def test_journalctl_records_become_the_rings_entries():
    record = {"__REALTIME_TIMESTAMP": "1796591472810000", "PRIORITY": "4", "_PID": "4242",
              "COMPONENT": "pool", "EVENT": "slow request", "MODEL": "demo",
              "MESSAGE": [115, 108, 111, 119, 255], "REQUEST_ID": "r1", "MESSAGE_ID": "ab",
              "_SYSTEMD_UNIT": "moltbotd.service", "__CURSOR": "s=1"}  # fmt: skip
    entry = reader.to_entry(record)
    assert entry["time"] == pytest.approx(1796591472.81)
    assert (entry["level"], entry["logger"], entry["event"]) == ("warning", "pool", "slow request")
    assert entry["message"] == "slow\ufffd"
    assert entry["fields"] == {"model": "demo", "request_id": "r1"}
    assert entry["pid"] == 4242
    assert reader.render(entry).endswith("[WARNING] [pool] slow\ufffd")
    argv = reader.command("warning", 100.5, 200.2, "demo", 10, True)
    assert argv[:8] == ["journalctl", "--unit", "moltbotd.service", "--output", "json",
                        "--no-pager", "--quiet", "--priority"]  # fmt: skip
    assert argv[8:] == ["warning", "--since", "@100", "--until", "@201", "--lines", "10",
                        "--follow", "MODEL=demo"]  # fmt: skip


def test_an_audit_record_in_the_journal_names_the_client():
    fields = journal.audit_entry({"op": "scale", "params": {"model": "demo", "instances": 2},
                                  "who": {"uid": 1001, "gid": 1001, "pid": 7, "user": "alice",
                                          "exe": "/usr/bin/python3"},
                                  "outcome": "PERMISSION_DENIED", "error": "uid 1001 may not",
                                  "ms": 0.1})  # fmt: skip
    assert fields["MESSAGE"] == "audit: scale by alice (pid 7): PERMISSION_DENIED: uid 1001 may not"
    assert fields["PRIORITY"] == 4 and fields["MODEL"] == "demo" and "VERSION" not in fields
    assert (fields["CLIENT_UID"], fields["CLIENT_USER"]) == (1001, "alice")
    assert fields["PARAMS"] == '{"model": "demo", "instances": 2}'
