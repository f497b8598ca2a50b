"""The real daemon, real workers, real onnxruntime sessions, over the real socket."""

import asyncio
import os
import signal
import socket
import struct

import msgpack
import numpy as np
import onnxruntime as ort
import pytest

from moltbotd.demo import iris_model, save, scale_model
from moltbotd.wire.protocol import ErrorCode, FrameDecoder, MoltError, encode_frame, encode_tensor
from moltctl.client import AsyncClient, ConnectError
from tests.conftest import wait_until, wait_until_async
from tests.models import mlp_model

SLOW_N = 3_000_000  # Loop iterations: seconds of work for one request of the slow model


def direct(model, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    return session.run(None, feeds)


def slow_inputs(n: int = SLOW_N, x: float = 1.0) -> dict:
    return {"n": np.array(n, dtype=np.int64), "x": np.full(4, x, np.float32)}


def raw_exchange(path, payload: bytes, expect: int = 1) -> list:
    """Send raw bytes, read `expect` frames back (or until the daemon closes)."""
    decoder, frames = FrameDecoder(), []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(payload)
        while len(frames) < expect:
            data = sock.recv(65536)
            if not data:
                break
            frames += decoder.feed(data)
    return frames


def worker_pid(client, model: str) -> int:
    return client.status(model)["models"][0]["worker"]["pid"]


async def running(client: AsyncClient, model: str, count: int) -> dict:
    """Wait until the worker said it runs `count` of the model's relayed requests (they
    left its queue); its pool's status then."""

    async def pool() -> dict | None:
        [entry] = [m for m in (await client.status(model))["models"] if m["name"] == model]
        return entry["worker"] if entry["worker"]["running"] == count else None

    return await wait_until_async(pool, what=f"{count} requests of {model} running")


async def dispatched(client: AsyncClient, model: str, count: int) -> dict:
    """Wait until `count` of the model's requests were sent to its worker (in flight);
    its pool's status then."""

    async def pool() -> dict | None:
        [entry] = [m for m in (await client.status(model))["models"] if m["name"] == model]
        return entry["worker"] if entry["worker"]["inflight"] == count else None

    return await wait_until_async(pool, what=f"{count} requests of {model} in its worker")


# --- answers -----------------------------------------------------------------------------


def test_infer_equals_direct_session_run(daemon, models_dir):
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    with daemon.client() as c:
        out = c.infer("demo", {"x": x})
        iris = c.infer("iris", {"x": x})
    assert out.model == "demo"
    assert out.version == "v2.0"  # the highest version is active by default
    np.testing.assert_array_equal(out["y"], direct(scale_model(10.0), {"x": x})[0])
    label, probabilities = direct(iris_model(), {"x": x})
    np.testing.assert_array_equal(iris["label"], label)
    assert iris["probabilities"] == probabilities  # a sequence of {class: probability} maps


def test_mlp_and_mixed_dtypes_equal_direct_run(daemon_factory, models_dir):
    model = mlp_model(width=64, layers=3, seed=7)
    save(model, models_dir, "mlp", "v1")
    daemon = daemon_factory()
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    a, b = np.arange(6, dtype=np.int64).reshape(2, 3), np.array([0.5, -2.25])
    with daemon.client() as c:
        mlp = c.infer("mlp", {"x": x})
        multi = c.infer("multi", {"a": a, "b": b})
        from_lists = c.infer("multi", {"a": a.tolist(), "b": b.tolist()})
    np.testing.assert_array_equal(mlp["y"], direct(model, {"x": x})[0])
    assert multi["total"].dtype == np.int64 and multi["total"] == 15
    np.testing.assert_array_equal(multi["doubled"], [1.0, -4.5])
    np.testing.assert_array_equal(from_lists["doubled"], multi["doubled"])


def test_pipelined_requests_answer_out_of_order(daemon):
    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            slow = asyncio.ensure_future(c.infer("slow", slow_inputs()))
            await dispatched(c, "slow", 1)
            xs = [np.full((1, 4), i, np.float32) for i in range(200)]
            fast = await asyncio.gather(*(c.infer("demo", {"x": x}) for x in xs))
            assert not slow.done(), "the demo answers overtook the slow request"
            return await slow, fast, xs

    slow, fast, xs = asyncio.run(scenario())
    np.testing.assert_array_equal(slow["y"], np.ones(4))
    for out, x in zip(fast, xs, strict=True):
        np.testing.assert_array_equal(out["y"], x * 10)


def test_concurrent_first_calls_share_one_connection(daemon):
    """Tasks calling a new AsyncClient at once, without connect(): one connection opens,
    every call is answered (each used to open its own and lose the others' answers)."""

    async def scenario():
        c = AsyncClient(daemon.socket)
        try:
            xs = [np.full((1, 4), i, np.float32) for i in range(16)]
            return xs, await asyncio.gather(*(c.infer("demo", {"x": x}) for x in xs))
        finally:
            await c.close()

    xs, outs = asyncio.run(scenario())
    for out, x in zip(outs, xs, strict=True):
        np.testing.assert_array_equal(out["y"], x * 10)


def test_switch_changes_the_answers(daemon):
    x = np.ones((1, 4), np.float32)
    with daemon.client() as c:
        assert c.infer("demo", {"x": x})["y"][0, 0] == 10.0
        result = c.switch("v1.0", "demo")
        assert (result["from"], result["to"], result["changed"]) == ("v2.0", "v1.0", True)
        after = c.infer("demo", {"x": x})
        assert (after.version, after["y"][0, 0]) == ("v1.0", 2.0)
        assert c.switch("v1.0")["changed"] is False  # model left out: only demo has v1.0
        assert c.status("demo")["models"][0]["active_version"] == "v1.0"


def test_switch_keeps_serving_requests_in_flight(daemon):
    """Requests sent around a switch all succeed; the old version finishes its own."""

    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            x = np.ones((1, 4), np.float32)
            before = [asyncio.ensure_future(c.infer("demo", {"x": x})) for _ in range(50)]
            switched = asyncio.ensure_future(c.switch("v1.0", "demo"))
            during = [asyncio.ensure_future(c.infer("demo", {"x": x})) for _ in range(50)]
            await switched
            after = await asyncio.gather(*(c.infer("demo", {"x": x}) for _ in range(20)))
            return await asyncio.gather(*before, *during), after

    around, after = asyncio.run(scenario())
    assert all(out["y"][0, 0] == {"v2.0": 10.0, "v1.0": 2.0}[out.version] for out in around)
    assert {out.version for out in after} == {"v1.0"}


def test_switch_to_a_broken_version_keeps_the_old_one(daemon, models_dir):
    (models_dir / "demo" / "v3.0").mkdir()
    (models_dir / "demo" / "v3.0" / "model.onnx").write_bytes(b"not an onnx file")
    with daemon.client() as c:
        with pytest.raises(MoltError) as err:
            c.switch("v3.0", "demo")
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert "cannot load" in err.value.message and "v2.0 keeps serving" in err.value.message
        assert c.infer("demo", {"x": np.ones((1, 4), np.float32)}).version == "v2.0"


# --- failures ------------------------------------------------------------------------------


def test_killed_worker_fails_its_requests_and_comes_back(daemon):
    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            pid = (await c.status("slow"))["models"][0]["worker"]["pid"]
            # two in flight on the worker: one running, one in its queue
            inflight = [asyncio.ensure_future(c.infer("slow", slow_inputs(n)))
                        for n in (SLOW_N, 10)]  # fmt: skip
            await dispatched(c, "slow", 2)

            async def first_runs() -> bool:  # the worker reports one waiting
                [entry] = (await c.status("slow"))["models"]
                return entry["worker"]["queue"]["depth"] == 1

            await wait_until_async(first_runs, what="the first request running")
            os.kill(pid, signal.SIGKILL)
            results = await asyncio.gather(*inflight, return_exceptions=True)
            other = await c.infer("demo", {"x": np.ones((1, 4), np.float32)})
            return pid, results, other

    pid, results, other = asyncio.run(scenario())
    failed, waited = results  # what ran fails; what waited runs on the restarted worker
    assert isinstance(failed, MoltError) and failed.code is ErrorCode.WORKER_FAILED, failed
    assert f"worker pid {pid} was killed by SIGKILL" in failed.message
    np.testing.assert_array_equal(waited["y"], np.ones(4))
    assert other["y"][0, 0] == 10.0  # the other model never noticed
    daemon.wait_for_log("Model slow v1 loaded", count=2)
    with daemon.client() as c:
        out = c.infer("slow", slow_inputs(10))  # it restarted and serves again
        status = c.status("slow")["models"][0]["worker"]
    np.testing.assert_array_equal(out["y"], np.ones(4))
    assert status["pid"] != pid and status["restarts"] == 1 and status["state"] == "ready"


def test_broken_model_is_fatal_with_the_loader_error_others_serve(daemon_factory, models_dir):
    (models_dir / "broken" / "v1").mkdir(parents=True)
    (models_dir / "broken" / "v1" / "model.onnx").write_bytes(b"\x08\x07garbage")
    daemon = daemon_factory()
    with daemon.client() as c:
        worker = c.status("broken")["models"][0]["worker"]
        assert worker["state"] == "fatal"
        assert "cannot load" in worker["error"] and "model.onnx" in worker["error"]
        assert c.health()["status"] == "degraded"
        with pytest.raises(MoltError) as err:
            c.infer("broken", {"x": [1.0]})
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert "model broken v1 is not serving (worker fatal)" in err.value.message
        assert c.infer("demo", {"x": [[1, 2, 3, 4]]})["y"].tolist() == [[10, 20, 30, 40]]
    assert "Model broken v1 loaded" not in daemon.log()
    assert daemon.log().count("model broken v1 starting pid=") == 1  # FATAL at once: no retry


@pytest.mark.parametrize(
    ("params", "code", "message"),
    [
        ({"model": "nope", "inputs": {}}, ErrorCode.MODEL_NOT_FOUND, "no model 'nope' is served"),
        ({"model": "demo", "inputs": {"x": {"dtype": "int64", "shape": [1, 4], "data": bytes(32)}}},
         ErrorCode.INVALID_INPUT, "input 'x': expected float32 with shape [N, 4], got dtype int64"),
        ({"model": "demo", "inputs": {"x": [[1.0, 2.0, 3.0]]}},
         ErrorCode.INVALID_INPUT, "expected float32 with shape [N, 4], got shape [1, 3]"),
        ({"model": "demo", "inputs": {}}, ErrorCode.INVALID_INPUT,
         "model demo v2.0: missing input 'x' (float32, shape [N, 4])"),
        ({"model": "demo", "inputs": {"x": [[1, 2, 3, 4]], "z": [1]}}, ErrorCode.INVALID_INPUT,
         "model demo v2.0 has no input 'z'"),
        ({"model": "demo", "inputs": {"x": {"dtype": "float32", "shape": [1, 4], "data": b"x"}}},
         ErrorCode.INVALID_INPUT, "'data' must be 16 bytes for float32 [1, 4], got 1 bytes"),
        ({"model": "demo", "inputs": {"x": [[1, 2, 3, 4]]}, "version": "v9"},
         ErrorCode.VERSION_NOT_FOUND, "model demo has no version v9 (versions: v1.0, v2.0)"),
        ({"model": "demo", "inputs": {"x": [[1, 2, 3, 4]]}, "version": "v1.0"},
         ErrorCode.VERSION_NOT_LOADED, "model demo v1.0 is not loaded (loaded: v2.0)"),
        ({"model": "demo", "inputs": {"x": [[1, 2, 3, 4]]}, "outputs": ["nope"]},
         ErrorCode.INVALID_INPUT, "has no output 'nope'; its outputs are y"),
        ({"model": "demo", "inputs": "x"}, ErrorCode.BAD_REQUEST,
         "parameter 'inputs' must be a map, got str"),
        ({"model": "demo"}, ErrorCode.BAD_REQUEST, "operation 'infer' needs parameter 'inputs'"),
    ],
)  # fmt: skip
def test_bad_requests_get_precise_errors_and_the_daemon_serves_on(daemon, params, code, message):
    frames = raw_exchange(daemon.socket, encode_frame({"id": 7, "op": "infer", "params": params}))
    assert frames[0]["id"] == 7 and frames[0]["ok"] is False
    assert frames[0]["error"]["code"] == code.value
    assert message in frames[0]["error"]["message"]
    with daemon.client() as c:
        assert c.infer("demo", {"x": [[1, 2, 3, 4]]})["y"][0, 3] == 40


def test_malformed_frames_get_errors_and_the_connection_goes_on(daemon):
    garbage = struct.pack(">I", 3) + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    a_list = encode_frame_of(msgpack.packb([1, 2]))
    no_id = encode_frame({"op": "health"})
    unknown_op = encode_frame({"id": "u", "op": "reboot"})
    health = encode_frame({"id": 9, "op": "health"})
    frames = raw_exchange(daemon.socket, garbage + a_list + no_id + unknown_op + health, expect=5)
    assert [f["error"]["code"] for f in frames[:4]] == [
        "BAD_FRAME", "BAD_FRAME", "BAD_REQUEST", "UNKNOWN_OPERATION"]  # fmt: skip
    assert "must be a msgpack map, got list" in frames[1]["error"]["message"]
    assert (
        "request 'id' must be an integer or a string, got nothing" in frames[2]["error"]["message"]
    )
    assert frames[3]["id"] == "u" and "unknown operation 'reboot'" in frames[3]["error"]["message"]
    assert frames[4] == {"id": 9, "ok": True, "result": {"status": "ok", "models": {
        "demo": "ready", "iris": "ready", "multi": "ready", "slow": "ready"}}}  # fmt: skip


def encode_frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_oversize_frame_is_refused_and_only_that_connection_closed(daemon_factory):
    daemon = daemon_factory("max_frame_bytes: 1KiB\n")
    with daemon.client() as healthy:
        big = encode_frame({"id": 1, "op": "infer", "params": {"model": "demo", "inputs": {
            "x": encode_tensor(np.zeros((100, 4), np.float32))}}})  # fmt: skip
        frames = raw_exchange(daemon.socket, big, expect=2)
        assert len(frames) == 1, "the daemon must close the connection after FRAME_TOO_LARGE"
        assert frames[0]["error"]["code"] == "FRAME_TOO_LARGE"
        expected = f"frame of {len(big) - 4} bytes exceeds the limit of 1024 bytes"
        assert expected in frames[0]["error"]["message"]
        assert healthy.health()["status"] == "ok"


def test_protocol_version_mismatch_is_refused(daemon):
    frames = raw_exchange(daemon.socket, encode_frame(
        {"id": 1, "op": "hello", "params": {"protocol": 99}}))  # fmt: skip
    assert frames[0]["error"]["code"] == "UNSUPPORTED_PROTOCOL"
    assert "the client speaks protocol 99; moltbotd" in frames[0]["error"]["message"]


# --- start and stop ------------------------------------------------------------------------


def test_sigterm_leaves_no_process_and_no_socket(daemon):
    with daemon.client() as c:
        pids = [m["worker"]["pid"] for m in c.status()["models"]]
    assert len(pids) == 4
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    assert not daemon.group_alive()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigterm_lets_requests_in_flight_finish(daemon):
    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            inflight = asyncio.ensure_future(c.infer("slow", slow_inputs()))
            await dispatched(c, "slow", 1)
            daemon.proc.send_signal(signal.SIGTERM)
            return await inflight

    out = asyncio.run(scenario())
    np.testing.assert_array_equal(out["y"], np.ones(4))
    assert daemon.proc.wait(30) == 0
    assert not daemon.group_alive()


def test_sigkilled_daemon_takes_its_workers_along(daemon):
    with daemon.client() as c:
        pids = [m["worker"]["pid"] for m in c.status()["models"]]
    daemon.stop(signal.SIGKILL)
    wait_until(lambda: not daemon.group_alive(), what=f"workers {pids} ending with their daemon")


def test_stale_socket_is_replaced_and_a_live_one_is_not(daemon_factory, tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "moltbotd.sock"))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    first = daemon_factory()
    second = daemon_factory(wait=False)
    assert second.proc.wait(60) == 1
    assert f"another moltbotd is already serving at {first.socket}" in second.log()
    with first.client() as c:
        assert c.health()["status"] == "ok"


