"""Scheduling (issue 6) end to end: dynamic batching, priorities, bounded queues, deadlines,
instances and autoscaling, `moltctl scale`, fallback models.

Each worker has one queue for the socket's requests and its direct channels' (issue 16):
the batching, priority, bound and deadline tests run over both paths (the `path`
fixture), with the same expectations.

Real daemons, real workers, real onnxruntime. Every test writes only the models it needs
(the `models_dir` fixture below replaces conftest's full repository), so each daemon
starts in well under a second.
"""

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from moltbotd.demo import finish, save
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.client import AsyncChannel, AsyncClient, Client
from tests.conftest import run_moltctl, wait_until, wait_until_async
from tests.models import busy_loop_body, mlp_model, slow_model
from tests.test_daemon import direct, running
from tests.test_daemon import slow_inputs as daemon_slow_inputs

SLOW_N = 200_000  # Loop iterations of the slow model: a few tenths of a second per request
LONG = SLOW_N * 3  # a run that outlasts a request's round trip by far, even on a busy machine


# --- models built here -----------------------------------------------------------------------


def rows_model() -> "helper.ModelProto":
    """x float32 [N, T], n int64 [N] -> y = 3x + 1 after max(n) iterations of a Loop, and
    rows int64 [N]: every element is the number of rows the session ran at once, so a
    request can tell how many rows shared its batch (and n makes a request slow)."""
    body = busy_loop_body(["N", "T"])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["n"], ["trips"], keepdims=0),
            helper.make_node("Loop", ["trips", "cond", "x"], ["looped"], body=body),
            helper.make_node("Mul", ["looped", "three"], ["tripled"]),
            helper.make_node("Add", ["tripled", "one"], ["y"]),
            helper.make_node("Shape", ["x"], ["count"], end=1),
            helper.make_node("Expand", ["count", "count"], ["rows"]),
        ],
        "rows",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"]),
            helper.make_tensor_value_info("n", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"]),
            helper.make_tensor_value_info("rows", TensorProto.INT64, ["N"]),
        ],
        [
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.array(3.0, np.float32), "three"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        ],
    )
    return finish(graph)


def rows_inputs(x: np.ndarray, n: int = 1) -> dict:
    return {"x": x, "n": np.full(x.shape[0], n, np.int64)}


def fixed_model() -> "helper.ModelProto":
    """y = x for x float32 [2, 4]: a fixed first dimension, which batching cannot use."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    return finish(graph)


def quick_model() -> "helper.ModelProto":
    """The slow model's signature (n int64 scalar, x float32 [4]) answered at once: y = 2x."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["n"], ["n_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["n_float", "zero"], ["nothing"]),
            helper.make_node("Mul", ["x", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "nothing"], ["y"]),
        ],
        "quick",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        ],
    )
    return finish(graph)


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """An empty repository: each test saves the models it needs before starting a daemon."""
    repo = tmp_path / "models"
    repo.mkdir()
    return repo


def slow_inputs(n: int = SLOW_N, x: float = 1.0) -> dict:
    return daemon_slow_inputs(n, x)


def pool_status(status: dict, model: str) -> dict:
    """models[i].worker of one model in a status answer."""
    [entry] = [m for m in status["models"] if m["name"] == model]
    return entry["worker"]


async def failure(awaitable) -> MoltError:
    with pytest.raises(MoltError) as err:
        await awaitable
    return err.value


def tracked(order: list[str], name: str, awaitable) -> "asyncio.Future":
    """A task that appends its name to `order` when it completes."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(lambda _: order.append(name))
    return task


async def settle(client: AsyncClient, model: str, depth: int, timeout: float = 5.0) -> dict:
    """Wait until `depth` requests wait in the model's queue (all sent ones have arrived)."""

    async def settled() -> dict | None:
        pool = pool_status(await client.status(model), model)
        return pool if pool["queue"]["depth"] == depth else None

    return await wait_until_async(settled, timeout, f"a queue depth of {depth} for {model}")


