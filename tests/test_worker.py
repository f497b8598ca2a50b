"""The worker's onnxruntime session: what the settings make of it, and how many runs
share it at once."""

import dataclasses
import threading
import time

import onnx
import pytest

from moltbotd.config import SessionSettings
from moltbotd.worker import load_session, taking_turns
from tests.models import mlp_model


@pytest.mark.parametrize("spinning", [False, True])
def test_session_settings_reach_onnxruntime(tmp_path, spinning):
    path = tmp_path / "model.onnx"
    onnx.save(mlp_model(), path)
    settings = SessionSettings(intra_op_threads=2, inter_op_threads=3, spinning=spinning)
    session, providers = load_session({"path": str(path), **dataclasses.asdict(settings)})
    options = session.get_session_options()
    assert providers == ["CPUExecutionProvider"]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
    expected = "1" if spinning else "0"
    for pool in ("intra_op", "inter_op"):
        assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == expected


@pytest.mark.parametrize("runs", [1, 2])
def test_runs_take_turns_for_channel_threads_permits(runs):
    """The daemon's batches (main thread) and the lanes' runs never exceed
    channel_threads at once: the worker's memory and CPU limits were sized for that."""
    running, most = [0], [0]
    lock = threading.Lock()
    both_in = threading.Barrier(runs)

    def runner(batch, concat):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if runs > 1:
            both_in.wait(10)  # with 2 permits, both are inside at once
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return [b"ok"] * len(batch)

    run = taking_turns(runner, runs)
    threads = [threading.Thread(target=run, args=([({}, None)], False)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most[0] == runs
