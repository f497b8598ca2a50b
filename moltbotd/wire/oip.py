"""The Open Inference Protocol (KServe v2) as pure functions: its JSON requests, with
or without the binary tensor data extension, into an infer operation's parameters, and
an infer's result back into its JSON and binary answer. network/rest.py and
network/rpc.py carry the bytes; the dtype and error tables here serve both.

A tensor becomes the same tensor map (dtype, shape, data) the Unix socket carries, so the
worker checks it against the model's signature exactly as it checks a local client's.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moltbotd.wire.protocol import STRING_DTYPE, WIRE_DTYPES, ErrorCode, MoltError, echo

# OIP datatype -> the wire's dtype. BF16 is not here: numpy has no bfloat16, so neither
# has the wire; a BF16 tensor is refused, naming the datatypes served.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": STRING_DTYPE,
}
OIP_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
PLATFORM = "onnxruntime_onnx"  # as Triton names an ONNX model served by onnxruntime
HEADER_LENGTH = "inference-header-content-length"  # the binary extension's header
LENGTH_PREFIX = 4  # a BYTES element in binary form: little-endian uint32 length, then bytes

# The JSON values that may fill a tensor of each numpy kind (a float never fills an
# integer tensor: it would be truncated without a word; a bool is not a number here).
_FILLS = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}

# ErrorCode -> (HTTP status, gRPC status code name)
STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.BAD_FRAME: (400, "INVALID_ARGUMENT"),
    ErrorCode.BAD_REQUEST: (400, "INVALID_ARGUMENT"),
    ErrorCode.UNSUPPORTED_PROTOCOL: (400, "INVALID_ARGUMENT"),
    ErrorCode.UNKNOWN_OPERATION: (404, "UNIMPLEMENTED"),
    ErrorCode.INVALID_INPUT: (400, "INVALID_ARGUMENT"),
    ErrorCode.VALIDATION_FAILED: (400, "INVALID_ARGUMENT"),
    ErrorCode.PERMISSION_DENIED: (403, "PERMISSION_DENIED"),
    ErrorCode.MODEL_NOT_FOUND: (404, "NOT_FOUND"),
    ErrorCode.VERSION_NOT_FOUND: (404, "NOT_FOUND"),
    ErrorCode.VERSION_NOT_LOADED: (404, "NOT_FOUND"),
    ErrorCode.FRAME_TOO_LARGE: (413, "RESOURCE_EXHAUSTED"),
    ErrorCode.CONFLICT: (409, "ABORTED"),
    ErrorCode.ALREADY_EXISTS: (409, "ALREADY_EXISTS"),
    ErrorCode.SESSION_LOST: (409, "FAILED_PRECONDITION"),
    ErrorCode.BUDGET_EXCEEDED: (429, "RESOURCE_EXHAUSTED"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "DEADLINE_EXCEEDED"),
    # Retryable on another node: HAProxy's retry-on 503 sends these elsewhere.
    ErrorCode.OVERLOADED: (503, "UNAVAILABLE"),
    ErrorCode.CIRCUIT_OPEN: (503, "UNAVAILABLE"),
    ErrorCode.MODEL_UNAVAILABLE: (503, "UNAVAILABLE"),
    ErrorCode.SHUTTING_DOWN: (503, "UNAVAILABLE"),
    ErrorCode.WORKER_FAILED: (503, "UNAVAILABLE"),
    ErrorCode.WORKER_HUNG: (503, "UNAVAILABLE"),
    ErrorCode.RESOURCE_EXHAUSTED: (503, "RESOURCE_EXHAUSTED"),
    ErrorCode.INFERENCE_FAILED: (500, "INTERNAL"),
    ErrorCode.INVALID_CONFIG: (500, "INTERNAL"),
    ErrorCode.INTERNAL: (500, "INTERNAL"),
}


def invalid(message: str) -> MoltError:
    return MoltError(ErrorCode.INVALID_INPUT, message)


def error_body(message: str) -> bytes:
    """The protocol's error object."""
    return json.dumps({"error": message}).encode()


# --- requests ----------------------------------------------------------------------------


@dataclass
class Wanted:
    """Which outputs come back as binary data: each named one as it asked, the rest as
    the request's binary_data_output says."""

    default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def __call__(self, name: str) -> bool:
        return self.binary.get(name, self.default)


