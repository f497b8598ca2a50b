"""Worker faults under load: a death at any moment fails exactly its own requests once,
and the model recovers; a hung worker is noticed by its heartbeat and killed."""

import asyncio
import os
import signal
import socket

import numpy as np
import pytest

from moltbotd.wire.protocol import ErrorCode, FrameDecoder, MoltError, encode_frame
from moltctl.client import AsyncClient
from tests.conftest import wait_until
from tests.test_daemon import SLOW_N, slow_inputs
from tests.test_direct import cpu_seconds, until, until_direct
from tests.test_scheduling import pool_status

X = {"x": np.ones((1, 4), np.float32)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _keep_busy(client: AsyncClient, stop: asyncio.Event, depth: int) -> list[object]:
    """Keep `depth` requests in flight on one connection until stop; every outcome."""
    outcomes: list[object] = []

    async def one() -> None:
        while not stop.is_set():
            try:
                outcomes.append(await client.infer("demo", X))
            except MoltError as exc:
                outcomes.append(exc)

    await asyncio.gather(*(one() for _ in range(depth)))
    return outcomes


def _serving_pid(status: dict) -> int | None:
    worker = status["models"][0]["worker"]
    return worker["pid"] if worker["state"] == "ready" else None


# five deaths in a row: more than the default max_failures, which would make it FATAL
RESTARTS = "workers:\n  restart:\n    backoff: 50ms\n    max_failures: 10\n"


def test_workers_killed_under_pipelined_load_never_wedge_the_model(daemon_factory) -> None:
    """Kill the worker 5 times while two connections keep 4 requests each in flight: every
    request is answered (ok or WORKER_FAILED), and the model serves again each time."""
    daemon = daemon_factory(RESTARTS)

    async def scenario() -> tuple[list[object], list[int]]:
        async with AsyncClient(daemon.socket) as a, AsyncClient(daemon.socket) as b:
            stop = asyncio.Event()
            load = asyncio.gather(_keep_busy(a, stop, 4), _keep_busy(b, stop, 4))
            killed: list[int] = []
            for _ in range(5):
                pid = None
                while pid is None or pid in killed:  # the restarted worker serves
                    await asyncio.sleep(0.05)
                    pid = _serving_pid(await a.status("demo"))
                await asyncio.sleep(0.1)  # requests flow to it
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            stop.set()
            first, second = await asyncio.wait_for(load, 120)
            return first + second, killed

    outcomes, killed = asyncio.run(scenario())
    errors = [o for o in outcomes if isinstance(o, MoltError)]
    assert {e.code for e in errors} <= {ErrorCode.WORKER_FAILED}, errors[:3]
    assert len(outcomes) - len(errors) > 0
    with daemon.client() as c:
        # until the daemon has seen the last kill, status may still show its pid ready
        pid = wait_until(lambda: (p := _serving_pid(c.status("demo"))) not in killed and p,
                         what="the last restart")  # fmt: skip
        assert c.infer("demo", X)["y"][0, 0] == 10.0
        status = c.status("demo")["models"][0]["worker"]
    assert status["state"] == "ready" and status["pid"] == pid and pid not in killed
    assert _pid_alive(status["pid"])
    assert daemon.log().count("model demo v2.0 worker died") == 5
    assert "Traceback" not in daemon.log()


def test_a_dead_worker_is_never_shown_ready(daemon) -> None:
    with daemon.client() as c:
        pid = c.status("slow")["models"][0]["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        worker = wait_until(
            lambda: (w := c.status("slow")["models"][0]["worker"])["pid"] != pid and w,
            what="the restart",
        )
        assert worker["state"] in ("backoff", "starting", "ready")
        out = c.infer("slow", slow_inputs(10))
    np.testing.assert_array_equal(out["y"], np.ones(4))


@pytest.mark.parametrize("path", ["socket", "direct"])
@pytest.mark.parametrize("depth", [1, 6])
def test_requests_queued_for_a_dead_worker_wait_for_its_restart(daemon, depth, path) -> None:
    """What waited in the worker's queue (never run) runs on the restarted one; only what
    ran fails. On moltbotd's socket, moltbotd runs them again; on a direct channel, the
    client reads the worker's table of running requests and sends the others through
    moltbotd's socket."""

    async def scenario() -> list[object]:
        async with AsyncClient(daemon.socket, direct=path == "direct") as c:
            if path == "direct":
                await until_direct(c, "slow", slow_inputs(10))
            pid = pool_status(await c.status("slow"), "slow")["pid"]
            idle = cpu_seconds(pid)
            running = [asyncio.ensure_future(c.infer("slow", slow_inputs(SLOW_N * 50)))]
            await until(lambda: cpu_seconds(pid) > idle + 0.1)  # running, not just sent
            queued = [asyncio.ensure_future(c.infer("slow", slow_inputs(10))) for _ in range(depth)]
            while pool_status(await c.status("slow"), "slow")["queue"]["depth"] < depth:
                await asyncio.sleep(0.02)  # the worker reports its queue within 0.25 s
            os.kill(pid, signal.SIGKILL)
            return await asyncio.gather(*running, *queued, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert isinstance(outcomes[0], MoltError), outcomes[0]
    assert outcomes[0].code is ErrorCode.WORKER_FAILED
    assert "was killed by SIGKILL while running this request" in outcomes[0].message
    for out in outcomes[1:]:
        assert not isinstance(out, BaseException), out
        np.testing.assert_array_equal(out["y"], np.ones(4))


def test_a_client_that_asks_for_a_channel_and_leaves_costs_no_traceback(daemon) -> None:
    for _ in range(20):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(daemon.socket))
            sock.sendall(encode_frame({"id": 1, "op": "channel", "params": {"model": "demo"}}))
    # a request on a fresh connection is answered after all 20 were handled in order
    with daemon.client() as c:
        wait_until(lambda: c.status()["clients"]["connections"] <= 2, what="the 20 to close")
        assert c.infer("demo", X)["y"][0, 0] == 10.0
    assert "Traceback" not in daemon.log()


def test_requests_refused_together_before_a_half_close_are_all_answered(daemon) -> None:
    """Answers finished in one loop turn wait for its end: the close must not drop them."""
    bad = [{"id": i, "op": "hello", "params": {"client": 5}} for i in (1, 2)]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket))
        sock.sendall(b"".join(map(encode_frame, bad)))
        sock.shutdown(socket.SHUT_WR)
        decoder, frames = FrameDecoder(), []
        while data := sock.recv(65536):
            frames += decoder.feed(data)
    assert [f["id"] for f in frames] == [1, 2]
    assert all(f["error"]["code"] == "BAD_REQUEST" for f in frames)


