"""A demo model repository made of small real ONNX models, built with onnx.helper.

`python -m moltbotd.demo DIR` writes:
  demo/v1.0  y = 2x for x float32 [N, 4]
  demo/v2.0  y = 10x (same signature, different answers: a switch is visible)
  iris/v1    a linear classifier whose `probabilities` output is a sequence of maps,
             as onnxruntime's logreg_iris.onnx example has
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
    folder = repository / name / version
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def write_demo_repository(repository: Path) -> None:
    save(scale_model(2.0), repository, "demo", "v1.0")
    save(scale_model(10.0), repository, "demo", "v2.0")
    save(iris_model(), repository, "iris", "v1")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "run/models")
    write_demo_repository(target)
    print(f"demo model repository written to {target}")
