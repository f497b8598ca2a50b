"""Direct channels end to end: a client's infer requests go straight to the worker on a
socket moltbotd handed over (SCM_RIGHTS), with the daemon's checks, queue and counts,
and moltbotd still in control (switches, canaries, fallbacks, dead workers).

Real daemons, real workers, real onnxruntime; the raw tests speak the protocol's bytes.
"""

import asyncio
import contextlib
import mmap
import os
import signal
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from moltbotd.wire.protocol import (
    HEADER,
    ErrorCode,
    FrameDecoder,
    MoltError,
    encode_frame,
    encode_tensor,
    request,
)
from moltbotd.wire.region import HEADER_BYTES
from moltctl.client import AsyncClient, Client, DirectChannel, ProtocolError
from tests.conftest import run_moltctl, wait_until
from tests.models import mlp_model
from tests.test_daemon import direct
from tests.test_scheduling import BAD_PARAMS, SLOW_N, pool_status, slow_inputs

X = np.arange(4, dtype=np.float32).reshape(1, 4)
LONG_RUN = 300  # seconds a slow request may take on a slow or loaded machine


class RawChannel:
    """A direct channel opened by hand: the `channel` answer and its socket."""

    def __init__(self, socket_path: Path, model: str) -> None:
        with socket.socket(socket.AF_UNIX) as daemon:
            daemon.connect(str(socket_path))
            daemon.sendall(encode_frame(request(1, "channel", {"model": model})))
            data, fds, _, _ = socket.recv_fds(daemon, 1 << 16, 1)
        [self.answer] = FrameDecoder().feed(data)
        self.sock = socket.socket(fileno=fds[0]) if fds else None
        self.decoder = FrameDecoder(1 << 30)
        self.got: list = []
        self.region = self._region() if self.sock else None

    def _region(self) -> mmap.mmap:
        """The worker's first frame: the shared region offered for large inputs."""
        assert self.sock is not None
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
        [offer] = self.decoder.feed(data)
        assert offer["region"] > 0 and len(fds) == 1, offer
        self.region_fd = fds[0]
        return mmap.mmap(self.region_fd, offer["region"])

    def send(self, *messages: dict) -> None:
        assert self.sock is not None
        self.sock.sendall(b"".join(encode_frame(m) for m in messages))

    def receive(self, count: int = 1, timeout: float = 30) -> list:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        while len(self.got) < count:
            data = self.sock.recv(1 << 20)
            if not data:
                break
            self.got += self.decoder.feed(data)
        out, self.got = self.got[:count], self.got[count:]
        return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def infer(req_id: int, model: str, inputs: dict, **params) -> dict:
    tensors = {name: encode_tensor(np.asarray(v)) for name, v in inputs.items()}
    return request(req_id, "infer", {"model": model, "inputs": tensors, **params})


def worker_of(status: dict, model: str) -> dict:
    return pool_status(status, model)


def test_client_infers_on_a_direct_channel_counted_in_status(daemon) -> None:
    with Client(daemon.socket, 60, direct=True) as client:
        outputs = client.infer("demo", {"x": X})
        assert np.array_equal(outputs["y"], 10 * X)  # the newest version serves: v2.0
        assert (outputs.model, outputs.version) == ("demo", "v2.0")
        for _ in range(9):
            client.infer("demo", {"x": X})
        pool = wait_until(lambda: (p := worker_of(client.status("demo"), "demo"))["requests"] == 10
                          and p, what="10 direct requests counted")  # fmt: skip
        assert pool["channels"] == 1
        assert pool["instances"][0]["channels"] == 1


