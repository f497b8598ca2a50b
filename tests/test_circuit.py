"""The circuit breaker and the active health checks (issue 19).

The breaker's bookkeeping driven with numbers (every transition, the window, what counts
as a failure); then real daemons with real ONNX models made here that fail on demand:
`flaky` fails in onnxruntime when its input f is not 0, and a slow model whose warm-up
sample outlasts a short health-check timeout. Faults are caused, never mocked; tests wait
for states, never for durations.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from moltbotd.config import (
    CircuitSettings,
    ConfigError,
    HealthCheckSettings,
    Overrides,
    load,
)
from moltbotd.demo import finish, save
from moltbotd.serving.checks import FAILED, PASSED, SILENT, verdict, zeros
from moltbotd.serving.circuit import Breaker, CircuitState, Transition, check_transition
from moltbotd.serving.states import IllegalTransition
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltbotd.wire.signature import Signature, TensorSpec
from moltctl.cli import EXIT_CIRCUIT_OPEN
from moltctl.client import Client, DirectChannel
from tests.conftest import run_moltctl, wait_until
from tests.models import slow_model
from tests.test_cli import fails, ok
from tests.test_scheduling import SLOW_N, quick_model

C = CircuitState
FAIL = {ErrorCode.INFERENCE_FAILED.value: 1}
OK = {"OK": 1}


def breaker(**settings) -> tuple[Breaker, list[Transition]]:
    moves: list[Transition] = []
    return Breaker(CircuitSettings(**settings), moves.append), moves


def opened(**settings) -> Breaker:
    """A breaker opened at t=100 by 5 failures of 5 (min_requests 5, cooldown 10s)."""
    b, _ = breaker(**{"min_requests": 5, "cooldown": 10.0, **settings})
    for _ in range(5):
        b.record(100.0, FAIL)
    assert b.state is C.OPEN
    return b


# --- the breaker, with numbers ----------------------------------------------------------------


def test_it_opens_once_min_requests_came_and_the_share_passes_the_limit():
    b, moves = breaker(min_requests=10, max_failure_rate=0.2, window=60.0)
    for _ in range(8):
        b.record(100.0, OK)
    b.record(100.0, {ErrorCode.WORKER_FAILED.value: 1, ErrorCode.WORKER_HUNG.value: 1})
    assert b.state is C.CLOSED  # 2 of 10: 20 %, not more
    b.record(101.0, {ErrorCode.RESOURCE_EXHAUSTED.value: 1})
    assert b.state is C.OPEN  # 3 of 11: 27 %
    assert moves == [Transition(C.CLOSED, C.OPEN, "3 of its last 11 requests failed (27%, more"
                                " than 20%) within 60s")]  # fmt: skip
    assert b.status(101.0)["transitions"] == {"closed": 0, "open": 1, "half-open": 0}


def test_no_verdict_before_min_requests():
    b, moves = breaker(min_requests=5)
    for _ in range(4):
        b.record(100.0, FAIL)
    assert b.state is C.CLOSED and not moves
    assert b.admit(100.0)


@pytest.mark.parametrize("code", ["INVALID_INPUT", "BAD_REQUEST", "OVERLOADED", "MODEL_UNAVAILABLE",
                                  "INTERNAL", "DEADLINE_EXCEEDED", "SHUTTING_DOWN"])  # fmt: skip
def test_a_clients_garbage_and_load_count_neither_way(code):
    """Bad input must not open the circuit for everyone, however much of it comes; nor
    does it dilute the share of the version's own failures."""
    b, _ = breaker(min_requests=5)
    b.record(100.0, {code: 1000})
    b.record(100.0, {**FAIL, "OK": 4})
    assert b.state is C.CLOSED
    assert (b.status(100.0)["requests"], b.status(100.0)["failures"]) == (5, 1)
    b.record(100.0, FAIL)
    assert b.state is C.OPEN  # 2 of 6


def test_deadlines_count_when_the_setting_says_so():
    b, _ = breaker(min_requests=5, deadlines=True)
    b.record(100.0, {ErrorCode.DEADLINE_EXCEEDED.value: 5})
    assert b.state is C.OPEN


