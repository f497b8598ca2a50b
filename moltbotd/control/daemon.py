"""`moltbotd`: load the config, serve in the foreground until SIGTERM/SIGINT, stop cleanly.

Signal handlers only set an event; the main task does the stopping in order: stop
accepting, let requests in flight finish, stop the workers, remove the socket.
"""

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import sdnotify
import uvloop

from moltbotd import __version__
from moltbotd import config as cfg
from moltbotd.control.activation import listen_fds
from moltbotd.control.rollout import Rollout
from moltbotd.control.server import Reloader, Server, StartError
from moltbotd.control.supervisor import Supervisor
from moltbotd.isolation.cgroups import CgroupError
from moltbotd.isolation.policy import Isolation
from moltbotd.journal import Journal, stderr_is_journal
from moltbotd.logs import Ring, configure, get_logger
from moltbotd.malloc import keep_freed_memory
from moltbotd.versions.repository import scan
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltbotd.wire.units import plural

# Exit statuses. systemd's unit refuses to restart on 78 and 69 (RestartPreventExitStatus):
# retrying cannot fix them. Anything else that stops a start (a full disk, a permission,
# the socket) may be gone on the next try, so it exits 1 and Restart=on-failure retries.
EXIT_FAILURE = 1
EXIT_ISOLATION = 69  # EX_UNAVAILABLE: isolation: strict without cgroup v2 delegation
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: the config or the repository's layout
Loader = Callable[[], cfg.Config]

log = get_logger("daemon")


def check_repository(config: cfg.Config) -> list[str]:
    """Problems --check-config reports beyond the file itself: the repository's model.yaml."""
    problems = []
    try:
        repo = scan(config.models_dir)
    except cfg.ConfigError as exc:
        return [str(exc)]
    problems.extend(f"skipped {why}" for why in repo.skipped)
    for model in repo.models.values():
        for version in model.versions:
            try:
                model.model_yaml(version)
            except cfg.ConfigError as exc:
                problems.append(str(exc))
    return problems


def reloader(load: Loader, rollout: Rollout, notifier: Any) -> Reloader:
    """Re-read the config; a bad file leaves the running configuration as it is."""

    async def reload_config() -> dict[str, Any]:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            config = load()
        except cfg.ConfigError as exc:
            log.error("reload refused: {error}", error=str(exc))
            raise MoltError(
                ErrorCode.INVALID_CONFIG, f"{exc}; the running configuration is unchanged"
            ) from None
        else:
            return await rollout.sup.reload(config, rollout.restart)
        finally:  # after the reload finished: systemctl reload returns when it is done
            notifier.notify("READY=1")

    return reload_config


async def on_sighup(reload_config: Reloader) -> None:
    with contextlib.suppress(MoltError):  # already logged
        await reload_config()


