"""Request ids and the slow-request log, on a real daemon, on both request paths."""

import json

import numpy as np
import pytest

from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.client import Client
from tests.conftest import run_moltctl
from tests.test_cli import ok
from tests.test_scheduling import SLOW_N, slow_inputs

X = np.ones((1, 4), np.float32)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "socket"])
def test_the_answer_carries_the_callers_request_id(daemon, direct):
    with Client(daemon.socket, direct=direct) as client:
        traced = client.infer("demo", {"x": X}, request_id="order-42/step-3")
        plain = client.infer("demo", {"x": X})
        assert traced.request_id == "order-42/step-3" and plain.request_id is None
        np.testing.assert_array_equal(traced["y"], plain["y"])
        assert (client._channels.get("demo") is not None) == direct  # the path it took
        with pytest.raises(MoltError) as long:
            client.infer("demo", {"x": X}, request_id="x" * 10_000)
    assert long.value.code is ErrorCode.BAD_REQUEST and "request_id" in long.value.message


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "socket"])
def test_an_error_answer_names_the_request_too(daemon, direct):
    def refused(model: str, inputs: dict, **options) -> MoltError:
        with pytest.raises(MoltError) as caught:
            client.infer(model, inputs, **options)
        return caught.value

    with Client(daemon.socket, direct=direct) as client:
        client.infer("slow", slow_inputs(1))  # opens the direct channels, where direct
        checked = refused("demo", {"x": np.ones((1, 3), np.float32)}, request_id="bad-shape")
        late = refused("slow", slow_inputs(SLOW_N), request_id="late", timeout_ms=1)
        unknown = refused("nothing", {"x": X}, request_id="lost")
        unnamed = refused("demo", {"x": np.ones((1, 3), np.float32)})
        assert (client._channels.get("demo") is not None) == direct  # the path it took
    assert (checked.code, checked.details["request_id"]) == (ErrorCode.INVALID_INPUT, "bad-shape")
    assert (late.code, late.details["request_id"]) == (ErrorCode.DEADLINE_EXCEEDED, "late")
    assert (unknown.code, unknown.details["request_id"]) == (ErrorCode.MODEL_NOT_FOUND, "lost")
    assert "request_id" not in unnamed.details


def test_moltctl_infer_request_id(daemon):
    out = ok(run_moltctl("infer", "demo", "--input", "x=[[1, 2, 3, 4]]", "--request-id", "cli-7",
                         "-o", "json", socket=daemon.socket))  # fmt: skip
    assert json.loads(out)["request_id"] == "cli-7"


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "socket"])
def test_a_slow_request_is_logged_once_with_its_id_and_phases(daemon_factory, direct):
    daemon = daemon_factory("metrics: {slow_request: 50ms}\n")
    path = "direct" if direct else "socket"
    with Client(daemon.socket, direct=direct) as client:
        client.infer("slow", slow_inputs(10), request_id=f"quick-{path}")
        client.infer("slow", slow_inputs(SLOW_N), request_id=f"slow-{path}")
    daemon.wait_for_log(f"request_id=slow-{path}")
    [line] = [line for line in daemon.log().splitlines() if f"request_id=slow-{path}" in line]
    assert "[WARNING]" in line and "slow request" in line and "model=slow" in line, line
    for field in ("ms=", "queue_ms=", "batch_ms=", "compute_ms=", "transfer_ms=", "code=OK"):
        assert field in line, line
    assert f"quick-{path}" not in daemon.log()  # reported before it, and fast: not logged