async def reported(client: AsyncClient, model: str, requests: int) -> dict:
    """The model's status once its workers reported batches holding `requests` requests
    (a worker reports its counts every quarter of a second while they change)."""

    async def counted() -> dict | None:
        status = await client.status(model)
        sizes = pool_status(status, model)["batching"]["batch_sizes"]
        return status if sum(int(k) * n for k, n in sizes.items()) == requests else None

    return await wait_until_async(counted, what=f"batches of {requests} requests reported")


@pytest.fixture(params=["socket", "direct"])
def path(request) -> str:
    """The way the scenario's requests take: moltbotd's socket, or a direct channel."""
    return request.param


@contextlib.asynccontextmanager
async def client_on(daemon, path: str, model: str, warm: dict) -> AsyncIterator[AsyncClient]:
    """A client whose requests for `model` take `path`. One request (`warm`) is answered
    first, on both paths alike (it counts): on "direct", the channel it asked for is then
    open."""
    async with AsyncClient(daemon.socket, direct=path == "direct") as c:
        await c.infer(model, warm)
        if path == "direct":

            async def opened() -> bool:
                return isinstance(c._channels.get(model), AsyncChannel)

            await wait_until_async(opened, what=f"a direct channel for {model}")
        yield c


async def counted(client: AsyncClient, model: str, requests: int) -> dict:
    """The model's pool status once it counts `requests` (a direct channel's are counted
    from the worker's reports)."""

    async def done() -> dict | None:
        pool = pool_status(await client.status(model), model)
        return pool if pool["requests"] == requests and not pool["queue"]["depth"] else None

    return await wait_until_async(done, what=f"{requests} requests of {model} counted")


def state_file(daemon) -> dict:
    return json.loads((daemon.state_dir / "state.json").read_text())


def restart(daemon_factory, old, config: str):
    assert old.stop() == 0, old.log()
    ready = old.log().count("ready: serving")  # the log file is shared: count, not find
    new = daemon_factory(config, wait=False)
    new.wait_for_log("ready: serving", count=ready + 1)
    return new


# --- batching --------------------------------------------------------------------------------


def test_batched_results_equal_unbatched_ones(daemon_factory, models_dir, path):
    """Requests of 1 to 5 rows sent at once are run in batches of several requests, and
    each gets exactly what it would have got alone."""
    model = mlp_model(width=16, layers=3, seed=3)
    save(model, models_dir, "mlp", "v1")
    daemon = daemon_factory("models:\n  mlp:\n    batching:\n"
                            "      max_batch_size: 16\n      timeout_ms: 20\n")  # fmt: skip
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((i % 5 + 1, 16)).astype(np.float32) for i in range(40)]

    async def scenario():
        async with client_on(daemon, path, "mlp", {"x": xs[0]}) as c:
            outs = await asyncio.gather(*(c.infer("mlp", {"x": x}) for x in xs))
            return outs, await reported(c, "mlp", 41)

    outs, status = asyncio.run(scenario())
    for x, out in zip(xs, outs, strict=True):
        assert out["y"].shape == (x.shape[0], 16)
        np.testing.assert_array_equal(out["y"], direct(model, {"x": x})[0])
    pool = pool_status(status, "mlp")
    sizes = {int(k): n for k, n in pool["batching"]["batch_sizes"].items()}
    assert sum(size * n for size, n in sizes.items()) == 41  # every request, once
    assert max(sizes) > 1, f"no batch held more than one request: {sizes}"
    assert pool["batching"]["batches"] < 40
    assert pool["batching"]["mean_batch"] > 1
    assert pool["batching"]["max_batch_size"] == 16
    assert pool["requests"] == 41  # with the one before
    assert pool["queue"]["depth"] == 0


