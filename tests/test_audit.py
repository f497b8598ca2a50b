"""The audit trail: the file (appended, fsynced, rotated, read back), and the records a
real daemon writes for every change made through real moltctl commands, refused ones
included."""

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

from moltbotd.control.access import Peer
from moltbotd.control.audit import MAX_PENDING, SHOWN_CHARS, AuditLog, shown
from moltbotd.wire.protocol import ErrorCode, FrameDecoder, MoltError, encode_frame, request
from moltctl.cli import EXIT_ERROR
from tests.conftest import run_moltctl, wait_until, wait_until_async
from tests.test_cli import fails, ok
from tests.test_deploy import model_folder

ME = Peer(os.getpid(), os.getuid(), os.getgid())


async def settle(outcome: object) -> "asyncio.Future[object]":
    future = asyncio.get_running_loop().create_future()
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    return future


async def record_all(trail: AuditLog, entries: list[tuple[str, dict, object]]) -> None:
    for op, params, outcome in entries:
        trail.watch(op, params, ME, await settle(outcome))
        await asyncio.sleep(0)  # the done callback runs
    await trail.close()


def test_records_are_appended_fsynced_and_read_back(tmp_path, fsynced):
    trail = AuditLog(tmp_path / "audit" / "audit.jsonl", 2**20, 2)
    refused = MoltError(ErrorCode.VERSION_NOT_FOUND, "model demo has no version v9")
    asyncio.run(record_all(trail, [("switch", {"version": "v2.0"}, {}),
                                   ("switch", {"version": "v9"}, refused),
                                   ("scale", {"model": "demo", "instances": 2}, {})]))  # fmt: skip
    lines = (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(fsynced) == 3
    first, second, _ = (json.loads(line) for line in lines)
    assert first["op"] == "switch" and first["outcome"] == "ok" and first["ms"] >= 0
    assert first["who"]["uid"] == os.getuid() and first["who"]["pid"] == os.getpid()
    assert first["who"]["exe"] == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert second["outcome"] == "VERSION_NOT_FOUND"
    assert second["error"] == "model demo has no version v9"

    async def query(**kwargs):
        return await AuditLog(trail.path, 2**20, 2).query(**kwargs)

    everything = asyncio.run(query(since=None, until=None, op=None, limit=10))
    assert [r["op"] for r in everything] == ["switch", "switch", "scale"]
    assert [r["op"] for r in asyncio.run(query(since=None, until=None, op="scale", limit=10))] == [
        "scale"]  # fmt: skip
    newest = asyncio.run(query(since=None, until=None, op="switch", limit=1))
    assert newest[0]["params"] == {"version": "v9"}
    later = asyncio.run(query(since=first["time"] + 3600, until=None, op=None, limit=10))
    assert later == []


def test_the_file_is_rotated_and_only_keep_old_files_stay(tmp_path):
    trail = AuditLog(tmp_path / "audit.jsonl", 1000, 2)
    asyncio.run(record_all(trail, [("reload", {"n": n}, {}) for n in range(60)]))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    found = asyncio.run(AuditLog(trail.path, 1000, 2).query(None, None, None, 1000))
    numbers = [r["params"]["n"] for r in found]
    assert numbers == list(range(numbers[0], 60)) and numbers[0] > 0  # the oldest went


def test_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"time": 1, "op": "reload"}\n{"time": 2, "op": "sw')  # a crash mid-write
    found = asyncio.run(AuditLog(path, 2**20, 1).query(None, None, None, 10))
    assert found == [{"time": 1, "op": "reload"}]


def test_parameters_are_recorded_without_their_bulk():
    files = {f"f{n}": "0" * 64 for n in range(100)}
    assert shown({"data": b"x" * 5000, "files": files, "source": "s" * 1000}) == {
        "data": {"bytes": 5000}, "files": {"entries": 100},
        "source": "s" * SHOWN_CHARS + "... (1000 characters)"}  # fmt: skip
    assert shown({"files": {"model.onnx": "ab"}}) == {"files": {"model.onnx": "ab"}}


def records(daemon, *args: str) -> list[dict]:
    result = run_moltctl("audit", "-o", "json", *args, socket=daemon.socket)
    return json.loads(ok(result))["records"]


def test_every_change_through_moltctl_is_audited_refused_ones_too(daemon, tmp_path):
    ok(run_moltctl("switch", "v1.0", socket=daemon.socket))
    fails(run_moltctl("switch", "demo", "v9", socket=daemon.socket), EXIT_ERROR)
    ok(run_moltctl("scale", "demo", "1", socket=daemon.socket))
    fails(run_moltctl("scale", "demo", "2", socket=daemon.socket), EXIT_ERROR)  # max is 1
    ok(run_moltctl("reload", socket=daemon.socket))
    ok(run_moltctl("deploy", str(model_folder(tmp_path, "demo")), "--version", "v7",
                   socket=daemon.socket))  # fmt: skip
    ok(run_moltctl("status", socket=daemon.socket))  # reads are not audited
    found = wait_until(lambda: (r := records(daemon, "--last", "1h")) and len(r) >= 7 and r,
                       what="7 audit records")  # fmt: skip
    outcomes = [(r["op"], r["outcome"]) for r in found]
    assert outcomes == [("switch", "ok"), ("switch", "VERSION_NOT_FOUND"), ("scale", "ok"),
                        ("scale", "BAD_REQUEST"), ("reload", "ok"), ("upload", "ok"),
                        ("deploy", "ok")]  # fmt: skip
    switch, refused = found[0], found[1]
    assert switch["params"]["version"] == "v1.0"
    assert switch["who"]["uid"] == os.getuid() and switch["who"]["gid"] == os.getgid()
    assert switch["who"]["pid"] > 0 and switch["who"]["pid"] != daemon.proc.pid
    assert "no version v9" in refused["error"] or "v9" in refused["error"]
    assert found[6]["params"]["version"] == "v7" and found[6]["params"]["files"]
    # the same records as a table, and filtered
    table = ok(run_moltctl("audit", "--last", "1h", "--op", "scale", socket=daemon.socket))
    assert table.splitlines()[0].split() == ["TIME", "WHO", "OP", "PARAMS", "OUTCOME", "MS"]
    assert len(table.splitlines()) == 3 and "BAD_REQUEST: model demo may run at most 1" in table
    assert records(daemon, "--since", "1h", "--until", "2h ago") == []


def test_a_request_refused_before_its_handler_is_audited(daemon):
    with socket.socket(socket.AF_UNIX) as raw:  # moltctl checks first: speak the bytes
        raw.connect(str(daemon.socket))
        raw.sendall(encode_frame(request(1, "switch", {"version": 5})))
        decoder, answers = FrameDecoder(), []
        while not answers:
            answers = decoder.feed(raw.recv(65536))
    assert answers[0]["error"]["code"] == ErrorCode.BAD_REQUEST.value
    [record] = wait_until(lambda: records(daemon), what="the refused switch recorded")
    assert record["op"] == "switch" and record["outcome"] == "BAD_REQUEST"
    assert record["params"] == {"version": 5}


def test_a_record_not_written_is_logged_and_the_change_stands(daemon_factory, tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    daemon = daemon_factory(f"audit: {{file: {blocker / 'audit.jsonl'}}}\n")
    ok(run_moltctl("switch", "v1.0", socket=daemon.socket))
    daemon.wait_for_log(f"an audit record could not be written to {blocker / 'audit.jsonl'}")
    with daemon.client() as c:
        assert c.status("demo")["models"][0]["active_version"] == "v1.0"


def test_whatever_a_client_nests_the_record_stays_small():
    deep: list = []
    inner = deep
    for _ in range(1000):  # as deep as msgpack decodes
        inner.append([])
        inner = inner[0]
    wide = {f"k{n}": list(range(30)) for n in range(30)}
    assert shown({"a": deep}) == {"a": [[[{"nested": "list"}]]]}
    assert len(json.dumps(shown({"w": wide, b"\xff" * 500: 1}))) < 100_000


def test_records_past_the_queue_are_counted_and_the_count_recorded(tmp_path):
    """A client repeating a refused change faster than the disk takes records: the queue
    stops at MAX_PENDING, and one record says how many were not written."""
    trail = AuditLog(tmp_path / "audit.jsonl", 2**30, 1)
    disk = threading.Event()

    async def flood() -> None:
        busy = asyncio.get_running_loop().run_in_executor(trail._thread, disk.wait)
        refused = MoltError(ErrorCode.PERMISSION_DENIED, "uid 7 may not switch")
        for n in range(MAX_PENDING + 5):
            trail.watch("switch", {"n": n}, ME, await settle(refused))
        await asyncio.sleep(0)  # the done callbacks run
        assert trail.dropped == 5
        disk.set()
        await busy
        await wait_until_async(lambda: asyncio.sleep(0, not trail._writes), what="the writes")
        await trail.close()

    asyncio.run(flood())
    records = [json.loads(line) for line in trail.path.read_text().splitlines()]
    assert [r["params"]["n"] for r in records[:-1]] == list(range(MAX_PENDING))
    assert records[-1]["outcome"] == "DROPPED" and records[-1]["params"] == {"dropped": 5}
    assert records[-1]["who"]["pid"] == os.getpid()
