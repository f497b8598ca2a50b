"""moltctl: the operator's command line over moltbotd's socket.

One command per operation in moltbotd.wire.operations.OPERATIONS (hello is implicit: every
command checks the protocol version first). Exit codes:
  0 success, 1 the daemon reported an error (or is unhealthy), 2 usage error,
  3 moltbotd cannot be reached, 4 the daemon's answer could not be read,
  5 deploy refused for lack of room (disk space, upload limits: RESOURCE_EXHAUSTED),
  6 the user lacks the role the command needs (PERMISSION_DENIED),
  7 the model's circuit is open (CIRCUIT_OPEN: it fails; the message says when it is
    tried again), 8 quantize or optimize made a version that fails the accuracy gate
    (nothing was published; the report says why).
"""

import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from moltbotd import __version__
from moltbotd.wire.loglines import LEVELS, parse_level, render_text
from moltbotd.wire.operations import OPTIMIZATION_LEVELS
from moltbotd.wire.protocol import PRIORITIES, ErrorCode, MoltError
from moltbotd.wire.units import format_duration, format_size, parse_percent, plural
from moltctl import journal
from moltctl.client import Client, ConnectError, ProtocolError
from moltctl.deploying import (
    DeployError,
    data_files,
    folder_files,
    next_version,
    send_files,
    send_folder,
)
from moltctl.gate_view import report_lines, summary
from moltctl.render import preview, table, to_json
from moltctl.status_view import status_table
from moltctl.when import parse_when

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_PROTOCOL = 4
EXIT_NO_ROOM = 5  # a deploy the daemon has no room for: retrying as is cannot help
EXIT_DENIED = 6  # PERMISSION_DENIED: the user lacks the role (the message says which group)
EXIT_CIRCUIT_OPEN = 7  # CIRCUIT_OPEN: the model fails; retry after details.retry_after
EXIT_GATE = 8  # a conversion failed its accuracy gate: its report is shown, nothing published
# the daemon's errors that have an exit code of their own; any other one exits EXIT_ERROR
EXIT_BY_CODE = {ErrorCode.PERMISSION_DENIED: EXIT_DENIED, ErrorCode.CIRCUIT_OPEN: EXIT_CIRCUIT_OPEN}
FOLLOW_POLL_SECONDS = 0.5
NPY_MAGIC = b"\x93NUMPY"

# moltctl commands and the operations each one uses ("hello" runs before each of them).
COMMANDS = {"health": ("health",), "status": ("status",), "models": ("models",),
            "infer": ("infer", "channel", "channel_ended"), "scale": ("scale",),
            "switch": ("switch",), "rollback": ("rollback",), "promote": ("promote",),
            "versions": ("versions",), "metadata": ("metadata",),
            "sessions": ("sessions",), "end-session": ("end_session",), "budgets": ("budgets",),
            "reset-session": ("reset_session",),
            "deploy": ("upload", "deploy"), "quantize": ("upload", "convert"),
            "optimize": ("upload", "convert"), "reload": ("reload",), "logs": ("logs",),
            "metrics": ("metrics",), "audit": ("audit",)}  # fmt: skip