def test_the_window_forgets_failures_older_than_its_span():
    b, _ = breaker(min_requests=5, window=10.0)
    for t in range(4):
        b.record(100.0 + t, FAIL)
    b.record(115.0, FAIL)  # the first four are out of the window: 1 of 1
    assert b.state is C.CLOSED
    assert b.status(115.0)["requests"] == 1
    for _ in range(4):
        b.record(116.0, FAIL)
    assert b.state is C.OPEN


def test_open_refuses_until_the_cooldown_then_half_opens_and_probes_close_it():
    b = opened(probes=2)
    assert not b.admit(109.9)
    error = b.refusal(105.0, "flaky", "v1")
    assert error.code is ErrorCode.CIRCUIT_OPEN
    assert error.message == (
        "model flaky v1: circuit open: 5 of its last 5 requests failed (100%, more than 20%)"
        " within 60s; it is tried again in 5.0s"
    )
    assert error.details == {"model": "flaky", "version": "v1", "state": "open", "failures": 5,
                             "requests": 5, "failure_rate": 1.0, "window": 60.0,
                             "retry_after": 5.0}  # fmt: skip
    b.tick(110.0)
    assert b.state is C.HALF_OPEN
    assert b.admit(110.0) and b.admit(110.0)
    assert not b.admit(110.5)  # both probes under way
    assert b.refusal(110.5, "flaky", "v1").details["state"] == "half-open"
    b.record(110.6, OK)
    assert b.state is C.HALF_OPEN
    b.record(110.7, OK)
    assert b.state is C.CLOSED
    assert b.status(110.7)["requests"] == 0  # a closed circuit starts its count over
    assert b.admit(110.8)


def test_a_failed_probe_opens_it_again_for_another_cooldown():
    b = opened()
    assert b.admit(111.0)  # the cooldown passed: half-open, and this is a probe
    b.record(111.5, {"OK": 1, ErrorCode.WORKER_HUNG.value: 1})
    assert b.state is C.OPEN
    assert b.why == "a probe request failed (WORKER_HUNG)"
    assert b.retry_in(111.5) == 10.0
    assert b.transitions == {C.OPEN: 2, C.HALF_OPEN: 1}


def test_a_probe_that_ends_neither_way_gives_its_place_to_another():
    b = opened(probes=1)
    assert b.admit(110.0) and not b.admit(110.0)
    b.record(110.1, {ErrorCode.INVALID_INPUT.value: 1})  # says nothing of the version
    assert b.state is C.HALF_OPEN
    assert b.admit(110.2)


def test_probes_whose_outcome_never_comes_are_given_up_after_a_cooldown():
    b = opened(probes=1)
    assert b.admit(110.0) and not b.admit(119.9)
    assert b.admit(120.0)


def test_a_trip_opens_it_from_closed_or_half_open_and_restarts_an_open_ones_cooldown():
    b, moves = breaker(cooldown=10.0)
    b.trip(100.0, "its health check failed: boom")
    assert b.state is C.OPEN and b.why == "its health check failed: boom"
    b.trip(105.0, "its health check failed: again")
    assert b.retry_in(105.0) == 10.0 and len(moves) == 1  # still open: no transition
    assert b.admit(115.0)  # half-open
    b.trip(115.0, "its health check failed: still")
    assert b.state is C.OPEN
    assert [m.new for m in moves] == [C.OPEN, C.HALF_OPEN, C.OPEN]


def test_a_shorter_cooldown_from_a_reload_counts_at_once():
    b = opened()
    b.configure(CircuitSettings(min_requests=5, cooldown=1.0))
    b.tick(101.0)
    assert b.state is C.HALF_OPEN


def test_only_the_tables_transitions_are_allowed():
    check_transition(C.CLOSED, C.OPEN)
    check_transition(C.HALF_OPEN, C.CLOSED)
    for old, new in [(C.CLOSED, C.HALF_OPEN), (C.OPEN, C.CLOSED), (C.CLOSED, C.CLOSED)]:
        with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
            check_transition(old, new)


# --- what a health check sends and how its answer is judged ----------------------------------


def test_a_check_without_samples_sends_the_workers_zeros():
    signature = Signature(
        (TensorSpec("x", "tensor(float)", ("N", 3)), TensorSpec("s", "tensor(string)", (2,))),
        (),
    )
    assert zeros(signature) == {
        "x": {"dtype": "float32", "shape": [1, 3], "data": bytes(12)},
        "s": {"dtype": "string", "shape": [2], "data": ["", ""]},
    }
    assert zeros(Signature((TensorSpec("m", "map(int64,float)", None),), ())) is None


