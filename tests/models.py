"""Small real ONNX models the tests build (the demo repository's are in moltbotd.demo)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from moltbotd.demo import finish


def busy_loop_body(shape: list[int | str]) -> "helper.GraphProto":
    """A Loop body that passes its float state through unchanged, with work (a Sin) in
    every iteration: each iteration costs time, the result equals the input."""
    return helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Sin", ["state_in"], ["s"]),
            helper.make_node("Sub", ["s", "s"], ["zero"]),
            helper.make_node("Add", ["state_in", "zero"], ["state_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, shape),
        ],
    )


def slow_model() -> "helper.ModelProto":
    """y = x after `n` iterations of an ONNX Loop: a request that runs as long as asked.

    Inputs: n int64 scalar (iterations), x float32 [4]. Output: y float32 [4] (equal to x).
    """
    body = busy_loop_body([4])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body)],
        "slow",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(True), "cond")],
    )
    return finish(graph)


def mlp_model(width: int = 64, layers: int = 3, seed: int = 0) -> "helper.ModelProto":
    """layers x (Gemm + Relu), x float32 [N, width]: random weights, fixed by seed."""
    rng = np.random.default_rng(seed)
    nodes, inits, last = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = rng.standard_normal(width).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("Gemm", [last, f"w{i}", f"b{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
        ]
        last = f"r{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    return _rows_to_rows(nodes, "mlp", width, inits)


def outlier_model(width: int = 16, seed: int = 0) -> "helper.ModelProto":
    """x [N, width] -> Mul "mask" -> MatMul "wide" -> MatMul "head" -> Relu -> y. wide's
    weights hold one outlier (1000) on the input the mask zeroes: harmless in float, but
    INT8's per-tensor scale then rounds every other weight of wide to zero. head is ordinary."""
    rng = np.random.default_rng(seed)
    mask = np.ones(width, np.float32)
    mask[0] = 0
    wide = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    wide[0, 0] = 1000
    head = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((mask, "m"), (wide, "w"), (head, "v"))]
    nodes = [
        helper.make_node("Mul", ["x", "m"], ["masked"], name="mask"),
        helper.make_node("MatMul", ["masked", "w"], ["h"], name="wide"),
        helper.make_node("MatMul", ["h", "v"], ["z"], name="head"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),  # not a classifier's output
    ]
    return _rows_to_rows(nodes, "outlier", width, inits)


def _rows_to_rows(nodes: list, name: str, width: int, inits: list) -> "helper.ModelProto":
    """A graph of x float32 [N, width] to y float32 [N, width]."""
    rows = ["N", width]
    graph = helper.make_graph(nodes, name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, rows)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, rows)],
                              inits)  # fmt: skip
    return finish(graph)


def multi_io_model() -> "helper.ModelProto":
    """Two inputs of different dtypes: a int64 [2, 3], b float64 [N]; sum and scaled copy."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["a"], ["total"], keepdims=0),
            helper.make_node("Add", ["b", "b"], ["doubled"]),
        ],
        "multi",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, [2, 3]),
            helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["N"]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.INT64, []),
            helper.make_tensor_value_info("doubled", TensorProto.DOUBLE, ["N"]),
        ],
    )
    return finish(graph)


def memory_hog_model() -> "helper.ModelProto":
    """y = sum of n ones: a request allocates n float32 (n=100_000_000 is 400 MB)."""
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["n"], ["ones"],
                          value=numpy_helper.from_array(np.array([1.0], np.float32))),
         helper.make_node("ReduceSum", ["ones"], ["y"], keepdims=0)],
        "hog",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )  # fmt: skip
    return finish(graph)


def reshape_model() -> "helper.ModelProto":
    """y = x reshaped to `shape`: zeros for `shape` are an invalid target (warm-up fails)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )  # fmt: skip
    return finish(graph)


def cnn_model(size: int = 224, classes: int = 10, seed: int = 0) -> "helper.ModelProto":
    """A small CNN: Conv 3->16 k3 s2 + Relu, Conv 16->32 k3 s2 + Relu, GlobalAveragePool,
    Flatten, Gemm 32->classes. x float32 [N, 3, size, size], y [N, classes]; random
    weights, fixed by seed (about 5,000 parameters)."""
    rng = np.random.default_rng(seed)

    def weights(name: str, *shape: int) -> TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    def biases(name: str, n: int) -> TensorProto:
        return numpy_helper.from_array((0.1 * rng.standard_normal(n)).astype(np.float32), name)

    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **conv),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
            helper.make_node("Gemm", ["features", "w3", "b3"], ["y"], transB=1),
        ],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        [
            weights("w1", 16, 3, 3, 3),
            biases("b1", 16),
            weights("w2", 32, 16, 3, 3),
            biases("b2", 32),
            weights("w3", classes, 32),
            biases("b3", classes),
        ],
    )
    return finish(graph)


# The Open Inference Protocol's datatypes and the ONNX element types they map to.
OIP_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def every_dtype_model() -> "helper.ModelProto":
    """out_T = in_T for each datatype T of OIP_TYPES, shape [N, 2]."""
    nodes, inputs, outputs = [], [], []
    for name, element in OIP_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", element, ["N", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", element, ["N", 2]))
    return finish(helper.make_graph(nodes, "every_dtype", inputs, outputs))


def gru_model(inputs: int = 4, hidden: int = 8, seed: int = 0) -> "helper.ModelProto":
    """A stateful model: one GRU step over a sequence, batch first.

    Inputs: x float32 [N, T, inputs], h float32 [N, hidden] (the state). Outputs: y
    float32 [N, 2] (a projection of the new state), h_next float32 [N, hidden]. A session
    feeds h_next back into h; model.yaml: state: [{input: h, output: h_next}].
    """
    rng = np.random.default_rng(seed)
    weights = {
        "W": rng.standard_normal((1, 3 * hidden, inputs)),
        "R": rng.standard_normal((1, 3 * hidden, hidden)) / np.sqrt(hidden),
        "B": rng.standard_normal((1, 6 * hidden)) * 0.1,
        "P": rng.standard_normal((hidden, 2)),
        "axis0": np.array([0]),
    }
    inits = [numpy_helper.from_array(v.astype(np.int64 if k == "axis0" else np.float32), k)
             for k, v in weights.items()]  # fmt: skip
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("Unsqueeze", ["h", "axis0"], ["h0"]),
        helper.make_node("GRU", ["xt", "W", "R", "B", "", "h0"], ["", "hn"], hidden_size=hidden),
        helper.make_node("Squeeze", ["hn", "axis0"], ["h_next"]),
        helper.make_node("MatMul", ["h_next", "P"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gru",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", inputs]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("h_next", TensorProto.FLOAT, ["N", hidden]),
        ],
        inits,
    )
    return finish(graph)
