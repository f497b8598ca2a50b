"""The four ways to a cheaper model, each one call into onnxruntime's or
onnxconverter-common's own tools (moltbot writes no quantizer): INT8 dynamic, INT8
static (calibrated), FP16, and onnxruntime's offline graph optimization.

Each writes the new model.onnx and returns what `made:` records: the tool, the options
it was given, and the versions of the libraries that did the work.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnxconverter_common import float16
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from moltbotd.convert.data import Feed
from moltbotd.wire.protocol import ErrorCode, MoltError

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_LIBRARIES = ("onnxruntime-gpu", "onnxruntime", "onnx", "onnxconverter-common", "numpy")

# The quantizer advises pre-processing on every call; its log reaches the daemon's
# journal as warnings (the job's stderr is logged), so only its errors go there.
logging.getLogger().setLevel(logging.ERROR)


@dataclass(frozen=True)
class Job:
    """One conversion as the daemon asked for it."""

    method: str
    source: Path
    target: Path  # the new model.onnx
    per_channel: bool = False
    exclude: tuple[str, ...] = ()  # node names or operator types left as they are
    level: str = "extended"
    calibration: list[Feed] = field(default_factory=list)


class _Reader(CalibrationDataReader):
    """onnxruntime's calibration interface over the checked feeds."""

    def __init__(self, feeds: list[Feed]) -> None:
        self._feeds: Iterator[Feed] = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def convert(job: Job) -> dict[str, Any]:
    """Write job.target; the `made:` record of how."""
    model = onnx.load(str(job.source), load_external_data=False)
    nodes, ops = _excluded(model, job.exclude)
    tool, options = _METHODS[job.method](job, model, nodes, ops)
    excluded = {"exclude": list(job.exclude)} if job.exclude else {}
    return {"method": job.method, "tool": tool, "options": {**options, **excluded},
            "versions": _versions()}  # fmt: skip


Made = tuple[str, dict[str, Any]]  # the tool, and the options it was given


def _int8_dynamic(job: Job, model: onnx.ModelProto, nodes: list[str], ops: list[str]) -> Made:
    quantize_dynamic(job.source, job.target, per_channel=job.per_channel,
                     weight_type=QuantType.QInt8, nodes_to_exclude=nodes,
                     op_types_to_quantize=_kept(model, ops))  # fmt: skip
    return "onnxruntime.quantization.quantize_dynamic", {
        "weight_type": "QInt8",
        "per_channel": job.per_channel,
    }


def _int8_static(job: Job, model: onnx.ModelProto, nodes: list[str], ops: list[str]) -> Made:
    quantize_static(job.source, job.target, _Reader(job.calibration),
                    quant_format=QuantFormat.QDQ, per_channel=job.per_channel,
                    nodes_to_exclude=nodes, op_types_to_quantize=_kept(model, ops))  # fmt: skip
    return "onnxruntime.quantization.quantize_static", {
        "quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
        "per_channel": job.per_channel, "calibrate_method": "MinMax",
        "calibration_inputs": len(job.calibration)}  # fmt: skip


def _fp16(job: Job, model: onnx.ModelProto, nodes: list[str], ops: list[str]) -> Made:
    blocked = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(ops))
    half = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=blocked, node_block_list=nodes
    )
    onnx.save(half, str(job.target))
    return "onnxconverter_common.float16.convert_float_to_float16", {
        "keep_io_types": True, "op_block_list": blocked, "node_block_list": nodes}  # fmt: skip


def _optimize(job: Job, model: onnx.ModelProto, nodes: list[str], ops: list[str]) -> Made:
    settings = ort.SessionOptions()
    settings.graph_optimization_level = LEVELS[job.level]
    settings.optimized_model_filepath = str(job.target)
    ort.InferenceSession(str(job.source), settings, providers=["CPUExecutionProvider"])
    return "onnxruntime.InferenceSession(optimized_model_filepath)", {
        "graph_optimization_level": job.level}  # fmt: skip


_METHODS = {"int8-dynamic": _int8_dynamic, "int8-static": _int8_static, "fp16": _fp16,
            "optimize": _optimize}  # fmt: skip
METHODS = tuple(_METHODS)


def _excluded(model: onnx.ModelProto, names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """--exclude's names split into node names and operator types; a name that is
    neither is refused, naming what the graph has."""
    node_names = {node.name for node in model.graph.node if node.name}
    op_types = {node.op_type for node in model.graph.node}
    unknown = [name for name in names if name not in node_names | op_types]
    if unknown:
        named = ", ".join(sorted(node_names)[:20]) or "none: its nodes have no names"
        raise MoltError(
            ErrorCode.BAD_REQUEST,
            f"--exclude {unknown[0]}: the model has no node or operator type of that name"
            f" (operator types: {', '.join(sorted(op_types))}; named nodes: {named})",
        )
    return [n for n in names if n in node_names], [n for n in names if n in op_types]


def _kept(model: onnx.ModelProto, excluded_ops: list[str]) -> list[str] | None:
    """The operator types to quantize: all the quantizer knows (None) unless some are
    excluded, then the graph's other types (the quantizer passes over those it cannot)."""
    if not excluded_ops:
        return None
    kept = sorted({node.op_type for node in model.graph.node} - set(excluded_ops))
    if not kept:  # an empty list means "every type" to the quantizer
        raise MoltError(ErrorCode.BAD_REQUEST, "--exclude leaves no operator type to convert")
    return kept


def _versions() -> dict[str, str]:
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