def test_a_check_that_never_ran_says_nothing():
    queued = MoltError(ErrorCode.DEADLINE_EXCEEDED, "waited", {"ran": False})
    ran = MoltError(ErrorCode.DEADLINE_EXCEEDED, "did not answer", {"ran": True})
    assert verdict(b"outputs")[0] == PASSED
    assert verdict(queued)[0] == SILENT
    assert verdict(MoltError(ErrorCode.OVERLOADED, "full"))[0] == SILENT
    assert verdict(ran) == (FAILED, "DEADLINE_EXCEEDED: did not answer")
    assert verdict(MoltError(ErrorCode.INFERENCE_FAILED, "boom"))[0] == FAILED


def test_circuit_and_health_check_settings_load_per_model(tmp_path):
    file = tmp_path / "moltbotd.yaml"
    file.write_text("scheduling:\n  health_check: {interval: 0}\nmodels:\n  flaky:\n"
                    "    circuit: {max_failure_rate: 50%, cooldown: 5s, probes: 1}\n")  # fmt: skip
    config = load(file)
    flaky = config.scheduling_for("flaky", Overrides())
    assert flaky.circuit == CircuitSettings(max_failure_rate=0.5, cooldown=5.0, probes=1)
    assert flaky.health_check == HealthCheckSettings(interval=0.0)
    assert config.scheduling_for("other", Overrides()).circuit == CircuitSettings()
    file.write_text("models:\n  flaky:\n    health_check: {timeout: 0}\n")
    with pytest.raises(ConfigError, match=r"models\.flaky\.health_check: timeout must be above 0"):
        load(file)


# --- the real daemon ---------------------------------------------------------------------------


def flaky_model() -> "helper.ModelProto":
    """x float32 [4], f int64 [1] -> y = x, reshaped to [4 - f]: any f but 0 fails in
    onnxruntime (INFERENCE_FAILED), a client's wrong shape fails its check (INVALID_INPUT)."""
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Sub", ["shape", "f"], ["target"]),
         helper.make_node("Reshape", ["x", "target"], ["y"])],
        "flaky",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("f", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a"])],
    )  # fmt: skip
    return finish(graph)


def steady_model() -> "helper.ModelProto":
    """flaky's signature answered by y = 2x, whatever f: the fallback."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"]),
         helper.make_node("Identity", ["f"], ["unused"])],
        "steady",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("f", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("unused", TensorProto.INT64, [1])],
    )  # fmt: skip
    return finish(graph)


def inputs(f: int = 0, x: float = 1.0) -> dict:
    return {"x": np.full(4, x, np.float32), "f": np.array([f], np.int64)}


def failing(client: Client, *args, **kwargs) -> MoltError:
    with pytest.raises(MoltError) as err:
        client.infer(*args, **kwargs)
    return err.value


def circuit(client: Client, model: str = "flaky") -> dict:
    return client.status(model)["models"][0]["worker"]["circuit"]


def in_state(client: Client, state: str, model: str = "flaky") -> dict | None:
    found = circuit(client, model)
    return found if found["state"] == state else None


def reload_with(daemon, config: str) -> None:
    assert daemon.config_path is not None
    daemon.config_path.write_text(config)
    with daemon.client() as c:
        c.reload()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """An empty repository: each test saves the models it needs before starting a daemon."""
    repo = tmp_path / "models"
    repo.mkdir()
    return repo


FALLBACK = """models:
  flaky:
    fallback: steady
    circuit: {{min_requests: 5, cooldown: {cooldown}, probes: 2}}
    health_check: {{interval: 0}}
