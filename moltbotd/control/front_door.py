"""The network listeners (network/): opened after the Unix socket, closed before it at
shutdown, so that a load balancer sees the port go away first and sends new requests
elsewhere while the requests already here finish."""

import asyncio
import contextlib
import errno
import socket
from collections.abc import Awaitable
from typing import Any

from moltbotd.config import Config, is_loopback
from moltbotd.logs import get_logger
from moltbotd.network.gateway import Gateway
from moltbotd.network.rest import HttpListener
from moltbotd.network.rpc import GrpcListener
from moltbotd.network.tls import server_context
from moltbotd.network.tokens import Tokens

log = get_logger("network")


class FrontDoorError(Exception):
    """A listener that cannot start, phrased for the operator (the setting, the cause)."""


class FrontDoor:
    def __init__(self, gateway: Gateway, config: Config,
                 activated: dict[str, socket.socket]) -> None:  # fmt: skip
        self.gateway = gateway
        self.config = config
        self.activated = activated
        self.http: HttpListener | None = None
        self.grpc: GrpcListener | None = None

    async def open(self) -> None:
        settings = self.config.network
        given = self.activated.pop("http", None)
        if given is not None and settings.http:
            log.warning("network.http is ignored: systemd passed a socket for it")
        http = given or settings.http
        if http is None and settings.grpc is None:
            return
        tls = server_context(settings)  # TlsError names the setting
        tokens = Tokens(settings.tokens)  # KeyFileError names the file
        if not tokens.required and not settings.tls_client_ca:
            log.warning(
                "network: no token keys and no client CA: any client that reaches the"
                " listener may read and infer (set network.tokens.keys)"
            )
        if given is not None and not settings.tls_cert:
            _refuse_plain(given)
        limit = self.config.max_frame_bytes
        if http is not None:
            self.http = HttpListener(self.gateway, settings, tokens, tls, limit)
            named = "the socket systemd passed" if given else "network.http"
            await _listening(self.http.start(http), named)
        if settings.grpc is not None:
            self.grpc = GrpcListener(self.gateway, settings, tokens, tls, limit)
            await _listening(self.grpc.start(settings.grpc), "network.grpc")

    def close(self) -> None:
        """Accept no more connections."""
        if self.http:
            self.http.close()

    async def drain(self, timeout: float) -> None:
        """Wait (up to timeout) for the requests being answered, on both listeners at
        once; gRPC refuses new calls from the start and cancels those left at the end."""
        waits = [self.grpc.stop(timeout)] if self.grpc else []
        if self.http:
            waits.append(_within(self.http.idle.wait(), timeout))
        await asyncio.gather(*waits)

    async def stop(self) -> None:
        if self.http:
            await self.http.stop()
        if self.grpc:
            await self.grpc.stop(0)


async def _within(wait: Awaitable[Any], timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait, timeout)


async def _listening(start: Awaitable[None], named: str) -> None:
    try:
        await start
    except OSError as exc:
        hint = ""
        if exc.errno in (None, errno.EAFNOSUPPORT, errno.EPERM):  # gRPC's bind names no errno
            hint = f" ({SANDBOXED})"
        raise FrontDoorError(f"cannot listen on {named}: {exc.strerror or exc}{hint}") from None


SANDBOXED = (
    "under systemd, moltbotd.service has no network of its own: add the drop-in"
    " /usr/share/moltbot/systemd/network.conf, or use moltbotd-http.socket (network.md)"
)


def _refuse_plain(given: socket.socket) -> None:
    """The rule network.http's check applies, for a socket systemd passed."""
    host, port = given.getsockname()[:2]
    if not is_loopback(host):
        raise FrontDoorError(
            f"the socket systemd passed for http listens on {host or '*'}:{port}: plain TCP there"
            " would send requests and tokens in the clear; set network.tls_cert and"
            " network.tls_key, or ListenStream=127.0.0.1:PORT (systemctl edit"
            " moltbotd-http.socket)"
        )