def test_requests_with_other_dimensions_are_not_mixed(daemon_factory, models_dir):
    """While the instance is busy, T=3 and T=5 requests arrive interleaved: each batch holds
    one T only (the rows output shows how many rows ran together)."""
    save(rows_model(), models_dir, "rows", "v1")
    daemon = daemon_factory("models:\n  rows:\n    batching:\n"
                            "      max_batch_size: 4\n      timeout_ms: 300\n")  # fmt: skip
    # (T, rows): the T=3 ones make 4 rows (a full batch, it goes at once); the T=5 ones 2
    shapes = [(3, 1), (5, 1), (3, 2), (5, 1), (3, 1)]
    xs = [np.arange(r * t, dtype=np.float32).reshape(r, t) + i for i, (t, r) in enumerate(shapes)]

    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            idle = await settle(c, "rows", 0)  # the instance is idle: the next request runs alone
            assert idle["instances"][0]["inflight"] == 0
            blocker = asyncio.ensure_future(
                c.infer("rows", rows_inputs(np.zeros((1, 3), np.float32), SLOW_N))
            )
            await running(c, "rows", 1)  # it runs now; what comes next waits for a batch
            outs = await asyncio.gather(*(c.infer("rows", rows_inputs(x)) for x in xs))
            return await blocker, outs, await reported(c, "rows", 6)

    blocker, outs, status = asyncio.run(scenario())
    assert blocker["rows"].tolist() == [1]
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out["y"], 3 * x + 1)
    ran_with = [set(out["rows"].tolist()) for out in outs]
    assert ran_with == [{4}, {2}, {4}, {2}, {4}], ran_with
    sizes = pool_status(status, "rows")["batching"]["batch_sizes"]
    assert {int(k): n for k, n in sizes.items()} == {1: 1, 2: 1, 3: 1}


def test_batching_a_fixed_first_dimension_is_refused_while_others_serve(daemon_factory, models_dir):
    save(fixed_model(), models_dir, "fixed", "v1")
    save(rows_model(), models_dir, "rows", "v1")
    daemon = daemon_factory("scheduling:\n  batching:\n    max_batch_size: 8\n")
    with daemon.client() as c:
        status = c.status()
        fixed, rows = pool_status(status, "fixed"), pool_status(status, "rows")
        assert fixed["state"] == "fatal"
        assert "batching is configured (max_batch_size above 1), but input 'x'" in fixed["error"]
        assert "has a fixed first dimension; batching needs it dynamic" in fixed["error"]
        assert "batching.max_batch_size: 1" in fixed["error"]  # what to do about it
        assert rows["state"] == "ready"
        out = c.infer("rows", rows_inputs(np.ones((2, 3), np.float32)))
        np.testing.assert_array_equal(out["y"], np.full((2, 3), 4.0))
        with pytest.raises(MoltError) as err:
            c.infer("fixed", {"x": np.ones((2, 4), np.float32)})
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert "fixed first dimension" in err.value.message
        assert c.health()["models"] == {"fixed": "fatal", "rows": "ready"}


# --- priorities ------------------------------------------------------------------------------


def test_a_high_request_overtakes_queued_low_ones(daemon_factory, models_dir, path):
    """The model's own priority is low; a request that asks for high runs next, before the
    low ones that were already waiting."""
    save(slow_model(), models_dir, "slow", "v1")
    daemon = daemon_factory("models:\n  slow:\n    priority: low\n")

    async def scenario():
        order: list[str] = []
        async with client_on(daemon, path, "slow", slow_inputs(n=1)) as c:
            # the first runs long enough for the others to be seen waiting
            lows = [tracked(order, f"low{i}", c.infer("slow", slow_inputs(n=n, x=i)))
                    for i, n in enumerate([2 * LONG] + [SLOW_N] * 4)]  # fmt: skip
            pool = await settle(c, "slow", 4)  # one runs; four wait in the worker's queue
            assert pool["queue"]["by_priority"] == {"high": 0, "normal": 0, "low": 4}
            high = tracked(order, "high", c.infer("slow", slow_inputs(x=9), priority="high"))
            outs = await asyncio.gather(*lows, high)
        return order, outs

    order, outs = asyncio.run(scenario())
    assert [float(out["y"][0]) for out in outs] == [0, 1, 2, 3, 4, 9]
    queued_lows = [order.index(f"low{i}") for i in (1, 2, 3, 4)]
    assert order.index("high") < min(queued_lows), order


