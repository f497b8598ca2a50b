"""Every socket operation, declared once: its name, parameters and whether it changes state.

The server dispatches only names found in OPERATIONS (an explicit dict, never a lookup
by reflection on a name from the wire), checks parameters against the declaration
before any handler runs, and moltctl has one command per operation. docs/protocol.md
documents this table.
"""

import enum
import heapq
from dataclasses import dataclass, field
from typing import Any, Protocol

from moltbotd.wire.protocol import DEFAULT_MAX_NAME_CHARS, ErrorCode, MoltError, describe, echo


class Bounds(Protocol):
    """How long a parameter may be: the daemon passes its `clients:` settings."""

    @property
    def max_name_chars(self) -> int: ...
    @property
    def max_text_chars(self) -> int: ...
    @property
    def max_items(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DefaultBounds:
    """The bounds of a daemon configured with none (config.ClientLimits' defaults)."""

    max_name_chars: int = DEFAULT_MAX_NAME_CHARS
    max_text_chars: int = 4096
    max_items: int = 10_000


DEFAULT_LIMITS = DefaultBounds()
# The Bounds field that bounds a parameter's len(): a declared name, never one
# from the wire.
NAME, TEXT, ITEMS = "max_name_chars", "max_text_chars", "max_items"
_UNITS = {NAME: "characters", TEXT: "characters", ITEMS: "entries"}
_SHOWN_UNKNOWN = 5  # unknown parameter names an error lists


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    types: tuple[type, ...]
    required: bool = False
    help: str = ""
    # NAME, TEXT or ITEMS: how long the value may be (default: NAME for a string, ITEMS
    # for a list or map, unbounded otherwise: numbers, and bytes bounded by the frame).
    size: str | None = None

    def __post_init__(self) -> None:
        if self.size is None:
            default = (
                NAME if str in self.types else ITEMS if {list, dict} & set(self.types) else None
            )
            object.__setattr__(self, "size", default)

    def describe_type(self) -> str:
        return " or ".join(_TYPE_NAMES[t] for t in self.types)

    def bound(self, limits: Bounds) -> int | None:
        return None if self.size is None else getattr(limits, self.size)

    def too_long(self, value: Any, limits: Bounds) -> bool:
        """Is a value of the right type longer than its bound?"""
        bound = self.bound(limits)
        return bound is not None and isinstance(value, str | list | dict) and len(value) > bound


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    dict: "a map",
    list: "a list",
    bool: "a boolean",
    bytes: "bytes",
}


class Role(enum.StrEnum):
    """What a client may do, granted by `access:` in the config (control/access.py)."""

    READ = "read"  # look: status, models, versions, logs, metrics, the audit trail
    INFER = "infer"  # run models (the grant may name which, by glob)
    OPERATE = "operate"  # change what serves: switch, canary, promote, rollback, scale, reload
    DEPLOY = "deploy"  # add versions: upload, deploy


