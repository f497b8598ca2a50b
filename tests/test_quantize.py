"""`moltctl quantize` and `moltctl optimize` end to end: real onnxruntime quantization of
the test MLP and CNN in a job the real daemon spawns, the accuracy gate, the published
version served, and the refusals (a damaging calibration, data that does not fit)."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moltbotd.convert import gate, methods
from moltbotd.demo import save
from moltbotd.wire.operations import CONVERSIONS, OPTIMIZATION_LEVELS
from moltctl.cli import EXIT_ERROR, EXIT_GATE, EXIT_USAGE
from tests.conftest import run_moltctl
from tests.models import cnn_model, mlp_model, outlier_model
from tests.test_cli import fails, ok

CNN_SIZE = 32  # pixels: a small image keeps the CNN's runs (and the test) fast


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """mlp v1 (64 wide, 3 x Gemm + Relu) and cnn v1 (a 10-class classifier, 32x32)."""
    repo = tmp_path / "models"
    save(mlp_model(), repo, "mlp", "v1")
    save(cnn_model(CNN_SIZE), repo, "cnn", "v1")
    return repo


def inputs(folder: Path, shape: tuple[int, ...], count: int = 4, scale: float = 1.0,
           seed: int = 0) -> Path:  # fmt: skip
    """`count` .npy files of 8 rows each, fixed by seed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for number in range(count):
        np.save(folder / f"{number}.npy", (scale * rng.standard_normal((8, *shape))).astype(
            np.float32))  # fmt: skip
    return folder


def quantize(daemon, *args: str):
    return run_moltctl("quantize", *args, socket=daemon.socket, timeout=120)


def passes(result):
    """The finished moltctl, once it succeeded (test_cli.ok's checks)."""
    ok(result)
    return result


def refused(result, code: int = EXIT_ERROR):
    """The finished moltctl, once it failed with `code` (test_cli.fails' checks)."""
    fails(result, code)
    return result


def report_of(models_dir: Path, model: str, version: str) -> dict:
    return json.loads((models_dir / model / version / "report.json").read_text())


def size(models_dir: Path, model: str, version: str) -> int:
    return (models_dir / model / version / "model.onnx").stat().st_size


def served(daemon, model: str, x: np.ndarray) -> np.ndarray:
    """y from the model's active version, through the daemon."""
    with daemon.client() as client:
        return client.infer(model, {"x": x})["y"]


