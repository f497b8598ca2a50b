"""The daemon's relay to a worker, seen from both ends.

moltbotd forwards each socket request to a worker as an ordinary `infer` frame (with
the relay's own id): the worker checks and queues it exactly as a direct channel's, in
its one queue. The answer comes back as a relay frame, not a msgpack map, so the daemon
splices the packed outputs into its client's answer without decoding them:

    length (4 bytes) | relay id (8) | how it ended (1) | packed outputs, or the error's map

Before a batch runs, the worker says which relayed requests it holds are STARTED (one
frame, relay id 0, their ids packed): when a worker dies, moltbotd fails those and sends
the others, which never ran, to the restarted worker.
"""

import enum
import struct

import msgpack

from moltbotd.wire.protocol import HEADER, MoltError

RELAY = struct.Struct(">QB")


class Ending(enum.IntEnum):
    ANSWERED = 0  # the outputs follow
    FAILED = 1  # it was queued, then failed (its run, its deadline): counted as served
    REFUSED = 2  # never queued (a bad input, a full queue): counted by no one
    STARTED = 3  # not an answer: these requests now run


def relay_frame(relay_id: int, outcome: bytes | MoltError, queued: bool) -> bytes:
    """The answer to the relayed request `relay_id`: its packed outputs or its error."""
    if isinstance(outcome, MoltError):
        ending = Ending.FAILED if queued else Ending.REFUSED
        payload = msgpack.packb(outcome.to_wire(), use_bin_type=True)
    else:
        ending, payload = Ending.ANSWERED, outcome
    body = RELAY.pack(relay_id, ending) + payload
    return HEADER.pack(len(body)) + body


def started_frame(relay_ids: list[int]) -> bytes:
    """The relayed requests a batch about to run holds."""
    body = RELAY.pack(0, Ending.STARTED) + msgpack.packb(relay_ids)
    return HEADER.pack(len(body)) + body


Parsed = tuple[int, Ending, bytes | MoltError | list[int]]


def parse_relay(body: memoryview) -> Parsed:
    """A relay frame's body: the relay id, how it ended, the packed outputs, the error or
    (STARTED) the ids now running. Only the worker writes these: a malformed one is a
    bug, and raises."""
    relay_id, code = RELAY.unpack_from(body)
    ending, payload = Ending(code), bytes(body[RELAY.size :])
    if ending is Ending.ANSWERED:
        return relay_id, ending, payload
    if ending is Ending.STARTED:
        return relay_id, ending, msgpack.unpackb(payload)
    return relay_id, ending, MoltError.from_wire(msgpack.unpackb(payload, raw=False))