class Cli(click.Group):
    """Turns expected failures into one line on stderr and a distinct exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConnectError as exc:
            _fail(str(exc), EXIT_UNAVAILABLE)
        except MoltError as exc:
            _fail(f"{exc.message} [{exc.code}]", EXIT_BY_CODE.get(exc.code, EXIT_ERROR))
        except ProtocolError as exc:
            _fail(str(exc), EXIT_PROTOCOL)
        except KeyboardInterrupt:
            sys.exit(130)


def _fail(message: str, code: int) -> None:
    click.echo(f"moltctl: {message}", err=True)
    sys.exit(code)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    envvar="MOLTBOT_SOCKET",
    help="moltbotd's socket  [env: MOLTBOT_SOCKET; default: /run/moltbot/moltbotd.sock]",
)
@click.option("--timeout", type=float, default=None, help="seconds to wait for an answer")
@click.version_option(__version__, prog_name="moltctl")
@click.pass_context
def cli(ctx: click.Context, socket_path: Path | None, timeout: float | None) -> None:
    """Control and query moltbotd, the ONNX model server."""
    ctx.obj = _Session(socket_path, timeout)


class _Session:
    """The connection a command uses, opened (and protocol-checked) on first use."""

    def __init__(self, socket_path: Path | None, timeout: float | None) -> None:
        # one command, one request: a direct channel would only add a round trip
        self.client = Client(socket_path, timeout, direct=False)
        self.server: dict[str, Any] | None = None  # what hello said

    def __call__(self) -> Client:
        if self.server is None:
            self.server = self.client.hello(client=f"moltctl {__version__}")
        return self.client


@contextlib.contextmanager
def until_ctrl_c(repeating: bool) -> Iterator[None]:
    """Ctrl-C is how a repeating command (--interval, -f) is meant to end: exit 0, as
    journalctl -f does; Ctrl-C anywhere else exits 130 (Cli.invoke)."""
    try:
        yield
    except KeyboardInterrupt:
        if not repeating:
            raise
        sys.exit(EXIT_OK)


def output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json"]),
        default="table",
        help="table for people, json for scripts",
    )(func)
    return click.option("--no-legend", is_flag=True, help="omit table headers")(func)


# --- status, health, models ------------------------------------------------------------------


@cli.command()
@click.argument("model", required=False)
@click.option("--interval", type=click.FloatRange(min=0.1), help="repeat every N seconds")
@click.option("--count", type=click.IntRange(min=1), help="with --interval: stop after N reports")
@output_options
@click.pass_obj
def status(session: _Session, model: str | None, interval: float | None, count: int | None,
           output: str, no_legend: bool) -> None:  # fmt: skip
    """Daemon and per-model state (optionally every --interval seconds)."""
    client = session()
    shown, legend = 0, not no_legend
    with until_ctrl_c(repeating=interval is not None):
        while True:
            report = client.status(model)
            click.echo(to_json(report) if output == "json" else status_table(report, legend))
            shown += 1
            if interval is None or (count is not None and shown >= count):
                return
            time.sleep(interval)
            if output == "table":
                click.echo()


@cli.command()
@output_options
@click.pass_obj
def health(session: _Session, output: str, no_legend: bool) -> None:
    """Exit 0 when every model is ready, 1 when any is not."""
    report = session().health()
    if output == "json":
        click.echo(to_json(report))
    else:
        rows = [{"model": n, "state": s} for n, s in report["models"].items()]
        click.echo(f"{report['status']}")
        click.echo(table(rows, [("MODEL", "model"), ("STATE", "state")], not no_legend))
    if report["status"] != "ok":
        sys.exit(EXIT_ERROR)


@cli.command()
@output_options
@click.pass_obj
def models(session: _Session, output: str, no_legend: bool) -> None:
    """The model repository: models, versions on disk, the active one."""
    report = session().models()
    if output == "json":
        click.echo(to_json(report))
        return
    columns = [("MODEL", "name"), ("ACTIVE", "active"), ("VERSIONS", "versions")]
    click.echo(table(report["models"], columns, not no_legend))


@cli.command()
@click.argument("model")
@click.option("--version", help="a loaded version (default: the active one)")
@output_options
@click.pass_obj
def metadata(session: _Session, model: str, version: str | None, output: str,
             no_legend: bool) -> None:  # fmt: skip
    """MODEL's inputs and outputs: names, dtypes, shapes (None: a dynamic dimension)."""
    report = session().metadata(model, version)
    if output == "json":
        click.echo(to_json(report))
        return
    ready = "ready" if report["ready"] else "not ready"
    click.echo(f"{report['model']} {report['version']} ({ready})")
    signature = report["signature"] or {"inputs": [], "outputs": []}
    rows = [{"kind": kind[:-1], **spec, "dtype": spec["dtype"] or spec["type"]}
            for kind in ("inputs", "outputs") for spec in signature[kind]]  # fmt: skip
    columns = [("KIND", "kind"), ("NAME", "name"), ("DTYPE", "dtype"), ("SHAPE", "shape")]
    click.echo(table(rows, columns, not no_legend))


@cli.command()
@click.argument("model")
@click.option("--limit", type=click.IntRange(0, 10_000), default=100, show_default=True,
              help="sessions listed, the least idle first")  # fmt: skip
@output_options
@click.pass_obj
def sessions(session: _Session, model: str, limit: int, output: str, no_legend: bool) -> None:
    """A stateful model's sessions: hot (in its worker), spilled (on disk) or lost."""
    report = session().sessions(model, limit)
    if output == "json":
        click.echo(to_json(report))
        return
    click.echo(f"{report['model']} {report['version']}: {report['hot']} hot"
               f" ({format_size(report['hot_bytes'])} of {format_size(report['hot_limit'])}),"
               f" {report['spilled']} spilled, {report['lost']} lost"
               f" ({format_size(report['disk_bytes'])} of {format_size(report['disk_limit'])}"
               " on disk)")  # fmt: skip
    rows = [{**row, "bytes": format_size(row["bytes"]), "idle": format_duration(row["idle"]),
             "turns": "-" if row["turns"] is None else row["turns"]}
            for row in report["sessions"]]  # fmt: skip
    columns = [("SESSION", "session"), ("WHERE", "where"), ("BYTES", "bytes"),
               ("IDLE", "idle"), ("TURNS", "turns")]  # fmt: skip
    click.echo(table(rows, columns, not no_legend))


