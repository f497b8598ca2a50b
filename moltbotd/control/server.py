"""The Unix socket server: a thin asyncio adapter over the sans-IO protocol.

Each connection decodes frames and starts every request at once; a handler is either a
coroutine (run as its own task) or returns a future (an inference: queued in its model's
pool, no task at all, which is most of the per-request cost saved). Responses go out in
completion order, each tagged with its id. Operations are dispatched from
operations.OPERATIONS only.

No client can exhaust the daemon (config.ClientLimits): connections are counted in total
and per uid, with descriptors kept for the workers; a connection is not read from while
it has max_inflight_per_connection requests open or its client leaves its answers unread,
and is closed when those pass a cap; unfinished frames are bounded in bytes, across
connections, and in time.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import resource
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moltbotd import __version__
from moltbotd.config import ClientLimits, Config
from moltbotd.control.access import Access, Peer, Rights
from moltbotd.control.audit import AuditLog
from moltbotd.control.budgets import LEDGER, Budgets, LedgerError
from moltbotd.control.catalog import Catalog
from moltbotd.control.conversion import Conversions
from moltbotd.control.front_door import FrontDoor, FrontDoorError
from moltbotd.control.metrics import Metrics
from moltbotd.control.metrics_http import MetricsListener
from moltbotd.control.rollout import Progress, Rollout, no_progress
from moltbotd.control.supervisor import Supervisor
from moltbotd.logs import Entry, Ring, get_logger, select
from moltbotd.network.tls import TlsError
from moltbotd.network.tokens import KeyFileError
from moltbotd.scheduler import request_options
from moltbotd.wire.loglines import LEVELS, parse_level
from moltbotd.wire.operations import OPERATIONS, lookup
from moltbotd.wire.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    MoltError,
    RequestError,
    encode_frame,
    error_response,
    ok_response,
    parse_request,
    request_id,
    trace_of,
    traced,
)
from moltbotd.wire.units import format_size

log = get_logger("server")
MAX_AUDIT_RECORDS = 100_000  # one `audit` answer's records: well under max_frame_bytes
SHOWN_SESSIONS, MAX_SHOWN_SESSIONS = 100, 10_000  # sessions one `sessions` answer describes


@dataclass(frozen=True)
class Caller:
    """Who sent a request, and how to tell them how it is going."""

    peer: str
    progress: Progress
    uid: int = -1  # SO_PEERCRED's, for bounds per user; -1: not a socket client
    account: str = ""  # whose budget it spends: "uid 1000", "the token of 'alice'"


Handler = Callable[[dict[str, Any], Caller], Awaitable[Any]]
Emit = Callable[[dict[str, Any]], None]
# a request's id, its outcome to come, and its operation (UNKNOWN: none of the table's)
Answer = tuple[Any, "asyncio.Future[Any]", str]
UNKNOWN = "unknown"


class Handover(dict[str, Any]):
    """A result that travels with a socket: the client's end of a direct channel, sent
    with the response frame (SCM_RIGHTS) and closed here once sent."""

    def __init__(self, result: dict[str, Any], sock: socket.socket) -> None:
        super().__init__(result)
        self.sock = sock


class StartError(Exception):
    """The daemon cannot start serving (the socket is taken, ...); the message says why."""


Reloader = Callable[[], Awaitable[dict[str, Any]]]


def session_handlers(supervisor: Supervisor) -> dict[str, Handler]:
    """The operations on a stateful model's sessions, which its worker answers."""

    async def sessions(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        limit = p.get("limit", SHOWN_SESSIONS)
        if not 0 <= limit <= MAX_SHOWN_SESSIONS:
            raise MoltError(ErrorCode.BAD_REQUEST, f"limit must be from 0 to"
                            f" {MAX_SHOWN_SESSIONS}, got {limit}")  # fmt: skip
        return await supervisor.sessions(p["model"], {"sessions": {"list": limit}})

    def forget(reset: bool) -> Handler:
        """end_session, or reset_session: the session starts over."""

        async def handler(p: dict[str, Any], _: Caller) -> dict[str, Any]:
            order = {"session": p["session"], "reset": reset}
            return await supervisor.sessions(p["model"], {"sessions": order})

        return handler

    return {
        "sessions": sessions,
        "end_session": forget(reset=False),
        "reset_session": forget(reset=True),
    }


def version_handlers(rollout: Rollout) -> dict[str, Handler]:
    """The operations that list versions and add them: deploys and conversions."""
    catalog, conversions = Catalog(rollout.sup), Conversions(rollout)

    async def versions(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return await catalog.versions(p.get("model"))

    async def upload(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return await rollout.sup.uploads.receive(p.get("upload"), p["path"], p["offset"],
                                                 p["data"], p.get("total"))  # fmt: skip

    async def deploy(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        return await rollout.deploy(p["upload"], p["model"], p["version"], p["files"],
                                    p.get("activate", False), p.get("force", False),
                                    p.get("source", ""), c.peer, c.progress)  # fmt: skip

    async def convert(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        return await conversions.convert(p, c.peer, c.progress)

    return {"versions": versions, "upload": upload, "deploy": deploy, "convert": convert}


def make_handlers(rollout: Rollout, ring: Ring, config: Config, reload_config: Reloader,
                  clients: "Clients", metrics: Metrics, audit: AuditLog,
                  budgets: Budgets) -> dict[str, Handler]:  # fmt: skip
    """The daemon's half of every operation in OPERATIONS (the server checks it is complete)."""
    supervisor = rollout.sup

    async def hello(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        wanted = p.get("protocol", PROTOCOL_VERSION)
        log.debug("hello", client=p.get("client", "unnamed"), protocol=wanted)
        if wanted != PROTOCOL_VERSION:
            raise MoltError(
                ErrorCode.UNSUPPORTED_PROTOCOL,
                f"the client speaks protocol {wanted}; moltbotd {__version__} speaks"
                f" {PROTOCOL_VERSION}: use a matching moltctl or client library",
                {"supported": [PROTOCOL_VERSION]},
            )
        return {
            "protocol": PROTOCOL_VERSION,
            "server": f"moltbotd {__version__}",
            "pid": os.getpid(),
            "max_frame_bytes": config.max_frame_bytes,
            "operations": list(OPERATIONS),
        }

    async def health(_: dict[str, Any], __: Caller) -> dict[str, Any]:
        return supervisor.health()

    async def status(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return {
            "server": f"moltbotd {__version__}",
            "pid": os.getpid(),
            "socket": str(config.socket),
            "clients": clients.usage(),
            **supervisor.status(p.get("model")),
        }

    async def models(_: dict[str, Any], __: Caller) -> dict[str, Any]:
        return await supervisor.repository()

    async def metadata(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return supervisor.metadata(p["model"], p.get("version"))

    def infer(p: dict[str, Any], c: Caller) -> Awaitable[Any]:
        priority, timeout = request_options(p)
        return budgets.infer(p, c.account, lambda refused: supervisor.infer(p, priority, timeout,
                                                                            refused))  # fmt: skip

    async def budget_usage(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        if p.get("model"):
            supervisor.model(p["model"])  # MODEL_NOT_FOUND names the models served
        return budgets.report(p.get("model"))

    async def channel(p: dict[str, Any], c: Caller) -> "Handover":
        pool, worker = supervisor.channel(p["model"])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            try:
                worker.attach(theirs, c.uid)
            except BaseException:
                ours.close()
                raise
        log.debug("direct channel", model=pool.spec.model, version=pool.spec.version,
                  pid=worker.pid)  # fmt: skip
        return Handover({"model": pool.spec.model, "version": pool.spec.version,
                         "pid": worker.pid}, ours)  # fmt: skip

    async def channel_ended(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return await supervisor.channel_ended(p["model"], p["pid"])

    async def scale(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        instances = p["instances"]
        if not 0 <= instances <= 64:
            raise MoltError(ErrorCode.BAD_REQUEST, f"instances must be from 1 to 64, or 0 for"
                            f" autoscaling; got {instances}")  # fmt: skip
        return await supervisor.scale(p["model"], instances or None)

    async def switch(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        share = p.get("canary")
        if share is not None and not 0 < share < 1:
            raise MoltError(ErrorCode.BAD_REQUEST, f"canary share must be above 0 and below 1"
                            f" (10% is 0.1), got {share!r}")  # fmt: skip
        return await rollout.switch(p.get("model"), p["version"], p.get("force", False), share,
                                    c.progress)  # fmt: skip

    async def rollback(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        return await rollout.rollback(p.get("model"), c.progress)

    async def promote(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        return await rollout.promote(p.get("model"), c.progress)

    async def reload(_: dict[str, Any], __: Caller) -> dict[str, Any]:
        return await reload_config()

    async def metrics_text(_: dict[str, Any], __: Caller) -> dict[str, Any]:
        return {"text": metrics.render().decode()}

    async def audit_trail(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        limit = p.get("limit", 1000)
        if not 1 <= limit <= MAX_AUDIT_RECORDS:
            raise MoltError(ErrorCode.BAD_REQUEST, f"limit must be from 1 to"
                            f" {MAX_AUDIT_RECORDS}, got {limit}")  # fmt: skip
        records = await audit.query(p.get("since"), p.get("until"), p.get("op"), limit)
        return {"records": records, "file": str(audit.path)}

    logs = LogQueries(ring)

    return {
        "hello": hello,
        "health": health,
        "status": status,
        "models": models,
        "metadata": metadata,
        **session_handlers(supervisor),
        "budgets": budget_usage,
        "infer": infer,
        "channel": channel,
        "channel_ended": channel_ended,
        "scale": scale,
        "switch": switch,
        "rollback": rollback,
        "promote": promote,
        **version_handlers(rollout),
        "reload": reload,
        "metrics": metrics_text,
        "audit": audit_trail,
        "logs": logs,
    }


class LogQueries:
    """The `logs` operation, off the event loop: one query at a time, in one thread, on a
    snapshot of the ring. Filtering a large ring (rendering each entry's text for
    `contains`) never stalls other requests, and queries queued behind it hold no
    snapshot yet."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="logs")
        self.turn = asyncio.Lock()

    async def __call__(self, p: dict[str, Any], _: Caller) -> dict[str, Any]:
        try:
            low = parse_level(p.get("min_level", LEVELS[0]))
            high = parse_level(p.get("max_level", LEVELS[-1]))
        except ValueError as exc:
            raise MoltError(ErrorCode.BAD_REQUEST, str(exc)) from None
        limit = p.get("limit")
        if limit is not None and limit < 0:
            raise MoltError(ErrorCode.BAD_REQUEST, f"limit must be 0 or more, got {limit}")
        filters = (low, high, p.get("since"), p.get("until"), p.get("model"),
                   p.get("contains"), limit)  # fmt: skip
        async with self.turn:
            last_seq, snapshot = self.ring.seq, self.ring.snapshot(p.get("after", 0))
            entries = await asyncio.get_running_loop().run_in_executor(
                self.thread, _wire_entries, snapshot, filters
            )
        # journal: the same entries are in the journal, with those of earlier runs
        return {"entries": entries, "last_seq": last_seq, "journal": self.ring.journal is not None}


def _wire_entries(snapshot: list[Entry], filters: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [entry.to_wire() for entry in select(snapshot, *filters)]


class Clients:
    """What all connections hold together: their count in total and per uid, the bytes of
    their unfinished frames, and the descriptors left; refusals are logged here."""

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.connections: set[Connection] = set()
        self.per_uid: collections.Counter[int] = collections.Counter()
        self.partial_bytes = 0  # held by every connection's decoder together
        self.fd_ceiling = 0  # a connection on this descriptor or above is refused
        self.refusals = Refusals(limits.refusal_log_interval)

    def admit(self, connection: "Connection", fd: int) -> str | None:
        """Count a new connection in, or say why it is refused."""
        limits, uid = self.limits, connection.uid
        if len(self.connections) >= limits.max_connections:
            return (f"moltbotd has {len(self.connections)} connections open, its limit"
                    f" (clients.max_connections)")  # fmt: skip
        if self.per_uid[uid] >= limits.max_connections_per_uid:
            return (f"uid {uid} has {self.per_uid[uid]} connections open, the limit per user"
                    f" (clients.max_connections_per_uid)")  # fmt: skip
        if fd >= self.fd_ceiling:
            return (f"moltbotd keeps its last {limits.reserved_fds} file descriptors for its"
                    f" workers (clients.reserved_fds)")  # fmt: skip
        self.connections.add(connection)
        self.per_uid[uid] += 1
        return None

    def release(self, connection: "Connection") -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self.per_uid[connection.uid] -= 1
            if not self.per_uid[connection.uid]:
                del self.per_uid[connection.uid]

    def usage(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "users": len(self.per_uid),
            "partial_bytes": self.partial_bytes,
            "unsent_bytes": sum(c.waiting() for c in self.connections),
        }


class Server:
    def __init__(self, config: Config, rollout: Rollout, ring: Ring, reload_config: Reloader,
                 activated: dict[str, socket.socket] | None = None) -> None:  # fmt: skip
        self.config = config
        self.activated = activated or {}  # sockets systemd passed, by name (activation.py)
        self.limits = config.clients
        ring.field_chars = self.limits.log_field_chars
        self.clients = Clients(self.limits)
        self.answers: collections.Counter[tuple[str, str]] = collections.Counter()  # op, code
        self.budgets = Budgets(rollout.sup.budget)
        self.metrics = Metrics(rollout.sup, self.answers, self.budgets)
        trail = config.audit
        self.audit = AuditLog(trail.file or config.state_dir / "audit.jsonl", trail.max_bytes,
                              trail.keep, ring.journal)  # fmt: skip
        self.handlers = make_handlers(rollout, ring, config, reload_config, self.clients,
                                      self.metrics, self.audit, self.budgets)  # fmt: skip
        self.metrics_listener: MetricsListener | None = None
        self.front = FrontDoor(self, config, self.activated)
        if self.handlers.keys() != OPERATIONS.keys():
            raise RuntimeError(
                f"handlers {sorted(self.handlers)} != operations {sorted(OPERATIONS)}"
            )
        self.sup = rollout.sup
        self._access_settings = config.access
        self._access = Access(config.access)
        self.accepting = True
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()

    async def listen(self) -> None:
        try:
            self.budgets.open(self.config.state_dir / LEDGER)
        except (LedgerError, OSError) as exc:
            raise StartError(str(exc)) from None
        path = self.config.socket
        _claim_socket_path(path)
        self.clients.fd_ceiling = _descriptor_ceiling(self.limits)
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: Connection(self), path=str(path)
        )
        os.chmod(path, self.config.socket_mode)
        log.info("listening on {socket}", socket=str(path))
        given = self.activated.pop("metrics", None)
        if given is not None:
            if self.config.metrics.listen:
                log.warning("metrics.listen is ignored: systemd passed a socket for metrics")
            await self._listen_for_metrics(given, "the socket systemd passed")
        elif self.config.metrics.listen:
            host, port = self.config.metrics.listen
            await self._listen_for_metrics((host, port), f"{host}:{port} (metrics.listen)")
        try:
            await self.front.open()
        except (FrontDoorError, TlsError, KeyFileError) as exc:
            raise StartError(str(exc)) from None

    async def _listen_for_metrics(self, where: tuple[str, int] | socket.socket,
                                  named: str) -> None:  # fmt: skip
        listener = MetricsListener(self.metrics.render)
        try:
            await listener.start(where)
        except OSError as exc:
            raise StartError(f"cannot serve metrics on {named}: {exc.strerror or exc}") from None
        self.metrics_listener = listener

    @property
    def access(self) -> Access:
        """Who may do what, as the running configuration (reloaded live) says."""
        settings = self.sup.config.access
        if settings is not self._access_settings:
            self._access, self._access_settings = Access(settings), settings
        return self._access

    def begin(self, message: dict[str, Any], peer: Peer, rights: Rights,
              emit: Emit | None = None) -> Answer:  # fmt: skip
        """Start one request; the future gives its response (and progress frames go
        through emit, when the request asks for them). Never raises."""
        names = self.limits.max_name_chars
        req_id = request_id(message, names)
        audited: tuple[str, dict[str, Any]] | None = None  # a change: recorded when it ends
        name = UNKNOWN
        try:
            request = parse_request(message, names)
            op = lookup(request.op)
            name = op.name
            audited = (op.name, request.params) if _changes(op.name, request.params) else None
            if not self.accepting:
                raise MoltError(
                    ErrorCode.SHUTTING_DOWN, "moltbotd is shutting down; retry once it is back"
                )
            try:
                rights.check(op, request.params)
            except MoltError:  # other refusals than a change's: the first per connection
                if not audited and rights.first_refusal(op.name):
                    audited = (op.name, request.params)
                raise
            params = op.check_params(request.params, self.limits)
            if audited:
                audited = (op.name, params)
            if op.mutating:  # an upload's chunk (its data) is not logged
                log.info("{op} requested", op=op.name, peer=peer.describe(), **params)
            caller = self._caller(request.id, params, peer, emit, rights.who)
            outcome = asyncio.ensure_future(self.handlers[op.name](params, caller))
            if op.name == "infer" and "request_id" in params:
                outcome = _traced(outcome, params["request_id"])
        except Exception as exc:
            if isinstance(exc, MoltError):
                # Its traceback holds this frame, and so the request (a 10 MB parameter)
                # in a cycle with `outcome` that only the garbage collector would break.
                exc.__traceback__ = None
            if type(exc) is MoltError:
                exc = traced(exc, trace_of(message, names))
            outcome = asyncio.get_running_loop().create_future()
            outcome.set_exception(exc)
        if audited:
            self.audit.watch(*audited, peer, outcome)
        return req_id, outcome, name

    def respond(self, answer: Answer) -> dict[str, Any]:
        """The response for a finished request, counted by operation and outcome; an
        unexpected exception is logged."""
        req_id, outcome, op = answer
        try:
            response, code = ok_response(req_id, outcome.result()), "OK"
        except RequestError as exc:
            response, code = error_response(exc.req_id, exc), exc.code.value
        except MoltError as exc:
            response, code = error_response(req_id, exc), exc.code.value
        except Exception:
            log.exception("internal error while handling a request")
            error = MoltError(
                ErrorCode.INTERNAL, "internal error in moltbotd; the daemon log has the details"
            )
            response, code = error_response(req_id, error), error.code.value
        self.answers[op, code] += 1
        return response

    @staticmethod
    def _caller(req_id: Any, params: dict[str, Any], peer: Peer, emit: Emit | None,
                account: str) -> Caller:  # fmt: skip
        if not (params.get("progress") and emit):
            return Caller(peer.describe(), no_progress, peer.uid, account)

        def progress(phase: str, detail: str) -> None:
            emit({"id": req_id, "progress": {"phase": phase, "detail": detail}})

        return Caller(peer.describe(), progress, peer.uid, account)

    def request_done(self) -> None:
        if not any(c.pending for c in self.clients.connections):
            self._idle.set()

    async def _drained(self, timeout: float) -> None:
        """Until the socket's requests in flight are answered, or timeout."""
        if any(c.pending for c in self.clients.connections):
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to timeout), close everything."""
        self.accepting = False
        self.front.close()
        if self._server:
            self._server.close()
        await asyncio.gather(self._drained(timeout), self.front.drain(timeout))
        unfinished = sum(c.pending for c in self.clients.connections)
        if unfinished:
            log.warning("{count} requests still running after {timeout:g}s; closing anyway",
                        count=unfinished, timeout=timeout)  # fmt: skip
        for connection in list(self.clients.connections):
            connection.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()
        if self.metrics_listener:
            await self.metrics_listener.stop()
        await self.front.stop()
        await self.audit.close()
        self.budgets.close()


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a dead daemon; refuse if a live one answers there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # nobody listens: a stale socket
        return
    except OSError as exc:
        raise StartError(f"cannot check whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartError(f"another moltbotd is already serving at {path}")


def _traced(outcome: "asyncio.Future[Any]", trace: str) -> "asyncio.Future[Any]":
    """The outcome of an infer the caller named: an error moltbotd gives names it too."""
    answer = asyncio.get_running_loop().create_future()

    def settle(done: "asyncio.Future[Any]") -> None:
        if done.cancelled():
            answer.cancel()
        elif (exc := done.exception()) is not None:
            answer.set_exception(traced(exc, trace) if type(exc) is MoltError else exc)
        else:
            answer.set_result(done.result())

    outcome.add_done_callback(settle)
    return answer


def _changes(op: str, params: Any) -> bool:
    """Whether a request is one the audit trail records: an operation that changes what
    serves, or an upload's first chunk (it opens one; later chunks add to it)."""
    if op == "upload":
        return not (isinstance(params, dict) and params.get("upload"))
    return OPERATIONS[op].mutating


def _descriptor_ceiling(limits: ClientLimits) -> int:
    """The first descriptor a connection may not take: the soft RLIMIT_NOFILE (raised, as
    far as the hard limit allows, to fit max_connections) less reserved_fds. Descriptors
    are given lowest first, so a connection at or above it means fewer than reserved_fds
    are free: workers, direct channels and good clients keep working."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + limits.reserved_fds
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < wanted:
        log.warning("the descriptor limit {soft} (LimitNOFILE) allows fewer connections than"
                    " clients.max_connections {wanted}: about {served} will be served",
                    soft=soft, wanted=limits.max_connections,
                    served=soft - limits.reserved_fds)  # fmt: skip
    return soft - limits.reserved_fds


class Refusals:
    """Refused and closed connections, logged once per interval with their count: a flood
    of them must not flood the log."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.counts: collections.Counter[str] = collections.Counter()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, why: str, peer: str) -> None:
        if self.timer is None:
            log.warning("refused a connection: {why}", why=why, peer=peer)
            self.timer = asyncio.get_running_loop().call_later(self.interval, self._report)
        else:
            self.counts[why] += 1

    def _report(self) -> None:
        self.timer = None
        if not self.counts:
            return  # quiet for a whole interval: the next refusal is logged at once
        total = sum(self.counts.values())
        reasons = "; ".join(f"{n}x {why}" for why, n in self.counts.most_common(5))
        log.warning("refused {count} more connections in the last {interval:g}s",
                    count=total, interval=self.interval, reasons=reasons)  # fmt: skip
        self.counts.clear()
        self.timer = asyncio.get_running_loop().call_later(self.interval, self._report)


class Connection(asyncio.Protocol):
    """One client. Reading stops while it may not start requests (max_inflight requests
    open, its answers unread, or it is ending); the decoder keeps what it read meanwhile,
    and those frames are started as soon as it may again."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.clients = server.clients
        self.limits = server.limits
        self.decoder = FrameDecoder(server.config.max_frame_bytes)
        self.pending = 0
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.who = Peer()
        self.peer = self.who.describe()  # for the log
        self.rights: Rights | None = None
        self.rights_from: Access | None = None  # the access settings rights came from
        self.half_closed = False
        self.unsent: list[bytes] = []
        self.unsent_bytes = 0  # in self.unsent
        self.write_paused = False  # the transport holds unsent_pause_bytes of answers
        self.allowance = 0  # the largest answer written while the client kept up
        self.reading = True
        self.held = 0  # decoder bytes counted in clients.partial_bytes
        self.frame_timer: asyncio.TimerHandle | None = None
        self.ending: MoltError | None = None  # sent once the requests open are answered

    @property
    def uid(self) -> int:
        return self.who.uid

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.who = Peer.of(sock)
        self.peer = self.who.describe()
        why = self.clients.admit(self, sock.fileno() if sock is not None else -1)
        if why is not None:
            self.clients.refusals.add(why, self.peer)
            error = MoltError(ErrorCode.RESOURCE_EXHAUSTED, f"connection refused: {why}")
            self.transport.write(encode_frame(error_response(None, error)))
            self.transport.close()
            return
        self.transport.set_write_buffer_limits(high=self.limits.unsent_pause_bytes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.clients.release(self)
        self.decoder.discard()
        self._count_held()
        self._stop_frame_timer()

    def eof_received(self) -> bool:
        """A client that half-closes after its requests still gets every answer."""
        self.half_closed = True
        if self.pending:
            return True  # keeps the transport open until they are written
        self._flush()  # answers of this loop turn wait for its end: they go out before the close
        return False

    def data_received(self, data: bytes) -> None:
        if self.ending is None and not self.transport.is_closing():  # else: discarded
            self.decoder.receive(data)
            self._pump()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.ending is None:  # an ending connection reads on, to drop what comes
            self._set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.allowance = 0
        if self.ending is None:
            self._pump()

    # --- reading -------------------------------------------------------------------------

    def _may_start(self) -> bool:
        return (
            self.pending < self.server.config.max_inflight_per_connection
            and not self.write_paused
            and self.ending is None
        )

    def _pump(self) -> None:
        """Start every whole frame the decoder holds, while this connection may; then read
        on only if it still may, and bound what the decoder holds."""
        taken = False
        while self._may_start():
            try:
                message = self.decoder.next_frame()
            except FrameTooLarge as exc:
                log.warning("closing a connection that sent a frame over the limit",
                            size=exc.details["size"], peer=self.peer)  # fmt: skip
                self._end(exc)
                break
            if message is None:
                break
            taken = True
            if isinstance(message, MoltError):
                self._write(error_response(None, message))
            else:
                self._start(message)
        if self.ending is None and not self.transport.is_closing():
            self._set_reading(self._may_start())
            self._time_frame(taken)
            self._bound_partial()  # last: it may end the connection

    def _set_reading(self, wanted: bool) -> None:
        if wanted != self.reading and not (self.transport.is_closing() or self.half_closed):
            self.reading = wanted
            (self.transport.resume_reading if wanted else self.transport.pause_reading)()

    def _count_held(self) -> None:
        self.clients.partial_bytes += self.decoder.buffered - self.held
        self.held = self.decoder.buffered

    def _bound_partial(self) -> None:
        """Frames not yet whole of all connections together stay within max_partial_bytes:
        the connection that would pass it is refused."""
        grown = self.decoder.buffered - self.held
        budget = self.limits.max_partial_bytes
        if grown > 0 and self.clients.partial_bytes + grown > budget:
            why = (f"frames not yet whole hold {format_size(self.clients.partial_bytes)} of"
                   f" {format_size(budget)} (clients.max_partial_bytes); retry later")  # fmt: skip
            self.clients.refusals.add(why, self.peer)
            self._end(MoltError(ErrorCode.RESOURCE_EXHAUSTED, why))
        self._count_held()

    def _time_frame(self, taken: bool) -> None:
        """A frame begun must be whole within frame_timeout (slowloris); the clock starts
        again with each frame."""
        if not (self.decoder.buffered and self._may_start()):
            self._stop_frame_timer()  # nothing begun, or the wait is ours, not the client's
        elif self.frame_timer is None or taken:
            self._stop_frame_timer()
            self.frame_timer = asyncio.get_running_loop().call_later(
                self.limits.frame_timeout, self._frame_expired
            )

    def _stop_frame_timer(self) -> None:
        if self.frame_timer is not None:
            self.frame_timer.cancel()
            self.frame_timer = None

    def _frame_expired(self) -> None:
        self.frame_timer = None
        timeout, came = self.limits.frame_timeout, self.decoder.buffered
        log.warning("closing a connection whose frame did not arrive whole in time",
                    peer=self.peer, received=came, frame_timeout=timeout)  # fmt: skip
        why = (f"a frame was not whole {timeout:g}s after its first byte"
               f" (clients.frame_timeout): {came} bytes came")  # fmt: skip
        self._end(MoltError(ErrorCode.BAD_FRAME, why))

    def _end(self, error: MoltError) -> None:
        """Read nothing more; answer the requests open, then `error`, then close."""
        self.ending = error
        self.decoder.discard()
        self._count_held()
        self._stop_frame_timer()
        self._set_reading(False)
        if not self.pending:
            self._say_goodbye()

    def _say_goodbye(self) -> None:
        """Send the ending error, half-close, and read (discarding) until the client closes,
        for at most frame_timeout: closing with its bytes unread would reset the
        connection, and the client might never read why."""
        assert self.ending is not None
        self._write(error_response(None, self.ending))
        if self.half_closed:  # nothing more will come
            self.close()
            return
        self._flush()
        if self.transport.is_closing():
            return
        self.transport.write_eof()
        self._set_reading(True)
        self.frame_timer = asyncio.get_running_loop().call_later(
            self.limits.frame_timeout, self.abort
        )

    # --- requests and answers ------------------------------------------------------------

    def _start(self, message: dict[str, Any]) -> None:
        self.pending += 1
        answer = self.server.begin(message, self.who, self._rights(), self._write)
        answer[1].add_done_callback(lambda _: self._finished(answer))

    def _rights(self) -> Rights:
        """Worked out at the first request, and again after a reload changed `access:`."""
        access = self.server.access
        if self.rights is None or self.rights_from is not access:
            self.rights, self.rights_from = access.rights(self.who), access
        return self.rights

    def _finished(self, answer: Answer) -> None:
        self.pending -= 1
        self._write(self.server.respond(answer))
        if not self.pending:
            self.server.request_done()
            if self.ending is not None:
                self._say_goodbye()
                return
        if not self.transport.is_closing():
            self._pump()  # frames read meanwhile may start now
        if self.half_closed and not self.pending:
            self.close()

    def _write(self, response: dict[str, Any]) -> None:
        result = response.get("result")
        try:
            self._send(response)
        finally:
            if isinstance(result, Handover):
                result.sock.close()  # sent with the frame, or not at all: ours to close

    def _send(self, response: dict[str, Any]) -> None:
        if self.transport.is_closing():
            return
        try:
            frame = encode_frame(response)
        except (TypeError, ValueError, OverflowError):  # a result msgpack cannot carry: a bug
            log.exception("cannot encode a response", id=response.get("id"))
            error = MoltError(ErrorCode.INTERNAL, "moltbotd could not encode its answer")
            frame = encode_frame(error_response(response.get("id"), error))
        if not self._room_for(len(frame)):
            return
        if isinstance(response.get("result"), Handover):
            self._hand_over(frame, response)
            return
        if not self.pending and not self.unsent:  # the only answer due: no reason to wait
            self.transport.write(frame)
            return
        if not self.unsent:  # responses finished in one turn of the loop go in one write
            asyncio.get_running_loop().call_soon(self._flush)
        self.unsent.append(frame)
        self.unsent_bytes += len(frame)

    def _room_for(self, size: int) -> bool:
        """May an answer of `size` bytes wait for this client? One that goes out while the
        client keeps up always may (however large); past that, the answers waiting stay
        within max_unsent_bytes, or the connection is closed: its client does not read."""
        waiting = self.waiting()
        if waiting <= self.limits.unsent_pause_bytes:
            self.allowance = max(self.allowance, size)
            return True
        if waiting + size <= self.limits.max_unsent_bytes + self.allowance:
            return True
        log.warning("closing a connection that does not read its answers", peer=self.peer,
                    unsent=waiting, max_unsent_bytes=self.limits.max_unsent_bytes)  # fmt: skip
        self.abort()
        return False

    def waiting(self) -> int:
        """Bytes of answers written but not yet taken by the client."""
        return self.transport.get_write_buffer_size() + self.unsent_bytes

    def _hand_over(self, frame: bytes, response: dict[str, Any]) -> None:
        """Send the frame with the socket attached, after every answer written before it
        (the descriptor rides on the frame's first byte, so the bytes must be in order)."""
        channel = response["result"].sock
        self._flush()
        if not self.transport.get_write_buffer_size():
            ours = os.dup(self.transport.get_extra_info("socket").fileno())
            with socket.socket(fileno=ours) as sock:
                try:
                    sent = socket.send_fds(sock, [frame], [channel.fileno()])
                except BlockingIOError:
                    sent = 0  # a full socket buffer: the refusal below goes through the loop
                except OSError:  # the client went away while asking: nobody to answer
                    return
                if sent:
                    if sent < len(frame):
                        self.transport.write(frame[sent:])
                    return
        error = MoltError(ErrorCode.CONFLICT, "this connection's earlier answers are not read"
                          " yet; ask for the channel again")  # fmt: skip
        self.transport.write(encode_frame(error_response(response.get("id"), error)))

    def close(self) -> None:
        """Close once what is written went out."""
        self._flush()
        self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is not sent (its client does not read it)."""
        self.unsent, self.unsent_bytes = [], 0
        self.decoder.discard()
        self._count_held()
        self._stop_frame_timer()
        self.transport.abort()

    def _flush(self) -> None:
        frames, self.unsent, self.unsent_bytes = self.unsent, [], 0
        if frames and not self.transport.is_closing():
            self.transport.write(b"".join(frames))