def test_not_running_is_a_connect_error(tmp_path):
    from moltctl.client import Client

    with pytest.raises(ConnectError, match=r"moltbotd is not running at .*nothing\.sock"):
        Client(tmp_path / "nothing.sock").connect()


def test_logs_ring_over_the_socket(daemon):
    with daemon.client() as c:
        c.switch("v1.0", "demo")
        entries = c.logs(model="demo", min_level="info")["entries"]
        messages = [e["message"] for e in entries]
        assert "Model demo v1.0 loaded" in messages
        assert "model demo: now serving v1.0" in messages
        loaded = next(e for e in entries if e["message"] == "Model demo v1.0 loaded")
        assert loaded["event"] == "Model {model} {version} loaded"  # the kind: fixed
        assert all(e["fields"]["model"] == "demo" for e in entries)
        assert c.logs(min_level="error")["entries"] == []
        last = c.logs()["last_seq"]
        assert c.logs(after=last)["entries"] == []


def test_worker_killed_while_loading_is_restarted_and_requests_wait(daemon_factory):
    import re

    daemon = daemon_factory(wait=False)
    daemon.wait_for_log("model slow v1 starting pid=")
    pid = int(re.search(r"model slow v1 starting pid=(\d+)",
                        daemon.log()).group(1))  # fmt: skip
    os.kill(pid, signal.SIGKILL)  # python is still importing onnxruntime: mid-load
    with daemon.client() as c:  # a request now waits for the restarted worker
        out = c.infer("slow", slow_inputs(10))
        status = c.status("slow")["models"][0]["worker"]
    np.testing.assert_array_equal(out["y"], np.ones(4))
    assert status["restarts"] == 1 and status["pid"] != pid
    assert f"worker pid {pid} was killed by SIGKILL while loading its model" in daemon.log()