def test_a_direct_channel_checks_every_request_and_keeps_serving(daemon_factory) -> None:
    daemon = daemon_factory("max_frame_bytes: 4096\n")
    channel = RawChannel(daemon.socket, "demo")
    assert channel.answer["ok"] and channel.answer["result"]["version"] == "v2.0"
    wrong = {"x": np.ones((1, 3), np.float32)}
    channel.send(infer(1, "demo", wrong), infer(2, "demo", {"x": X.astype(np.float64)}),
                 request(3, "status", {}), infer(4, "iris", {"x": X}),
                 infer(5, "demo", {"x": X}, version="v1.0"),
                 infer(6, "demo", {"x": X}))  # fmt: skip
    answers = {a["id"]: a for a in channel.receive(6)}
    assert answers[1]["error"]["code"] == "INVALID_INPUT"
    assert "expected float32 with shape [N, 4], got shape [1, 3]" in answers[1]["error"]["message"]
    assert "got dtype float64" in answers[2]["error"]["message"]
    assert answers[3]["error"]["code"] == "UNKNOWN_OPERATION"
    assert "send 'status' to moltbotd's socket" in answers[3]["error"]["message"]
    for bad in (4, 5):
        assert answers[bad]["error"]["code"] == "BAD_REQUEST"
        assert "this direct channel serves model demo v2.0" in answers[bad]["error"]["message"]
    assert answers[6]["ok"]
    channel.sock.sendall(HEADER.pack(3) + b"\xc1\xc1\xc1")  # not msgpack
    [bad_frame] = channel.receive()
    assert bad_frame["error"]["code"] == "BAD_FRAME"
    channel.send(infer(7, "demo", {"x": X}))
    assert channel.receive()[0]["ok"]
    channel.sock.sendall(HEADER.pack(10_000))
    [too_large] = channel.receive()
    assert too_large["error"]["code"] == "FRAME_TOO_LARGE"
    assert channel.receive() == []  # the stream cannot resynchronise: closed
    with Client(daemon.socket, 60, direct=True) as client:  # and everyone else is served
        assert np.array_equal(client.infer("demo", {"x": X})["y"], 10 * X)


def test_the_channel_queue_has_priorities_a_bound_and_deadlines(daemon_factory) -> None:
    daemon = daemon_factory("models:\n  slow:\n    max_queue: 4\n")
    channel = RawChannel(daemon.socket, "slow")
    quick = slow_inputs(n=1)
    # one write: the worker queues all six before it runs any; the idle lane is about
    # to take one, so five fit, and the 6th finds 4 waiting
    channel.send(infer(1, "slow", quick, priority="low"), infer(2, "slow", quick, priority="low"),
                 infer(3, "slow", quick, priority="high"), infer(4, "slow", quick),
                 infer(5, "slow", quick), infer(6, "slow", quick))  # fmt: skip
    answers = channel.receive(6)
    assert answers[0]["id"] == 6 and answers[0]["error"]["code"] == "OVERLOADED"
    assert answers[0]["error"]["details"]["queue_depth"] == 4
    # the queue: 1 low, 2 low, 3 high, 4 normal, 5 normal -> 3, 4, 5, 1, 2
    assert [a["id"] for a in answers[1:]] == [3, 4, 5, 1, 2]
    channel.send(infer(6, "slow", slow_inputs()), infer(7, "slow", quick, timeout_ms=50))
    late = {a["id"]: a for a in channel.receive(2)}
    assert late[6]["ok"]
    assert late[7]["error"]["code"] == "DEADLINE_EXCEEDED"
    assert late[7]["error"]["details"]["ran"] is False


def test_batching_on_a_channel_equals_unbatched_runs(daemon_factory, models_dir: Path) -> None:
    from moltbotd.demo import save

    model = mlp_model(width=32)
    save(model, models_dir, "mlp", "v1")
    daemon = daemon_factory("models:\n  mlp:\n    batching: {max_batch_size: 16}\n")
    channel = RawChannel(daemon.socket, "mlp")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((rows, 32)).astype(np.float32) for rows in (1, 3, 2, 1, 4, 1)]
    channel.send(*(infer(i, "mlp", {"x": x}) for i, x in enumerate(xs)))
    for answer in channel.receive(len(xs)):
        got = answer["result"]["outputs"]["y"]
        expected = direct(model, {"x": xs[answer["id"]]})[0]
        assert np.frombuffer(got["data"], np.float32).reshape(got["shape"]).tolist() == \
            expected.tolist()  # fmt: skip
    with Client(daemon.socket, direct=False) as client:
        batching = wait_until(lambda: worker_of(client.status("mlp"), "mlp")["batching"]["batches"],
                              what="the batch counted") and \
            worker_of(client.status("mlp"), "mlp")["batching"]  # fmt: skip
    assert batching["batch_sizes"] == {"6": 1} or batching["batch_sizes"] == {6: 1}


