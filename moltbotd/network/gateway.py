"""What the network listeners need of the daemon: the Unix socket's own entry point
(control/server.py's begin and respond), so that a request from the network takes the
same operation table, parameter checks, scheduling, metrics and audit as a local one.
"""

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from moltbotd.network.tokens import TokenRights
from moltbotd.wire.protocol import ErrorCode, MoltError

Answer = tuple[Any, "asyncio.Future[Any]", str]


@dataclass(frozen=True)
class NetPeer:
    """A network client, as the logs and the audit name it."""

    transport: str  # "http", "https", "grpc", "grpcs"
    address: str  # "10.0.0.5:40112"
    pid: int = -1  # no process of this host
    uid: int = -1

    def describe(self) -> str:
        return f"{self.transport} {self.address}"

    def identity(self) -> dict[str, Any]:
        return {"transport": self.transport, "address": self.address}


class Gateway(Protocol):
    def begin(self, message: dict[str, Any], peer: Any, rights: Any) -> Answer: ...

    def respond(self, answer: Answer) -> dict[str, Any]: ...


async def call(gateway: Gateway, op: str, params: dict[str, Any], rights: TokenRights,
               peer: NetPeer) -> Any:  # fmt: skip
    """Run one operation as a Unix socket client would; its result, or its MoltError."""
    answer = gateway.begin({"id": 0, "op": op, "params": params}, peer, rights)
    await asyncio.wait((answer[1],))
    response = gateway.respond(answer)
    if "error" in response:
        raise MoltError.from_wire(response["error"])
    result = response["result"]
    if isinstance(result, bytes):  # an infer result, packed by its worker
        return msgpack.unpackb(result, strict_map_key=False)  # a map output may have int keys
    return result


async def ready_or_not(metadata: Awaitable[dict[str, Any]]) -> bool:
    """A model's readiness from the metadata operation: a version not loaded is not
    ready (an unknown model is still an error)."""
    try:
        return bool((await metadata)["ready"])
    except MoltError as exc:
        if exc.code is ErrorCode.VERSION_NOT_LOADED:
            return False
        raise


async def health(gateway: Gateway, peer: NetPeer) -> dict[str, Any]:
    """The health operation, which the protocol's readiness checks ask with no token:
    its answer tells only whether each model is ready."""
    rights = TokenRights("a health check", frozenset({"read"}))
    return await call(gateway, "health", {}, rights, peer)  # type: ignore[no-any-return]
