"""Canaries: CanaryRoute's bookkeeping (a fake clock), and the real daemon routing,
rolling back, promoting and remembering a canary through moltctl."""

import contextlib
import json
import math
import re
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from moltbotd.config import CanarySettings
from moltbotd.control.canary import CanaryRoute
from moltbotd.demo import finish, save
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.cli import EXIT_ERROR, EXIT_USAGE
from tests.conftest import run_moltctl, wait_until
from tests.disks import fill, small_disk
from tests.test_cli import fails, ok

X = np.array([[1, 2, 3, 4]], dtype=np.float32)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_route(share: float = 0.1, clock: Clock | None = None, **settings) -> CanaryRoute:
    return CanaryRoute("v2", share, CanarySettings(**settings), clock=clock or Clock())


# --- which requests go to the canary ------------------------------------------------------


def test_share_one_tenth_is_every_tenth_request():
    route = make_route(0.1)
    taken = [i for i in range(100) if route.takes_next()]
    assert len(taken) == 10
    assert taken == list(range(9, 100, 10))


def test_share_one_third_is_one_of_every_three():
    route = make_route(1 / 3)
    picks = [route.takes_next() for _ in range(300)]
    assert sum(picks) == 100
    for block in range(100):
        assert sum(picks[3 * block : 3 * block + 3]) == 1, block


@pytest.mark.parametrize("share", [0.01, 0.05, 0.07, 0.1, 0.125, 0.25, 0.3, 1 / 3, 0.5, 0.9, 0.99])
def test_share_is_exact_and_never_exceeded(share):
    """After n requests the canary had floor(n * share) of them: never more, never behind."""
    route = make_route(share)
    taken = 0
    for n in range(1, 1001):
        taken += route.takes_next()
        assert taken <= n * share + 1e-9, (n, taken)
        assert taken == math.floor(n * share + 1e-9), (n, taken)


# --- outcomes and the verdict -------------------------------------------------------------


def test_no_verdict_before_min_requests():
    route = make_route(min_requests=5, max_error_rate=0.2, window=60.0)
    for _ in range(4):
        assert route.record(failed=True) is None
    assert route.requests == 4 and route.errors == 4
    why = route.record(failed=True)
    assert why == "5 of its last 5 requests failed (100%, more than 20%) within 60s"


def test_verdict_only_above_the_rate_not_at_it():
    route = make_route(min_requests=5, max_error_rate=0.2, window=60.0)
    for _ in range(4):
        assert route.record(failed=False) is None
    assert route.record(failed=True) is None  # 1 of 5 is 20%: equal is not more
    why = route.record(failed=True)  # 2 of 6
    assert why == "2 of its last 6 requests failed (33%, more than 20%) within 60s"
    assert (route.requests, route.errors) == (6, 2)


def test_old_outcomes_leave_the_window():
    clock = Clock()
    route = make_route(clock=clock, min_requests=5, max_error_rate=0.5, window=30.0)
    for failed in (True, True, False, False, False):  # 40%: fine
        assert route.record(failed) is None
    clock.now += 30.5  # all five are now older than the window
    for _ in range(3):  # 3 failures: with the old five it would be 5 of 8, above 50%
        assert route.record(failed=True) is None  # only 3 in the window: below min_requests
    clock.now += 10
    assert route.record(failed=False) is None  # 3 of 4, still fewer than 5
    why = route.record(failed=False)  # 3 of 5: 60%
    assert why == "3 of its last 5 requests failed (60%, more than 50%) within 30s"
    assert (route.requests, route.errors) == (10, 5)  # the counters are not windowed


def test_window_keeps_recent_outcomes():
    clock = Clock()
    route = make_route(clock=clock, min_requests=4, max_error_rate=0.5, window=60.0)
    for _ in range(3):
        route.record(failed=True)
        clock.now += 10  # 30s in all: inside the window
    assert route.record(failed=False) == (
        "3 of its last 4 requests failed (75%, more than 50%) within 60s"
    )


def test_status():
    route = CanaryRoute("v1.0", 0.25, CanarySettings(), started=123.5, clock=Clock())
    assert route.status() == {
        "version": "v1.0", "share": 0.25, "started": 123.5, "requests": 0, "errors": 0,
    }  # fmt: skip
    route.record(failed=True)
    route.record(failed=False)
    assert route.status()["requests"] == 2 and route.status()["errors"] == 1


# --- with the real daemon -------------------------------------------------------------------


def failing_model():
    """x float32 [N, 4] -> y float32 [N, 4], like demo, but every run fails in onnxruntime:
    x is reshaped to [N, 3] (computed from x's shape, so nothing is folded at load)."""
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Sub", ["shape", "minus"], ["target"]),
         helper.make_node("Reshape", ["x", "target"], ["y"])],
        "failing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array([0, 1], np.int64), "minus")],
    )  # fmt: skip
    return finish(graph)