@cli.command()
@click.argument("model", required=False)
@output_options
@click.pass_obj
def budgets(session: _Session, model: str | None, output: str, no_legend: bool) -> None:
    """What each caller spent of each model's cost_limit this period, and what remains."""
    report = session().budgets(model)
    if output == "json":
        click.echo(to_json(report))
        return
    rows = [{**row, "spent": f"{row['spent']:g}",
             "limit": "-" if row["limit"] is None else f"{row['limit']:g}",
             "remaining": "-" if row["remaining"] is None else f"{row['remaining']:g}"}
            for row in report["usage"]]  # fmt: skip
    columns = [("MODEL", "model"), ("CALLER", "caller"), ("PERIOD", "period"),
               ("SPENT", "spent"), ("LIMIT", "limit"), ("REMAINING", "remaining")]  # fmt: skip
    click.echo(table(rows, columns, not no_legend))


@cli.command("end-session")
@click.argument("model")
@click.argument("conversation", metavar="SESSION")
@click.pass_obj
def end_session(session: _Session, model: str, conversation: str) -> None:
    """Forget SESSION of MODEL: its state, in memory and on disk, is gone."""
    _said(session().end_session(model, conversation), "ended")


@cli.command("reset-session")
@click.argument("model")
@click.argument("conversation", metavar="SESSION")
@click.pass_obj
def reset_session(session: _Session, model: str, conversation: str) -> None:
    """Start SESSION of MODEL over: its next request gets the first state."""
    _said(session().reset_session(model, conversation), "reset")


def _said(result: dict[str, Any], done: str) -> None:
    what = f"session {result['session']} of {result['model']} {result['version']}"
    click.echo(f"{what}: {done}" if result["found"] else f"{what}: no such session (nothing to do)")


# --- infer -----------------------------------------------------------------------------------


