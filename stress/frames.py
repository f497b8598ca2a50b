"""Malformed and mutated frames for the fuzzer, each case built from its own seed.

A case is the bytes one connection sends, cut into the writes it sends them in, and how
many answers the daemon owes for them (None when the bytes are not a clean sequence of
frames: random bytes, an oversized header). Case i of seed s is always the same bytes,
so a finding is replayed with `python -m stress.fuzz --seed s --case i`.
"""

import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from moltbotd.wire.operations import OPERATIONS, Param

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 << 20  # the daemon's default max_frame_bytes (docs/protocol.md)


@dataclass(frozen=True)
class Raw:
    """Bytes spliced into a packed message as they are: nesting deeper than msgpack's
    packer allows, or a str that is not UTF-8."""

    data: bytes


@dataclass
class Case:
    kind: str
    writes: list[bytes]
    frames: int | None  # answers owed; None: not a clean frame sequence
    abort: bool = False  # close without reading: a connection lost mid-frame


def pack(obj: Any) -> bytes:
    if isinstance(obj, Raw):
        return obj.data
    if isinstance(obj, dict):
        return _header(len(obj), 0x80, 0xDE) + b"".join(pack(k) + pack(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return _header(len(obj), 0x90, 0xDC) + b"".join(pack(v) for v in obj)
    return msgpack.packb(obj, use_bin_type=True)


def _header(n: int, fix: int, wide: int) -> bytes:
    """A map (fix 0x80, 0xde) or array (0x90, 0xdc) header for n entries."""
    if n < 16:
        return bytes([fix | n])
    return (
        bytes([wide]) + struct.pack(">H", n)
        if n < 1 << 16
        else bytes([wide + 1]) + struct.pack(">I", n)
    )


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


# --- values ---------------------------------------------------------------------------------

HUGE_STRING = "A" * (1 << 20)
STRINGS = [
    "", "..", "../..", "../../etc/passwd", "/", "/etc/passwd", "/dev/zero", "a\x00b", "\x00",
    "x" * 300, "a/" + "b" * 300 + "/c", "../" * 50, "demo/../demo", "demo/", ".", " ",
    "%s%n%x", "\u202e", "é" * 100, "v1.0\n", ".incoming", "model.onnx/..",
]  # fmt: skip
NUMBERS = [0, -1, 1, -(2**63), 2**63 - 1, 2**64 - 1, 2**31, 0.5, -0.0, math.nan, math.inf,
           -math.inf, 1e308, -1e-308]  # fmt: skip
OTHERS = [None, True, False, b"", b"\x00" * 16, [], [1, "a"], {}, {"a": 1}, {1: 2}, {b"k": 1},
          {None: None}, Raw(b"\xa2\xff\xfe"), Raw(b"\xc1"), Raw(b"\xd4\x01\x02")]  # fmt: skip


def deep(rng: random.Random) -> Raw:
    """Nested arrays or maps, about 1,000 levels (or more)."""
    depth = rng.choice([100, 600, 1000, 1025, 5000])
    step = b"\x91" if rng.random() < 0.5 else b"\x81\xa1k"
    return Raw(step * depth + b"\x01")


def weird(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.02:
        return HUGE_STRING
    if roll < 0.06:
        return deep(rng)
    return rng.choice([*STRINGS, *NUMBERS, *OTHERS])


# --- tensors and inputs --------------------------------------------------------------------

DTYPES = ["float32", "float64", "int64", "int32", "bool", "string", "uint8", "float16",
          "complex64", "object", "", "<f4", "float32\x00", "V8", "U4", "O"]  # fmt: skip
SHAPES = [[1, 4], [2, 4], [], [0, 4], [4], [-1, 4], [1, -4], [2**62, 4], [2**31, 2**31],
          [1] * 40, [1.5, 4], [None], [2**64 - 1], "1,4", [[1], [4]], [1, 4, 1]]  # fmt: skip
MODELS = {"demo": ("x",), "iris": ("x",), "multi": ("a", "b")}


def tensor(rng: random.Random) -> dict[str, Any]:
    dtype = rng.choice(DTYPES) if rng.random() < 0.5 else "float32"
    shape = rng.choice(SHAPES) if rng.random() < 0.6 else [1, 4]
    lengths = [0, 1, 15, 16, 17, 32, 64, 4096]
    data: Any = bytes(rng.choice(lengths)) if rng.random() < 0.7 else weird(rng)
    if dtype == "string" and rng.random() < 0.5:
        data = rng.choice([["a"] * 4, [1, 2], "abcd", [None] * 4])
    value: dict[Any, Any] = {"dtype": dtype, "shape": shape, "data": data}
    if rng.random() < 0.1:
        value["shm"] = rng.choice([[0, 16], [-1, 16], [2**63, 1], "x"])
    if rng.random() < 0.1:
        del value[rng.choice(["dtype", "shape", "data"])]
    return value


def nested(rng: random.Random) -> Any:
    """Inputs as plain lists: ragged, of strings, of None, too deep, scalars."""
    return rng.choice([
        [[1, 2, 3, 4]], [[1, 2], [3]], [["a", "b", "c", "d"]], [[None] * 4], [[True] * 4],
        [[1e400, -1e400, math.nan, 0]], 7, "x", [], [[]], [[2**64 - 1] * 4], [[[[1]]]],
        deep(rng), [[1, 2, 3, 4]] * 5000,
    ])  # fmt: skip


def inputs(rng: random.Random, model: str) -> Any:
    names = list(MODELS.get(model, ("x",)))
    if rng.random() < 0.2:
        names.append(rng.choice(["y", "", "x" * 300, "a\x00"]))
    if rng.random() < 0.1 and names:
        names.pop(0)
    feeds: dict[Any, Any] = {n: tensor(rng) if rng.random() < 0.6 else nested(rng) for n in names}
    if rng.random() < 0.05:
        feeds[rng.choice([1, b"x", None])] = [[1, 2, 3, 4]]
    return feeds if rng.random() < 0.95 else weird(rng)


# --- requests -------------------------------------------------------------------------------

VALID: dict[str, list[Any]] = {
    "model": ["demo", "iris", "multi"], "version": ["v1.0", "v2.0", "v1", "v9"],
    "protocol": [1, 2], "client": ["fuzz"], "instances": [0, 1, 2], "force": [True, False],
    "canary": [0.3, 0.0, 1.0], "progress": [True, False], "outputs": [["y"], [], ["nope"]],
    "priority": ["high", "normal", "low"], "timeout_ms": [1, 1000, 0, -5],
    "upload": ["tok", "0" * 32], "path": ["model.onnx", "sub/model.onnx"], "offset": [0, 4],
    "data": [b"xx", b""], "files": [{"model.onnx": "00" * 32}, {}], "activate": [False],
    "source": ["fuzz"], "min_level": ["info", "nope"], "max_level": ["error"],
    "since": [0.0, 1.7e9], "until": [1e12], "contains": ["x"], "after": [0], "limit": [10],
}  # fmt: skip


def param_value(rng: random.Random, param: Param, model: str) -> Any:
    roll = rng.random()
    if param.name == "inputs" and roll < 0.7:
        return inputs(rng, model)
    if roll < 0.35 and param.name in VALID:
        return rng.choice(VALID[param.name])
    if roll < 0.55:
        return rng.choice(STRINGS)
    return weird(rng)


def operation_request(rng: random.Random, req_id: Any) -> dict[Any, Any]:
    """An operation from the table with each parameter valid, mutated or left out, and
    sometimes one it does not take."""
    op = rng.choice(list(OPERATIONS.values()))
    model = rng.choice(VALID["model"])
    params: dict[Any, Any] = {}
    for param in op.params:
        if param.required or rng.random() < 0.6:
            params[param.name] = param_value(rng, param, model)
    if "model" in params and rng.random() < 0.7:
        params["model"] = model  # mostly a served model, so the mutations reach deeper
    if rng.random() < 0.1:
        params[rng.choice(["bogus", "", 1, None, "x" * 300])] = weird(rng)
    return {"id": req_id, "op": op.name, "params": params}


def envelope_request(rng: random.Random, req_id: Any) -> dict[Any, Any]:
    """A request whose id, op or params are of the wrong kind or missing."""
    message: dict[Any, Any] = {"id": req_id, "op": rng.choice(list(OPERATIONS)), "params": {}}
    key = rng.choice(["id", "op", "params", "extra"])
    if rng.random() < 0.3:
        message.pop(key, None)
    else:
        message[key] = (
            weird(rng)
            if key != "op" or rng.random() < 0.5
            else rng.choice(["", "__class__", "Infer", "infer ", "hello\x00", "x" * 300, "_call"])
        )
    return message


def message_body(rng: random.Random, req_id: int) -> tuple[str, bytes]:
    """One frame body: a request (mutated operation or envelope), or not a request."""
    roll = rng.random()
    if roll < 0.6:
        return "operation", pack(operation_request(rng, req_id))
    if roll < 0.8:
        return "envelope", pack(envelope_request(rng, req_id))
    if roll < 0.9:
        return "not a map", pack(weird(rng))
    return "bad msgpack", rng.randbytes(rng.randrange(1, 64))


# --- cases ----------------------------------------------------------------------------------


def framed(rng: random.Random) -> Case:
    """1 frame, or several in one write (pipelined)."""
    count = 1 if rng.random() < 0.8 else rng.randrange(2, 20)
    kinds, data = [], b""
    for i in range(count):
        kind, body = message_body(rng, i + 1)
        kinds.append(kind)
        data += frame(body)
    label = kinds[0] if count == 1 else f"burst of {count}"
    return Case(label, [data], count)


def random_bytes(rng: random.Random) -> Case:
    return Case("random bytes", [rng.randbytes(rng.randrange(0, 300))], None)


def oversized(rng: random.Random) -> Case:
    """A header over the limit: FRAME_TOO_LARGE, then the daemon closes."""
    size = rng.choice([MAX_FRAME_BYTES + 1, 2**31, 2**32 - 1])
    return Case("oversized header", [HEADER.pack(size) + rng.randbytes(rng.randrange(0, 64))], None)


def truncated(rng: random.Random) -> Case:
    """A header promising more than comes before the client half-closes: no answer owed."""
    _, body = message_body(rng, 1)
    claimed = rng.choice([len(body) + 1, len(body) * 2 + 8, MAX_FRAME_BYTES])
    return Case("truncated frame", [HEADER.pack(claimed) + body], 0)


GENERATORS: list[tuple[float, Callable[[random.Random], Case]]] = [
    (0.75, framed),
    (0.1, random_bytes),
    (0.05, oversized),
    (0.1, truncated),
]


def split(rng: random.Random, case: Case) -> Case:
    """Cut the bytes at random points (separate writes), or cut the connection mid-way."""
    data = b"".join(case.writes)
    roll = rng.random()
    if roll < 0.25 and len(data) > 1:
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 6))))
        case.writes = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    elif roll < 0.3 and len(data) > 1:
        case.writes, case.abort = [data[: rng.randrange(1, len(data))]], True
        case.kind += ", closed mid-way"
    return case


def make_case(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    generate = rng.choices([g for _, g in GENERATORS], [w for w, _ in GENERATORS])[0]
    return split(rng, generate(rng))
