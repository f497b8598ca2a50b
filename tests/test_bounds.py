"""Issue 14: no client can exhaust the daemon. The real daemon over real sockets; memory
is read from the daemon's /proc/PID/status, and states are polled, never timed."""

import contextlib
import dataclasses
import os
import socket

import msgpack
import numpy as np

from moltbotd.config import Config
from moltbotd.control.server import Clients
from moltbotd.wire.protocol import HEADER, ErrorCode, FrameDecoder, encode_frame, encode_tensor
from tests.conftest import Daemon, wait_until

MiB = 2**20


def rss(daemon: Daemon) -> int:
    """The daemon's resident memory in bytes (VmRSS)."""
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def connect(daemon: Daemon, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect(str(daemon.socket))
    return sock


def read_frames(sock: socket.socket, expect: int | None = None) -> list:
    """Frames until `expect` came, or until the daemon closes."""
    decoder, frames = FrameDecoder(1 << 30), []
    while expect is None or len(frames) < expect:
        data = sock.recv(1 << 16)
        if not data:
            break
        frames += decoder.feed(data)
    return frames


def call(sock: socket.socket, op: str, params: dict | None = None) -> dict:
    sock.sendall(encode_frame({"id": op, "op": op, "params": params or {}}))
    [answer] = read_frames(sock, 1)
    return answer


def status(daemon: Daemon) -> dict:
    with connect(daemon) as sock:
        return call(sock, "status")["result"]


def test_a_client_that_never_reads_is_closed_and_the_daemon_stays_small(daemon_factory):
    daemon = daemon_factory("clients: {unsent_pause_bytes: 64KiB, max_unsent_bytes: 1MiB}\n")
    status(daemon)  # the daemon's own first-call allocations are not the client's
    before = rss(daemon)
    request = encode_frame({"id": 1, "op": "status"})  # an answer of a few KiB for 30 bytes
    with connect(daemon, rcvbuf=4096) as sock:
        try:
            for _ in range(200):  # 20,000 requests: 100s of MiB of answers, if all were kept
                sock.sendall(request * 100)
        except OSError:
            pass  # the daemon closed it
        daemon.wait_for_log("closing a connection that does not read its answers")
    grown = rss(daemon) - before
    line = next(x for x in daemon.log().splitlines() if "does not read its answers" in x)
    assert "peer=" in line and "uid" in line
    assert grown < 48 * MiB, f"the daemon grew by {grown / MiB:.0f} MiB"
    assert status(daemon)["clients"]["connections"] == 1  # this one: the other is gone


def test_requests_open_on_one_connection_never_exceed_max_inflight(daemon_factory):
    daemon = daemon_factory("max_inflight_per_connection: 2\n")
    inputs = {"n": encode_tensor(np.array(200_000, np.int64)),
              "x": encode_tensor(np.ones(4, np.float32))}  # fmt: skip
    burst = b"".join(
        encode_frame({"id": i, "op": "infer", "params": {"model": "slow", "inputs": inputs}})
        for i in range(6)
    )
    decoder, answers, seen = FrameDecoder(), [], []
    with connect(daemon) as sock:
        sock.sendall(burst)  # one write: the daemon reads all six at once
        sock.setblocking(False)
        while len(answers) < 6:
            seen.append(status(daemon)["models"])
            with contextlib.suppress(BlockingIOError):
                answers += decoder.feed(sock.recv(1 << 16))
    open_counts = [m["worker"]["inflight"] for models in seen for m in models
                   if m["name"] == "slow"]  # fmt: skip
    assert max(open_counts) <= 2, open_counts
    assert sorted(a["id"] for a in answers) == list(range(6))
    assert all(a["ok"] for a in answers)


def test_a_frame_that_never_completes_is_closed_after_frame_timeout(daemon_factory):
    daemon = daemon_factory("clients: {frame_timeout: 1s}\n")
    with connect(daemon) as sock:
        sock.sendall(HEADER.pack(1000) + b"\x80" * 10)  # then nothing: slowloris
        [error] = read_frames(sock)  # the daemon answers, then closes
    assert error["error"]["code"] == ErrorCode.BAD_FRAME
    assert "clients.frame_timeout" in error["error"]["message"]
    assert "14 bytes came" in error["error"]["message"]
    daemon.wait_for_log("frame did not arrive whole in time")
    assert status(daemon)["clients"]["partial_bytes"] == 0


def test_unfinished_frames_of_all_connections_share_one_budget(daemon_factory):
    daemon = daemon_factory("clients: {max_partial_bytes: 1MiB}\n")
    first, second = connect(daemon), connect(daemon)
    with first, second:
        first.sendall(HEADER.pack(8 * MiB) + b"\0" * (700 * 1024))
        wait_until(lambda: status(daemon)["clients"]["partial_bytes"] >= 700 * 1024,
                   what="the daemon read the first partial frame")  # fmt: skip
        second.sendall(HEADER.pack(8 * MiB) + b"\0" * (400 * 1024))
        [refused] = read_frames(second)
        assert refused["error"]["code"] == ErrorCode.RESOURCE_EXHAUSTED
        assert "clients.max_partial_bytes" in refused["error"]["message"]
        assert status(daemon)["clients"]["partial_bytes"] <= MiB
    # once the first is gone, its bytes are free for others
    wait_until(lambda: status(daemon)["clients"]["partial_bytes"] == 0, what="bytes released")
    with connect(daemon) as third:
        third.sendall(HEADER.pack(8 * MiB) + b"\0" * (900 * 1024))
        wait_until(lambda: status(daemon)["clients"]["partial_bytes"] >= 900 * 1024,
                   what="the third's partial frame read")  # fmt: skip


def test_connections_past_the_limit_are_refused_and_logged_once(daemon_factory):
    daemon = daemon_factory("clients: {max_connections: 3, refusal_log_interval: 1h}\n")
    held = [connect(daemon) for _ in range(3)]
    wait_until(lambda: call(held[0], "status")["result"]["clients"]["connections"] == 3,
               what="three connections accepted")  # fmt: skip
    refused = []
    for _ in range(5):
        with connect(daemon) as extra:
            refused += read_frames(extra)
    assert call(held[1], "health")["ok"] is True  # the connections held still work
    assert [f["error"]["code"] for f in refused] == [ErrorCode.RESOURCE_EXHAUSTED] * 5
    assert "clients.max_connections" in refused[0]["error"]["message"]
    assert refused[0]["id"] is None
    assert daemon.log().count("refused a connection") == 1  # not once per connection
    for sock in held:
        sock.close()
    with connect(daemon) as sock:  # a slot is free again
        assert call(sock, "health")["ok"] is True


def test_connections_per_uid_are_limited(daemon_factory):
    daemon = daemon_factory("clients: {max_connections: 100, max_connections_per_uid: 2}\n")
    with connect(daemon) as one, connect(daemon) as other:
        wait_until(lambda: call(one, "status")["result"]["clients"]["connections"] == 2,
                   what="two connections accepted")  # fmt: skip
        with connect(daemon) as third:
            [refused] = read_frames(third)
        assert call(other, "health")["ok"] is True
    assert refused["error"]["code"] == ErrorCode.RESOURCE_EXHAUSTED
    assert f"uid {os.getuid()} has 2 connections" in refused["error"]["message"]
    assert "clients.max_connections_per_uid" in refused["error"]["message"]


def test_a_frame_before_an_oversized_header_is_answered_first(daemon):
    payload = encode_frame({"id": 7, "op": "health"}) + HEADER.pack(2**31)
    with connect(daemon) as sock:
        sock.sendall(payload)
        frames = read_frames(sock)  # until the daemon closes
    assert [f["id"] for f in frames] == [7, None]
    assert frames[0]["ok"] is True
    assert frames[1]["error"]["code"] == ErrorCode.FRAME_TOO_LARGE


def test_a_huge_version_string_is_refused_briefly_and_kept_out_of_the_log(daemon):
    size_before = daemon.log_path.stat().st_size
    huge = "v" * 10_000_000
    frame = encode_frame({"id": 1, "op": "switch", "params": {"model": "demo", "version": huge}})
    with connect(daemon) as sock:
        for sent in range(8):
            sock.sendall(frame)
            [answer] = read_frames(sock, 1)
            assert answer["error"]["code"] == ErrorCode.BAD_REQUEST
            assert "clients.max_name_chars" in answer["error"]["message"]
            assert len(answer["error"]["message"]) < 400
            if sent == 0:  # the first frame's buffers stay with the allocator, for reuse
                after_one = rss(daemon)
    grown = rss(daemon) - after_one
    # each request kept would be 10 MiB more: 70 MiB; allocator noise stays far below
    assert grown < 24 * MiB, f"7 more requests kept {grown / MiB:.0f} MiB"
    assert daemon.log_path.stat().st_size - size_before < 100_000


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_values_never_get_internal(daemon):
    deep = nested(1000)
    messages = [
        {"id": deep, "op": "health"},
        {"id": 1, "op": deep},
        {"id": 2, "op": "status", "params": {"model": deep}},
        {"id": 3, "op": "status", "params": {"y": deep}},
        {"id": 4, "op": "infer", "params": {"model": "demo", "inputs": {"x": deep}}},
        {"id": 5, "op": "switch", "params": {"version": "v1.0", "canary": deep}},
        {"id": 6, "op": "logs", "params": {"contains": deep}},
    ]
    payload = b"".join(
        HEADER.pack(len(body)) + body
        for body in (msgpack.packb(m, use_bin_type=True) for m in messages)
    )
    with connect(daemon) as sock:
        sock.sendall(payload)
        answers = read_frames(sock, len(messages))
    codes = [a["error"]["code"] for a in answers]
    assert ErrorCode.INTERNAL not in codes, answers
    assert all(len(a["error"]["message"]) < 600 for a in answers)
    assert "Traceback" not in daemon.log()
    assert "RecursionError" not in daemon.log()


def test_a_heavy_logs_query_does_not_stall_other_requests(daemon_factory):
    daemon = daemon_factory("log_ring_size: 40000\n")
    hellos = b"".join(encode_frame({"id": i, "op": "hello"}) for i in range(1000))
    with connect(daemon) as sock:
        for _ in range(30):  # fill the ring: a debug entry per hello
            sock.sendall(hellos)
            read_frames(sock, 1000)
        heavy = encode_frame({"id": "logs", "op": "logs", "params": {"contains": "no such"}})
        others = b"".join(encode_frame({"id": i, "op": "health"}) for i in range(20))
        sock.sendall(heavy + others)  # the logs query is read and started first
        order = [f["id"] for f in read_frames(sock, 21)]
    answered_before_logs = order.index("logs")
    assert answered_before_logs > 0, "every health answer waited for the logs query"


class Caller:  # what Clients reads of a connection
    uid = 1000

    def waiting(self) -> int:
        return 0


def test_a_connection_on_a_reserved_descriptor_is_refused():
    limits = dataclasses.replace(Config().clients, reserved_fds=100)
    clients = Clients(limits)
    clients.fd_ceiling = 900  # a soft limit of 1000, less the reserve
    caller = Caller()
    assert clients.admit(caller, 899) is None  # type: ignore[arg-type]
    why = clients.admit(caller, 900)  # type: ignore[arg-type]
    assert why is not None and "clients.reserved_fds" in why
    assert clients.usage()["connections"] == 1


def test_an_ended_connection_is_closed_even_if_its_client_never_closes(daemon_factory):
    daemon = daemon_factory("clients: {frame_timeout: 1s}\n")
    with connect(daemon) as sock:
        sock.sendall(HEADER.pack(2**31))
        [error] = read_frames(sock)  # the daemon half-closed: EOF after the error
        assert error["error"]["code"] == ErrorCode.FRAME_TOO_LARGE
        # this client keeps its end open; the daemon lets it go after frame_timeout
        wait_until(lambda: status(daemon)["clients"]["connections"] == 1,
                   what="the daemon closed the ended connection")  # fmt: skip