class Refusals:
    """Remembers the operations a connection was refused: the audit records the first
    of each (the rights classes of the Unix socket and of tokens both keep `refused`)."""

    refused: set[str]

    def first_refusal(self, op: str) -> bool:
        first = op not in self.refused
        self.refused.add(op)
        return first


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    summary: str
    params: tuple[Param, ...] = ()
    # State-changing operations on one model are serialised; a second one gets CONFLICT.
    mutating: bool = False
    # The role a client needs; None: any client the daemon admits (hello).
    role: Role | None = Role.READ
    _params: dict[str, Param] = field(init=False, repr=False, compare=False)
    _required: list[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_params", {p.name: p for p in self.params})
        object.__setattr__(self, "_required", [p.name for p in self.params if p.required])

    def check_params(
        self, params: dict[str, Any], limits: Bounds = DEFAULT_LIMITS
    ) -> dict[str, Any]:
        """The parameters, checked against the declaration (types, then sizes, before
        anything is formatted); a null counts as not given."""
        given = {}
        for key, value in params.items():  # one pass: this runs for every request
            if not isinstance(key, str):
                raise self._refuse(params, limits)
            if value is not None:
                p = self._params.get(key)
                if p is None or not _is_instance(value, p.types) or p.too_long(value, limits):
                    raise self._refuse(params, limits)
                given[key] = value
        if not all(name in given for name in self._required):
            raise self._refuse(params, limits)
        return given

    def _refuse(self, params: dict[str, Any], limits: Bounds) -> MoltError:
        """What is wrong with parameters that failed the check. Every value shown goes
        through echo(), and nothing here costs more than a pass over the map."""
        if not all(isinstance(key, str) for key in params):
            return MoltError(ErrorCode.BAD_REQUEST, f"operation '{self.name}': parameter names"
                             " must be strings")  # fmt: skip
        unknown = [k for k, v in params.items() if v is not None and k not in self._params]
        if unknown:
            return self._unknown(unknown)
        for p in self.params:
            value = params.get(p.name)
            if value is None and p.required:
                return MoltError(
                    ErrorCode.BAD_REQUEST,
                    f"operation '{self.name}' needs parameter '{p.name}' ({p.describe_type()})",
                )
            if value is not None and not _is_instance(value, p.types):
                return MoltError(
                    ErrorCode.BAD_REQUEST,
                    f"operation '{self.name}': parameter '{p.name}' must be {p.describe_type()},"
                    f" got {describe(value)}",
                )
            if value is not None and p.too_long(value, limits):
                return MoltError(
                    ErrorCode.BAD_REQUEST,
                    f"operation '{self.name}': parameter '{p.name}' may have at most"
                    f" {p.bound(limits)} {_UNITS[p.size or '']} (clients.{p.size}),"
                    f" got {describe(value)}",
                )
        raise AssertionError(f"{len(params)} parameters were refused for no reason")

    def _unknown(self, unknown: list[str]) -> MoltError:
        shown = ", ".join(echo(name) for name in heapq.nsmallest(_SHOWN_UNKNOWN, unknown))
        more = len(unknown) - _SHOWN_UNKNOWN
        known = ", ".join(self._params) or "none"
        return MoltError(
            ErrorCode.BAD_REQUEST,
            f"operation '{self.name}' takes no parameter {shown}"
            + (f" (and {more} more)" if more > 0 else "")
            + f" (it takes: {known})",
        )


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int to Python, never to the protocol
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


_MODEL = Param("model", (str,), help="model name")
_ONE_MODEL = Param("model", (str,), help="model name; may be left out when only one model fits")
_PROGRESS = Param(
    "progress", (bool,), help="also send {id, progress: {phase, detail}} frames as it goes"
)
_FORCE = Param("force", (bool,), help="accept a changed signature or a failed warm-up on zeros")
_ONE_SESSION = (
    Param("model", (str,), required=True, help="model name"),
    Param("session", (str,), required=True, help="the session's id"),
)
# How `convert` makes a cheaper version (moltbotd/convert/methods.py does each).
CONVERSIONS = ("int8-dynamic", "int8-static", "fp16", "optimize")
OPTIMIZATION_LEVELS = ("basic", "extended", "all")  # onnxruntime's offline graph levels

OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "hello",
            "Agree on the protocol version; returns the server's version and operations.",
            (
                Param("protocol", (int,), help="the client's protocol version"),
                Param("client", (str,), help="client name and version, for the log", size=TEXT),
            ),
            role=None,
        ),
        Operation("health", "Is every served model ready? Returns ok or degraded, per model."),
        Operation(
            "status",
            "Daemon and per-model state: versions, worker state, pids, errors, counters.",
            (_MODEL,),
        ),
        Operation("models", "The model repository: every model, its versions, which is active."),
        Operation(
            "infer",
            "Run a model on named input tensors; returns its named outputs.",
            (
                Param("model", (str,), required=True, help="model name"),
                Param("inputs", (dict,), required=True, help="input name -> tensor or nested list"),
                Param("version", (str,), help="answer from this loaded version (default: active)"),
                Param("outputs", (list,), help="names of the outputs wanted (default: all)"),
                Param("priority", (str,), help="high, normal or low (default: the model's)"),
                Param(
                    "request_id",
                    (str,),
                    help="the caller's id for this request: in its answer and its logs",
                ),
                Param(
                    "timeout_ms",
                    (float,),
                    help="deadline: answered DEADLINE_EXCEEDED (and"
                    " never run if still queued) after this many milliseconds",
                ),
                Param(
                    "cache",
                    (bool,),
                    help="false: run the model even where its result cache has the answer",
                ),
                Param(
                    "session",
                    (str,),
                    help="a stateful model's session: the state its previous request left"
                    " feeds this one, kept by moltbotd (docs/sessions.md)",
                ),
                Param(
                    "reply_shm",
                    (list,),
                    help="on a direct channel: [offset, size] of its shared region where"
                    " outputs of 64 KiB or more come back (as {'shm': [offset, size]})",
                ),
            ),
            role=Role.INFER,
        ),
        Operation(
            "channel",
            "A direct channel to a worker serving MODEL's active version: the answer carries"
            " a socket (SCM_RIGHTS) on which infer requests for MODEL skip the daemon.",
            (Param("model", (str,), required=True, help="model name"),),
            role=Role.INFER,
        ),
        Operation(
            "channel_ended",
            "Why the worker PID serving MODEL ended a direct channel with requests in flight:"
            " the error moltbotd's socket gave its own requests then (RESOURCE_EXHAUSTED"
            " when its memory limit killed it), waiting a moment for moltbotd to see it.",
            (
                Param("model", (str,), required=True, help="model name"),
                Param("pid", (int,), required=True, help="the worker's pid, from `channel`"),
            ),
            role=Role.INFER,
        ),
        Operation(
            "scale",
            "Set the number of worker processes of MODEL's active version, or give it back"
            " to autoscaling (instances: 0); remembered across restarts.",
            (
                Param("model", (str,), required=True, help="model name"),
                Param("instances", (int,), required=True, help="1 to 64; 0: autoscaling"),
            ),
            mutating=True,
            role=Role.OPERATE,
        ),
        Operation(
            "switch",
            "Make VERSION the active version of MODEL (validated, warmed, then cut over;"
            " the old version drains), or give it a share of the requests as a canary.",
            (
                _ONE_MODEL,
                Param("version", (str,), required=True, help="version to activate"),
                _FORCE,
                Param("canary", (float,), help="share of requests for VERSION, 0 < share < 1"),
                _PROGRESS,
            ),
            mutating=True,
            role=Role.OPERATE,
        ),
        Operation(
            "rollback",
            "End MODEL's canary, or return to the version that served before the active one.",
            (_ONE_MODEL, _PROGRESS),
            mutating=True,
            role=Role.OPERATE,
        ),
        Operation(
            "promote",
            "Make MODEL's canary the active version; the old one drains.",
            (_ONE_MODEL, _PROGRESS),
            mutating=True,
            role=Role.OPERATE,
        ),
        Operation(
            "metadata",
            "A loaded version's signature: its inputs and outputs with dtypes and shapes, and"
            " whether it is ready (the Open Inference Protocol's model metadata).",
            (
                Param("model", (str,), required=True, help="model name"),
                Param("version", (str,), help="a loaded version (default: the active one)"),
            ),
        ),
        Operation(
            "sessions",
            "A stateful model's sessions: how many are hot, spilled or lost, their bytes, and"
            " the LIMIT least idle with where each lives and how long it has been idle.",
            (
                Param("model", (str,), required=True, help="model name"),
                Param("limit", (int,), help="sessions described, the least idle first (100)"),
            ),
        ),
        Operation(
            "end_session",
            "Forget a session of a stateful model: its state, hot or on disk, is gone.",
            _ONE_SESSION,
            role=Role.INFER,
        ),
        Operation(
            "reset_session",
            "Start a session of a stateful model over: its next request gets the first state.",
            _ONE_SESSION,
            role=Role.INFER,
        ),
        Operation(
            "budgets",
            "What each caller spent of each model's cost_limit this period, and what remains.",
            (_MODEL,),
        ),
        Operation(
            "versions",
            "The versions on disk with state, size, sha256 and deploy time.",
            (_MODEL,),
        ),
        Operation(
            "upload",
            "Append a chunk to a file of a model folder being deployed; the first chunk"
            " (no upload) opens the upload and returns its token.",
            (
                Param("upload", (str,), help="the token an earlier chunk returned"),
                Param("path", (str,), required=True, help="file path inside the folder", size=TEXT),
                Param("offset", (int,), required=True, help="bytes of the file sent before"),
                Param("data", (bytes,), required=True, help="the chunk"),
                Param(
                    "total",
                    (int,),
                    help="with the first chunk: bytes of all the files, checked against"
                    " uploads.max_version_bytes and free space before any is written",
                ),
            ),
            role=Role.DEPLOY,
        ),
        Operation(
            "deploy",
            "Publish an upload as MODEL/VERSION after it is checked, loaded and warmed;"
            " optionally switch to it.",
            (
                Param("upload", (str,), required=True, help="the upload's token"),
                Param("model", (str,), required=True, help="model name"),
                Param("version", (str,), required=True, help="the new version's name"),
                Param("files", (dict,), required=True, help="path -> sha256 as the client read it"),
                Param("activate", (bool,), help="switch to it once deployed"),
                _FORCE,
                Param(
                    "source", (str,), help="where the folder came from, for the manifest", size=TEXT
                ),
                _PROGRESS,
            ),
            mutating=True,
            role=Role.DEPLOY,
        ),
        Operation(
            "convert",
            "Make a new version of MODEL from VERSION (INT8, FP16 or an optimized graph) in a"
            " job inside the model's cgroup; published like a deploy only if it passes the"
            " accuracy gate against VERSION (or with force); optionally activated or a canary.",
            (
                Param("model", (str,), required=True, help="model name"),
                Param("method", (str,), required=True, help=" | ".join(CONVERSIONS)),
                Param("version", (str,), help="the source version (default: the active one)"),
                Param("to", (str,), help="the new version's name (default: VERSION-int8, ...)"),
                Param(
                    "data",
                    (str,),
                    help="an upload's token: its calibration/ and eval/ .npy or .npz files",
                ),
                Param("per_channel", (bool,), help="INT8: a scale per output channel"),
                Param("exclude", (list,), help="node names or operator types left unconverted"),
                Param("level", (str,), help="optimize: " + " | ".join(OPTIMIZATION_LEVELS)),
                Param(
                    "min_top1", (float,), help="the gate's bound (conversion.min_top1_agreement)"
                ),
                Param(
                    "max_error", (float,), help="the gate's bound (conversion.max_relative_error)"
                ),
                Param(
                    "force", (bool,), help="publish even if the gate or the signature check fails"
                ),
                Param("activate", (bool,), help="switch to it once published"),
                Param("canary", (float,), help="once published, its share of requests (0 to 1)"),
                _PROGRESS,
            ),
            mutating=True,
            role=Role.DEPLOY,
        ),
        Operation(
            "reload",
            "Re-read the config file: limits change live, session changes restart workers.",
            mutating=True,
            role=Role.OPERATE,
        ),
        Operation(
            "metrics",
            "Every Prometheus series, as /metrics serves them: {text: the exposition}.",
        ),
        Operation(
            "audit",
            "The audit trail: each change (and refused attempt), who made it, how it ended.",
            (
                Param("since", (float,), help="UNIX time of the oldest record"),
                Param("until", (float,), help="UNIX time of the newest record"),
                Param("op", (str,), help="only records of this operation"),
                Param("limit", (int,), help="at most this many of the newest (default 1000)"),
            ),
        ),
        Operation(
            "logs",
            "Entries from the daemon's log ring, filtered.",
            (
                Param("min_level", (str,), help="lowest level shown, e.g. warning"),
                Param("max_level", (str,), help="highest level shown"),
                Param("since", (float,), help="UNIX time of the oldest entry"),
                Param("until", (float,), help="UNIX time of the newest entry"),
                Param("model", (str,), help="only entries about this model"),
                Param("contains", (str,), help="only entries whose text contains this", size=TEXT),
                Param("after", (int,), help="only entries after this sequence number (follow)"),
                Param("limit", (int,), help="at most this many of the newest entries"),
            ),
        ),
    )
}


def lookup(name: str) -> Operation:
    try:
        return OPERATIONS[name]
    except KeyError:
        raise MoltError(
            ErrorCode.UNKNOWN_OPERATION,
            f"unknown operation {echo(name)} (known: {', '.join(OPERATIONS)})",
        ) from None