def test_low_requests_all_complete_once_high_ones_are_done(daemon_factory, models_dir, path):
    """Strict priority, but no starvation: lows waiting while highs keep coming all run as
    soon as no high request waits."""
    save(slow_model(), models_dir, "slow", "v1")
    daemon = daemon_factory()

    async def scenario():
        order: list[str] = []
        async with client_on(daemon, path, "slow", slow_inputs(n=1)) as c:
            lows = (c.infer("slow", slow_inputs(n=LONG * (3 if i == 0 else 1), x=i),
                            priority="low") for i in range(4))  # fmt: skip
            tasks = [tracked(order, f"low{i}", low) for i, low in enumerate(lows)]
            await settle(c, "slow", 3)
            for i in range(4):  # highs arriving while the lows wait
                high = c.infer("slow", slow_inputs(n=SLOW_N // 2, x=10 + i), priority="high")
                tasks.append(tracked(order, f"high{i}", high))
            await settle(c, "slow", 7)  # all queued before the first low is done: 3 lows, 4 highs
            outs = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            return order, outs, await counted(c, "slow", 9)

    order, outs, pool = asyncio.run(scenario())
    assert [float(out["y"][0]) for out in outs] == [0, 1, 2, 3, 10, 11, 12, 13]
    # the three queued lows ran after every high, and they did run
    assert min(order.index(f"low{i}") for i in (1, 2, 3)) > max(
        order.index(f"high{i}") for i in range(4)
    ), order
    assert pool["errors"] == 0


# --- bounded queue, deadlines, bad values ----------------------------------------------------


def test_a_full_queue_answers_overloaded_at_once_and_keeps_serving(
    daemon_factory, models_dir, path
):
    save(slow_model(), models_dir, "slow", "v1")
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory("models:\n  slow:\n    max_queue: 2\n")

    async def scenario():
        async with client_on(daemon, path, "slow", slow_inputs(n=1)) as c:
            waiting = [asyncio.ensure_future(c.infer("slow", slow_inputs(n=n)))
                       for n in (2 * LONG, LONG, LONG)]  # fmt: skip
            await settle(c, "slow", 2)  # one runs, two wait: the queue is full
            error = await failure(c.infer("slow", slow_inputs(n=1)))
            done_before = sum(t.done() for t in waiting)  # none, unless the refusal waited
            other = await c.infer("quick", slow_inputs(x=3))  # other models still serve
            still_waiting = sum(not t.done() for t in waiting)
            outs = await asyncio.gather(*waiting)
            after = await c.infer("slow", slow_inputs(n=10, x=5))  # and slow serves again
            return (
                error,
                done_before,
                other,
                still_waiting,
                outs,
                after,
                await counted(c, "slow", 5),
            )

    error, done_before, other, still_waiting, outs, after, pool = asyncio.run(scenario())
    assert error.code is ErrorCode.OVERLOADED
    assert error.details == {"queue_depth": 2, "max_queue": 2}
    assert "model slow v1 is overloaded: 2 requests are waiting (max_queue 2)" in error.message
    assert done_before == 0, "the refusal waited for the queue"
    assert still_waiting >= 2  # it was refused while the queue was full, not after
    np.testing.assert_array_equal(other["y"], np.full(4, 6.0))
    assert all(float(out["y"][0]) == 1.0 for out in outs)
    np.testing.assert_array_equal(after["y"], np.full(4, 5.0))
    assert pool["errors"] == 0  # the refused request was never queued: not counted
    assert pool["queue"] == {"depth": 0, "max": 2,
                             "by_priority": {"high": 0, "normal": 0, "low": 0}}  # fmt: skip


def test_a_request_that_expires_in_the_queue_is_never_run(daemon_factory, models_dir, path):
    save(slow_model(), models_dir, "slow", "v1")
    daemon = daemon_factory()

    async def scenario():
        async with client_on(daemon, path, "slow", slow_inputs(n=1)) as c:
            busy = [asyncio.ensure_future(c.infer("slow", slow_inputs(n=LONG))) for _ in range(2)]
            await settle(c, "slow", 1)  # one runs, one waits: the next one waits too
            expired = await failure(c.infer("slow", slow_inputs(n=10), timeout_ms=100))
            busy_done = sum(t.done() for t in busy)
            await asyncio.gather(*busy)
            errors = (await counted(c, "slow", 4))["errors"]  # the expired one was queued
            # a deadline that passes while the request runs: it ran, the answer is late
            late = await failure(c.infer("slow", slow_inputs(), timeout_ms=50))
            in_time = await c.infer("slow", slow_inputs(n=10, x=4), timeout_ms=5000)
            return expired, busy_done, errors, late, in_time

    expired, busy_done, errors, late, in_time = asyncio.run(scenario())
    assert expired.code is ErrorCode.DEADLINE_EXCEEDED
    assert "in the queue of model slow v1; it was not run" in expired.message
    assert expired.details["ran"] is False
    assert expired.details["waited_ms"] >= 90  # timers may fire a little early
    assert busy_done == 0  # answered at its deadline, not once the worker was free
    assert errors == 1
    assert late.code is ErrorCode.DEADLINE_EXCEEDED and late.details["ran"] is True
    assert "did not answer within" in late.message
    np.testing.assert_array_equal(in_time["y"], np.full(4, 4.0))


BAD_PARAMS = [
    ({"priority": "urgent"}, "priority must be high, normal or low, got 'urgent'"),
    ({"priority": "HIGH"}, "priority must be high, normal or low, got 'HIGH'"),
    ({"timeout_ms": 0}, "timeout_ms must be above 0, got 0"),
    ({"timeout_ms": -5.5}, "timeout_ms must be above 0, got -5.5"),
]


def test_bad_priority_or_timeout_is_a_bad_request(daemon_factory, models_dir):
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory()
    with Client(
        daemon.socket, direct=False
    ) as c:  # the daemon's checks (test_direct: the worker's)
        for params, expected in BAD_PARAMS:
            with pytest.raises(MoltError) as err:
                c.infer("quick", slow_inputs(n=1), **params)
            assert err.value.code is ErrorCode.BAD_REQUEST, params
            assert expected in err.value.message
        assert pool_status(c.status("quick"), "quick")["requests"] == 0  # none reached it
        assert c.infer("quick", slow_inputs(n=1), priority="low", timeout_ms=5000).model == "quick"
        assert pool_status(c.status("quick"), "quick")["requests"] == 1


def test_moltctl_infer_refuses_bad_priority_and_timeout(daemon_factory, models_dir):
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory()
    inputs = ("-i", "n=3", "-i", "x=[1, 2, 3, 4]")
    for option, value in (("--priority", "urgent"), ("--timeout-ms", "0")):
        result = run_moltctl("infer", "quick", *inputs, option, value, socket=daemon.socket)
        assert result.returncode == 2, result
        assert f"Invalid value for '{option}'" in result.stderr
        assert "Traceback" not in result.stderr
    ok = run_moltctl("infer", "quick", *inputs, "--priority", "high", "--timeout-ms", "5000",
                     "-o", "json", socket=daemon.socket)  # fmt: skip
    assert ok.returncode == 0, ok
    assert json.loads(ok.stdout)["outputs"]["y"]["data"] == [2.0, 4.0, 6.0, 8.0]


# --- instances -------------------------------------------------------------------------------


def test_autoscaling_adds_an_instance_under_pressure_and_removes_it_when_idle(
    daemon_factory, models_dir
):
    save(slow_model(), models_dir, "slow", "v1")
    daemon = daemon_factory("""\
models:
  slow:
    instances:
      min: 1
      max: 2
      scale_up_queue: 1
      scale_up_after: 100ms
      scale_down_after: 1s
""")

    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            first = pool_status(await c.status("slow"), "slow")
            assert len(first["instances"]) == 1
            tasks = [asyncio.ensure_future(c.infer("slow", slow_inputs(x=i))) for i in range(12)]

            async def instances(states: list[str]) -> dict | None:
                pool = pool_status(await c.status("slow"), "slow")
                return pool if [i["state"] for i in pool["instances"]] == states else None

            # two instances, both serving, while the queue is still long
            pool = await wait_until_async(lambda: instances(["ready", "ready"]),
                                          what="a second instance")  # fmt: skip

            async def both_served() -> dict | None:
                # polled while the queue is long: after it, the second may already be gone
                pool = pool_status(await c.status("slow"), "slow")
                served = [i["requests"] > 0 for i in pool["instances"]]
                return pool if served == [True, True] else None

            busy = await wait_until_async(both_served, what="both instances serving")
            outs = await asyncio.gather(*tasks)
            idle = await wait_until_async(lambda: instances(["ready"]),
                                          what="the idle instance stopped")  # fmt: skip
            events = (await c.status("slow"))["models"][0]["events"]
            return first, pool, outs, busy, idle, events

    first, pool, outs, busy, idle, events = asyncio.run(scenario())
    assert [float(out["y"][0]) for out in outs] == list(range(12))
    assert pool["scaling"] == {"min": 1, "max": 2, "manual": None}
    pids = [i["pid"] for i in pool["instances"]]
    assert len(set(pids)) == 2 and pids[0] == first["pid"]
    assert [i["pid"] for i in busy["instances"]] == pids
    assert [i["pid"] for i in idle["instances"]] == [first["pid"]]  # the first one stays
    assert idle["instances"][0]["state"] == "ready"
    kinds = [e["kind"] for e in events]
    assert "scale-up" in kinds and "scale-down" in kinds
    assert kinds.index("scale-up") < kinds.index("scale-down")
    assert "2 instances" in next(e["message"] for e in events if e["kind"] == "scale-up")


def test_moltctl_scale_sets_instances_and_it_survives_a_restart(daemon_factory, models_dir):
    save(slow_model(), models_dir, "slow", "v1")
    # instances.max 2: `scale` may ask for no more than the version allows
    config = "models:\n  slow:\n    instances:\n      max: 2\n      scale_down_after: 300ms\n"
    daemon = daemon_factory(config)

    def both_ready(d) -> list[dict]:
        with d.client() as c:
            pool = pool_status(c.status("slow"), "slow")
        states = [i["state"] for i in pool["instances"]]
        return pool["instances"] if states == ["ready", "ready"] else []

    result = run_moltctl("scale", "slow", "2", socket=daemon.socket)
    assert result.returncode == 0, result
    assert "model slow v1: 2 instances (set by hand)" in result.stdout
    instances = wait_until(lambda: both_ready(daemon), what="two ready instances")
    assert len({i["pid"] for i in instances}) == 2
    assert state_file(daemon)["models"]["slow"]["instances"] == 2
    with daemon.client() as c:  # both answer
        outs = [c.infer("slow", slow_inputs(n=10, x=i)) for i in range(4)]
        assert [float(o["y"][0]) for o in outs] == [0, 1, 2, 3]
        assert pool_status(c.status("slow"), "slow")["scaling"]["manual"] == 2

    daemon = restart(daemon_factory, daemon, config)
    # ready means both instances are: the count set by hand is started with the daemon
    instances = both_ready(daemon)
    assert len({i["pid"] for i in instances}) == 2, instances
    with daemon.client() as c:
        assert pool_status(c.status("slow"), "slow")["scaling"]["manual"] == 2

    result = run_moltctl("scale", "slow", "auto", socket=daemon.socket)
    assert result.returncode == 0, result
    assert "(autoscaling)" in result.stdout
    assert state_file(daemon)["models"]["slow"]["instances"] is None

    def one_left() -> bool:
        with daemon.client() as c:
            pool = pool_status(c.status("slow"), "slow")
        return len(pool["instances"]) == 1 and pool["scaling"]["manual"] is None

    wait_until(one_left, what="autoscaling back to instances.min")


def test_moltctl_scale_refuses_a_bad_count(daemon_factory, models_dir):
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory()
    for count in ("0", "65", "two", "1.5", ""):
        result = run_moltctl("scale", "quick", count, socket=daemon.socket)
        assert result.returncode == 2, result
        assert f"expected 1 to 64 or auto, got '{count}'" in result.stderr
        assert "Traceback" not in result.stderr
    with daemon.client() as c:
        pool = pool_status(c.status("quick"), "quick")
    assert len(pool["instances"]) == 1 and pool["scaling"]["manual"] is None


def test_scale_errors_from_the_daemon(daemon_factory, models_dir):
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory()
    with daemon.client() as c:
        with pytest.raises(MoltError) as err:
            c.scale("quick", 65)
        assert err.value.code is ErrorCode.BAD_REQUEST
        assert "instances must be from 1 to 64" in err.value.message
    result = run_moltctl("scale", "nosuch", "2", socket=daemon.socket)
    assert result.returncode == 1, result  # the daemon's error, not a usage error
    assert "no model 'nosuch' is served (served: quick) [MODEL_NOT_FOUND]" in result.stderr
    assert "Traceback" not in result.stderr
    assert "nosuch" not in state_file(daemon)["models"]
    assert state_file(daemon)["models"]["quick"]["instances"] is None


# --- fallback --------------------------------------------------------------------------------


def test_an_overloaded_model_falls_back_unless_the_version_is_pinned(daemon_factory, models_dir):
    save(slow_model(), models_dir, "slow", "v1")
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory("models:\n  slow:\n    max_queue: 1\n    fallback: quick\n")

    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            waiting = [asyncio.ensure_future(c.infer("slow", slow_inputs(n=n)))
                       for n in (2 * LONG, SLOW_N)]  # fmt: skip
            await settle(c, "slow", 1)  # one runs, one waits: full
            answered = await c.infer("slow", slow_inputs(n=1, x=7))
            pinned = await failure(c.infer("slow", slow_inputs(n=1), version="v1"))
            outs = await asyncio.gather(*waiting)
            normal = await c.infer("slow", slow_inputs(n=1, x=7))
            return answered, pinned, outs, normal

    answered, pinned, outs, normal = asyncio.run(scenario())
    assert (answered.model, answered.version, answered.fallback_for) == ("quick", "v1", "slow")
    np.testing.assert_array_equal(answered["y"], np.full(4, 14.0))  # quick's answer: 2x
    assert pinned.code is ErrorCode.OVERLOADED
    assert pinned.details["queue_depth"] == 1
    assert all(out.model == "slow" and out.fallback_for is None for out in outs)
    assert (normal.model, normal.fallback_for) == ("slow", None)  # no longer overloaded
    np.testing.assert_array_equal(normal["y"], np.full(4, 7.0))


def test_a_model_that_cannot_load_falls_back_unless_the_version_is_pinned(
    daemon_factory, models_dir
):
    folder = models_dir / "broken" / "v1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"this is not an onnx model")
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory("models:\n  broken:\n    fallback: quick\n")
    with daemon.client() as c:
        assert pool_status(c.status("broken"), "broken")["state"] == "fatal"
        out = c.infer("broken", slow_inputs(n=1, x=3))
        assert (out.model, out.fallback_for) == ("quick", "broken")
        assert out.fallback_reason["code"] == "MODEL_UNAVAILABLE"
        np.testing.assert_array_equal(out["y"], np.full(4, 6.0))
        with pytest.raises(MoltError) as err:
            c.infer("broken", slow_inputs(n=1), version="v1")
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
    result = run_moltctl("infer", "broken", "-i", "n=1", "-i", "x=[1, 1, 1, 1]",
                         socket=daemon.socket)  # fmt: skip
    assert result.returncode == 0, result
    assert "broken could not answer (model broken v1 is not serving" in result.stderr
    assert "its fallback did" in result.stderr
    assert "model quick v1" in result.stdout


def test_a_model_whose_only_worker_went_fatal_falls_back(daemon_factory, models_dir):
    save(slow_model(), models_dir, "slow", "v1")
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory("workers:\n  restart:\n    max_failures: 1\n"
                            "models:\n  slow:\n    fallback: quick\n")  # fmt: skip
    with daemon.client(timeout=10) as c:
        assert c.infer("slow", slow_inputs(n=1, x=3)).model == "slow"
        os.kill(pool_status(c.status("slow"), "slow")["pid"], signal.SIGKILL)
        wait_until(lambda: pool_status(c.status("slow"), "slow")["state"] == "fatal",
                   what="slow going FATAL after its worker died")  # fmt: skip
        out = c.infer("slow", slow_inputs(n=1, x=3))
        assert (out.model, out.version, out.fallback_for) == ("quick", "v1", "slow")
        np.testing.assert_array_equal(out["y"], np.full(4, 6.0))
        with pytest.raises(MoltError) as err:
            c.infer("slow", slow_inputs(n=1), version="v1")
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert "model slow v1 is not serving (worker fatal)" in err.value.message