def parse_input(text: str) -> tuple[str, Any]:
    """NAME=@file.npy, NAME=@file.json or NAME=<JSON>."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"expected NAME=@file.npy or NAME=JSON, got {text!r}")
    if value.startswith("@"):
        file = Path(value[1:])
        try:
            if file.suffix == ".npy":
                return name, _load_npy(file)
            return name, json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"input {name}: cannot read {file}: {exc}") from None
    try:
        return name, json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"input {name}: {value!r} is not JSON ({exc})") from None


def _load_npy(file: Path) -> np.ndarray:
    with file.open("rb") as stream:
        if stream.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ValueError("not a .npy file (numpy's format, as np.save writes it)")
    try:
        return np.load(file, allow_pickle=False)
    except ValueError as exc:  # an array of Python objects, pickled by np.save
        raise ValueError(f"a .npy file of Python objects cannot be sent ({exc})") from None


def like_the_model(client: Client, model: str, feeds: dict[str, Any]) -> dict[str, Any]:
    """Arrays cast to the dtype the model's inputs take, where numpy calls the cast
    same-kind (float64 to float32, int64 to int32; never float to int), as a JSON
    number is converted: np.save writes float64 unless told otherwise."""
    arrays = [n for n, v in feeds.items() if isinstance(v, np.ndarray) and v.dtype != object]
    if not arrays:
        return feeds
    worker = client.status(model)["models"][0]["worker"] or {}
    wanted = {i["name"]: i["dtype"] for i in (worker.get("signature") or {}).get("inputs", [])}
    for name in arrays:
        dtype = wanted.get(name)
        have = feeds[name].dtype
        if dtype and dtype != have.name and np.can_cast(have, dtype, "same_kind"):
            feeds[name] = feeds[name].astype(dtype)
    return feeds


@cli.command()
@click.argument("model")
@click.option(
    "-i",
    "--input",
    "inputs",
    multiple=True,
    required=True,
    metavar="NAME=@FILE|JSON",
    help="an input: NAME=@file.npy, NAME=@file.json or NAME='[[1, 2]]'; repeatable. Numbers"
    " become the model's dtype: a float64 .npy (np.save's default) is sent as float32 to a"
    " float32 input; a cast numpy does not call same-kind (float to int) is refused",
)
@click.option("--version", "version", help="answer from this version (default: the active one)")
@click.option("--output-name", "output_names", multiple=True, help="only these outputs")
@click.option("--priority", type=click.Choice(PRIORITIES), help="default: the model's")
@click.option("--timeout-ms", type=click.FloatRange(min=0, min_open=True),
              help="give up after this many milliseconds (DEADLINE_EXCEEDED)")  # fmt: skip
@click.option("--direct", is_flag=True, help="send it on a direct channel to the model's"
              " worker (fails if moltbotd grants none, and says why)")  # fmt: skip
@click.option("--request-id", help="your id for the request: in the answer, and in moltbotd's"
              " log if it is slow")  # fmt: skip
@click.option("--session", "conversation", metavar="ID", help="a stateful model's session:"
              " moltbotd feeds it the state its previous request left")  # fmt: skip
@output_options
@click.pass_obj
def infer(session: _Session, model: str, inputs: tuple[str, ...], version: str | None,
          output_names: tuple[str, ...], priority: str | None, timeout_ms: float | None,
          direct: bool, request_id: str | None, conversation: str | None, output: str,
          no_legend: bool) -> None:  # fmt: skip
    """Run MODEL on the given inputs and show its outputs."""
    feeds = like_the_model(session(), model, dict(parse_input(text) for text in inputs))
    session.client.direct = session.client.strict_direct = direct
    result = session().infer(model, feeds, version, list(output_names) or None, priority,
                             timeout_ms, request_id, conversation)  # fmt: skip
    if output == "json":
        answer = {"model": result.model, "version": result.version,
                  "fallback_for": result.fallback_for,
                  "fallback_reason": result.fallback_reason}  # fmt: skip
        if result.request_id is not None:
            answer["request_id"] = result.request_id
        answer["outputs"] = {n: _describe(v) for n, v in result.items()}
        click.echo(to_json(answer))
        return
    if result.fallback_for and not no_legend:
        why = (result.fallback_reason or {}).get("message", "")
        click.echo(f"{result.fallback_for} could not answer ({why}); its fallback did", err=True)
    rows = [{"name": n, **_describe(v), "value": preview(v)} for n, v in result.items()]
    for row in rows:
        row["shape"] = row["shape"] and "[" + ", ".join(map(str, row["shape"])) + "]"
    click.echo(f"model {result.model} {result.version}" if not no_legend else "", nl=not no_legend)
    columns = [("OUTPUT", "name"), ("DTYPE", "dtype"), ("SHAPE", "shape"), ("VALUE", "value")]
    click.echo(table(rows, columns, not no_legend))


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.name, "shape": list(value.shape), "data": value}
    return {"dtype": "sequence" if isinstance(value, list) else "map", "shape": None, "data": value}


# --- versions: switch, canary, promote, rollback, deploy -----------------------------------


def show_progress(progress: dict[str, Any]) -> None:
    """Progress goes to stderr, so that -o json keeps stdout one JSON document."""
    click.echo(f"  {progress['phase']:<11} {progress['detail']}", err=True)


def _timings(seconds: dict[str, float]) -> str:
    parts = [f"{phase} {format_duration(spent)}" for phase, spent in seconds.items()]
    return f" ({', '.join(parts)})" if parts else ""


def show_outcome(result: dict[str, Any], output: str) -> None:
    if output == "json":
        click.echo(to_json(result))
        return
    name = result["model"]
    if result.get("canary_ended"):
        click.echo(f"{name}: canary {result['from']} ended; {result['to']} serves every request")
    elif result.get("canary"):
        click.echo(
            f"{name}: canary {result['to']} takes {result['canary']:.0%} of requests,"
            f" {result['from']} the rest{_timings(result['seconds'])}\n"
            f"  complete it: moltctl promote {name}   undo it: moltctl rollback {name}"
        )
    elif not result["changed"]:
        click.echo(
            f"{name}: {result['to']} is ready"
            if result.get("deployed")
            else f"{name}: already serving {result['to']}"
        )
    else:
        total = format_duration(sum(result["seconds"].values()))
        click.echo(f"{name}: {result['from'] or 'nothing'} -> {result['to']} in {total}"
                   f"{_timings(result['seconds'])}")  # fmt: skip
    for change in result.get("changes", []):
        click.echo(f"  accepted with --force: {change}")
    if result.get("checksum", "verified") != "verified":
        click.echo(f"  checksum {result['checksum']}")
    if result.get("drained") is False:
        click.echo("  the previous version did not finish its requests within drain_timeout")


def force_option(func: Callable[..., Any]) -> Callable[..., Any]:
    force = "accept a changed signature or a failed warm-up on zeros"
    return click.option("--force", is_flag=True, help=force)(func)


def parse_share(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_percent(text, "a share such as 10% (above 0%, below 100%)",
                             lambda share: 0 < share < 1)  # fmt: skip
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--canary") from None


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[MODEL] VERSION")
@force_option
@click.option(
    "--canary",
    "share",
    metavar="PERCENT",
    help="send this share of requests (10%) to VERSION; promote or rollback later",
)
@output_options
@click.pass_obj
def switch(session: _Session, args: tuple[str, ...], force: bool, share: str | None,
           output: str, no_legend: bool) -> None:  # fmt: skip
    """Serve VERSION of MODEL from now on, without dropping a request.

    The new version is checked against its manifest, loaded, warmed and compared with the
    serving one before any request reaches it; the old version then drains and stops.
    MODEL may be left out when only one served model has VERSION: `moltctl switch v2.0`.
    """
    if len(args) > 2:
        raise click.UsageError("expected [MODEL] VERSION")
    model, version = (None, args[0]) if len(args) == 1 else args
    result = session().switch(version, model, force, parse_share(share), show_progress)
    show_outcome(result, output)


@cli.command()
@click.argument("model", required=False)
@output_options
@click.pass_obj
def rollback(session: _Session, model: str | None, output: str, no_legend: bool) -> None:
    """End MODEL's canary, or return to the version that served before (again: further back)."""
    show_outcome(session().rollback(model, show_progress), output)


