"""A model version's input/output signature, and the check of a request's inputs against it.

The worker reads the signature from its onnxruntime session and reports it in the
readiness handshake; the supervisor checks every request against it before the
request costs a worker anything, so a bad input gets a precise answer at once.
`compare` lists what replacing one signature with another would break for clients.
"""

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moltbotd.wire.protocol import STRING_DTYPE, WIRE_DTYPES, ErrorCode, MoltError

Dim = int | str | None  # a fixed size, a named dynamic dimension, or an unnamed one

# onnxruntime's type strings for tensors -> wire dtype names
ORT_TENSOR_TYPES = {
    "tensor(bool)": "bool",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(string)": STRING_DTYPE,
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    type: str  # onnxruntime's type string, e.g. tensor(float), seq(map(int64,tensor(float)))
    shape: tuple[Dim, ...] | None  # None for non-tensor values

    @property
    def dtype(self) -> str | None:
        """The wire dtype, or None where the value is not a tensor of a supported type."""
        return ORT_TENSOR_TYPES.get(self.type)

    def describe(self) -> str:
        if self.shape is None:
            return f"'{self.name}' ({self.type})"
        return f"'{self.name}' ({self.dtype or self.type}, shape {format_shape(self.shape)})"

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> "TensorSpec":
        shape = obj["shape"]
        return cls(obj["name"], obj["type"], None if shape is None else tuple(shape))


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)  # inputs

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {spec.name: spec for spec in self.inputs})

    def batch_problem(self) -> str | None:
        """Why requests cannot be concatenated along the first dimension, if they cannot."""
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for spec in specs:
                if spec.dtype in (None, STRING_DTYPE) or not spec.shape:
                    return f"{kind} {spec.describe()} has no first dimension to batch along"
                if isinstance(spec.shape[0], int):
                    return (f"{kind} {spec.describe()} has a fixed first dimension; batching"
                            " needs it dynamic: export the model with a dynamic batch dimension"
                            " or set batching.max_batch_size: 1")  # fmt: skip
        return None

    def to_wire(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_wire() for s in self.inputs],
            "outputs": [s.to_wire() for s in self.outputs],
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> "Signature":
        return cls(
            tuple(map(TensorSpec.from_wire, obj["inputs"])),
            tuple(map(TensorSpec.from_wire, obj["outputs"])),
        )


def spec_from_ort(node: Any) -> TensorSpec:
    """A TensorSpec from onnxruntime's NodeArg (session.get_inputs() items)."""
    is_tensor = node.type.startswith("tensor(")
    shape = tuple(_dim(d) for d in node.shape) if is_tensor else None
    return TensorSpec(node.name, node.type, shape)


def _dim(dim: Any) -> Dim:
    return dim if isinstance(dim, int | str) else None