def test_state_changing_requests_are_audited_with_the_caller(daemon):
    with daemon.client() as c:
        c.switch("v1.0", "demo")
    line = next(x for x in daemon.log().splitlines() if "switch requested" in x)
    assert f'peer="pid {os.getpid()} uid {os.getuid()}"' in line
    assert "model=demo version=v1.0" in line


def test_workers_warm_up_before_they_count_as_ready(daemon):
    loaded = [x for x in daemon.log().splitlines() if "] Model " in x and " loaded " in x]
    assert len(loaded) == 4
    assert all(" warmup_ms=" in line for line in loaded)
    assert "warm-up run on zeros failed" not in daemon.log()


def test_a_failed_warm_up_is_a_warning_and_the_model_serves(daemon_factory, models_dir):
    from tests.models import reshape_model

    save(reshape_model(), models_dir, "reshape", "v1")
    daemon = daemon_factory()
    assert "model reshape v1: warm-up run on zeros failed: " in daemon.log()
    with daemon.client() as c:
        out = c.infer("reshape", {"x": [1.0, 2.0, 3.0, 4.0], "shape": [2, 2]})
    assert out["y"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_a_half_closed_connection_still_gets_every_answer(daemon):
    requests = b"".join(encode_frame({"id": i, "op": "infer", "params": {
        "model": "demo", "inputs": {"x": [[i, 0, 0, 0]]}}}) for i in range(20))  # fmt: skip
    decoder, frames = FrameDecoder(), []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        sock.sendall(requests)
        sock.shutdown(socket.SHUT_WR)  # like `nc -N`: no more requests, answers please
        while data := sock.recv(65536):
            frames += decoder.feed(data)
    assert sorted(f["id"] for f in frames) == list(range(20))
    assert all(f["ok"] for f in frames)


@pytest.mark.parametrize(
    ("direct", "peer"), [(False, "moltbotd"), (True, "the worker serving model slow v1")]
)
def test_a_client_timeout_does_not_desynchronise_the_next_call(daemon, direct, peer):
    from moltctl.client import Client, ProtocolError

    client = Client(daemon.socket, timeout=0.3, direct=direct)
    with pytest.raises(ProtocolError, match=rf"no answer from {peer} within 0\.3s"):
        client.infer("slow", slow_inputs())
    assert client.infer("demo", {"x": [[1, 2, 3, 4]]}).model == "demo"  # not slow's answer
    if direct:  # the channel stays open: the slow request's late answer is skipped on it
        client.timeout = 30
        assert client.infer("slow", slow_inputs(n=1, x=5.0))["y"].tolist() == [5.0] * 4
    client.close()


def test_a_missing_models_dir_stops_the_start_with_a_message(daemon_factory, tmp_path):
    from moltbotd.control.daemon import EXIT_CONFIG

    daemon = daemon_factory(wait=False, args=("--models-dir", str(tmp_path / "nowhere")))
    assert daemon.proc.wait(60) == EXIT_CONFIG
    assert f"cannot start: models_dir {tmp_path / 'nowhere'} is not a directory" in daemon.log()
    assert "ready: serving" not in daemon.log()
