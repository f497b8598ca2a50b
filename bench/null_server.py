"""A server that speaks just enough of the Open Inference Protocol to answer tritonclient
at once with a canned answer of tiny's shape (y float32 [1, 4]), over HTTP (an asyncio
protocol on uvloop) and gRPC (grpc.aio, the answer serialized once): what tritonclient
reaches on this machine when the server does no work, for bench/oip.py's ceiling line.

Argument: JSON {"http": PORT, "grpc": PORT}. Serves until killed.
"""

import asyncio
import json
import struct
import sys
from typing import Any

import grpc
import uvloop
from tritonclient.grpc import service_pb2

OUTPUT = struct.pack("<4f", 2.0, 4.0, 6.0, 8.0)
HEADER = json.dumps({"model_name": "tiny_batched", "model_version": "v1", "outputs": [
    {"name": "y", "datatype": "FP32", "shape": [1, 4],
     "parameters": {"binary_data_size": len(OUTPUT)}}]}).encode()  # fmt: skip
INFER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
         b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
         % (len(HEADER), len(HEADER) + len(OUTPUT))) + HEADER + OUTPUT  # fmt: skip
EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"  # health, ready


class CannedHttp(asyncio.Protocol):
    """Keep-alive requests, each answered when its body is in; nothing is checked."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            size = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + size:
                return
            self.buffer = self.buffer[end + 4 + size :]
            self.transport.write(INFER if b"/infer " in head else EMPTY)


def canned_rpc() -> grpc.GenericRpcHandler:
    answer = service_pb2.ModelInferResponse(model_name="tiny_batched", model_version="v1")
    answer.outputs.add(name="y", datatype="FP32", shape=[1, 4])
    answer.raw_output_contents.append(OUTPUT)
    ready = service_pb2.ModelReadyResponse(ready=True)
    live = service_pb2.ServerLiveResponse(live=True)
    answers = {"ModelInfer": answer.SerializeToString(), "ModelReady": ready.SerializeToString(),
               "ServerLive": live.SerializeToString()}  # fmt: skip

    class Canned(grpc.GenericRpcHandler):
        def service(self, details: Any) -> grpc.RpcMethodHandler | None:
            found = answers.get(details.method.rsplit("/", 1)[-1])
            if found is None:
                return None

            async def answer(request: bytes, context: Any, found: bytes = found) -> bytes:
                return found  # no (de)serializer given: the bytes go as they are

            return grpc.unary_unary_rpc_method_handler(answer)

    return Canned()


async def serve(ports: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(CannedHttp, "127.0.0.1", ports["http"])
    rpc = grpc.aio.server()
    rpc.add_generic_rpc_handlers((canned_rpc(),))
    rpc.add_insecure_port(f"127.0.0.1:{ports['grpc']}")
    await rpc.start()
    print("null server: serving", flush=True)
    await rpc.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(json.loads(sys.argv[1])))
