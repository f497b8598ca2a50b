"""Hostile HTTP for the Open Inference Protocol listener: good requests (an infer of demo
with binary data, a chunked one, a health check) mutated by a seeded generator, so a
failing case can be made again. tests/test_http1.py feeds them to the parser alone,
tests/test_network.py to a live daemon.
"""

import json
import random
import struct

HEADER = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 16}}]}).encode()  # fmt: skip
BODY = HEADER + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
INFER = (b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: h\r\nInference-Header-Content-Length: "
         b"%d\r\nContent-Length: %d\r\n\r\n" % (len(HEADER), len(BODY))) + BODY  # fmt: skip
CHUNKED = (b"POST /v2/models/demo/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b'10\r\n{"inputs": [], "\r\n2\r\nx}\r\n0\r\n\r\n')  # fmt: skip
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: h\r\n\r\n"
GOOD = (INFER, CHUNKED, LIVE, INFER + LIVE)
INSERTS = (b"\r\n", b":", b" ", b"0", b"9" * 12, b"\x00", b"\r\n\r\n", b"Content-Length: 1\r\n")


def hostile(seed: int, index: int) -> bytes:
    """Case `index` of `seed`: a good request or two, with one to six bytes flipped,
    pieces inserted or cut out."""
    rng = random.Random(f"{seed}:{index}")
    data = bytearray(rng.choice(GOOD) * rng.randint(1, 2))
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(data))
        choice = rng.random()
        if choice < 0.4:
            data[at] = rng.randrange(256)
        elif choice < 0.7:
            data[at:at] = rng.choice(INSERTS)
        else:
            del data[at : at + rng.randint(1, 8)]
    return bytes(data)


def pieces(seed: int, index: int, data: bytes) -> list[bytes]:
    """The same bytes cut where the seed says, as a client's writes may arrive."""
    rng, found = random.Random(f"{seed}:{index}:cuts"), []
    while data:
        cut = rng.randint(1, len(data))
        found.append(data[:cut])
        data = data[cut:]
    return found