@cli.command()
@click.argument("model", required=False)
@output_options
@click.pass_obj
def promote(session: _Session, model: str | None, output: str, no_legend: bool) -> None:
    """Make MODEL's canary the version serving every request."""
    show_outcome(session().promote(model, show_progress), output)


@cli.command()
@click.argument("model", required=False)
@output_options
@click.pass_obj
def versions(session: _Session, model: str | None, output: str, no_legend: bool) -> None:
    """Versions on disk: state (active, canary, loaded, available, broken), size, sha256."""
    report = session().versions(model)
    if output == "json":
        click.echo(to_json(report))
        return
    rows = [{"model": m["name"], **v, "size": format_size(v["size"]),
             "sha256": v["sha256"][:12] + ("" if v["verified"] is not False else " (changed!)"),
             "deployed": _when_deployed(v), "made": summary(v.get("report")),
             "detail": v.get("error") or v.get("problem")}
            for m in report["models"] for v in m["versions"]]  # fmt: skip
    columns = [("MODEL", "model"), ("VERSION", "version"), ("STATE", "state"), ("SIZE", "size"),
               ("SHA256", "sha256"), ("DEPLOYED", "deployed"), ("MADE", "made"),
               ("DETAIL", "detail")]  # fmt: skip
    click.echo(table(rows, columns, not no_legend))


def _when_deployed(version: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(version["deployed_at"]))
    return f"{when} by {version['deployed_by']}" if version["deployed_by"] else when


@cli.command()
@click.argument("path", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--model-path",
    "model_path",
    type=click.Path(path_type=Path, file_okay=False),
    help="the model folder (same as PATH): model.onnx, optional model.yaml",
)
@click.option("--model", "model", help="model name (default: the folder's name if a model has"
              " it, else the only served model)")  # fmt: skip
@click.option("--version", "version", help="new version name (default: the newest plus one)")
@click.option("--activate", is_flag=True, help="switch to it once deployed")
@force_option
@output_options
@click.pass_obj
def deploy(session: _Session, path: Path | None, model_path: Path | None, model: str | None,
           version: str | None, activate: bool, force: bool, output: str,
           no_legend: bool) -> None:  # fmt: skip
    """Copy a model folder into the repository as a new version, checked and validated.

    `moltctl deploy ./resnet --model resnet --version v3 --activate`, or
    `moltctl deploy --model-path DIR`: the model DIR is named after (or the only served
    one), as the version after its newest. A version that exists is never overwritten.
    """
    if (path is None) == (model_path is None):
        raise click.UsageError("give the model folder once: PATH or --model-path DIR")
    folder = path or model_path
    assert folder is not None
    try:
        files = folder_files(folder)  # before asking the daemon anything
    except DeployError as exc:
        raise click.UsageError(str(exc)) from None
    client = session()
    model, version = _deploy_names(client, folder, model, version)
    click.echo(f"deploying {folder} as {model} {version}", err=True)
    try:
        result = send_folder(client, folder, files, model, version,
                             {"activate": activate, "force": force},
                             session.server["max_frame_bytes"],  # type: ignore[index]
                             _sending, show_progress)  # fmt: skip
    except OSError as exc:  # a file changed or vanished while it was read
        raise click.UsageError(str(exc)) from None
    except MoltError as exc:
        if exc.code != ErrorCode.RESOURCE_EXHAUSTED:
            raise
        _fail(f"{exc.message} [{exc.code}]", EXIT_NO_ROOM)
    show_outcome(result, output)


def _sending(name: str, size: int) -> None:
    click.echo(f"  sending     {name} ({format_size(size)})", err=True)


def _deploy_names(client: Client, folder: Path, model: str | None,
                  version: str | None) -> tuple[str, str]:  # fmt: skip
    repo = client.models()["models"]
    if model is None:
        model = _model_of(folder, repo)
    versions = next((m["versions"] for m in repo if m["name"] == model), [])
    if version is None:
        try:
            version = next_version(versions)
        except DeployError as exc:
            raise click.UsageError(str(exc)) from None
    if version in versions:  # found before sending anything; the daemon checks again
        raise click.UsageError(f"model {model} already has a version {version}; a deployed"
                               " version never changes: choose a new --version")  # fmt: skip
    return model, version


def _model_of(folder: Path, repo: list[dict[str, Any]]) -> str:
    """Without --model: the model the folder is named after, else the only served one."""
    named = folder.resolve().name
    if any(m["name"] == named for m in repo):
        return named
    served = [m["name"] for m in repo if m["served"]]
    if len(served) != 1:
        raise click.UsageError(f"{plural(len(served), 'model')} served ({', '.join(served)})"
                               f" and none is named {named!r} like the folder:"
                               " name the model with --model")  # fmt: skip
    return served[0]


