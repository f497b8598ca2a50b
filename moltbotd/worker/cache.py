"""A model version's result cache: the packed answer of a request whose inputs were seen
before, given without running the model (`cache: {max_bytes, ttl}`, off by default).

It lives in the worker, so both paths (the socket's relay and direct channels) use it
and its bytes count in the version's cgroup; it goes with its worker, so a switch (a new
version: a new worker) starts with an empty one. The key is a BLAKE2b digest of the
request's inputs (names, dtypes, shapes, data) and the outputs it asked for. A request of
a session (its answer depends on the session's state) and one whose outputs go into a
shared region (`reply_shm`) pass it by. Used under the hub's lock: the intake looks up,
a lane stores.
"""

import hashlib
import time
from collections import OrderedDict
from typing import Any

import msgpack

ENTRY_OVERHEAD = 200  # bytes an entry costs besides its answer: key, tuple, map slot


class ResultCache:
    """Answers by input digest, least recently used first, within max_bytes and ttl."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.entries: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()  # answer, due
        self.bytes = 0
        self.hits = 0  # since the last report
        self.misses = 0
        self.configure(settings)

    def configure(self, settings: dict[str, Any]) -> None:
        self.max_bytes, self.ttl = settings["max_bytes"], settings["ttl"]
        self._shrink()

    @property
    def on(self) -> bool:
        return self.max_bytes > 0

    @staticmethod
    def key(inputs: dict[str, Any], outputs: list[str] | None) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(inputs):
            tensor = inputs[name]
            digest.update(msgpack.packb([name, tensor["dtype"], tensor["shape"]]))
            data = tensor["data"]
            digest.update(data if isinstance(data, bytes) else msgpack.packb(data))
        digest.update(msgpack.packb(outputs or []))
        return digest.digest()

    def get(self, key: bytes) -> bytes | None:
        """A live answer for `key`, counted as a hit; None (a miss) otherwise."""
        found = self.entries.get(key)
        if found is None or found[1] <= time.monotonic():
            if found is not None:  # expired
                del self.entries[key]
                self.bytes -= len(found[0]) + ENTRY_OVERHEAD
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: bytes, answer: bytes) -> None:
        size = len(answer) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old[0]) + ENTRY_OVERHEAD
        self.entries[key] = (answer, time.monotonic() + self.ttl)
        self.bytes += size
        self._shrink()

    def report(self) -> dict[str, int]:
        """Hits and misses since the last report, and the bytes held now."""
        counts = {"hits": self.hits, "misses": self.misses, "bytes": self.bytes,
                  "entries": len(self.entries)}  # fmt: skip
        self.hits = self.misses = 0
        return counts

    def _shrink(self) -> None:
        while self.entries and self.bytes > self.max_bytes:
            answer, _ = self.entries.popitem(last=False)[1]
            self.bytes -= len(answer) + ENTRY_OVERHEAD
