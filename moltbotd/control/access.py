"""Who may do what: each client's roles, decided from its credentials as the kernel
reports them for the socket, never from anything it says.

The config's `access:` lists, per role (wire.operations.Role), the users and groups that
have it. Root and the user moltbotd runs as have every role: either could take the
daemon's files anyway. A client's rights are worked out once per connection (the
credentials of a Unix socket are fixed at connect) and again after a reload.
"""

import contextlib
import fnmatch
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from moltbotd.config import AccessSettings, Grant
from moltbotd.logs import get_logger
from moltbotd.wire.operations import Operation, Refusals, Role
from moltbotd.wire.protocol import ErrorCode, MoltError, echo

log = get_logger("access")

# SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups, as at connect. Python's
# socket module does not name it; 59 is its number on every architecture Debian builds
# moltbot for.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GROUPS_FIRST_TRY = 64  # most users have a few; ERANGE means ask again with room for all
NGROUPS_MAX = 65536
_SHOWN_MODELS = 5  # globs a refusal lists


@dataclass(frozen=True)
class Peer:
    """The client process at the other end of a Unix socket, as the kernel says."""

    pid: int = -1
    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()  # supplementary, besides gid

    @classmethod
    def of(cls, sock: socket.socket | None) -> "Peer":
        if sock is None:
            return cls()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return cls(*struct.unpack("3i", creds), _peer_groups(sock))

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid}"

    def identity(self) -> dict[str, Any]:
        """The peer for an audit record: its ids and its executable, read now, while it
        waits for its answer (None where it cannot be read: hidden by ProtectProc); its
        user's name is added by the audit thread (a name service may be slow)."""
        exe = None
        with contextlib.suppress(OSError):
            exe = os.readlink(f"/proc/{self.pid}/exe")
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid,
                "groups": list(self.groups), "user": None, "exe": exe}  # fmt: skip


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    for room in (_GROUPS_FIRST_TRY, NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * room)
        except OSError:  # ERANGE: more groups than room; other errors: an older kernel
            continue
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return ()


@dataclass
class Rights(Refusals):
    """What one connection's client may do: its roles, and the models its infer grants
    cover; and the operations it was refused (the audit records the first of each)."""

    who: str  # for messages: "uid 1000"
    roles: frozenset[Role]
    models: tuple[str, ...] | None  # infer's globs; None: every model
    how: dict[Role, str]  # how to get each role (which groups have it)
    refused: set[str] = field(default_factory=set)

    def check(self, op: Operation, params: dict[str, Any]) -> None:
        """Raise PERMISSION_DENIED unless this client may run op with these parameters."""
        role = op.role
        if role is None:
            return
        if role not in self.roles:
            raise MoltError(
                ErrorCode.PERMISSION_DENIED,
                f"{self.who} may not use '{op.name}': it needs the role '{role}', {self.how[role]}",
                {"role": str(role), "roles": sorted(self.roles)},
            )
        model = params.get("model")
        if role is Role.INFER and not self._covers(model):
            shown = ", ".join(self.models[:_SHOWN_MODELS] if self.models else ())
            raise MoltError(
                ErrorCode.PERMISSION_DENIED,
                f"{self.who} may {role} only on models matching {shown} (access.{role}),"
                f" not {echo(model)}",
                {"role": str(role), "models": list(self.models or ())},
            )

    def _covers(self, model: Any) -> bool:
        """Whether the infer grants cover a model (a name of the wrong type is left to the
        parameter check, which names what was expected)."""
        if self.models is None or not isinstance(model, str):
            return True
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


class Access:
    """The `access:` settings with names resolved to ids (at start and at each reload)."""

    def __init__(self, settings: AccessSettings, own_uid: int | None = None) -> None:
        self.own_uid = os.getuid() if own_uid is None else own_uid
        self.grants = {role: getattr(settings, role.value) for role in Role}
        unknown: dict[str, list[str]] = {}  # a name this host lacks -> the roles naming it
        self.resolved = {role: [(self._resolve(g, role, unknown), g) for g in grants]
                         for role, grants in self.grants.items()}  # fmt: skip
        for who, roles in unknown.items():
            kind, _, name = who.partition(":")
            log.warning("access: there is no {kind} {name} here; {roles} grant it nothing",
                        kind=kind, name=name, roles=", ".join(roles))  # fmt: skip
        self.how = {role: _how(role, grants) for role, grants in self.grants.items()}

    @staticmethod
    def _resolve(grant: Grant, role: Role, unknown: dict[str, list[str]]) -> tuple[str, int | None]:
        """('user', uid), ('group', gid), ('everyone', None); an id of None for a name
        this host does not know: it grants nothing (noted in unknown, to be logged)."""
        if grant.who == "everyone":
            return "everyone", None
        kind, _, name = grant.who.partition(":")
        if name.isdigit():
            return kind, int(name)
        try:
            return kind, pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
        except KeyError:
            unknown.setdefault(grant.who, []).append(f"access.{role}")
            return kind, None

    def rights(self, peer: Peer) -> Rights:
        who = f"uid {peer.uid}"
        if peer.uid in (0, self.own_uid):
            return Rights(who, frozenset(Role), None, self.how)
        groups = {peer.gid, *peer.groups}
        roles: set[Role] = set()
        models: list[str] | None = []
        for role, entries in self.resolved.items():
            for (kind, ident), grant in entries:
                if (
                    kind == "everyone"
                    or (kind == "user" and ident == peer.uid)
                    or (kind == "group" and ident in groups)
                ):
                    roles.add(role)
                    if role is Role.INFER and models is not None:
                        models = None if grant.models is None else models + list(grant.models)
        return Rights(who, frozenset(roles), None if models is None else tuple(models), self.how)


def _how(role: Role, grants: tuple[Grant, ...]) -> str:
    """How a user gets a role, for a refusal."""
    groups = [g.who.partition(":")[2] for g in grants if g.who.startswith("group:")]
    if groups:
        named = [g for g in groups if not g.isdigit()]
        how = (
            f" (add the user with: sudo adduser USER {named[0]}, then log in again)"
            if named
            else ""
        )
        return f"which access.{role} gives to group {' or '.join(groups)}{how}"
    if grants:
        return f"which access.{role} gives only to {', '.join(g.who for g in grants)}"
    return f"which access.{role} gives to no one but root"
