"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService; messages in
oip.proto), on grpc.aio in the daemon's event loop, with the HTTP listener's TLS and
tokens."""

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from moltbotd import __version__
from moltbotd.config import NetworkSettings
from moltbotd.logs import get_logger
from moltbotd.network import oip_pb2 as pb
from moltbotd.network.gateway import Gateway, NetPeer, call, health, ready_or_not
from moltbotd.network.rest import EXTENSIONS
from moltbotd.network.tls import read_pem
from moltbotd.network.tokens import TokenRights, Tokens, Unauthenticated
from moltbotd.wire import oip
from moltbotd.wire.protocol import MoltError

log = get_logger("network")

SERVICE = "inference.GRPCInferenceService"
INTERNAL = "INTERNAL: internal error in moltbotd; the daemon log has the details"
# datatype -> the InferTensorContents field holding its values (FP16: raw only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

Context = grpc.aio.ServicerContext


class GrpcListener:
    def __init__(self, gateway: Gateway, settings: NetworkSettings, tokens: Tokens,
                 tls: ssl.SSLContext | None, max_message: int) -> None:  # fmt: skip
        self.gateway = gateway
        self.settings = settings
        self.tokens = tokens
        self.secure = tls is not None
        self.transport = "grpcs" if tls else "grpc"
        self.max_message = max_message
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, where: tuple[str, int]) -> None:
        """Listen at (host, port); OSError when the port cannot be had."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=self.settings.max_streams,
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        host, port = where
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = (server.add_secure_port(address, self._credentials()) if self.secure
                     else server.add_insecure_port(address))  # fmt: skip
        except RuntimeError as exc:  # grpc says only "Failed to bind"
            raise OSError(f"cannot bind {address}: {exc}") from None
        await server.start()
        self._server, self.port = server, bound
        shown = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log.info("Open Inference Protocol over gRPC at {address}", address=shown)

    def _credentials(self) -> grpc.ServerCredentials:
        s = self.settings
        ca = read_pem(s.tls_client_ca, "tls_client_ca")
        return grpc.ssl_server_credentials(
            [(read_pem(s.tls_key, "tls_key"), read_pem(s.tls_cert, "tls_cert"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    async def stop(self, grace: float) -> None:
        """Refuse new calls, give those running `grace` seconds, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace)

    def _handlers(self) -> grpc.GenericRpcHandler:
        calls: dict[str, tuple[Callable[..., Awaitable[Any]], Any, Any]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (
                self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": (
                self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        }  # fmt: skip
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._guarded(method),
                    request_deserializer=request.FromString,
                    response_serializer=response.SerializeToString,
                )
                for name, (method, request, response) in calls.items()
            },
        )

    def _guarded(self, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """The call, with moltbotd's errors as gRPC statuses."""

        async def guarded(request: Any, context: Context) -> Any:
            try:
                return await method(request, context, self._peer(context))
            except Unauthenticated as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            except MoltError as exc:
                code = oip.STATUS.get(exc.code, (500, "INTERNAL"))[1]
                await context.abort(grpc.StatusCode[code], f"{exc.code.value}: {exc.message}")
            except Exception:  # a bug: said as the socket says it, and logged
                log.exception("internal error in a gRPC call", call=method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL)

        return guarded

    def _peer(self, context: Context) -> NetPeer:
        address = context.peer()  # "ipv4:10.0.0.5:40112"
        return NetPeer(self.transport, address.partition(":")[2] or address)

    def _rights(self, context: Context) -> TokenRights:
        metadata = dict(context.invocation_metadata() or ())
        return self.tokens.rights(metadata.get("authorization"), set())

    # --- the calls ---------------------------------------------------------------------

    async def server_live(self, _: Any, __: Context, ___: NetPeer) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, _: Any, __: Context, peer: NetPeer) -> Any:
        found = await health(self.gateway, peer)
        return pb.ServerReadyResponse(ready=found["status"] == "ok")

    async def server_metadata(self, _: Any, __: Context, ___: NetPeer) -> Any:
        return pb.ServerMetadataResponse(
            name="moltbotd", version=__version__, extensions=EXTENSIONS
        )

    async def model_ready(self, request: Any, context: Context, peer: NetPeer) -> Any:
        ready = await ready_or_not(self._metadata(request, context, peer))
        return pb.ModelReadyResponse(ready=ready)

    async def model_metadata(self, request: Any, context: Context, peer: NetPeer) -> Any:
        found = oip.model_metadata(await self._metadata(request, context, peer))
        tensors = {
            kind: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in found[kind]]
            for kind in ("inputs", "outputs")
        }
        return pb.ModelMetadataResponse(
            name=found["name"], versions=found["versions"], platform=found["platform"], **tensors
        )

    async def _metadata(self, request: Any, context: Context, peer: NetPeer) -> dict[str, Any]:
        params = {"model": request.name, "version": request.version or None}
        return await call(self.gateway, "metadata", params, self._rights(context), peer)  # type: ignore[no-any-return]

    async def model_infer(self, request: Any, context: Context, peer: NetPeer) -> Any:
        rights = self._rights(context)
        params = infer_params(request)
        result = await call(self.gateway, "infer", params, rights, peer)
        return infer_response(result, request.id)


def infer_params(request: Any) -> dict[str, Any]:
    """A ModelInferRequest as the infer operation's parameters."""
    if not request.inputs:
        raise oip.invalid("the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise oip.invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs:"
            " give one for each input, in order, or none"
        )
    tensors = {}
    for index, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        dtype = oip.wire_dtype(where, tensor.datatype)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise oip.invalid(f"{where}: 'shape' must be sizes >= 0, got {shape}")
        if raw:
            tensors[tensor.name] = oip.from_raw(where, dtype, shape, raw[index])
        else:
            tensors[tensor.name] = oip.from_json(where, dtype, shape, _values(where, tensor))
    outputs = [o.name for o in request.outputs]
    return oip.infer_params(request.model_name, request.model_version, tensors, request.id,
                            outputs)  # fmt: skip


def _values(where: str, tensor: Any) -> list[Any]:
    """An input's typed contents, as the JSON form's flat list."""
    field = CONTENTS.get(tensor.datatype)
    if field is None:
        raise oip.invalid(f"{where}: {tensor.datatype} data must come in raw_input_contents")
    values = list(getattr(tensor.contents, field))
    if tensor.datatype != "BYTES":
        return values
    try:
        return [v.decode() for v in values]
    except UnicodeDecodeError:
        raise oip.invalid(f"{where}: a BYTES element is not UTF-8 text") from None


def infer_response(result: dict[str, Any], request_id: str) -> Any:
    """An infer result as a ModelInferResponse, every output's data raw."""
    outputs = oip.outputs_of(result)
    return pb.ModelInferResponse(
        model_name=result["model"],
        model_version=result["version"],
        id=request_id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=name, datatype=oip.OIP_NAMES[t["dtype"]], shape=t["shape"]
            )
            for name, t in outputs
        ],
        raw_output_contents=[oip.raw_of(t) for _, t in outputs],
    )
