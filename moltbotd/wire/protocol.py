"""The wire protocol without I/O: frames, requests, responses, errors and values.

Everything here is a pure function over bytes and plain objects (h11's model), so the
daemon, the worker channel and the client share one implementation and the tests
feed it bytes. docs/protocol.md is the reference for what travels.
"""

import builtins
import enum
import functools
import itertools
import reprlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
# Bytes asked of one blocking recv(): glibc serves buffers over 128 KiB with mmap, which
# costs an mmap/munmap pair on every call (measured: 17 us per 1 MiB recv vs 3 us).
RECV_BYTES = 64 * 1024
# Longest string id or operation name taken, unless the caller passes its own limit.
DEFAULT_MAX_NAME_CHARS = 256
PRIORITIES = ("high", "normal", "low")  # a request's "priority", highest first
# What an error message shows of a value a client sent (echo()), at most.
ECHO_CHARS = 80

RequestId = int | str


class ErrorCode(enum.StrEnum):
    """Stable error codes: clients branch on these, never on message text."""

    BAD_FRAME = "BAD_FRAME"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    BAD_REQUEST = "BAD_REQUEST"
    UNSUPPORTED_PROTOCOL = "UNSUPPORTED_PROTOCOL"
    UNKNOWN_OPERATION = "UNKNOWN_OPERATION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
    VERSION_NOT_LOADED = "VERSION_NOT_LOADED"
    INVALID_INPUT = "INVALID_INPUT"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    WORKER_FAILED = "WORKER_FAILED"
    WORKER_HUNG = "WORKER_HUNG"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    CONFLICT = "CONFLICT"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    OVERLOADED = "OVERLOADED"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INVALID_CONFIG = "INVALID_CONFIG"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    SESSION_LOST = "SESSION_LOST"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    INTERNAL = "INTERNAL"


