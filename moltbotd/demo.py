"""A demo model repository made of small real ONNX models, built with onnx.helper.

`python -m moltbotd.demo DIR` writes, each with the manifest.json a deploy writes:
  demo/v1.0  y = 2x for x float32 [N, 4]
  demo/v2.0  y = 10x (same signature, different answers: a switch is visible)
  iris/v1    a linear classifier whose `probabilities` output is a sequence of maps,
             as onnxruntime's logreg_iris.onnx example has
A version already there is left as it is: a running moltbotd may be serving it.

`python -m moltbotd.demo --scale F DIR` writes one model folder, y = F * x, ready for
`moltctl deploy DIR`.
"""

import argparse
import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moltbotd.durable import fsync_dir
from moltbotd.versions.manifest import build_manifest, write_manifest
from moltbotd.wire.files import MODEL_FILE

OPSET = 17
ML_OPSET = 3
IR_VERSION = 9  # readable by every onnxruntime the package allows


def finish(graph: onnx.GraphProto, *, ml: bool = False) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="moltbot")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def scale_model(factor: float, width: int = 4) -> onnx.ModelProto:
    """y = factor * x, for x float32 [N, width]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")],
    )
    return finish(graph)


def iris_model() -> onnx.ModelProto:
    """Three-class linear classifier over 4 features; probabilities as a ZipMap."""
    coefficients = [-0.4, 0.9, -2.2, -0.9, 0.5, -0.3, -0.2, -0.9, -0.1, -0.6, 2.4, 1.8]
    graph = helper.make_graph(
        [
            helper.make_node(
                "LinearClassifier",
                ["x"],
                ["label", "scores"],
                domain="ai.onnx.ml",
                classlabels_ints=[0, 1, 2],
                coefficients=coefficients,
                intercepts=[9.8, 2.2, -12.0],
                multi_class=1,
                post_transform="SOFTMAX",
            ),
            helper.make_node(
                "ZipMap",
                ["scores"],
                ["probabilities"],
                domain="ai.onnx.ml",
                classlabels_int64s=[0, 1, 2],
            ),
        ],
        "iris",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_value_info(
                "probabilities",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            ),
        ],
    )
    return finish(graph, ml=True)


def save(model: onnx.ModelProto, repository: Path, name: str, version: str) -> Path:
    return write_model(model, repository / name / version)


def write_model(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    onnx.save(model, str(path))
    return path


DEMO: dict[tuple[str, str], Callable[[], onnx.ModelProto]] = {
    ("demo", "v1.0"): lambda: scale_model(2.0),
    ("demo", "v2.0"): lambda: scale_model(10.0),
    ("iris", "v1"): iris_model,
}


def write_demo_repository(repository: Path) -> list[str]:
    """Write the demo versions missing from repository; 'name/version' of each written."""
    written = []
    for (name, version), build in DEMO.items():
        if not (repository / name / version).exists():
            _publish(build(), repository / name, version)
            written.append(f"{name}/{version}")
    return written


def _publish(model: onnx.ModelProto, parent: Path, version: str) -> None:
    """Model and manifest in a hidden folder, renamed into place: all or nothing."""
    staging = parent / f".{version}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    write_model(model, staging)
    manifest = build_manifest(staging, parent.name, version, "moltbotd.demo", "moltbotd.demo")
    if "SOURCE_DATE_EPOCH" in os.environ:  # the package is built reproducibly
        manifest = dataclasses.replace(manifest, deployed_at=float(os.environ["SOURCE_DATE_EPOCH"]))
    write_manifest(staging, manifest)
    os.rename(staging, parent / version)
    fsync_dir(parent)


def main() -> None:
    parser = argparse.ArgumentParser(
        "python -m moltbotd.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path, nargs="?", default=Path("run/models"))
    parser.add_argument("--scale", type=float, help="write one model folder: y = SCALE * x")
    args = parser.parse_args()
    if args.scale is not None:
        write_model(scale_model(args.scale), args.dir)
        print(f"{args.dir / MODEL_FILE}: y = {args.scale:g} * x, for x float32 [N, 4]")
        return
    written = write_demo_repository(args.dir)
    kept = len(DEMO) - len(written)
    print(f"demo model repository in {args.dir}: {len(written)} written"
          + (f", {kept} already there (kept as they are)" if kept else ""))  # fmt: skip


if __name__ == "__main__":
    main()