def switch_while_clients_infer(daemon, clients: int) -> None:
    """`clients` direct clients infer in a loop while demo switches from v2.0 (10x) to
    v1.0 (2x): none fails, and each sees the old version's answers, then the new one's."""
    answers: list[list[float]] = [[] for _ in range(clients)]
    errors: list[Exception] = []
    stop = threading.Event()

    def loop(mine: list[float]) -> None:
        with Client(daemon.socket, 60, direct=True) as client:
            while not stop.is_set():
                try:
                    mine.append(float(client.infer("demo", {"x": X})["y"][0, 1]))
                except Exception as exc:  # every failure counts against the switch
                    errors.append(exc)

    threads = [threading.Thread(target=loop, args=(mine,)) for mine in answers]
    for thread in threads:
        thread.start()
    wait_until(lambda: min(map(len, answers)) > 50, what="direct requests")
    result = run_moltctl("switch", "demo", "v1.0", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    counts = list(map(len, answers))
    wait_until(lambda: all(len(a) > c + 50 for a, c in zip(answers, counts, strict=True)),
               what="requests after the switch")  # fmt: skip
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    for mine in answers:
        assert mine[0] == 10.0 and mine[-1] == 2.0
        assert set(mine) == {2.0, 10.0}


def test_a_switch_moves_direct_clients_without_losing_a_request(daemon) -> None:
    switch_while_clients_infer(daemon, 1)
    with Client(daemon.socket, direct=False) as client:
        pool = worker_of(client.status("demo"), "demo")
    assert pool["version"] == "v1.0"
    assert pool["channels"] == 1  # the client came back for a channel to the new version


def test_canary_and_fallback_keep_requests_on_the_socket(daemon_factory) -> None:
    daemon = daemon_factory("models:\n  iris:\n    fallback: demo\n")
    refused = RawChannel(daemon.socket, "iris")
    assert refused.sock is None
    assert refused.answer["error"]["code"] == "CONFLICT"
    assert "fallback (demo)" in refused.answer["error"]["message"]
    channel = RawChannel(daemon.socket, "demo")
    result = run_moltctl("switch", "demo", "v1.0", "--canary", "0.5",
                         socket=daemon.socket)  # fmt: skip
    assert result.returncode == 0, result.stderr
    [notice] = channel.receive()
    assert notice == {"closing": "a canary started"}
    channel.send(infer(1, "demo", {"x": X}))  # still answered: nothing is lost on the way
    assert channel.receive()[0]["ok"]
    assert RawChannel(daemon.socket, "demo").answer["error"]["code"] == "CONFLICT"
    with Client(
        daemon.socket, 60, direct=True
    ) as client:  # the library goes through the socket: the split works
        versions = {client.infer("demo", {"x": X}).version for _ in range(60)}
    assert versions == {"v1.0", "v2.0"}


def test_a_dead_worker_fails_direct_requests_in_flight_then_serves_again(daemon) -> None:
    with Client(daemon.socket, 60, direct=True) as client:
        pid = worker_of(client.status("slow"), "slow")["pid"]
        failure: list[MoltError] = []

        def slow() -> None:
            with pytest.raises(MoltError) as err:
                client.infer("slow", slow_inputs(n=SLOW_N * 50))
            failure.append(err.value)

        thread = threading.Thread(target=slow)
        thread.start()
        idle = cpu_seconds(pid)
        # running the slow request, not merely holding the channel (a loaded CI machine)
        wait_until(lambda: cpu_seconds(pid) > idle + 0.1, what="the slow request running")
        os.kill(pid, signal.SIGKILL)
        thread.join(30)
        assert "direct channel model=slow" in daemon.log()  # it ran on the channel
        # what the socket answers for the same death: moltbotd told the client
        assert failure[0].code is ErrorCode.WORKER_FAILED
        assert failure[0].message == (
            f"model slow v1: worker pid {pid} was killed by SIGKILL while running this request"
        )
        wait_until(lambda: worker_of(client.status("slow"), "slow")["state"] == "ready",
                   timeout=30, what="the restart")  # fmt: skip
        answer = client.infer("slow", slow_inputs(n=1, x=3.0))
        assert answer["y"].tolist() == [3.0] * 4


def test_moltctl_infer_direct_uses_a_channel_or_says_why_not(daemon_factory) -> None:
    daemon = daemon_factory("models:\n  iris:\n    fallback: demo\n")
    ok = run_moltctl("infer", "demo", "-i", "x=[[1, 2, 3, 4]]", "--direct", "-o", "json",
                     socket=daemon.socket)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert '"version": "v2.0"' in ok.stdout
    assert "direct channel model=demo version=v2.0" in daemon.log()  # handed over
    refused = run_moltctl("infer", "iris", "-i", "x=[[1, 2, 3, 4]]", "--direct",
                          socket=daemon.socket)  # fmt: skip
    assert refused.returncode != 0
    assert "model iris has no direct channel: its fallback (demo)" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_channel_refuses_a_bad_priority_or_timeout_as_the_daemon_does(daemon) -> None:
    channel = RawChannel(daemon.socket, "slow")
    channel.send(*(infer(i, "slow", slow_inputs(n=1), **p) for i, (p, _) in enumerate(BAD_PARAMS)))
    for answer in channel.receive(len(BAD_PARAMS)):
        assert answer["error"]["code"] == "BAD_REQUEST"
        assert BAD_PARAMS[answer["id"]][1] in answer["error"]["message"]


def test_large_tensors_travel_in_a_sealed_shared_region(daemon_factory, models_dir: Path) -> None:
    from moltbotd.demo import save

    model = mlp_model(width=1024, layers=1)
    save(model, models_dir, "mlp", "v1")
    daemon = daemon_factory("models:\n  mlp:\n    batching: {max_batch_size: 16}\n")
    x = np.random.default_rng(4).standard_normal((20, 1024)).astype(np.float32)  # 80 KiB
    with Client(daemon.socket, direct=True) as client:
        got = client.infer("mlp", {"x": x})["y"]
        channel = client._channels["mlp"]
        assert isinstance(channel, DirectChannel) and channel.region is not None
        # the output came back through the region, after the worker's table of running
        # requests, where the input went (the worker had copied it out)
        assert bytes(channel.region[HEADER_BYTES : HEADER_BYTES + got.nbytes]) == got.tobytes()
        sent = channel.share({"model": "mlp", "inputs": {"x": encode_tensor(x)}})
        end = len(channel.region)
        assert sent["inputs"]["x"]["shm"] == [HEADER_BYTES, x.nbytes]
        assert sent["reply_shm"] == [HEADER_BYTES, end - HEADER_BYTES]
    assert got.tolist() == direct(model, {"x": x})[0].tolist()

    raw = RawChannel(daemon.socket, "mlp")
    with pytest.raises(PermissionError):
        os.ftruncate(raw.region_fd, 0)  # sealed: the worker never reads past its end
    assert raw.region is not None
    raw.region[HEADER_BYTES : HEADER_BYTES + x.nbytes] = x.tobytes()
    shm = {"dtype": "float32", "shape": [20, 1024], "shm": [HEADER_BYTES, x.nbytes]}
    size = len(raw.region)
    bad = [[size - 4, x.nbytes], [HEADER_BYTES, -1], "0", [HEADER_BYTES, x.nbytes, 1],
           [0, x.nbytes]]  # fmt: skip
    raw.send(request(1, "infer", {"model": "mlp", "inputs": {"x": shm}}),
             *(request(i, "infer", {"model": "mlp", "inputs": {"x": {**shm, "shm": where}}})
               for i, where in enumerate(bad, 2)),
             request(9, "infer", {"model": "mlp", "inputs": {"x": {**shm, "data": b""}}}),
             request(10, "infer", {"model": "mlp", "inputs": {
                 "x": {**shm, "shm": [HEADER_BYTES, 16]}}}),
             request(11, "infer", {"model": "mlp", "inputs": {"x": {**shm, 1: 2}}}),
             request(12, "infer", {"model": "mlp", "inputs": {"x": shm},
                                   "reply_shm": [size // 2, size // 2]}),
             request(13, "infer", {"model": "mlp", "inputs": {"x": shm},
                                   "reply_shm": [0, size]}))  # fmt: skip
    answers = {a["id"]: a for a in raw.receive(11)}
    placed = answers.pop(12)["result"]["outputs"]["y"]
    assert placed == {"dtype": "float32", "shape": [20, 1024], "shm": [size // 2, got.nbytes]}
    assert bytes(raw.region[size // 2 : size // 2 + got.nbytes]) == got.tobytes()
    bad_reply = answers.pop(13)["error"]
    assert bad_reply["code"] == "BAD_REQUEST"
    assert f"'reply_shm' must be [offset, size] within bytes {HEADER_BYTES} to {size} of this" \
        f" channel's shared region (the first page is the worker's), got [0, {size}]" \
        == bad_reply["message"]  # fmt: skip
    with_data = answers.pop(9)["error"]
    assert (with_data["code"], with_data["message"]) == (
        "INVALID_INPUT",
        "input 'x': 'shm' comes instead of 'data', not with it",
    )
    mixed_keys = answers.pop(11)["error"]
    assert mixed_keys["code"] == "INVALID_INPUT"
    assert "got a map with keys ['data', 'dtype', 'shape', 1]" in mixed_keys["message"]
    ok = answers.pop(1)["result"]["outputs"]["y"]
    assert np.frombuffer(ok["data"], np.float32).reshape(ok["shape"]).tolist() == got.tolist()
    size_error = answers.pop(10)["error"]
    assert size_error["code"] == "INVALID_INPUT"
    assert f"'data' must be {x.nbytes} bytes for float32 [20, 1024], got 16 bytes" in \
        size_error["message"]  # fmt: skip
    for answer in answers.values():
        assert answer["error"]["code"] == "INVALID_INPUT", answer
        assert f"'shm' must be [offset, size] within bytes {HEADER_BYTES} to {size} of this" \
            " channel's shared region (the first page is the worker's), got" \
            in answer["error"]["message"]  # fmt: skip


def test_the_daemons_socket_has_no_region(daemon) -> None:
    shm = {"dtype": "float32", "shape": [1, 4], "shm": [HEADER_BYTES, 16]}
    with Client(daemon.socket, direct=False) as client, pytest.raises(MoltError) as refused:
        client._call("infer", {"model": "demo", "inputs": {"x": shm}})
    assert refused.value.code == ErrorCode.INVALID_INPUT
    assert "input 'x': 'shm' names a direct channel's shared region; on moltbotd's socket" \
        " send 'data'" in refused.value.message  # fmt: skip
    with Client(daemon.socket, direct=False) as client, pytest.raises(MoltError) as refused:
        client._call("infer", {"model": "demo", "inputs": {"x": encode_tensor(X)},
                               "reply_shm": [HEADER_BYTES, 1 << 20]})  # fmt: skip
    assert refused.value.code == ErrorCode.BAD_REQUEST
    assert "'reply_shm' names a direct channel's shared region; moltbotd's socket answers in" \
        " its frames" in refused.value.message  # fmt: skip


def test_a_region_read_is_a_copy_and_unwritten_pages_are_refused() -> None:
    from moltbotd.worker.direct import Stream

    worker_end, client_end = socket.socketpair()
    stream = Stream(worker_end, 1 << 20)
    data, fds, _, _ = socket.recv_fds(client_end, 1 << 16, 1)
    [offer] = FrameDecoder().feed(data)
    region = mmap.mmap(fds[0], offer["region"])
    at = HEADER_BYTES
    region[at : at + 8] = np.arange(2, dtype=np.float32).tobytes()
    tensor = {"dtype": "float32", "shape": [2], "shm": [at, 8]}
    shared = stream.shared({"x": tensor})
    region[at : at + 8] = b"\xff" * 8  # the client writes again: the checked bytes must not change
    assert shared["x"]["data"] == np.arange(2, dtype=np.float32).tobytes()
    with pytest.raises(MoltError) as unwritten:  # reading it would allocate it in the worker
        stream.shared({"x": {**tensor, "shm": [8192, 8]}})
    assert unwritten.value.code is ErrorCode.INVALID_INPUT
    assert "bytes 8192 to 8200 of this channel's shared region were never written" in \
        unwritten.value.message  # fmt: skip
    stream.close()
    client_end.close()
    os.close(fds[0])


def test_a_busy_worker_does_not_hold_a_client_past_its_deadline(daemon) -> None:
    def busy() -> None:  # through the socket: the worker runs it until the daemon stops
        with Client(daemon.socket) as other, contextlib.suppress(MoltError, ProtocolError):
            other.infer("slow", slow_inputs(n=SLOW_N * 50))

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    pid = worker_of(Client(daemon.socket).status("slow"), "slow")["pid"]
    idle = cpu_seconds(pid)
    wait_until(lambda: cpu_seconds(pid) > idle + 0.1, what="the slow request running")
    with Client(daemon.socket, direct=True) as client:
        with pytest.raises(MoltError) as late:
            client.infer("slow", slow_inputs(n=1), timeout_ms=300)
        # let go: a run past its deadline could still write into the channel's region
        assert "slow" not in client._channels
    assert late.value.code is ErrorCode.DEADLINE_EXCEEDED
    # answered by the worker at its deadline while its one lane still runs the slow
    # request (seconds of work), not after it: the intake queued it as it came
    assert "in the queue of model slow" in late.value.message, late.value.message
    assert thread.is_alive()


LANES = "models:\n  slow:\n    channel_threads: 2\n  demo:\n    channel_threads: 2\n"


def test_channel_threads_run_two_channels_at_once_in_one_worker(daemon_factory) -> None:
    """Two channels to one worker: the second is answered while the first one's long run
    is still under way (with one lane it would wait for it), and both lanes' requests and
    channels are counted in status."""
    daemon = daemon_factory(LANES)
    with Client(daemon.socket, 60, direct=True) as first, \
         Client(daemon.socket, 60, direct=True) as second:  # fmt: skip
        pool = worker_of(first.status("slow"), "slow")
        long: list = []
        thread = threading.Thread(
            target=lambda: long.append(first.infer("slow", slow_inputs(n=SLOW_N * 50, x=2.0)))
        )
        thread.start()
        idle = cpu_seconds(pool["pid"])
        wait_until(lambda: cpu_seconds(pool["pid"]) > idle + 0.1, what="the long run under way")
        assert second.infer("slow", slow_inputs(n=1, x=3.0))["y"].tolist() == [3.0] * 4
        assert thread.is_alive()  # answered beside the long run, not after it
        thread.join(60)
        assert long[0]["y"].tolist() == [2.0] * 4
        pool = wait_until(lambda: (p := worker_of(first.status("slow"), "slow"))["requests"] == 2
                          and p, what="both lanes' requests counted")  # fmt: skip
        assert pool["channels"] == 2
        assert len(pool["instances"]) == 1
        assert pool["session"]["channel_threads"] == 2


def test_a_channel_opens_while_the_one_lane_runs_a_long_request(daemon) -> None:
    """The main thread does control only: with the one lane busy for seconds, a new
    channel opens at once, and the intake queues what comes meanwhile on it and on the
    socket, answered once the long run ends. Nothing here bounds how long the run takes:
    it failed on slower CPUs, where the late answer, which waits for the run, came after
    a fixed 30 s receive timeout."""
    with Client(daemon.socket, LONG_RUN, direct=True) as client:
        pid = worker_of(client.status("slow"), "slow")["pid"]
        long: list = []
        thread = threading.Thread(
            target=lambda: long.append(client.infer("slow", slow_inputs(n=SLOW_N * 50)))
        )
        thread.start()
        idle = cpu_seconds(pid)
        wait_until(lambda: cpu_seconds(pid) > idle + 0.1, what="the long run under way")
        late = RawChannel(daemon.socket, "slow")  # reads the region offer
        assert late.region is not None
        assert thread.is_alive()  # opened beside the long run, not after it
        late.send(infer(1, "slow", slow_inputs(n=1, x=4.0)))
        with Client(daemon.socket, LONG_RUN) as socket_client:
            answer = socket_client.infer("slow", slow_inputs(n=1, x=5.0))
        assert answer["y"].tolist() == [5.0] * 4
        thread.join(LONG_RUN)  # before the client closes: its socket is the thread's
        assert long[0]["y"].tolist() == [1.0] * 4
        [answer] = late.receive()
        assert answer["ok"], answer


def test_a_client_closed_under_a_direct_request_says_so_rather_than_blame_the_worker(
    daemon,
) -> None:
    """Closing a Client from another thread while its direct request waits made the
    request fail as WORKER_FAILED "closed its direct channel before answering (it
    exited?): [Errno 9] Bad file descriptor", which sent a test failure's reader looking
    for a descriptor bug in the worker's lanes: the closed descriptor was the client's."""
    client = Client(daemon.socket, LONG_RUN, direct=True).connect()
    pid = worker_of(client.status("slow"), "slow")["pid"]
    failure: list[Exception] = []

    def slow() -> None:
        with pytest.raises(ProtocolError) as err:
            client.infer("slow", slow_inputs(n=SLOW_N * 5))
        failure.append(err.value)

    thread = threading.Thread(target=slow)
    thread.start()
    idle = cpu_seconds(pid)
    wait_until(lambda: cpu_seconds(pid) > idle + 0.1, what="the request running")
    client.close()
    thread.join(LONG_RUN)
    assert "this client was closed while its request to the worker serving model slow v1" \
        " waited" in str(failure[0])  # fmt: skip


def test_a_switch_moves_the_clients_of_every_lane_without_losing_a_request(
    daemon_factory,
) -> None:
    daemon = daemon_factory(LANES)
    switch_while_clients_infer(daemon, 2)
    pool = worker_of(Client(daemon.socket).status("demo"), "demo")
    assert (pool["version"], pool["channels"], pool["session"]["channel_threads"]) == ("v1.0", 2, 2)
    daemon.stop()
    assert "did not stop within" not in daemon.log()  # the lanes ended with their worker
    assert "Traceback" not in daemon.log(), daemon.log()


@pytest.mark.parametrize(
    ("bounds", "reason"),
    [
        ("max_channels_per_uid: 2", f"uid {os.getuid()} holds 2 direct channels to the worker,"
                                    " the limit per user (max_channels_per_uid)"),
        ("max_channels: 2", "the worker serves 2 direct channels, its limit (max_channels)"),
    ],
)  # fmt: skip
def test_channels_past_the_bounds_are_refused_and_clients_use_the_socket(
    daemon_factory, bounds: str, reason: str
) -> None:
    """Channels held by one user, even after closing the connections that asked for
    them, count against max_channels_per_uid, and all of them against max_channels: past
    either, moltbotd refuses a channel (logged once per interval, not once per client),
    the client library sends its requests through the socket, and a channel closed
    makes room again."""
    daemon = daemon_factory(f"models:\n  demo:\n    {bounds}\n")
    held = [RawChannel(daemon.socket, "demo") for _ in range(2)]  # their connections closed
    assert all(channel.sock for channel in held)
    refused = [RawChannel(daemon.socket, "demo").answer for _ in range(3)]
    for answer in refused:
        assert answer["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert f"model demo v2.0: {reason}; send its requests to this socket" in \
            answer["error"]["message"]  # fmt: skip
    with Client(daemon.socket, 60, direct=True) as client:
        assert np.array_equal(client.infer("demo", {"x": X})["y"], 10 * X)
        assert not isinstance(client._channels["demo"], DirectChannel)  # through the socket
    assert daemon.log().count("refused 1 direct channel(s) since the last warning") == 1
    assert "refused 1 direct channel(s) since the last report" not in daemon.log()  # the worker
    held[0].sock.close()  # its worker reports it closed: there is room again
    wait_until(lambda: RawChannel(daemon.socket, "demo").sock, what="a channel granted again")


# --- AsyncClient(direct=True): many tasks pipelined on one channel ----------------------------


async def until_direct(client: AsyncClient, model: str, inputs: dict) -> None:
    """Requests go through the socket while the channel is asked for; then on it."""
    for _ in range(400):
        await client.infer(model, inputs)
        if worker_of(await client.status(model), model)["channels"] == 1:
            return
        await asyncio.sleep(0.025)
    pytest.fail(f"AsyncClient got no direct channel to {model}")


def test_async_client_pipelines_its_tasks_on_a_direct_channel(daemon) -> None:
    async def scenario():
        async with AsyncClient(daemon.socket, direct=True) as client:
            await until_direct(client, "demo", {"x": X})
            answers = await asyncio.gather(*(client.infer("demo", {"x": X * i}) for i in range(64)))
            return answers, worker_of(await client.status("demo"), "demo")

    answers, pool = asyncio.run(scenario())
    for i, outputs in enumerate(answers):  # each task got its own answer
        assert np.array_equal(outputs["y"], 10 * X * i), i
        assert (outputs.model, outputs.version) == ("demo", "v2.0")
    assert pool["channels"] == 1


def test_a_switch_moves_async_direct_tasks_without_losing_a_request(daemon) -> None:
    """8 tasks infer on one AsyncClient's channel while demo switches from v2.0 (10x) to
    v1.0 (2x): none fails, the answers go from the old version to the new one, and the
    client comes back for a channel to the new version."""
    answers: list[float] = []
    errors: list[Exception] = []

    async def scenario() -> dict:
        async with AsyncClient(daemon.socket, direct=True) as client:
            await until_direct(client, "demo", {"x": X})
            stop = asyncio.Event()

            async def loop() -> None:
                while not stop.is_set():
                    try:
                        answers.append(float((await client.infer("demo", {"x": X}))["y"][0, 1]))
                    except Exception as exc:  # every failure counts against the switch
                        errors.append(exc)

            tasks = [asyncio.create_task(loop()) for _ in range(8)]
            await until(lambda: len(answers) > 200)
            assert (await client.switch("v1.0", "demo"))["to"] == "v1.0"
            count = len(answers)
            await until(lambda: len(answers) > count + 200 and answers[-1] == 2.0)
            await until_direct(client, "demo", {"x": X})
            stop.set()
            await asyncio.gather(*tasks)
            return worker_of(await client.status("demo"), "demo")

    pool = asyncio.run(scenario())
    assert errors == []
    assert answers[0] == 10.0 and answers[-1] == 2.0 and set(answers) == {2.0, 10.0}
    assert (pool["version"], pool["channels"]) == ("v1.0", 1)


def test_a_dead_worker_fails_async_direct_requests_in_flight_then_serves_again(daemon) -> None:
    async def scenario() -> MoltError:
        async with AsyncClient(daemon.socket, direct=True) as client:
            await until_direct(client, "slow", slow_inputs(n=1))
            pid = worker_of(await client.status("slow"), "slow")["pid"]
            running = asyncio.create_task(client.infer("slow", slow_inputs(n=SLOW_N * 50)))
            idle = cpu_seconds(pid)
            await until(lambda: cpu_seconds(pid) > idle + 0.1)  # running, not just sent
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(MoltError) as failed:
                await running
            await until_direct(client, "slow", slow_inputs(n=1, x=3.0))  # the restarted one
            answer = await client.infer("slow", slow_inputs(n=1, x=3.0))
            assert answer["y"].tolist() == [3.0] * 4
            return failed.value

    error = asyncio.run(scenario())
    assert error.code is ErrorCode.WORKER_FAILED  # as the socket answers it: moltbotd said
    assert error.message.startswith("model slow v1: worker pid ")
    assert error.message.endswith(" was killed by SIGKILL while running this request")


async def until(condition, timeout: float = 60.0) -> None:
    """Poll a condition from inside the event loop; fail after `timeout` seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("the condition did not happen in time")


def test_the_table_of_running_requests_names_what_runs_or_says_it_cannot() -> None:
    from moltbotd.wire.region import SLOTS, running
    from moltbotd.worker.direct import RunningTable

    region = memoryview(bytearray(HEADER_BYTES + 64))
    table = RunningTable(region)
    first, second = table.start(7), table.start(1 << 40)
    assert running(region) == {7, 1 << 40}
    table.end(first)
    assert running(region) == {1 << 40}
    unnamed = table.start("text id")  # not a positive 64-bit integer: counted, not named
    assert running(region) is None  # the client cannot tell which ran: all fail
    table.end(unnamed)
    table.end(second)
    assert running(region) == set()
    slots = [table.start(n) for n in range(1, SLOTS + 2)]  # one more than it has slots
    assert running(region) is None
    table.end(slots.pop())
    assert running(region) == set(range(1, SLOTS + 1))
    assert running(b"too short") is None


def test_moltbotd_tells_how_a_worker_died_waiting_for_it_to_be_reaped() -> None:
    from moltbotd.serving.exits import KEPT, Exits

    async def scenario() -> None:
        exits = Exits()
        oom = MoltError(ErrorCode.RESOURCE_EXHAUSTED, "killed by its memory limit")
        asking = asyncio.create_task(exits.why("demo", 41, wait=60))
        await asyncio.sleep(0)
        exits.record("demo", 41, oom)  # reaped after the client asked
        assert await asking is oom
        assert await exits.why("other", 41, wait=0) is None  # not that model's
        assert await exits.why("demo", 42, wait=0.01) is None  # never ended
        for pid in range(1000, 1000 + KEPT):
            exits.record("demo", pid, oom)
        assert await exits.why("demo", 41, wait=0) is None  # the oldest are forgotten
        assert not exits._waiting

    asyncio.run(scenario())