"""


def test_an_open_circuit_sends_requests_to_the_fallback_until_probes_close_it(
    daemon_factory, models_dir
):
    save(flaky_model(), models_dir, "flaky", "v1")
    save(steady_model(), models_dir, "steady", "v1")
    daemon = daemon_factory(FALLBACK.format(cooldown="1h"))
    with daemon.client() as c:
        for _ in range(30):  # a client's garbage: refused, and never counted
            assert failing(c, "flaky", {"x": np.ones(3, np.float32), "f": [0]}).code is \
                ErrorCode.INVALID_INPUT  # fmt: skip
        for _ in range(5):
            assert failing(c, "flaky", inputs(f=1)).code is ErrorCode.INFERENCE_FAILED
        found = wait_until(lambda: in_state(c, "open"), what="the circuit opening")
        assert found["why"] == ("5 of its last 5 requests failed (100%, more than 20%)"
                                " within 60s")  # fmt: skip

        out = c.infer("flaky", inputs(x=3.0))
        assert (out.model, out.version, out.fallback_for) == ("steady", "v1", "flaky")
        np.testing.assert_array_equal(out["y"], np.full(4, 6.0))
        pinned = failing(c, "flaky", inputs(), version="v1")  # a pinned one never falls back
        assert pinned.code is ErrorCode.CIRCUIT_OPEN
        assert pinned.message.startswith("model flaky v1: circuit open: 5 of its last 5"
                                         " requests failed")  # fmt: skip
        assert pinned.details["failure_rate"] == 1.0 and pinned.details["window"] == 60.0
        assert pinned.details["retry_after"] > 3000
        metrics = c.metrics()
        assert 'moltbot_circuit_state{model="flaky",state="open",version="v1"} 1.0' in metrics
        assert 'moltbot_circuit_transitions_total{model="flaky",state="open",version="v1"} 1.0' \
            in metrics  # fmt: skip
        table = ok(run_moltctl("status", "flaky", socket=daemon.socket))
        assert "circuit open, tried again in" in table
        assert "circuit  open: 5 of 5 failed within 60.0s" in table
        assert "opened: 5 of its last 5 requests failed" in table

    reload_with(daemon, FALLBACK.format(cooldown="100ms"))  # shorter: it counts at once
    with daemon.client() as c:
        wait_until(lambda: in_state(c, "half-open"), what="the circuit half-opening")
        probes = [c.infer("flaky", inputs(x=5.0)) for _ in range(2)]
        assert [(p.model, p.fallback_for) for p in probes] == [("flaky", None)] * 2
        wait_until(lambda: in_state(c, "closed"), what="the probes closing the circuit")
        assert c.infer("flaky", inputs()).model == "flaky"
        events = [e["kind"] for e in c.status("flaky")["models"][0]["events"]]
        assert events == ["circuit-open", "circuit-half-open", "circuit-closed"]
    log = daemon.log()
    assert "model flaky v1: circuit opened: 5 of its last 5 requests failed" in log
    assert "model flaky v1: circuit half-open: its cooldown of 0.1s passed" in log
    assert "model flaky v1: circuit closed: 2 probe requests succeeded" in log


NO_FALLBACK = """models:
  flaky:
    circuit: {{min_requests: 5, cooldown: {cooldown}, probes: 1}}
    health_check: {{interval: 0}}
"""


def test_without_a_fallback_it_fails_fast_and_direct_channels_come_back_to_the_socket(
    daemon_factory, models_dir
):
    save(flaky_model(), models_dir, "flaky", "v1")
    daemon = daemon_factory(NO_FALLBACK.format(cooldown="1h"))
    with Client(daemon.socket, 60, direct=True) as direct, daemon.client() as c:
        for _ in range(5):  # on the direct channel: the daemon sees them in the worker's counts
            assert failing(direct, "flaky", inputs(f=1)).code is ErrorCode.INFERENCE_FAILED
        assert isinstance(direct._channels["flaky"], DirectChannel)
        wait_until(lambda: in_state(c, "open"), what="the circuit opening")
        channel = direct._channels["flaky"]
        wait_until(lambda: not channel.usable(), what="the worker's notice closing the channel")
        refused = failing(direct, "flaky", inputs())
        assert not isinstance(direct._channels["flaky"], DirectChannel)  # through the socket
        assert refused.code is ErrorCode.CIRCUIT_OPEN
        assert refused.details["model"] == "flaky" and refused.details["version"] == "v1"
        with pytest.raises(MoltError) as err:
            c.grant("flaky")
        assert err.value.code is ErrorCode.CONFLICT
        assert "its circuit is open: moltbotd routes its requests" in err.value.message

    result = run_moltctl("infer", "flaky", "-i", "x=[1, 1, 1, 1]", "-i", "f=[0]",
                         socket=daemon.socket)  # fmt: skip
    assert "[CIRCUIT_OPEN]" in fails(result, EXIT_CIRCUIT_OPEN)

    reload_with(daemon, NO_FALLBACK.format(cooldown="100ms"))
    with daemon.client() as c:
        wait_until(lambda: in_state(c, "half-open"), what="the circuit half-opening")
        assert failing(c, "flaky", inputs(f=1)).code is ErrorCode.INFERENCE_FAILED  # the probe
        found = wait_until(lambda: in_state(c, "open"), what="the failed probe reopening it")
        assert found["why"] == "a probe request failed (INFERENCE_FAILED)"
        assert found["transitions"] == {"closed": 0, "open": 2, "half-open": 1}
        wait_until(lambda: in_state(c, "half-open"), what="the circuit half-opening again")
        assert c.infer("flaky", inputs()).model == "flaky"
        wait_until(lambda: in_state(c, "closed"), what="the probe closing the circuit")


CHECKED = """workers:
  restart: {{stable_after: 100ms}}
