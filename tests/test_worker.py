"""The worker's onnxruntime session: what the settings make of it."""

import dataclasses

import onnx
import pytest

from moltbotd.config import SessionSettings
from moltbotd.worker import load_session
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