def model_status(daemon) -> dict:
    report = json.loads(ok(run_moltctl("status", "demo", "-o", "json", socket=daemon.socket)))
    return report["models"][0]


def test_canary_takes_its_share_then_promote(daemon):
    out = ok(run_moltctl("switch", "demo", "v1.0", "--canary", "25%", socket=daemon.socket))
    assert out.startswith("demo: canary v1.0 takes 25% of requests, v2.0 the rest")
    assert "moltctl promote demo" in out and "moltctl rollback demo" in out
    answers = {"v1.0": 0, "v2.0": 0}
    with daemon.client() as client:
        for _ in range(40):
            result = client.infer("demo", {"x": X})
            factor = {"v1.0": 2, "v2.0": 10}[result.version]
            np.testing.assert_array_equal(result["y"], X * factor)
            answers[result.version] += 1
    assert answers == {"v1.0": 10, "v2.0": 30}
    model = model_status(daemon)
    assert model["active_version"] == "v2.0"
    canary = model["canary"]
    assert (canary["version"], canary["share"]) == ("v1.0", 0.25)
    assert (canary["requests"], canary["errors"]) == (10, 0)
    assert canary["worker"]["state"] == "ready"
    table = ok(run_moltctl("status", "demo", socket=daemon.socket))
    assert "canary 25%: 0/10 failed" in table
    versions = json.loads(ok(run_moltctl("versions", "demo", "-o", "json", socket=daemon.socket)))
    states = {v["version"]: v["state"] for v in versions["models"][0]["versions"]}
    assert states == {"v1.0": "canary", "v2.0": "active"}

    ok(run_moltctl("promote", "demo", socket=daemon.socket))
    model = model_status(daemon)
    assert model["active_version"] == "v1.0"
    assert model["canary"] is None
    with daemon.client() as client:
        versions_seen = {client.infer("demo", {"x": X}).version for _ in range(8)}
    assert versions_seen == {"v1.0"}
    fails(run_moltctl("promote", "demo", socket=daemon.socket), EXIT_ERROR)  # none left


def test_failing_canary_is_rolled_back(daemon_factory):
    config = "canary:\n  min_requests: 5\n  max_error_rate: 20%\n  window: 1m\n"
    daemon = daemon_factory(config=config)
    save(failing_model(), daemon.models_dir, "demo", "v3.0")
    err = fails(run_moltctl("switch", "demo", "v3.0", "--canary", "25%",
                            socket=daemon.socket), EXIT_ERROR)  # fmt: skip
    assert "the warm-up run on zeros failed" in err and "[VALIDATION_FAILED]" in err
    out = ok(run_moltctl("switch", "demo", "v3.0", "--canary", "25%", "--force",
                         socket=daemon.socket))  # fmt: skip
    assert "accepted with --force: the warm-up run on zeros failed" in out
    assert model_status(daemon)["canary"]["version"] == "v3.0"

    outcomes: list[str] = []  # the answering version, or "error"
    errors: list[MoltError] = []
    with daemon.client() as client:
        deadline = time.monotonic() + 60
        while client.status("demo")["models"][0]["canary"] is not None:
            assert time.monotonic() < deadline and len(outcomes) < 200, outcomes
            try:
                result = client.infer("demo", {"x": X})
            except MoltError as exc:
                errors.append(exc)
                outcomes.append("error")
            else:
                np.testing.assert_array_equal(result["y"], X * 10)
                outcomes.append(result.version)
        after = [client.infer("demo", {"x": X}) for _ in range(20)]

    # every 4th request went to the canary and failed; the 5th failure (5 of 5) ended it
    canary_turns = [i for i in range(len(outcomes)) if i % 4 == 3]
    assert [i for i, o in enumerate(outcomes) if o == "error"] == canary_turns[:5]
    assert len(outcomes) == 20
    for exc in errors:
        assert exc.code == ErrorCode.INFERENCE_FAILED, exc
        assert "demo v3.0" in exc.message and "Reshape" in exc.message, exc.message
    assert set(outcomes) - {"error"} == {"v2.0"}
    assert {r.version for r in after} == {"v2.0"}
    for result in after:
        np.testing.assert_array_equal(result["y"], X * 10)

    message = (
        "canary v3.0 rolled back: 5 of its last 5 requests failed (100%, more than 20%)"
        " within 60s; v2.0 serves every request"
    )
    lines = [line for line in daemon.log().splitlines() if message in line]
    assert lines, daemon.log()
    assert all("[ERROR]" in line for line in lines), lines
    model = model_status(daemon)
    assert model["active_version"] == "v2.0"
    events = [e for e in model["events"] if e["kind"] == "canary-rollback"]
    assert len(events) == 1 and events[0]["message"] == message
    assert events[0]["version"] == "v3.0"
    assert re.search(r"\(100%, more than 20%\)", events[0]["message"])
    assert message in ok(run_moltctl("status", "demo", socket=daemon.socket))
    # Routing changed at once; the record follows, written in a thread.
    wait_until(lambda: saved(daemon)["canary"] is None, what="the rollback's state write")
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["models"]["demo"]["active"] == "v2.0"