models:
  slow:
    circuit: {{cooldown: {cooldown}, probes: 1}}
    health_check: {{interval: 200ms, timeout: {timeout}, restart_after: 2}}
"""


def health(client: Client) -> str:
    return client.health()["models"]["slow"]


def test_failing_health_checks_mark_the_version_unhealthy_open_its_circuit_and_restart_it(
    daemon_factory, models_dir
):
    """The check runs the version's sample, which takes far longer than the check's
    timeout: each check fails while running; two in a row restart the worker."""
    save(slow_model(), models_dir, "slow", "v1")
    (models_dir / "slow" / "v1" / "model.yaml").write_text(
        f"samples:\n  - {{n: {2 * SLOW_N}, x: [1, 2, 3, 4]}}\n"
    )
    daemon = daemon_factory(CHECKED.format(cooldown="1h", timeout="20ms"))
    with daemon.client() as c:
        first = c.status("slow")["models"][0]["worker"]["pid"]
        wait_until(lambda: health(c) == "unhealthy", 30, "a failed health check")
        report = c.health()
        assert report["status"] == "degraded"
        found = in_state(c, "open", "slow")
        assert found and found["why"].startswith("its health check failed: DEADLINE_EXCEEDED:")
        assert "(it was running)" in found["why"]
        wait_until(lambda: "restarting worker pid" in daemon.log(), 30, "a restart")
        wait_until(lambda: c.status("slow")["models"][0]["worker"]["pid"] not in (first, None),
                   30, "a new worker process")  # fmt: skip
        kinds = {e["kind"] for e in c.status("slow")["models"][0]["events"]}
        assert {"health-check-failed", "health-restart", "circuit-open"} <= kinds
        check = c.status("slow")["models"][0]["worker"]["health_check"]
        assert check["input"] == "samples" and check["outcomes"]["failed"] >= 2
        assert 'moltbot_health_checks_total{model="slow",outcome="failed",version="v1"}' \
            in c.metrics()  # fmt: skip
    assert fails(run_moltctl("health", socket=daemon.socket), 1) == ""
    assert "2 health checks failed in a row, the latest: DEADLINE_EXCEEDED" in daemon.log()

    # a timeout the sample fits in: the checks pass, and as the circuit's probes close it
    reload_with(daemon, CHECKED.format(cooldown="100ms", timeout="30s"))
    with daemon.client() as c:
        wait_until(lambda: health(c) == "ready", 60, "a passing health check")
        wait_until(lambda: in_state(c, "closed", "slow"), 30, "the circuit closing")
        assert c.health()["status"] == "ok"


def test_status_json_shows_the_circuit_and_checks_of_a_healthy_version(daemon_factory, models_dir):
    save(quick_model(), models_dir, "quick", "v1")
    daemon = daemon_factory("scheduling:\n  health_check: {interval: 100ms}\n")
    with daemon.client() as c:
        wait_until(lambda: c.status("quick")["models"][0]["worker"]["health_check"]["outcomes"]
                   ["passed"] >= 2, what="two passing checks on zeros")  # fmt: skip
        pool = c.status("quick")["models"][0]["worker"]
        assert pool["circuit"]["state"] == "closed"
        assert pool["health_check"]["input"] == "zeros" and pool["health_check"]["off"] is None
        assert pool["requests"] == 0  # the checks are not the clients' requests
        assert c.health() == {"status": "ok", "models": {"quick": "ready"}}
    report = json.loads(ok(run_moltctl("status", "quick", "-o", "json", socket=daemon.socket)))
    assert report["models"][0]["worker"]["circuit"]["transitions"] == {
        "closed": 0, "open": 0, "half-open": 0}  # fmt: skip
