"""moltbotd's own command line: config validation, --check-config, log formats, settings."""

import json
import re
import subprocess
import sys

import numpy as np

from moltbotd.control.daemon import EXIT_CONFIG

ROOT_CONFIG = "etc/moltbot/moltbotd.yaml"


def moltbotd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moltbotd", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_check_config_accepts_a_good_file(tmp_path, models_dir):
    config = tmp_path / "moltbotd.yaml"
    config.write_text(f"models_dir: {models_dir}\nworkers:\n  restart:\n    backoff: 250ms\n")
    result = moltbotd("--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"moltbotd: configuration OK ({config}; models_dir {models_dir})\n"


def test_shipped_default_config_is_valid_and_matches_the_defaults():
    from pathlib import Path

    from moltbotd import config

    shipped = config.load(Path(__file__).parent.parent / ROOT_CONFIG)
    assert shipped == config.Config()


def test_bad_config_stops_the_start_naming_file_key_and_expectation(tmp_path, models_dir):
    config = tmp_path / "moltbotd.yaml"
    config.write_text("defaults:\n  intra_op_threads: two\n")
    for args in (["--check-config"], ["--models-dir", str(models_dir)]):
        result = moltbotd("--config", str(config), *args)
        assert result.returncode == EXIT_CONFIG
        assert result.stderr == (f"moltbotd: {config}: defaults.intra_op_threads: expected an"
                                 " integer from 1 to 256 or auto, got 'two'\n")  # fmt: skip
    config.write_text("drain_timout: 5s\n")
    result = moltbotd("--config", str(config))
    assert result.returncode == EXIT_CONFIG
    assert (
        "drain_timout: unknown setting (known here: access, audit, canary, clients,"
        in result.stderr
    )


def test_check_config_reports_a_bad_model_yaml(tmp_path, models_dir):
    bad = models_dir / "demo" / "v1.0" / "model.yaml"
    bad.write_text("device: tpu\n")
    result = moltbotd("--models-dir", str(models_dir), "--check-config")
    assert result.returncode == EXIT_CONFIG
    assert f"moltbotd: {bad}: device: expected one of cpu, cuda, got 'tpu'" in result.stderr


def test_text_and_json_log_formats(daemon_factory):
    text = daemon_factory()
    text.stop()
    first = next(line for line in text.log().splitlines() if "listening on" in line)
    assert re.fullmatch(
        r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[INFO\] \[server\] listening on \S+",
        first,
    )
    text.log_path.unlink()
    structured = daemon_factory(args=("--log-format", "json"), wait=False)
    structured.wait_for_log('"message": "moltbotd 0.1.0 ready: serving')
    events = [json.loads(line) for line in structured.log().splitlines()]
    ready = next(e for e in events if e["message"].startswith("moltbotd 0.1.0 ready"))
    assert ready["level"] == "info" and ready["component"] == "daemon"
    assert ready["event"] == "moltbotd {release} ready: {summary}" and ready["release"] == "0.1.0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", ready["time"])


def test_session_settings_from_model_yaml_and_config(daemon_factory, models_dir):
    (models_dir / "demo" / "v2.0" / "model.yaml").write_text(
        "intra_op_threads: 2\ngraph_optimization: basic\nchannel_threads: 2\n")  # fmt: skip
    config = ("models:\n  demo:\n    graph_optimization: extended\n    spinning: true\n"
              "  iris:\n    device: cuda\n")  # fmt: skip
    daemon = daemon_factory(config)
    with daemon.client() as c:
        demo = c.status("demo")["models"][0]["worker"]
        iris = c.status("iris")["models"][0]["worker"]
        assert c.infer("iris", {"x": [[5.1, 3.5, 1.4, 0.2]]})["label"].tolist() == [0]
    assert demo["session"] == {"device": "cpu", "intra_op_threads": 2, "inter_op_threads": 1,
                               "graph_optimization": "extended", "channel_threads": 2,
                               "spinning": True}  # fmt: skip
    assert iris["session"]["device"] == "cuda"
    # No GPU here: onnxruntime falls back to the CPU provider and the daemon says so.
    assert iris["providers"] == ["CPUExecutionProvider"]
    assert "model iris v1: CUDA is not available, running on CPU" in daemon.log()


def test_configured_version_is_served(daemon_factory):
    daemon = daemon_factory("models:\n  demo:\n    version: v1.0\n")
    with daemon.client() as c:
        out = c.infer("demo", {"x": np.ones((1, 4), np.float32)})
    assert (out.version, out["y"][0, 0]) == ("v1.0", 2.0)


def test_configured_version_missing_is_reported(daemon_factory):
    daemon = daemon_factory("models:\n  demo:\n    version: v5\n")
    with daemon.client() as c:
        model = c.status("demo")["models"][0]
        assert model["worker"] is None
        assert model["error"].startswith("configured version v5 is not in ")
        assert model["error"].endswith("(versions there: v1.0, v2.0)")
        assert c.health()["models"]["demo"] == "failed"
        assert c.infer("iris", {"x": [[1, 2, 3, 4]]})["label"].shape == (1,)