def test_canary_survives_a_restart(daemon_factory):
    daemon = daemon_factory()
    ok(run_moltctl("switch", "demo", "v1.0", "--canary", "10%", socket=daemon.socket))
    before = model_status(daemon)["canary"]
    assert daemon.stop() == 0

    daemon = daemon_factory(wait=False)  # same tmp_path: same state dir, socket, models, log
    daemon.wait_for_log("ready: serving", count=2)
    model = model_status(daemon)
    assert model["active_version"] == "v2.0"
    canary = model["canary"]
    assert canary is not None
    assert (canary["version"], canary["share"]) == ("v1.0", 0.1)
    assert canary["started"] == before["started"]
    assert wait_until(lambda: model_status(daemon)["canary"]["worker"]["state"] == "ready",
                    what="the resumed canary's worker ready")  # fmt: skip
    with daemon.client() as client:
        versions = [client.infer("demo", {"x": X}).version for _ in range(20)]
    assert versions.count("v1.0") == 2 and versions.count("v2.0") == 18
    assert "model demo: resuming the canary of v1.0" in daemon.log()


def test_rollback_ends_a_canary(daemon):
    ok(run_moltctl("switch", "demo", "v1.0", "--canary", "50%", socket=daemon.socket))
    out = ok(run_moltctl("rollback", "demo", socket=daemon.socket))
    assert out == "demo: canary v1.0 ended; v2.0 serves every request\n"
    model = model_status(daemon)
    assert model["canary"] is None and model["active_version"] == "v2.0"
    assert any(e["kind"] == "canary-rollback" and "rolled back by hand" in e["message"]
               for e in model["events"])  # fmt: skip
    with daemon.client() as client:
        assert {client.infer("demo", {"x": X}).version for _ in range(10)} == {"v2.0"}
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["models"]["demo"]["canary"] is None


def test_switch_during_a_canary_conflicts(daemon):
    ok(run_moltctl("switch", "demo", "v1.0", "--canary", "10%", socket=daemon.socket))
    err = fails(run_moltctl("switch", "demo", "v1.0", socket=daemon.socket), EXIT_ERROR)
    assert "[CONFLICT]" in err
    assert "canary of v1.0 in progress (10% of requests)" in err
    assert "moltctl promote demo" in err and "moltctl rollback demo" in err
    err = fails(run_moltctl("switch", "demo", "v1.0", "--canary", "20%", socket=daemon.socket),
                EXIT_ERROR)  # fmt: skip
    assert "[CONFLICT]" in err
    assert model_status(daemon)["canary"]["share"] == 0.1  # unchanged


def test_canary_share_usage_errors(daemon):
    for share in ("0%", "150%", "100%", "0", "1", "ten", "-5%"):
        err = fails(run_moltctl("switch", "demo", "v1.0", "--canary", share,
                                socket=daemon.socket), EXIT_USAGE)  # fmt: skip
        assert "--canary" in err and "above 0%, below 100%" in err, err
    assert model_status(daemon)["canary"] is None


def saved(daemon) -> dict:
    return json.loads((daemon.state_dir / "state.json").read_text())["models"]["demo"]


def _until_rolled_back(daemon) -> None:
    with daemon.client() as client:
        deadline = time.monotonic() + 60
        while client.status("demo")["models"][0]["canary"] is not None:
            assert time.monotonic() < deadline
            with contextlib.suppress(MoltError):
                client.infer("demo", {"x": X})


def test_a_canary_rolled_back_on_a_full_disk_stays_rolled_back_after_a_restart(
    daemon_factory, tmp_path
):
    """The state file lives on a small real disk that is full when the canary fails: the
    rollback is still recorded (in place: the state only shrank), and a restart does not
    bring the failing canary back."""
    config = "canary:\n  min_requests: 5\n  max_error_rate: 20%\n  window: 1m\n"
    with small_disk(tmp_path / "state", "1m") as disk:
        daemon = daemon_factory(config=config)
        save(failing_model(), daemon.models_dir, "demo", "v3.0")
        ok(run_moltctl("switch", "demo", "v3.0", "--canary", "25%", "--force",
                       socket=daemon.socket))  # fmt: skip
        fill(disk)
        _until_rolled_back(daemon)
        # Routing changes at once; the record follows, written in a thread.
        daemon.wait_for_log("the disk is full; state rewritten in place")
        state = json.loads((disk / "state.json").read_text())
        assert state["models"]["demo"]["canary"] is None
        assert daemon.stop() == 0
        daemon = daemon_factory(config=config, wait=False)
        daemon.wait_for_log("ready: serving", count=2)
        assert model_status(daemon)["canary"] is None
        assert "resuming the canary" not in daemon.log()
        daemon.stop()