# --- liveness ---------------------------------------------------------------------------

LIVENESS = """workers:
  heartbeat: 100ms
  hung_after: 1s
  restart:
    backoff: 50ms
models:
  slow:
    run_timeout: 2s
"""


def _hung_request(daemon, harm) -> tuple[int, MoltError]:
    """Send a long run to slow, do harm(pid) once it runs; the pid and the request's error."""
    with daemon.client() as c:
        pid = c.status("slow")["models"][0]["worker"]["pid"]

    async def scenario() -> MoltError:
        async with AsyncClient(daemon.socket) as c:
            idle = cpu_seconds(pid)
            request = asyncio.ensure_future(c.infer("slow", slow_inputs(10**12)))
            # running, not only relayed: a request stopped before it starts is requeued
            await until(lambda: cpu_seconds(pid) > idle + 0.1)
            harm(pid)
            with pytest.raises(MoltError) as err:
                await asyncio.wait_for(request, 120)
            return err.value

    return pid, asyncio.run(scenario())


def _serves_again(daemon, old_pid: int) -> None:
    with daemon.client() as c:
        wait_until(lambda: _serving_pid(c.status("slow")) not in (None, old_pid), 60, "restart")
        np.testing.assert_array_equal(c.infer("slow", slow_inputs(10))["y"], np.ones(4))


def test_a_stopped_worker_is_killed_as_hung_and_restarted(daemon_factory) -> None:
    daemon = daemon_factory(LIVENESS)
    pid, error = _hung_request(daemon, lambda pid: os.kill(pid, signal.SIGSTOP))
    assert error.code is ErrorCode.WORKER_HUNG
    assert f"worker pid {pid} was killed as hung (no heartbeat for" in error.message
    _serves_again(daemon, pid)
    assert "model slow v1 worker hung; killing it" in daemon.log()


def test_a_run_over_run_timeout_is_killed_as_hung_and_restarted(daemon_factory) -> None:
    daemon = daemon_factory(LIVENESS)
    pid, error = _hung_request(daemon, lambda pid: None)
    assert error.code is ErrorCode.WORKER_HUNG
    assert "over run_timeout 2s" in error.message
    _serves_again(daemon, pid)
    with daemon.client() as c:  # the others were never touched
        assert c.infer("demo", X)["y"][0, 0] == 10.0


def test_a_busy_worker_that_beats_is_not_hung(daemon_factory) -> None:
    """A run within run_timeout, several heartbeats long, is left alone."""
    daemon = daemon_factory(LIVENESS.replace("run_timeout: 2s", "run_timeout: 1h"))
    with daemon.client() as c:
        pid = c.status("slow")["models"][0]["worker"]["pid"]
        before = daemon.log().count("heartbeat") + daemon.log().count("hung")
        out = c.infer("slow", slow_inputs(3 * 10**6))  # seconds here: many beats
        np.testing.assert_array_equal(out["y"], np.ones(4))
        assert c.status("slow")["models"][0]["worker"]["pid"] == pid
    assert daemon.log().count("hung") == before