def parse_infer(body: bytes, header_length: int | None, model: str,
                version: str | None) -> tuple[dict[str, Any], Wanted]:  # fmt: skip
    """An infer request's body (JSON, then the binary data when header_length says where
    the JSON ends) as the infer operation's parameters, and the outputs' form."""
    end = len(body) if header_length is None else header_length
    if end > len(body):
        raise invalid(f"{HEADER_LENGTH.title()} is {end}, but the body has only {len(body)} bytes")
    doc = _json_object(body[:end])
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid(f"'inputs' must be a non-empty list of tensors, got {echo(inputs)}")
    binary = memoryview(body)[end:]
    tensors: dict[str, Any] = {}
    taken = 0
    for index, item in enumerate(inputs):
        name, tensor, size = _input(index, item, binary[taken:])
        tensors[name] = tensor
        taken += size
    if taken != len(binary):
        raise invalid(
            f"{len(binary)} bytes of binary data follow the JSON, but the inputs'"
            f" binary_data_size parameters add up to {taken}"
        )
    request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    names, wanted = _outputs(doc)
    return infer_params(model, version, tensors, request_id, names), wanted


def infer_params(model: str, version: str | None, tensors: dict[str, Any],
                 request_id: str | None, outputs: list[str] | None) -> dict[str, Any]:  # fmt: skip
    """The infer operation's parameters, on either protocol (an empty field: not given)."""
    params: dict[str, Any] = {"model": model, "inputs": tensors}
    if version:
        params["version"] = version
    if request_id:
        params["request_id"] = request_id
    if outputs:
        params["outputs"] = outputs
    return params