async def keep_watchdog_fed(notifier: Any) -> None:
    """WATCHDOG=1 at half of systemd's WatchdogSec, from the event loop itself: a loop that
    hangs stops feeding it, and systemd restarts the daemon."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)


async def serve(config: cfg.Config, load: Loader, ring: Ring) -> int:
    activated = listen_fds()  # first: no worker may inherit them
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = sdnotify.SystemdNotifier()
    try:
        isolation = Isolation.establish(config.isolation, config.models_dir)
    except CgroupError as exc:
        log.error("cannot start: {error}", error=str(exc))
        return EXIT_ISOLATION
    supervisor = Supervisor(config, isolation)
    rollout = Rollout(supervisor)
    reload_config = reloader(load, rollout, notifier)
    reloads: set[asyncio.Task[None]] = set()

    def hangup() -> None:  # only schedules: the reload runs as a task of the loop
        task = loop.create_task(on_sighup(reload_config))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    server = Server(config, rollout, ring, reload_config, activated)
    try:
        await server.listen()
    except StartError as exc:  # it names the path or the address
        log.error("cannot start: {error}", error=str(exc))
        return EXIT_FAILURE
    except OSError as exc:
        log.error("cannot listen on {socket}: {error}", socket=str(config.socket), error=str(exc))
        return EXIT_FAILURE
    notifier.notify("STATUS=loading models")
    starting = loop.create_task(supervisor.start())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception():
        await server.shutdown(0)
        return start_failed(starting.exception())  # type: ignore[arg-type]
    if starting.done():
        health = supervisor.health()["models"]
        failed = sum(state != "ready" for state in health.values())
        summary = f"serving {plural(len(health) - failed, 'model')}, {failed} failed"
        notifier.notify(f"READY=1\nSTATUS={summary}")
        log.info("moltbotd {release} ready: {summary}", release=__version__, summary=summary,
                 socket=str(config.socket))  # fmt: skip
        watchdog = loop.create_task(keep_watchdog_fed(notifier))
        await stopping
        watchdog.cancel()
    else:
        starting.cancel()
    drain = supervisor.config.drain_timeout  # the supervisor holds the reloaded config
    log.info("stopping: draining requests, then workers", drain_timeout=drain)
    notifier.notify("STOPPING=1")
    await server.shutdown(drain)
    await supervisor.stop()
    log.info("stopped")
    return 0


def start_failed(exc: BaseException) -> int:
    """The exit status for a start that raised: EX_CONFIG only for a config error; anything
    else is logged with its traceback (it may be a bug) and may be retried."""
    if isinstance(exc, cfg.ConfigError):
        log.error("cannot start: {error}", error=str(exc))
        return EXIT_CONFIG
    log.error("cannot start: {error}", error=str(exc), exc_info=exc)
    return EXIT_FAILURE


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"config file  [default: {cfg.DEFAULT_CONFIG_PATH} if it exists]",
)
@click.option("--socket", type=click.Path(path_type=Path), help="Unix socket to serve on")
@click.option(
    "--models-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="model repository: MODEL/VERSION/model.onnx",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="where active versions are remembered across restarts",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), help="log line format")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--check-config",
    is_flag=True,
    help="validate the config and the repository's model.yaml files, then exit",
)
@click.version_option(__version__, prog_name="moltbotd")
def main(
    config_path: Path | None,
    socket: Path | None,
    models_dir: Path | None,
    state_dir: Path | None,
    log_format: str | None,
    log_level: str | None,
    check_config: bool,
) -> None:
    """Serve ONNX models from per-model worker processes on a Unix socket (foreground)."""
    if config_path is None and cfg.DEFAULT_CONFIG_PATH.exists():
        config_path = cfg.DEFAULT_CONFIG_PATH
    load = functools.partial(
        load_config, config_path, socket=socket, models_dir=models_dir, state_dir=state_dir,
        log_format=log_format, log_level=log_level,
    )  # fmt: skip
    try:
        config = load()
    except cfg.ConfigError as exc:
        click.echo(f"moltbotd: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if check_config:
        sys.exit(report_check(config_path, config))
    journal, problem = open_journal(config)
    ring = configure(config.log_format, config.log_level, config.log_ring_size, journal=journal)
    if problem:
        log.warning("logging to stderr: {problem}", problem=problem)
    keep_freed_memory()
    # uvloop: the event loop's own cost per request is about a third of asyncio's
    sys.exit(uvloop.run(serve(config, load, ring)))


def open_journal(config: cfg.Config) -> tuple[Journal | None, str | None]:
    """The journal to log to, if log_target asks for it (or, for auto, systemd connected
    stderr to it); else None, and why when it could not be reached."""
    wanted = config.log_target == "journal" or (config.log_target == "auto" and stderr_is_journal())
    if not wanted:
        return None, None
    try:
        return Journal(config.journal_socket), None
    except OSError as exc:
        return None, f"cannot reach journald at {config.journal_socket}: {exc.strerror or exc}"


def load_config(config_path: Path | None, **flags: Any) -> cfg.Config:
    """The file (or the defaults), with the command-line flags on top; also for reloads."""
    return cfg.with_overrides(cfg.load(config_path), **flags)


def report_check(config_path: Path | None, config: cfg.Config) -> int:
    problems = check_repository(config)
    for problem in problems:
        click.echo(f"moltbotd: {problem}", err=True)
    if problems:
        return EXIT_CONFIG
    source = config_path or "built-in defaults"
    click.echo(f"moltbotd: configuration OK ({source}; models_dir {config.models_dir})")
    return 0
