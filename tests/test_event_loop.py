"""Nothing on the daemon's event loop waits for a disk: a control operation stalled on
its state write delays itself, never another request. The stall is real: the state
directory is an ext4 file system frozen with fsfreeze, so every write and fsync on it
waits until it is thawed."""

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.conftest import wait_until
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


def stalled_in(daemon, operation: str) -> None:
    """Wait until the demo model's operation reached the phase that writes the state:
    from then on it waits for the frozen disk. A status that is not answered (the loop
    blocked in the write) fails the test by the client's timeout."""
    with daemon.client(timeout=30) as client:
        wait_until(lambda: client.status("demo")["models"][0]["operation"] == operation,
                   timeout=60, what=f"demo's operation '{operation}'")  # fmt: skip


def answered_while(daemon, operation: threading.Thread, outcome: list[Any],
                   version: str | None = None) -> int:  # fmt: skip
    """Requests to demo (pinned to `version`, if given) answered one at a time while
    `operation` has not returned (it cannot: its disk is frozen)."""
    with daemon.client(timeout=30) as client:
        count = 0
        while count < WHILE_STALLED:
            assert client.infer("demo", X, version=version)["y"].shape == (1, 4)
            count += 1
        assert operation.is_alive(), f"the operation did not wait for its state write: {outcome}"
        return count


def test_a_stalled_state_write_delays_its_operation_and_nothing_else(daemon_factory, tmp_path):
    with stalling_disk(tmp_path / "state") as disk:
        daemon = daemon_factory()
        with daemon.client() as client:
            assert client.infer("demo", X)["y"].shape == (1, 4)
            client.scale("demo", 1)  # the state file exists before the disk stalls
        with daemon.client() as other:
            with disk.frozen():
                scale, scaled = in_background(lambda: other.scale("demo", None))
                stalled_in(daemon, "scale")
                assert answered_while(daemon, scale, scaled) == WHILE_STALLED
            scale.join(60)  # thawed: its write goes through
            assert not isinstance(scaled[0], Exception), scaled
            with disk.frozen():
                switch, switched = in_background(lambda: other.switch("v1.0", "demo"))
                stalled_in(daemon, "switch to v1.0: switching")
                assert answered_while(daemon, switch, switched) == WHILE_STALLED  # v2.0 serves
            switch.join(60)
            assert switched[0]["to"] == "v1.0", switched
            other.switch("v2.0", "demo", canary=0.5)
            with disk.frozen():
                promote, promoted = in_background(lambda: other.promote("demo"))
                stalled_in(daemon, "promote: switching")
                # the canary being promoted still answers what is pinned to it
                assert answered_while(daemon, promote, promoted, "v2.0") == WHILE_STALLED
            promote.join(60)
            assert promoted[0]["to"] == "v2.0", promoted
        assert '"active": "v2.0"' in (disk.path / "state.json").read_text()
