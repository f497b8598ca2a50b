"""moltctl: the command line and the Python client for moltbotd."""

from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.client import AsyncClient, Client, ConnectError, Outputs, ProtocolError

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectError",
    "ErrorCode",
    "MoltError",
    "Outputs",
    "ProtocolError",
]
