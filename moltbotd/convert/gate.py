"""The accuracy gate: the candidate and its source run the same evaluation inputs.

Per output: the largest and the mean absolute error, the relative error (the mean
absolute error over the mean magnitude of the source's output), and for a
classifier-shaped output the share of rows whose top-1 class is the source's. The
verdict applies one bound per output: top-1 agreement where it applies, the relative
error elsewhere. Also the size ratio and latency at batch 1 and at the model's batch
size, each measured on both models in this process, one after the other.
"""

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from moltbotd.convert.data import Feed, rows

# A 2-D [N, classes] output made by one of these is a classifier's (logits or scores):
# its rows' top-1 class is what its users read, so that is what must agree.
CLASSIFIER_HEADS = frozenset({"Softmax", "LogSoftmax", "Gemm", "MatMul", "Add"})
LATENCY_SECONDS = 0.3  # measuring time per model and batch size
LATENCY_RUNS = (3, 200)  # at least, at most


@dataclass(frozen=True)
class Bounds:
    min_top1: float  # share of rows, for classifier-shaped outputs
    max_relative_error: float  # for every other output


def session(path: Path, threads: int) -> ort.InferenceSession:
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])


def classifier_outputs(source: Path) -> set[str]:
    """The source's outputs that are classifier-shaped: [N, C >= 2] floats from a head."""
    model = onnx.load(str(source), load_external_data=False)
    made_by = {out: node.op_type for node in model.graph.node for out in node.output}
    found = set()
    for output in model.graph.output:
        tensor = output.type.tensor_type
        dims = tensor.shape.dim
        floating = tensor.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                        onnx.TensorProto.DOUBLE)  # fmt: skip
        classes = dims[1].dim_value if len(dims) == 2 else 0
        if floating and classes >= 2 and made_by.get(output.name) in CLASSIFIER_HEADS:
            found.add(output.name)
    return found


def compare(source: ort.InferenceSession, candidate: ort.InferenceSession, feeds: list[Feed],
            classifiers: set[str], bounds: Bounds) -> dict[str, Any]:  # fmt: skip
    """Every output's errors over all the feeds, and the verdict."""
    names = [out.name for out in source.get_outputs()]
    expected = [source.run(names, feed) for feed in feeds]
    got = [candidate.run(names, feed) for feed in feeds]
    outputs, failures = {}, []
    for index, name in enumerate(names):
        ref = np.concatenate([np.asarray(run[index], np.float64).ravel() for run in expected])
        new = np.concatenate([np.asarray(run[index], np.float64).ravel() for run in got])
        error = np.abs(new - ref)
        scale = float(np.mean(np.abs(ref))) or 1.0
        entry: dict[str, Any] = {"max_abs_error": float(error.max(initial=0.0)),
                                 "mean_abs_error": float(error.mean()) if error.size else 0.0,
                                 "relative_error": float(error.mean() / scale) if error.size
                                 else 0.0}  # fmt: skip
        if name in classifiers:
            agree = [np.argmax(e[index], axis=1) == np.argmax(g[index], axis=1)
                     for e, g in zip(expected, got, strict=True)]  # fmt: skip
            entry["top1_agreement"] = float(np.mean(np.concatenate(agree)))
            entry["rows"] = int(sum(a.size for a in agree))
            if entry["top1_agreement"] < bounds.min_top1:
                failures.append(f"output '{name}': top-1 agreement {entry['top1_agreement']:.1%}"
                                f" is below {bounds.min_top1:.1%}")  # fmt: skip
        elif entry["relative_error"] > bounds.max_relative_error:
            failures.append(f"output '{name}': relative error {entry['relative_error']:.2%}"
                            f" is above {bounds.max_relative_error:.2%}")  # fmt: skip
        outputs[name] = entry
    return {"outputs": outputs, "passed": not failures, "failures": failures,
            "bounds": {"min_top1": bounds.min_top1,
                       "max_relative_error": bounds.max_relative_error}}  # fmt: skip


def latency(source: ort.InferenceSession, candidate: ort.InferenceSession, feed: Feed,
            batch: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Median milliseconds per run of each model at batch 1 and at `batch` rows; only at
    the feed's own size when a first dimension is fixed (or absent)."""
    dynamic = all(spec.shape and not isinstance(spec.shape[0], int)
                  for spec in source.get_inputs())  # fmt: skip
    if dynamic:
        feeds = {size: rows(feed, size) for size in sorted({1, batch})}
    else:
        first = next(iter(feed.values()))
        feeds = {first.shape[0] if first.ndim else 1: feed}
    return {str(size): {"source": _median_ms(source, run), "candidate": _median_ms(candidate, run)}
            for size, run in feeds.items()}  # fmt: skip


def _median_ms(model: ort.InferenceSession, feed: Feed) -> float:
    model.run(None, feed)  # the first run pays for onnxruntime's lazy set-up
    spent, deadline = [], time.perf_counter() + LATENCY_SECONDS
    least, most = LATENCY_RUNS
    while len(spent) < least or (len(spent) < most and time.perf_counter() < deadline):
        start = time.perf_counter()
        model.run(None, feed)
        spent.append(time.perf_counter() - start)
    return statistics.median(spent) * 1000