def format_shape(shape: tuple[Dim, ...] | list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def compare(old: Signature, new: Signature) -> list[str]:
    """What a switch from old to new changes for clients; empty when new is compatible.

    Compatible: every request valid for old is valid for new, and clients get the outputs
    they got before. Changes come inputs first (old's order, then added ones), then outputs.
    """
    return [
        *_compare_specs("input", old.inputs, new.inputs),
        *_compare_specs("output", old.outputs, new.outputs),
    ]


def _compare_specs(
    kind: str, old: tuple[TensorSpec, ...], new: tuple[TensorSpec, ...]
) -> list[str]:
    new_by_name = {spec.name: spec for spec in new}
    changes: list[str] = []
    for spec in old:
        if spec.name in new_by_name:
            changes += _spec_changes(kind, spec, new_by_name[spec.name])
        else:
            changes.append(f"{kind} {spec.describe()} is removed")
    # every input is required, so old clients lack a new one; a new output is just extra
    if kind == "input":
        old_names = {spec.name for spec in old}
        changes += [f"input {spec.describe()} is new" for spec in new if spec.name not in old_names]
    return changes


def _spec_changes(kind: str, old: TensorSpec, new: TensorSpec) -> list[str]:
    where = f"{kind} '{old.name}'"
    changes = []
    if old.type != new.type:
        changes.append(f"{where}: dtype {old.dtype or old.type} -> {new.dtype or new.type}")
    # a shape of None means a non-tensor: a switch to or from one already shows as a type change
    if old.shape is not None and new.shape is not None:
        # an input may accept more than before, an output may promise more, never the reverse
        loose, strict = (old.shape, new.shape) if kind == "input" else (new.shape, old.shape)
        if _pins_more(loose, strict):
            changes.append(f"{where}: shape {format_shape(old.shape)} -> {format_shape(new.shape)}")
    return changes


def _pins_more(loose: tuple[Dim, ...], strict: tuple[Dim, ...]) -> bool:
    """Whether `strict` fixes a size that `loose` leaves dynamic or fixes otherwise.

    Names of dynamic dims are only labels, so 'N' and 'batch' are the same.
    """
    if len(loose) != len(strict):
        return True
    return any(isinstance(s, int) and s != d for d, s in zip(loose, strict, strict=True))


def check_inputs(label: str, signature: Signature, inputs: dict[str, Any]) -> dict[str, Any]:
    """Validate a request's inputs; return them as tensor maps ready for the worker.

    `label` names the model version in messages ("model demo v1.0").
    """
    expected = signature.by_name
    checked = {}
    for name, value in inputs.items():
        spec = expected.get(name)
        if spec is None:
            raise MoltError(
                ErrorCode.INVALID_INPUT,
                f"{label} has no input {name!r}; its inputs are "
                + ", ".join(s.describe() for s in signature.inputs),
                {"input": name, "expected": [s.to_wire() for s in signature.inputs]},
            )
        checked[name] = _check_one(label, spec, value)
    if len(checked) < len(signature.inputs):
        missing = next(spec for spec in signature.inputs if spec.name not in inputs)
        raise MoltError(
            ErrorCode.INVALID_INPUT,
            f"{label}: missing input {missing.describe()}",
            {"input": missing.name, "expected": missing.to_wire()},
        )
    return checked


def check_output_names(label: str, signature: Signature, wanted: list[Any]) -> list[str]:
    names = [spec.name for spec in signature.outputs]
    for name in wanted:
        if name not in names:
            raise MoltError(
                ErrorCode.INVALID_INPUT,
                f"{label} has no output {name!r}; its outputs are {', '.join(names)}",
            )
    return wanted


def _check_one(label: str, spec: TensorSpec, value: Any) -> dict[str, Any]:
    where = f"{label}: input '{spec.name}'"
    if spec.dtype is None:
        raise MoltError(
            ErrorCode.INVALID_INPUT,
            f"{where} has type {spec.type}, which moltbot cannot send yet",
        )
    tensor = value if isinstance(value, dict) else _from_plain(where, spec, value)
    _check_tensor_map(where, tensor)
    if tensor["dtype"] != spec.dtype:
        raise _invalid(where, spec, f"dtype {tensor['dtype']}")
    shape = tensor["shape"]
    if not _shape_fits(shape, spec.shape or ()):
        raise _invalid(where, spec, f"shape {format_shape(shape)}")
    _check_data_size(where, tensor)
    return tensor


def _invalid(where: str, spec: TensorSpec, received: str) -> MoltError:
    return MoltError(
        ErrorCode.INVALID_INPUT,
        f"{where}: expected {spec.dtype} with shape {format_shape(spec.shape or ())},"
        f" got {received}",
        {"input": spec.name, "expected": spec.to_wire()},
    )


def _from_plain(where: str, spec: TensorSpec, value: Any) -> dict[str, Any]:
    """Nested lists or a scalar from a script: converted to the dtype the model expects."""
    if spec.dtype == STRING_DTYPE:
        array = np.array(value, dtype=object)
        if not all(isinstance(s, str) for s in array.ravel()):
            raise MoltError(
                ErrorCode.INVALID_INPUT, f"{where}: expected strings, got {value!r}"[:300]
            )
        return {"dtype": STRING_DTYPE, "shape": list(array.shape), "data": list(array.ravel())}
    try:
        array = np.asarray(value, dtype=WIRE_DTYPES[spec.dtype])
        _check_no_truncation(value, array)
    except (ValueError, TypeError, OverflowError) as exc:
        message = re.sub(r"\s+", " ", str(exc))
        raise MoltError(
            ErrorCode.INVALID_INPUT,
            f"{where}: cannot read the value as a {spec.dtype} tensor: {message}",
            {"input": spec.name, "expected": spec.to_wire()},
        ) from None
    return {"dtype": spec.dtype, "shape": list(array.shape), "data": array.tobytes()}


def _check_no_truncation(value: Any, array: np.ndarray) -> None:
    """Refuse 1.5 for an integer input rather than silently sending 1."""
    if array.dtype.kind in "iub":
        natural = np.asarray(value)
        if natural.dtype.kind == "f" and not np.array_equal(natural, array):
            bad = natural[natural != array].ravel()[0]
            raise ValueError(f"{bad.item()!r} is not a whole number")


_TENSOR_KEYS = {"dtype", "shape", "data"}


def _check_tensor_map(where: str, tensor: dict[str, Any]) -> None:
    form = "a tensor map {dtype, shape, data} or nested lists"
    if tensor.keys() != _TENSOR_KEYS:
        raise MoltError(
            ErrorCode.INVALID_INPUT,
            f"{where}: expected {form}, got a map with keys {sorted(tensor, key=repr)}",
        )
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MoltError(
            ErrorCode.INVALID_INPUT,
            f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}",
        )
    dtype = tensor["dtype"]
    if not isinstance(dtype, str) or (dtype not in WIRE_DTYPES and dtype != STRING_DTYPE):
        raise MoltError(
            ErrorCode.INVALID_INPUT,
            f"{where}: unknown dtype {tensor['dtype']!r} (known: "
            f"{', '.join([*WIRE_DTYPES, STRING_DTYPE])})",
        )


def _shape_fits(shape: list[int], expected: tuple[Dim, ...]) -> bool:
    if len(shape) != len(expected):
        return False
    # a loop, not all() over a generator: this runs for every request
    for size, want in zip(shape, expected, strict=True):
        if type(want) is int and want != size:
            return False
    return True


def _check_data_size(where: str, tensor: dict[str, Any]) -> None:
    count = math.prod(tensor["shape"])
    data = tensor["data"]
    if tensor["dtype"] == STRING_DTYPE:
        ok = isinstance(data, list) and len(data) == count and all(isinstance(s, str) for s in data)
        if not ok:
            raise MoltError(
                ErrorCode.INVALID_INPUT, f"{where}: 'data' must be a list of {count} strings"
            )
        return
    need = count * WIRE_DTYPES[tensor["dtype"]].itemsize
    if not isinstance(data, bytes) or len(data) != need:
        got = f"{len(data)} bytes" if isinstance(data, bytes) else type(data).__name__
        raise MoltError(
            ErrorCode.INVALID_INPUT,
            f"{where}: 'data' must be {need} bytes for {tensor['dtype']}"
            f" {format_shape(tensor['shape'])}, got {got}",
        )
