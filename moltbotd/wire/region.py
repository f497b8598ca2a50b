"""A direct channel's shared region: the worker's table of running requests, then the
client's large inputs, and the worker's large outputs when the client asks for them.

The region's first page is a table the worker writes (a request's id when its batch
starts, zero when it is answered) and the client reads only when the channel ends with
requests unanswered. A request the table does not name never ran, or ran to its end:
the client sends it again through moltbotd's socket, as moltbotd runs its own requests
that a dead worker never started on the next one. A request it names was running when
the worker died and fails, as moltbotd's do.

After the table, a tensor of SHARE_BYTES or more travels as its bytes in the region and
`{"dtype", "shape", "shm": [offset, size]}` in the frame: a copy in and a copy out instead
of packing, two socket copies and unpacking. The client writes its inputs there; a request
whose `reply_shm` names part of the region gets its large outputs written there by the
worker (the client reads them before it sends its next request on the channel).
"""

import mmap
import struct
from typing import Any

HEADER_BYTES = 4096  # the table's page
_WORD = struct.Struct("<Q")
# word 0 counts running requests the table could not name (an id that is not a positive
# 64-bit integer, or no free slot): while it is not zero, the client cannot tell which ran
SLOTS = HEADER_BYTES // _WORD.size - 1
SHARE_BYTES = 64 << 10  # tensors this large go through the region
SHARE_ALIGN = 64  # each starts on a cache line


def nameable(req_id: object) -> bool:
    return type(req_id) is int and 0 < req_id < 1 << 64


def name(table: memoryview, slot: int, req_id: int) -> None:
    """Write `req_id` (0: none) into `slot`."""
    _WORD.pack_into(table, (slot + 1) * _WORD.size, req_id)


def count_unnamed(table: memoryview, change: int) -> None:
    _WORD.pack_into(table, 0, _WORD.unpack_from(table, 0)[0] + change)


def running(table: mmap.mmap | memoryview | bytes) -> set[int] | None:
    """The ids the table names, or None when it cannot tell (some went unnamed)."""
    if len(table) < HEADER_BYTES:
        return None
    words = struct.unpack_from(f"<{SLOTS + 1}Q", table, 0)
    return None if words[0] else {word for word in words[1:] if word}


def shareable(tensor: Any) -> int:
    """The bytes of a tensor map that can go into a region as they are, or 0 (the rest
    travels as given)."""
    if not isinstance(tensor, dict) or tensor.keys() != {"dtype", "shape", "data"}:
        return 0
    data = tensor["data"]
    if isinstance(data, memoryview) and data.format == "B" and data.c_contiguous:
        return data.nbytes
    return len(data) if isinstance(data, bytes) else 0


def put(buffer: mmap.mmap | memoryview, tensors: dict[str, Any], start: int,
        end: int) -> dict[str, Any]:  # fmt: skip
    """The tensor maps with each large one copied into buffer[start:end], while there is
    room, and replaced by its "shm" reference."""
    placed, offset = dict(tensors), start
    for name, tensor in tensors.items():
        size = shareable(tensor)
        if SHARE_BYTES <= size <= end - offset:
            buffer[offset : offset + size] = tensor["data"]
            placed[name] = {"dtype": tensor["dtype"], "shape": tensor["shape"],
                            "shm": [offset, size]}  # fmt: skip
            offset += -(-size // SHARE_ALIGN) * SHARE_ALIGN
    return placed


def area(where: Any, size: int) -> tuple[int, int] | None:
    """[offset, size] as (start, end) if it lies within a region of `size` bytes after
    the table; None if it does not."""
    if not (isinstance(where, list) and len(where) == 2):
        return None
    if not all(type(n) is int and n >= 0 for n in where):
        return None
    start, end = where[0], where[0] + where[1]
    return (start, end) if start >= HEADER_BYTES and end <= size else None