def _json_object(text: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise invalid(f"the request is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid(f"the request must be a JSON object, got {echo(doc)}")
    return doc


def _input(index: int, item: Any, binary: memoryview) -> tuple[str, dict[str, Any], int]:
    """One input: its name, its tensor map, and the binary bytes it took."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise invalid(f"inputs[{index}] must be an object with a 'name', got {echo(item)}")
    name = item["name"]
    where = f"input {name!r}"
    dtype = wire_dtype(where, item.get("datatype"))
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise invalid(f"{where}: 'shape' must be a list of sizes >= 0, got {echo(shape)}")
    parameters = item.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is None:
        if "data" not in item:
            raise invalid(f"{where}: no 'data' and no binary_data_size parameter")
        return name, from_json(where, dtype, shape, item["data"]), 0
    if type(size) is not int or not 0 <= size <= len(binary):
        raise invalid(
            f"{where}: binary_data_size {echo(size)} is not a size within the"
            f" {len(binary)} bytes of binary data left"
        )
    return name, from_raw(where, dtype, shape, bytes(binary[:size])), size


def _outputs(doc: dict[str, Any]) -> tuple[list[str] | None, Wanted]:
    """The outputs asked for by name (None: all), and which come back binary."""
    wanted = Wanted(bool(_parameters(doc).get("binary_data_output", False)))
    outputs = doc.get("outputs")
    if outputs is None:
        return None, wanted
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise invalid(f"'outputs' must be a list of objects with a 'name', got {echo(outputs)}")
    for output in outputs:
        binary = _parameters(output).get("binary_data")
        if binary is not None:
            wanted.binary[output["name"]] = bool(binary)
    return [o["name"] for o in outputs], wanted


def _parameters(obj: dict[str, Any]) -> dict[str, Any]:
    parameters = obj.get("parameters")
    return parameters if isinstance(parameters, dict) else {}


def wire_dtype(where: str, datatype: Any) -> str:
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise invalid(
            f"{where}: datatype {echo(datatype)} is not one moltbotd serves"
            f" (served: {', '.join(DATATYPES)})"
        ) from None


def from_json(where: str, dtype: str, shape: list[int], data: Any) -> dict[str, Any]:
    """A tensor map from JSON data: flat or nested, row-major, as many values as the shape
    holds, each of a kind the dtype can hold exactly."""
    count = math.prod(shape)
    if dtype == STRING_DTYPE:
        values = list(_flat(data))
        if not all(isinstance(v, str) for v in values):
            raise invalid(f"{where}: BYTES data must be strings, got {echo(data)}")
        _check_count(where, shape, count, len(values))
        return {"dtype": dtype, "shape": shape, "data": values}
    values = list(_flat(data))
    target = WIRE_DTYPES[dtype]
    if not all(type(v) in _FILLS[target.kind] for v in values):
        raise invalid(f"{where}: {OIP_NAMES[dtype]} data cannot hold {echo(data)}")
    _check_count(where, shape, count, len(values))
    try:
        converted = np.array(values, dtype=target)  # numpy refuses an integer out of range
    except OverflowError:
        raise invalid(
            f"{where}: a value is out of {OIP_NAMES[dtype]}'s range: {echo(data)}"
        ) from None
    return {"dtype": dtype, "shape": shape, "data": converted.tobytes()}


def from_raw(where: str, dtype: str, shape: list[int], raw: bytes) -> dict[str, Any]:
    """A tensor map from binary data (the extension's, or gRPC's raw_input_contents)."""
    count = math.prod(shape)
    if dtype == STRING_DTYPE:
        values = _unprefix(where, raw)
        _check_count(where, shape, count, len(values))
        return {"dtype": dtype, "shape": shape, "data": values}
    itemsize = WIRE_DTYPES[dtype].itemsize
    if len(raw) != count * itemsize:
        raise invalid(
            f"{where}: shape {shape} of {OIP_NAMES[dtype]} needs {count * itemsize} bytes of"
            f" binary data, got {len(raw)}"
        )
    return {"dtype": dtype, "shape": shape, "data": raw}


def _flat(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flat(item)
    else:
        yield data


def _check_count(where: str, shape: list[int], count: int, got: int) -> None:
    if got != count:
        raise invalid(f"{where}: shape {shape} holds {count} values, the data has {got}")


def _unprefix(where: str, raw: bytes) -> list[str]:
    """BYTES elements in binary form, as text (the wire's strings are UTF-8)."""
    values, at = [], 0
    while at < len(raw):
        if at + LENGTH_PREFIX > len(raw):
            raise invalid(f"{where}: BYTES data ends inside an element's 4-byte length")
        size = int.from_bytes(raw[at : at + LENGTH_PREFIX], "little")
        at += LENGTH_PREFIX
        if at + size > len(raw):
            raise invalid(f"{where}: a BYTES element of {size} bytes runs past the data")
        try:
            values.append(raw[at : at + size].decode())
        except UnicodeDecodeError:
            raise invalid(f"{where}: BYTES element {len(values)} is not UTF-8 text") from None
        at += size
    return values


# --- answers -----------------------------------------------------------------------------


def outputs_of(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """An infer result's outputs, each a tensor map the protocol can carry."""
    outputs = []
    for name, value in result["outputs"].items():
        if not isinstance(value, dict) or value.get("dtype") not in OIP_NAMES:
            raise MoltError(
                ErrorCode.INFERENCE_FAILED,
                f"output {name!r} of {result['model']} is not a tensor the Open Inference"
                " Protocol can carry (a sequence or map): ask for it on the Unix socket",
            )
        outputs.append((name, value))
    return outputs


def raw_of(tensor: dict[str, Any]) -> bytes:
    """A tensor map's data in binary form."""
    if tensor["dtype"] == STRING_DTYPE:
        encoded = (s.encode() for s in tensor["data"])
        return b"".join(len(e).to_bytes(LENGTH_PREFIX, "little") + e for e in encoded)
    return bytes(tensor["data"])


def values_of(tensor: dict[str, Any]) -> list[Any]:
    """A tensor map's data as a flat JSON list."""
    if tensor["dtype"] == STRING_DTYPE:
        return list(tensor["data"])
    return np.frombuffer(tensor["data"], dtype=WIRE_DTYPES[tensor["dtype"]]).tolist()


def infer_answer(result: dict[str, Any], wanted: Wanted,
                 request_id: str | None) -> tuple[bytes, int | None]:  # fmt: skip
    """The response body, and the JSON's length when binary data follows it."""
    entries, blobs = [], []
    for name, tensor in outputs_of(result):
        entry: dict[str, Any] = {
            "name": name,
            "datatype": OIP_NAMES[tensor["dtype"]],
            "shape": tensor["shape"],
        }
        if wanted(name):
            raw = raw_of(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = values_of(tensor)
        entries.append(entry)
    doc: dict[str, Any] = {
        "model_name": result["model"],
        "model_version": result["version"],
        "outputs": entries,
    }
    if request_id:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def shape_of(dims: list[Any] | None) -> list[int]:
    """A signature's shape as the protocol writes it: -1 for a dynamic dimension."""
    return [d if isinstance(d, int) else -1 for d in dims or ()]


def tensor_metadata(spec: dict[str, Any]) -> dict[str, Any]:
    """A signature entry (TensorSpec.to_wire) as the protocol's tensor metadata."""
    datatype = OIP_NAMES.get(spec["dtype"]) or spec["type"]
    return {"name": spec["name"], "datatype": datatype, "shape": shape_of(spec["shape"])}


def model_metadata(found: dict[str, Any]) -> dict[str, Any]:
    """The metadata operation's answer as the protocol's model metadata."""
    signature = found["signature"] or {"inputs": [], "outputs": []}
    return {
        "name": found["model"],
        "versions": found["loaded"],
        "platform": PLATFORM,
        "inputs": [tensor_metadata(s) for s in signature["inputs"]],
        "outputs": [tensor_metadata(s) for s in signature["outputs"]],
    }
