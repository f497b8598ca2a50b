"""Triton Inference Server, installed from the package index by pytriton, serving the
bench's ONNX models for bench/oip.py: each through onnxruntime on one intra-op thread
(as moltbotd's workers run them), with Triton's dynamic batching (up to 32, 2 ms).

Runs in its own virtual environment (pytriton pins protobuf 6; moltbot's needs 7) made
from Debian's python3: Triton's Python backend embeds the system's libpython, whose
standard library must match. Argument: JSON {"http": PORT, "grpc": PORT, "metrics":
PORT, "models": {NAME: [PATH, WIDTH]}}. Serves until SIGTERM or SIGINT.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MAX_BATCH = 32
QUEUE_DELAY_US = 2000


def runner(path: str):  # noqa: ANN201 (pytriton inspects the decorated function)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    @batch
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": session.run(["y"], {"x": x})[0]}

    return infer


def main() -> None:
    spec = json.loads(sys.argv[1])
    config = TritonConfig(http_port=spec["http"], grpc_port=spec["grpc"],
                          metrics_port=spec["metrics"], log_verbose=0)  # fmt: skip
    with Triton(config=config) as triton:
        for name, (path, width) in spec["models"].items():
            triton.bind(
                model_name=name,
                infer_func=runner(path),
                inputs=[Tensor(name="x", dtype=np.float32, shape=(width,))],
                outputs=[Tensor(name="y", dtype=np.float32, shape=(width,))],
                config=ModelConfig(
                    max_batch_size=MAX_BATCH,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US),
                ),
            )
        print("triton: serving", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