class MoltError(Exception):
    """An error that travels: a stable code, a message for humans, details for programs."""

    def __init__(
        self, code: ErrorCode, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, "details": self.details}

    @classmethod
    def from_wire(cls, obj: Any) -> "MoltError":
        if not isinstance(obj, dict) or not isinstance(obj.get("message"), str):
            return cls(ErrorCode.INTERNAL, f"malformed error envelope: {echo(obj)}")
        try:
            code = ErrorCode(obj.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        details = obj.get("details")
        return cls(code, obj["message"], details if isinstance(details, dict) else {})

    def __repr__(self) -> str:
        return f"MoltError({self.code.value}, {self.message!r})"


class FrameTooLarge(MoltError):
    """Raised by the decoder: the stream cannot be resynchronised, so the peer is closed."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {size} bytes exceeds the limit of {limit} bytes",
            {"size": size, "limit": limit},
        )


# --- frames -------------------------------------------------------------------------


class Packed(bytes):
    """A value already encoded as msgpack (a worker's outputs): spliced in, never re-encoded."""


def pack_with(fields: dict[str, Any], key: str, packed: bytes) -> Packed:
    """The map `fields` plus `key: packed`, encoded without decoding `packed`: a map packed
    with None last ends in nil (0xc0), which the packed value replaces."""
    head = msgpack.packb({**fields, key: None}, use_bin_type=True)
    return Packed(head[:-1] + packed)


def encode_frame(message: dict[str, Any]) -> bytes:
    result = message.get("result")
    if isinstance(result, Packed):
        rest = {k: v for k, v in message.items() if k != "result"}
        return _frame(pack_with(rest, "result", result))
    return _frame(msgpack.packb(message, use_bin_type=True))


def ok_frame(req_id: RequestId, result: Packed) -> bytes:
    """encode_frame(ok_response(req_id, result)) without the message: a worker's direct
    channels send one per request."""
    return _frame(pack_with({"id": req_id, "ok": True}, "result", result))


def _frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into messages (h11's model): receive() whatever arrived, then
    take whole frames with next_frame(), or do both with feed().

    A frame whose body is not a msgpack map yields a MoltError in its place (the frame
    boundary is intact, so the stream goes on). A length over the limit raises
    FrameTooLarge when next_frame() reaches its header, after every whole frame before it
    was taken, and before any of its body is kept; from then on the decoder is failed:
    it keeps nothing more and raises again. It holds only bytes that arrived (never the
    length a header announces), and frames not yet taken.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 decode: Callable[[memoryview], Any] | None = None) -> None:  # fmt: skip
        self.max_frame_bytes = max_frame_bytes
        self.decode = decode or _decode_body  # another body than a msgpack map: relay.py
        self._buf = bytearray()
        self._pos = 0  # where the next frame starts in _buf
        self.error: FrameTooLarge | None = None

    def receive(self, data: bytes) -> None:
        if self.error is None:
            self._buf += data

    def next_frame(self) -> dict[str, Any] | MoltError | None:
        """The next whole frame, or None until more bytes arrive."""
        if self.error is not None:
            raise self.error
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            self._compact()
            return None
        (size,) = HEADER.unpack_from(buf, pos)
        if size > self.max_frame_bytes:
            self.error = FrameTooLarge(size, self.max_frame_bytes)
            self.discard()
            raise self.error
        end = pos + HEADER.size + size
        if len(buf) < end:
            self._compact()
            return None
        with memoryview(buf) as view:
            frame = self.decode(view[pos + HEADER.size : end])
        self._pos = end
        return frame

    def feed(self, data: bytes) -> list[dict[str, Any] | MoltError]:
        """receive(data), then every whole frame. Frames before a header over the limit
        are returned, and the next call raises FrameTooLarge; with no frame before it, this
        one raises."""
        self.receive(data)
        out: list[dict[str, Any] | MoltError] = []
        try:
            while (frame := self.next_frame()) is not None:
                out.append(frame)
        except FrameTooLarge:
            if not out:
                raise
        return out

    def discard(self) -> None:
        """Drop what is held (a connection being closed)."""
        self._buf = bytearray()
        self._pos = 0

    def _compact(self) -> None:
        # Taken frames are dropped only now, once per read: one memmove, not one per frame.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes held back: frames not yet taken, and the start of an incomplete one (a peer
        closing here cut a frame)."""
        return len(self._buf) - self._pos


def _decode_body(body: memoryview) -> dict[str, Any] | MoltError:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.StackError:
        return MoltError(
            ErrorCode.BAD_FRAME, "frame body nests values deeper than msgpack's 1024 levels"
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # TypeError: {[1]: 2}
        return MoltError(ErrorCode.BAD_FRAME, f"frame body is not valid msgpack: {exc}")
    if not isinstance(message, dict):
        return MoltError(
            ErrorCode.BAD_FRAME,
            f"frame body must be a msgpack map, got {type(message).__name__}",
        )
    return message


# --- requests and responses ---------------------------------------------------------


class RequestError(MoltError):
    """A MoltError about one request; it carries the id (when known) to address the answer."""

    def __init__(self, req_id: RequestId | None, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.req_id = req_id


@dataclass(slots=True)
class Request:
    id: RequestId
    op: str
    params: dict[str, Any] = field(default_factory=dict)


def request_id(
    message: dict[str, Any], max_chars: int = DEFAULT_MAX_NAME_CHARS
) -> RequestId | None:
    """The request's id when it is a valid one (an integer, or a string of at most
    max_chars characters), else None: an answer never echoes an oversized id."""
    req_id = message.get("id")
    if isinstance(req_id, str):
        return req_id if len(req_id) <= max_chars else None
    return req_id if isinstance(req_id, int) and not isinstance(req_id, bool) else None


def trace_of(message: Any, max_chars: int = DEFAULT_MAX_NAME_CHARS) -> str | None:
    """An infer request's `request_id` when it is a valid one, before or without the
    parameter check (an answer never echoes an oversized or mistyped one)."""
    infer = isinstance(message, dict) and message.get("op") == "infer"
    params = message.get("params") if infer else None
    trace = params.get("request_id") if isinstance(params, dict) else None
    return trace if isinstance(trace, str) and len(trace) <= max_chars else None


def traced(error: MoltError, trace: str | None) -> MoltError:
    """The error as the answer to a request the caller named: `details.request_id` says
    which (a copy: one error may answer several requests)."""
    if trace is None:
        return error
    return MoltError(error.code, error.message, {**error.details, "request_id": trace})


def parse_request(message: dict[str, Any], max_name_chars: int = DEFAULT_MAX_NAME_CHARS) -> Request:
    """Check a request's envelope; the RequestError raised carries the id when it is known.
    Sizes are checked before anything is formatted, and messages show values by echo()."""
    req_id = request_id(message, max_name_chars)
    if req_id is None:
        got = message.get("id")
        raise RequestError(
            None,
            ErrorCode.BAD_REQUEST,
            f"request 'id' must be an integer or a string{_at_most(got, max_name_chars)},"
            f" got {describe(got)}",
        )
    op = message.get("op")
    if not isinstance(op, str) or len(op) > max_name_chars:
        raise RequestError(
            req_id,
            ErrorCode.BAD_REQUEST,
            f"'op' must be a string{_at_most(op, max_name_chars)}, got {describe(op)}",
        )
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise RequestError(
            req_id, ErrorCode.BAD_REQUEST, f"'params' must be a map, got {describe(params)}"
        )
    return Request(req_id, op, params)


def _at_most(value: Any, chars: int) -> str:
    """The length limit, for a message about a string that is too long."""
    return f" of at most {chars} characters" if isinstance(value, str) else ""


def request(req_id: RequestId, op: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": req_id, "op": op, "params": params or {}}


def ok_response(req_id: RequestId | None, result: Any) -> dict[str, Any]:
    return {"id": req_id, "ok": True, "result": result}


def error_response(req_id: RequestId | None, error: MoltError) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": error.to_wire()}


def response_result(message: dict[str, Any]) -> Any:
    """The result of a response message, or its error raised as a MoltError."""
    if message.get("ok") is True:
        return message.get("result")
    raise MoltError.from_wire(message.get("error"))


class _Echo(reprlib.Repr):
    """A repr that cannot recurse past a few levels, never copies a long string or bytes
    whole, and never sorts a map (reprlib's default would, costing O(n log n))."""

    def __init__(self, chars: int) -> None:
        super().__init__()
        self.maxlevel = 3 if chars <= ECHO_CHARS else 6
        self.maxstring = self.maxother = chars
        self.maxlist = self.maxtuple = self.maxset = self.maxdict = max(4, chars // 40)

    def repr_bytes(self, value: bytes, level: int) -> str:
        return f"<{len(value)} bytes>"

    def repr_dict(self, value: dict, level: int) -> str:
        if not value:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [
            f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
            for k, v in itertools.islice(value.items(), self.maxdict)
        ]
        more = ", ..." if len(value) > self.maxdict else ""
        return "{" + ", ".join(items) + more + "}"

    def repr_instance(self, value: Any, level: int) -> str:
        if isinstance(value, int | float | complex | type(None)):
            return builtins.repr(value)
        return f"<{type(value).__name__}>"  # an object's repr could be anything


@functools.lru_cache(maxsize=8)
def _echo_for(chars: int) -> _Echo:
    return _Echo(chars)


def echo(value: Any, chars: int = ECHO_CHARS) -> str:
    """What a message or a log line may show of a value from a client: a repr of at
    most `chars` characters, in time bounded by `chars` (never a RecursionError)."""
    text = _echo_for(chars).repr(value)
    return text if len(text) <= chars else f"{text[: chars - 3]}..."


def clip(text: str, chars: int, keep_end: bool = False) -> str:
    """`text` cut to `chars` characters and a note of how many were cut; `keep_end`
    keeps its end (a traceback's last lines say what failed)."""
    if len(text) <= chars:
        return text
    cut = len(text) - chars
    return (
        f"({cut} characters cut) ...{text[-chars:]}"
        if keep_end
        else f"{text[:chars]}... ({cut} characters cut)"
    )


def describe(value: Any) -> str:
    """A value's type and echo, for "expected X, got Y" messages."""
    if value is None:
        return "nothing"
    unit = _UNITS.get(type(value))
    if unit and len(value) > ECHO_CHARS:
        return f"{type(value).__name__} of {len(value)} {unit} {echo(value)}"
    return f"{type(value).__name__} {echo(value)}"


_UNITS = {str: "characters", list: "items", dict: "entries"}


# --- values: tensors and the non-tensor outputs onnxruntime can return ---------------

# Wire dtype names are numpy's; the byte order on the wire is always little-endian.
WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
STRING_DTYPE = "string"
VIEW_BYTES = 64 << 10  # below this, a copy costs less than making a view
# numpy 2 takes 2 us for dtype.name, more than the rest of encoding a small tensor
_WIRE_NAMES = {np.dtype(name): name for name in WIRE_DTYPES}


def encode_tensor(array: np.ndarray, view: bool = False) -> dict[str, Any]:
    """A tensor map; with `view`, the data of an array of VIEW_BYTES or more is a view of
    its memory, not a copy: for a caller that packs it before the array can change."""
    if array.dtype.kind in "OUS":
        return {
            "dtype": STRING_DTYPE,
            "shape": list(array.shape),
            "data": [s.decode() if isinstance(s, bytes) else str(s) for s in array.ravel()],
        }
    name = _WIRE_NAMES.get(array.dtype) or array.dtype.name  # by name: a big-endian float32
    if name not in WIRE_DTYPES:
        raise MoltError(ErrorCode.INVALID_INPUT, f"dtype {name} cannot be sent on the wire")
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[name])
    if not view or data.nbytes < VIEW_BYTES:
        return {"dtype": name, "shape": list(array.shape), "data": data.tobytes()}
    return {"dtype": name, "shape": list(array.shape),
            "data": memoryview(data.reshape(-1).view(np.uint8))}  # fmt: skip


def join_tensors(tensors: list[dict[str, Any]]) -> np.ndarray:
    """Checked numeric tensor maps with one dtype and the same dimensions after the first,
    as one array along the first: their bytes joined, not decoded one by one."""
    first = tensors[0]
    rows = sum(t["shape"][0] for t in tensors)
    data = b"".join(t["data"] for t in tensors)
    return np.frombuffer(data, dtype=WIRE_DTYPES[first["dtype"]]).reshape(rows, *first["shape"][1:])


def split_tensor(array: np.ndarray, rows: list[int]) -> list[dict[str, Any]]:
    """The inverse of join_tensors: a tensor map for each run of `rows` along the first
    dimension, cut from one encoding of the whole array."""
    whole = encode_tensor(array, view=True)  # the parts are packed at once
    data, rest = whole["data"], whole["shape"][1:]
    size = len(data) // len(array) if len(array) else 0
    parts, start = [], 0
    for count in rows:
        piece = data[start * size : (start + count) * size]
        parts.append({"dtype": whole["dtype"], "shape": [count, *rest], "data": piece})
        start += count
    return parts


def decode_tensor(obj: dict[str, Any]) -> np.ndarray:
    """Wrap a checked tensor map as an array (no copy for numeric data)."""
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype == STRING_DTYPE:
        return np.array(data, dtype=object).reshape(shape)
    return np.frombuffer(data, dtype=WIRE_DTYPES[dtype]).reshape(shape)


def encode_value(value: Any) -> Any:
    """An output value as it travels: tensors as tensor maps, sequences and maps tagged."""
    if isinstance(value, np.ndarray):
        return encode_tensor(value)
    if isinstance(value, list | tuple):
        return {"sequence": [encode_value(v) for v in value]}
    if isinstance(value, dict):
        return {"map": {_plain(k): encode_value(v) for k, v in value.items()}}
    return _plain(value)


def decode_value(obj: Any) -> Any:
    """The inverse of encode_value: arrays, lists and dicts of plain scalars."""
    if isinstance(obj, dict):
        if "dtype" in obj:
            return decode_tensor(obj)
        if "sequence" in obj:
            return [decode_value(v) for v in obj["sequence"]]
        if "map" in obj:
            return {k: decode_value(v) for k, v in obj["map"].items()}
    return obj


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
