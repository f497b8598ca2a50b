"""Nothing on the daemon's event loop waits for a disk: a control operation stalled on
its state write delays itself, never another model's requests. The stall is real: the
state directory is an ext4 file system frozen with fsfreeze, so every write and fsync on
it waits until it is thawed."""

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.disks import stalling_disk

X = {"x": np.array([[1, 2, 3, 4]], dtype=np.float32)}
WHILE_STALLED = 50  # requests answered while the operation waits: the bound, as a count


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def answered_while(daemon, model: str, operation: threading.Thread, outcome: list[Any]) -> int:
    """Requests to `model` answered, one at a time, while `operation` has not returned
    (it cannot: its disk is frozen); a client timeout fails the test instead of hanging."""
    with daemon.client(timeout=30) as client:
        count = 0
        while count < WHILE_STALLED:
            assert client.infer(model, X)["y"].shape == (1, 4)
            count += 1
        assert operation.is_alive(), f"the operation did not wait for its state write: {outcome}"
        return count


def test_a_stalled_state_write_delays_its_operation_not_other_models(daemon_factory, tmp_path):
    with stalling_disk(tmp_path / "state") as disk:
        daemon = daemon_factory()
        with daemon.client() as client:
            assert client.infer("demo", X)["y"].shape == (1, 4)
            client.scale("multi", 1)  # the state file exists before the disk stalls
        with daemon.client() as other:
            with disk.frozen():
                scale, scaled = in_background(lambda: other.scale("multi", None))
                assert answered_while(daemon, "demo", scale, scaled) == WHILE_STALLED
            scale.join(60)  # thawed: its write goes through
            assert not isinstance(scaled[0], Exception), scaled
            with disk.frozen():
                switch, switched = in_background(lambda: other.switch("v1.0", "demo"))
                daemon.wait_for_log("Model demo v1.0 loaded")  # warmed next, then the write
                assert answered_while(daemon, "demo", switch, switched) == WHILE_STALLED
            switch.join(60)
        assert switched[0]["to"] == "v1.0", switched
        assert "v1.0" in (disk.path / "state.json").read_text()
