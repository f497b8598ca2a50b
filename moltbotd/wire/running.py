"""Which requests a direct channel's worker is running, in the channel's shared region.

The region's first page is a table the worker writes (a request's id when its batch
starts, zero when it is answered) and the client reads only when the channel ends with
requests unanswered. A request the table does not name never ran, or ran to its end:
the client sends it again through moltbotd's socket, as moltbotd runs its own requests
that a dead worker never started on the next one. A request it names was running when
the worker died and fails, as moltbotd's do. The client's inputs go after the table.
"""

import mmap
import struct

HEADER_BYTES = 4096  # the table's page
_WORD = struct.Struct("<Q")
# word 0 counts running requests the table could not name (an id that is not a positive
# 64-bit integer, or no free slot): while it is not zero, the client cannot tell which ran
SLOTS = HEADER_BYTES // _WORD.size - 1


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
