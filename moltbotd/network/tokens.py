"""Who a network client is and what it may do: a JWT bearer token, verified with PyJWT,
and the rights its scopes give (the network's counterpart of control/access.py).

Each key file verifies one algorithm, chosen by the key itself (a PEM RSA key: RS256,
an EC P-256 key: ES256, anything else: an HS256 secret), so a token can never pick
the algorithm its key is used with (the 'alg: HS256 with the RSA public key' attack).
Scopes: `read` (health, metadata), `infer:<model glob>`, `admin` (everything).
"""

import fnmatch
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from moltbotd.config import TokenSettings
from moltbotd.wire.operations import Operation, Refusals, Role
from moltbotd.wire.protocol import ErrorCode, MoltError, echo

MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
MAX_TOKEN_CHARS = 8192
ADMIN, READ, INFER = "admin", "read", "infer:"


class Unauthenticated(Exception):
    """No token, or one that does not verify: 401 (UNAUTHENTICATED on gRPC), with why."""


class KeyFileError(Exception):
    """A key file that cannot serve: moltbotd refuses to start, naming it."""


@dataclass(frozen=True)
class Key:
    algorithm: str
    key: Any  # a public key object, or the secret's bytes
    file: Path


def load_key(file: Path) -> Key:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"network.tokens.keys: cannot read {file}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        secret = data.strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyFileError(
                f"network.tokens.keys: {file} holds an HS256 secret of {len(secret)} bytes;"
                f" use {MIN_SECRET_BYTES} or more (e.g. head -c 48 /dev/urandom | base64)"
            )
        return Key("HS256", secret, file)
    try:
        public = load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"network.tokens.keys: {file} is not a PEM public key: {exc}") from None
    if isinstance(public, rsa.RSAPublicKey):
        return Key("RS256", public, file)
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
        return Key("ES256", public, file)
    raise KeyFileError(
        f"network.tokens.keys: {file} is a {type(public).__name__}; RSA (RS256) and"
        " EC P-256 (ES256) public keys are supported"
    )


@dataclass
class TokenRights(Refusals):
    """What a request's token allows; `refused` is its connection's, so that the audit
    records each refused operation once per connection, as on the Unix socket."""

    who: str  # for messages: "token of 'alice'"
    scopes: frozenset[str]
    refused: set[str] = field(default_factory=set)

    def check(self, op: Operation, params: dict[str, Any]) -> None:
        """Raise PERMISSION_DENIED unless a scope covers op (and infer's model)."""
        if op.role is None or ADMIN in self.scopes:
            return
        if op.role is Role.READ and READ in self.scopes:
            return
        model = params.get("model")
        if op.role is Role.INFER and self._covers(model):
            return
        if op.role is Role.INFER:
            needed = f"{INFER}<a glob matching {echo(model)}> for model {echo(model)}"
        else:
            needed = READ if op.role is Role.READ else ADMIN
        raise MoltError(
            ErrorCode.PERMISSION_DENIED,
            f"{self.who} lacks the scope {needed}, which '{op.name}' needs"
            f" (its scopes: {', '.join(sorted(self.scopes)) or 'none'})",
            {"role": str(op.role), "scopes": sorted(self.scopes)},
        )

    def _covers(self, model: Any) -> bool:
        if not isinstance(model, str):
            return True  # the parameter check names the wrong type
        globs = (s[len(INFER) :] for s in self.scopes if s.startswith(INFER))
        return any(fnmatch.fnmatchcase(model, glob) for glob in globs)


ANONYMOUS = frozenset({READ, INFER + "*"})  # no keys configured: any client may read and infer


class Tokens:
    """The configured keys and claims a token must carry."""

    def __init__(self, settings: TokenSettings) -> None:
        self.settings = settings
        self.keys = [load_key(file) for file in settings.keys]

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def rights(self, authorization: str | None, refused: set[str]) -> TokenRights:
        """The rights an Authorization header's value gives; raises Unauthenticated."""
        if not self.keys:
            return TokenRights("an anonymous client", ANONYMOUS, refused)
        claims = self.verify(_bearer(authorization))
        subject = claims.get("sub")
        who = f"the token of {echo(subject)}" if subject else "the token"
        return TokenRights(who, _scopes(claims), refused)

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise Unauthenticated(f"malformed token: {exc}") from None
        algorithm = header.get("alg")
        keys = [k for k in self.keys if k.algorithm == algorithm]
        if not keys:
            taken = ", ".join(sorted({k.algorithm for k in self.keys}))
            raise Unauthenticated(
                f"the token is signed with {echo(algorithm)}; this server's keys verify {taken}"
            )
        problem = "the token's signature does not verify with any key of this server"
        for key in keys:
            try:
                return self._decode(token, key)
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                problem = _why(exc, token, self.settings)
                break
        raise Unauthenticated(problem)

    def _decode(self, token: str, key: Key) -> dict[str, Any]:
        s = self.settings
        return jwt.decode(
            token,
            key.key,
            algorithms=[key.algorithm],
            issuer=s.issuer,
            audience=s.audience,
            leeway=s.leeway,
            options={"require": ["exp"], "verify_aud": s.audience is not None},
        )


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("no token: send the header Authorization: Bearer <JWT>")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            f"expected Authorization: Bearer <JWT>, got the scheme {echo(scheme)}"
        )
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthenticated(f"the token is longer than {MAX_TOKEN_CHARS} characters")
    return token.strip()


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """OAuth's `scope` (space-separated) or `scp` (a list or a string)."""
    found: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)


def _why(exc: Exception, token: str, settings: TokenSettings) -> str:
    """A PyJWT refusal as the reason a client is given."""
    claims = jwt.decode(token, options={"verify_signature": False})
    if isinstance(exc, jwt.ExpiredSignatureError):
        return f"the token expired at {_when(claims.get('exp'))}"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return f"the token is not valid before {_when(claims.get('nbf'))}"
    if isinstance(exc, jwt.InvalidAudienceError):
        return (f"wrong audience: the token is for {echo(claims.get('aud'))}, this server is"
                f" {settings.audience!r}")  # fmt: skip
    if isinstance(exc, jwt.InvalidIssuerError):
        return (f"wrong issuer: the token is from {echo(claims.get('iss'))}, this server takes"
                f" {settings.issuer!r}")  # fmt: skip
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim!r} claim"
    return f"invalid token: {exc}"


def _when(stamp: Any) -> str:
    if not isinstance(stamp, int | float):
        return echo(stamp)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))