def source(models_dir: Path, model: str, x: np.ndarray) -> np.ndarray:
    """y from v1, the source, run here."""
    path = str(models_dir / model / "v1" / "model.onnx")
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_int8_dynamic_mlp_is_published_smaller_and_served(daemon, tmp_path, models_dir):
    calibration = inputs(tmp_path / "calib", (64,))
    out = passes(quantize(daemon, "mlp", "v1", "--int8", "--calibration", str(calibration),
                      "--activate"))  # fmt: skip
    assert "gate passed" in out.stdout
    assert "mlp: v1 -> v1-int8" in out.stdout
    for phase in ("loading", "quantizing", "evaluating", "writing", "validating",
                  "publishing", "switching"):  # fmt: skip
        assert f"  {phase}" in out.stderr
    report = report_of(models_dir, "mlp", "v1-int8")
    assert report["passed"] and report["method"] == "int8-dynamic"
    assert report["outputs"]["y"]["relative_error"] < 0.05
    assert "top1_agreement" not in report["outputs"]["y"]  # a Relu's output: no classifier
    assert report["size_ratio"] < 0.5
    assert size(models_dir, "mlp", "v1-int8") < size(models_dir, "mlp", "v1") / 2
    assert set(report["latency_ms"]) == {"1"}  # batching is off: the model's batch is 1
    made = (models_dir / "mlp" / "v1-int8" / "model.yaml").read_text()
    assert "onnxruntime.quantization.quantize_dynamic" in made and "version: v1" in made
    manifest = json.loads((models_dir / "mlp" / "v1-int8" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.yaml", "report.json"}
    x = np.load(calibration / "0.npy")
    np.testing.assert_allclose(served(daemon, "mlp", x), source(models_dir, "mlp", x), atol=0.2)
    listed = ok(run_moltctl("versions", "mlp", socket=daemon.socket))
    assert "int8-dynamic of v1, gate passed, 0.30x size" in listed


def test_int8_static_cnn_passes_top1_and_is_served(daemon, tmp_path, models_dir):
    calibration = inputs(tmp_path / "calib", (3, CNN_SIZE, CNN_SIZE))
    ok(quantize(daemon, "cnn", "--int8", "--static", "--calibration", str(calibration),
                "--per-channel", "--activate"))  # fmt: skip
    report = report_of(models_dir, "cnn", "v1-int8-static")
    assert report["outputs"]["y"]["top1_agreement"] >= 0.99  # a Gemm's [N, 10]: a classifier
    assert report["outputs"]["y"]["rows"] == 32
    assert size(models_dir, "cnn", "v1-int8-static") < size(models_dir, "cnn", "v1")
    x = np.load(calibration / "1.npy")
    assert np.array_equal(
        served(daemon, "cnn", x).argmax(1), source(models_dir, "cnn", x).argmax(1)
    )


def test_fp16_and_optimize_make_versions_that_serve(daemon, tmp_path, models_dir):
    evaluation = inputs(tmp_path / "eval", (64,), count=2)
    ok(quantize(daemon, "mlp", "--fp16", "--eval", str(evaluation), "--as", "v2-half"))
    ok(run_moltctl("optimize", "mlp", "--level", "basic", "--eval", str(evaluation),
                   "--canary", "50%", socket=daemon.socket, timeout=120))  # fmt: skip
    half = report_of(models_dir, "mlp", "v2-half")
    assert half["method"] == "fp16" and half["outputs"]["y"]["relative_error"] < 0.01
    assert half["inputs"] == {"evaluation": 2, "from": "--eval files"}
    assert size(models_dir, "mlp", "v2-half") < 0.6 * size(models_dir, "mlp", "v1")
    optimized = report_of(models_dir, "mlp", "v1-opt")
    assert optimized["outputs"]["y"]["max_abs_error"] < 1e-5
    with daemon.client() as client:
        assert client.status("mlp")["models"][0]["canary"]["version"] == "v1-opt"


def test_damaging_calibration_is_refused_with_the_report(daemon, tmp_path, models_dir):
    """Static INT8 calibrated on inputs 100x smaller than those evaluated: every
    activation range is far too narrow, the outputs clip, the gate refuses."""
    calibration = inputs(tmp_path / "calib", (64,), scale=0.01)
    evaluation = inputs(tmp_path / "eval", (64,), seed=1)
    out = refused(quantize(daemon, "mlp", "--int8", "--static", "--calibration", str(calibration),
                         "--eval", str(evaluation), "--activate"), EXIT_GATE)  # fmt: skip
    assert "gate FAILED" in out.stderr
    assert "fails the accuracy gate: output 'y': relative error" in out.stderr
    assert "nothing was published" in out.stderr and "[VALIDATION_FAILED]" in out.stderr
    assert sorted(p.name for p in (models_dir / "mlp").iterdir()) == ["v1"]
    assert not list((models_dir / ".incoming").iterdir())  # the staging and the data upload
    with daemon.client() as client:
        assert client.status("mlp")["models"][0]["active_version"] == "v1"
    forced = passes(quantize(daemon, "mlp", "--int8", "--static", "--calibration",
                             str(calibration), "--eval", str(evaluation), "--force"))  # fmt: skip
    assert "published with --force" in forced.stdout
    assert report_of(models_dir, "mlp", "v1-int8-static")["forced"] is True


def test_a_damaging_exclusion_list_is_refused_and_the_right_one_passes(daemon, tmp_path,
                                                                       models_dir):  # fmt: skip
    """outlier's node wide cannot be INT8 (tests/models.py says why): excluding head
    instead quantizes wide, which the gate catches; excluding wide passes."""
    save(outlier_model(), models_dir, "outlier", "v1")
    calibration = inputs(tmp_path / "calib", (16,))
    out = refused(quantize(daemon, "outlier", "--int8", "--calibration", str(calibration),
                           "--exclude", "head", "-o", "json"), EXIT_GATE)  # fmt: skip
    report = json.loads(out.stdout)
    assert report["failures"][0].startswith("output 'y': relative error")
    assert report["outputs"]["y"]["relative_error"] > 0.5
    assert sorted(p.name for p in (models_dir / "outlier").iterdir()) == ["v1"]
    passes(quantize(daemon, "outlier", "--int8", "--calibration", str(calibration),
                    "--exclude", "wide", "--activate"))  # fmt: skip
    kept = report_of(models_dir, "outlier", "v1-int8")
    assert kept["passed"] and kept["outputs"]["y"]["relative_error"] < 0.05
    quantized = onnx.load(str(models_dir / "outlier" / "v1-int8" / "model.onnx"))
    ops = {node.name: node.op_type for node in quantized.graph.node}
    assert ops["wide"] == "MatMul" and "head" not in ops  # head became the INT8 nodes
    assert "MatMulInteger" in ops.values()
    x = np.load(calibration / "0.npy")
    np.testing.assert_allclose(served(daemon, "outlier", x), source(models_dir, "outlier", x),
                               rtol=0.1, atol=0.1)  # fmt: skip


def test_a_tight_bound_refuses_what_the_default_passes(daemon, tmp_path):
    calibration = inputs(tmp_path / "calib", (64,))
    out = refused(quantize(daemon, "mlp", "--int8", "--calibration", str(calibration),
                         "--max-error", "0.1%", "-o", "json"), EXIT_GATE)  # fmt: skip
    assert json.loads(out.stdout)["failures"][0].endswith("is above 0.10%")


def test_calibration_that_does_not_fit_is_refused_naming_the_input(daemon, tmp_path, models_dir):
    wide = inputs(tmp_path / "wide", (32,))
    out = refused(quantize(daemon, "mlp", "--int8", "--static", "--calibration", str(wide)))
    assert "calibration file 0.npy: input 'x': expected float32 with shape [N, 64]," in out.stderr
    assert "got shape [8, 32]" in out.stderr and "[INVALID_INPUT]" in out.stderr
    named = tmp_path / "named"
    named.mkdir()
    np.savez(named / "a.npz", image=np.zeros((1, 64), np.float32))
    out = refused(quantize(daemon, "mlp", "--int8", "--calibration", str(named)))
    assert "has no input 'image'; its inputs are 'x' (float32, shape [N, 64])" in out.stderr
    doubles = tmp_path / "doubles"
    doubles.mkdir()
    np.save(doubles / "a.npy", np.zeros((2, 64)))
    out = refused(quantize(daemon, "mlp", "--int8", "--calibration", str(doubles)))
    assert "input 'x': expected float32 with shape [N, 64], got dtype float64" in out.stderr
    assert sorted(p.name for p in (models_dir / "mlp").iterdir()) == ["v1"]


def test_refusals_before_any_work(daemon, tmp_path):
    refused(quantize(daemon, "mlp"), EXIT_USAGE)  # neither --int8 nor --fp16
    refused(quantize(daemon, "mlp", "--fp16", "--static"), EXIT_USAGE)
    out = refused(quantize(daemon, "mlp", "--int8", "--static"))
    assert "static quantization needs calibration inputs" in out.stderr
    out = refused(quantize(daemon, "mlp", "--int8"))
    assert "nothing to evaluate the result on: give --eval DIR" in out.stderr
    calibration = inputs(tmp_path / "calib", (64,), count=1)
    out = refused(quantize(daemon, "mlp", "--int8", "--calibration", str(calibration),
                         "--exclude", "Conv"))  # fmt: skip
    assert "--exclude Conv: the model has no node or operator type of that name" in out.stderr
    out = refused(quantize(daemon, "mlp", "v9", "--int8", "--calibration", str(calibration)))
    assert "[VERSION_NOT_FOUND]" in out.stderr
    out = refused(quantize(daemon, "mlp", "--int8", "--calibration", str(calibration), "--as",
                         "v1"))  # fmt: skip
    assert "[ALREADY_EXISTS]" in out.stderr
    passes(quantize(daemon, "mlp", "--fp16", "--calibration", str(calibration), "--activate"))
    out = refused(quantize(daemon, "mlp", "--int8", "--calibration", str(calibration)))
    assert "mlp v1-fp16 is already fp16 (made from v1): convert v1 instead" in out.stderr


def test_the_job_and_the_table_know_the_same_methods():
    assert set(methods._METHODS) == set(CONVERSIONS)
    assert set(methods.LEVELS) == set(OPTIMIZATION_LEVELS)


def test_classifier_outputs_are_2d_heads(tmp_path):
    onnx.save(cnn_model(8), str(tmp_path / "cnn.onnx"))
    onnx.save(mlp_model(), str(tmp_path / "mlp.onnx"))
    assert gate.classifier_outputs(tmp_path / "cnn.onnx") == {"y"}
    assert gate.classifier_outputs(tmp_path / "mlp.onnx") == set()
