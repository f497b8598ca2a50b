"""TLS for the network listeners: TLS 1.2 or newer, with client certificates when a CA
is configured (mTLS). Problems are reported naming the setting, for a refusal to start."""

import ssl
from pathlib import Path

from moltbotd.config import NetworkSettings


class TlsError(Exception):
    """Certificate or key files that cannot serve."""


def server_context(settings: NetworkSettings) -> ssl.SSLContext | None:
    """The context both listeners use; None when network.tls_cert is not set."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"network.tls_cert {settings.tls_cert} with network.tls_key {settings.tls_key}:"
            f" {_reason(exc)}"
        ) from None
    if settings.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(
                f"network.tls_client_ca {settings.tls_client_ca}: {_reason(exc)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def read_pem(file: Path | None, setting: str) -> bytes | None:
    """A PEM file's bytes, for gRPC's credentials (which take bytes, not paths)."""
    if file is None:
        return None
    try:
        return file.read_bytes()
    except OSError as exc:
        raise TlsError(f"network.{setting} {file}: {exc.strerror}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return getattr(exc, "strerror", None) or str(exc)