# --- quantize, optimize: a cheaper version, proven by the accuracy gate ----------------------


def conversion_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """What quantize and optimize share: names, evaluation, the gate, the rollout."""
    folder = click.Path(path_type=Path, file_okay=False, exists=True)
    for option in reversed((
        click.argument("model"),
        click.argument("version", required=False),
        click.option("--as", "to", metavar="VERSION",
                     help="the new version's name (default: VERSION-int8, -fp16, -opt)"),
        click.option("--eval", "eval_dir", type=folder, help="evaluation inputs: .npy (the"
                     " only input) or .npz (one array per input) files (default: the"
                     " calibration files, else model.yaml samples)"),
        click.option("--min-top1", metavar="PERCENT", help="the gate's top-1 agreement for"
                     " classifier outputs (default: conversion.min_top1_agreement, 99%)"),
        click.option("--max-error", metavar="PERCENT", help="the gate's relative error for the"
                     " other outputs (default: conversion.max_relative_error, 5%)"),
        click.option("--force", is_flag=True,
                     help="publish even if the gate fails or the signature changes"),
        click.option("--activate", is_flag=True, help="switch to it once published"),
        click.option("--canary", "share", metavar="PERCENT",
                     help="once published, send it this share of requests (5%)"),
        output_options,
        click.pass_obj,
    )):  # fmt: skip
        func = option(func)
    return func


@cli.command()
@conversion_options
@click.option("--int8", is_flag=True, help="8-bit integer weights (and activations with --static)")
@click.option("--fp16", is_flag=True, help="16-bit floats, inputs and outputs kept as they are")
@click.option("--static/--dynamic", default=False, help="INT8: calibrated activation ranges"
              " (--calibration DIR or model.yaml samples), or computed per run")  # fmt: skip
@click.option("--calibration", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="calibration inputs: .npy or .npz files, as --eval")  # fmt: skip
@click.option("--per-channel", is_flag=True, help="INT8: one scale per output channel")
@click.option("--exclude", multiple=True, metavar="NODE_OR_OP",
              help="a node name or operator type to leave as it is (repeatable)")  # fmt: skip
def quantize(session: _Session, int8: bool, fp16: bool, static: bool, calibration: Path | None,
             per_channel: bool, exclude: tuple[str, ...], **common: Any) -> None:  # fmt: skip
    """Make an INT8 or FP16 version of MODEL's VERSION (default: the active one).

    The work runs in a job inside the model's cgroup; the result and its source then run
    the same inputs, and it is published only if it passes the accuracy gate:
    `moltctl quantize mlp v1 --int8 --static --calibration ./calib --canary 5%`.
    """
    if int8 == fp16:
        raise click.UsageError("give --int8 or --fp16")
    if fp16 and (static or per_channel):
        raise click.UsageError("--static and --per-channel apply to --int8")
    method = "fp16" if fp16 else "int8-static" if static else "int8-dynamic"
    options = {"per_channel": per_channel or None, "exclude": list(exclude) or None}
    _convert(session, method, options, calibration, **common)


@cli.command()
@conversion_options
@click.option("--level", type=click.Choice(OPTIMIZATION_LEVELS), default="extended",
              show_default=True, help="onnxruntime's graph optimization level; `all` adds"
              " layout changes for this machine's CPU")  # fmt: skip
def optimize(session: _Session, level: str, **common: Any) -> None:
    """Make a version of MODEL's VERSION with onnxruntime's graph optimizations applied
    offline (fused operators, folded constants), proven by the same accuracy gate."""
    _convert(session, "optimize", {"level": level}, None, **common)


def _convert(session: _Session, method: str, options: dict[str, Any], calibration: Path | None,
             model: str, version: str | None, to: str | None, eval_dir: Path | None,
             min_top1: str | None, max_error: str | None, force: bool, activate: bool,
             share: str | None, output: str, no_legend: bool) -> None:  # fmt: skip
    if activate and share:
        raise click.UsageError("give --activate or --canary, not both")
    try:
        files = data_files({"calibration": calibration, "eval": eval_dir})
    except DeployError as exc:
        raise click.UsageError(str(exc)) from None
    client = session()
    data = None
    if files:
        max_frame = session.server["max_frame_bytes"]  # type: ignore[index]
        data, _ = send_files(client, files, max_frame, _sending)
    bounds = {"min_top1": _share(min_top1, "--min-top1"),
              "max_error": _share(max_error, "--max-error")}  # fmt: skip
    try:
        result = client.convert(model, method, show_progress, version=version, to=to, data=data,
                                force=force or None, activate=activate or None,
                                canary=parse_share(share), **options, **bounds)  # fmt: skip
    except MoltError as exc:
        if "report" not in exc.details:
            raise
        _show_report(exc.details["report"], output, err=True)
        _fail(f"{exc.message} [{exc.code}]", EXIT_GATE)
    click.echo(f"{model}: made {result['to']} from {result['report']['source']}", err=True)
    if output == "json":
        click.echo(to_json(result))
        return
    _show_report(result["report"], output)
    show_outcome(result, output)


def _show_report(report: dict[str, Any], output: str, err: bool = False) -> None:
    if output == "json":
        click.echo(to_json(report))
    else:
        for line in report_lines(report):
            click.echo(f"  {line}", err=err)


def _share(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_percent(text, "a share such as 99% or 0.99", lambda share: 0 <= share <= 1)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@cli.command()
@click.pass_obj
def metrics(session: _Session) -> None:
    """Every Prometheus series, in the text format /metrics serves (through the socket,
    so it works without metrics.listen)."""
    click.echo(session().metrics(), nl=False)


@cli.command()
@output_options
@click.pass_obj
def reload(session: _Session, output: str, no_legend: bool) -> None:
    """Re-read moltbotd's config file: limits change live (same worker pids)."""
    result = session().reload()
    if output == "json":
        click.echo(to_json(result))
        return
    rows = [{"model": name, "outcome": outcome} for name, outcome in result["models"].items()]
    click.echo(table(rows, [("MODEL", "model"), ("OUTCOME", "outcome")], not no_legend))
    if result["restart_needed"]:
        click.echo("takes effect when moltbotd restarts: " + ", ".join(result["restart_needed"]))


@cli.command()
@click.argument("model")
@click.argument("instances", metavar="N|auto")
@output_options
@click.pass_obj
def scale(session: _Session, model: str, instances: str, output: str, no_legend: bool) -> None:
    """Run N worker processes for MODEL's active version, or give the count back to
    autoscaling (auto: between instances.min and instances.max). Remembered."""
    count = None if instances == "auto" else _instance_count(instances)
    result = session().scale(model, count)
    if output == "json":
        click.echo(to_json(result))
        return
    pool = result["worker"]
    how = "set by hand" if pool["scaling"]["manual"] else "autoscaling"
    click.echo(
        f"model {model} {pool['version']}: {plural(len(pool['instances']), 'instance')} ({how})"
    )
    columns = [("PID", "pid"), ("STATE", "state"), ("INFLIGHT", "inflight"),
               ("REQUESTS", "requests")]  # fmt: skip
    click.echo(table(pool["instances"], columns, not no_legend))


def _instance_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise click.BadParameter(f"expected 1 to 64 or auto, got {text!r}", param_hint="N")
    return int(text)


# --- logs ------------------------------------------------------------------------------------


def level_range(priority: str | None, filter_text: str | None) -> tuple[str, str, str | None]:
    """-p LEVEL or -p FROM..TO (journalctl); --filter LEVEL means -p LEVEL, else it is text."""
    low, high, contains = LEVELS[0], LEVELS[-1], None
    try:
        if priority:
            first, _, last = priority.partition("..")
            low = parse_level(first)
            high = parse_level(last) if last else high
        if filter_text:
            try:
                low = parse_level(filter_text)
            except ValueError:
                contains = filter_text
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return low, high, contains


def time_range(since: str | None, last: str | None,
               until: str | None) -> tuple[float | None, float | None]:  # fmt: skip
    """--since (or --last) and --until as UNIX times, for logs and audit."""
    if since and last:
        raise click.UsageError("--since and --last both set a start: give one")
    now = time.time()
    return _when(since or last, now), _when(until, now)


def _when(text: str | None, now: float) -> float | None:
    if text is None:
        return None
    try:
        return parse_when(text, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option(
    "-p",
    "--priority",
    metavar="LEVEL|FROM..TO",
    help="levels shown: err, warning..err (debug, info, warning, error, critical)",
)
@click.option(
    "--filter",
    "filter_text",
    metavar="LEVEL|TEXT",
    help="a level name (same as -p LEVEL) or text the entry must contain",
)
@click.option(
    "-S", "--since", help="entries from this time: 1h, 30m ago, today, '2026-11-21 14:00'"
)
@click.option("--last", help="entries of the last DURATION, e.g. 1h (same as --since 1h)")
@click.option("-U", "--until", help="entries up to this time")
@click.option("-m", "--model", help="only entries about this model")
@click.option("-n", "--lines", type=click.IntRange(min=1), help="only the newest N entries")
@click.option("-f", "--follow", is_flag=True, help="keep printing new entries (Ctrl-C stops)")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    help="text lines, or one JSON object per line",
)
@click.option(
    "--source",
    type=click.Choice(["auto", "journal", "daemon"]),
    default="auto",
    help="journal: the history, earlier runs too (read with journalctl); daemon: the"
    " entries moltbotd keeps in memory; auto: the journal when moltbotd logs there and"
    " you may read it",
)
@click.pass_obj
def logs(session: _Session, priority: str | None, filter_text: str | None, since: str | None,
         last: str | None, until: str | None, model: str | None, lines: int | None,
         follow: bool, output: str, source: str) -> None:  # fmt: skip
    """Entries from moltbotd's log, filtered like journalctl's."""
    start, end = time_range(since, last, until)
    low, high, contains = level_range(priority, filter_text)
    query = {"min_level": low, "max_level": high, "since": start, "until": end,
             "model": model, "contains": contains,
             "limit": lines or (10 if follow else None)}  # fmt: skip
    with until_ctrl_c(repeating=follow):
        if _from_journal(session, source):
            _show_journal(journal.entries(low, high, start, end, model, contains,
                                          query["limit"], follow), output)  # fmt: skip
        else:
            _follow_ring(session(), query, output, follow)


def _from_journal(session: _Session, source: str) -> bool:
    """Whether the entries come from the journal: asked for; or (auto) moltbotd logs
    there, or cannot be reached and did log there, and this user may read it."""
    if source == "daemon":
        return False
    why = journal.why_unreadable()
    if source == "journal":
        if why:
            _fail(f"cannot read the journal: {why}", EXIT_ERROR)
        return True
    try:
        logs_there = bool(session().logs(limit=0).get("journal"))
    except ConnectError:  # its history may still be in the journal
        if why is None and journal.has_entries():
            return True
        raise
    if logs_there and why:
        click.echo(f"moltctl: showing the entries moltbotd keeps in memory, since it"
                   f" started: {why}", err=True)  # fmt: skip
    return logs_there and why is None


def _follow_ring(client: Client, query: dict[str, Any], output: str, follow: bool) -> None:
    answer = client.logs(**query)
    if not answer["entries"]:  # on stderr: stdout stays the entries, none here
        notice = " yet; following (Ctrl-C stops)" if follow else ""
        click.echo(f"-- no entries match{notice} --", err=True)
    while True:
        for entry in answer["entries"]:
            click.echo(json.dumps(entry) if output == "json" else
                       render_text(entry["time"], entry["level"], entry["logger"],
                                   entry["event"], entry["fields"]))  # fmt: skip
        if not follow:
            return
        query.update(after=answer["last_seq"], limit=None)
        time.sleep(FOLLOW_POLL_SECONDS)
        answer = client.logs(**query)


def _show_journal(found: Iterable[dict[str, Any]], output: str) -> None:
    shown = 0
    for entry in found:
        click.echo(json.dumps(entry) if output == "json" else journal.render(entry))
        shown += 1
    if not shown:
        click.echo("-- no entries match (in the journal) --", err=True)


@cli.command()
@click.option("-S", "--since", help="records from this time: 1d, 2h ago, today, '2026-11-21'")
@click.option("--last", help="records of the last DURATION, e.g. 1d (same as --since 1d)")
@click.option("-U", "--until", help="records up to this time")
@click.option("--op", help="only this operation: switch, deploy, scale, reload, ...")
@click.option("-n", "--lines", type=click.IntRange(1, 100_000), default=1000,
              help="only the newest N records (default 1000)")  # fmt: skip
@output_options
@click.pass_obj
def audit(session: _Session, since: str | None, last: str | None, until: str | None,
          op: str | None, lines: int, output: str, no_legend: bool) -> None:  # fmt: skip
    """Who changed what: every switch, canary, promote, rollback, deploy, scale and reload,
    refused ones included, oldest first."""
    start, end = time_range(since, last, until)
    result = session().audit(since=start, until=end, op=op, limit=lines)
    if output == "json":
        click.echo(to_json(result))
        return
    if not result["records"]:
        click.echo(f"-- no audit records match (in {result['file']}) --", err=True)
        return
    rows = [_audit_row(record) for record in result["records"]]
    columns = [("TIME", "time"), ("WHO", "who"), ("OP", "op"), ("PARAMS", "params"),
               ("OUTCOME", "outcome"), ("MS", "ms")]  # fmt: skip
    click.echo(table(rows, columns, not no_legend))


def _audit_row(record: dict[str, Any]) -> dict[str, Any]:
    who = record.get("who") or {}
    name = who.get("user") or f"uid {who.get('uid')}"
    if "transport" in who:  # a network client: no uid, its address
        name = f"{who['transport']} {who['address']}"
    exe = os.path.basename(who.get("exe") or "") or "?"
    params = " ".join(f"{k}={json.dumps(v)}" for k, v in (record.get("params") or {}).items())
    outcome = record.get("outcome")
    if record.get("error"):
        outcome = f"{outcome}: {record['error']}"
    when = datetime.datetime.fromtimestamp(record.get("time", 0)).strftime("%Y-%m-%d %H:%M:%S")
    return {
        "time": when,
        "who": f"{name} (pid {who.get('pid')}, {exe})",
        "op": record.get("op"),
        "params": params[:120],
        "outcome": str(outcome)[:160],
        "ms": record.get("ms"),
    }


def main() -> None:
    cli(prog_name="moltctl")
