"""Soak moltbotd under pipelined load from three client kinds while chaos strikes.

    make soak MINUTES=10                  # or: .venv/bin/python -m stress.soak --minutes 10

Starts the daemon on a temporary socket with two models of two versions each, whose
answers differ per version (stress.models: y = factor * x). Clients: a raw socket
sending pipelined infer frames matched by id, an AsyncClient shared by several tasks,
and blocking Client(direct=True) clients (direct channels to the workers). Every
request carries its own tag in x and its answer is checked against the version that
answered. Meanwhile stress.chaos SIGKILLs and SIGSTOPs workers, switches, starts
canaries, promotes, rolls back, scales and reloads (SIGHUP). With --cgroups (systemd as
PID 1, as in the VM scenarios) the daemon runs in a delegated scope with isolation:
strict, and the chaos also OOM-kills workers through their cgroup's memory.max.

At the end the clients stop sending and wait --drain seconds for what is owed; the
soak puts the models back as they started (rollback of a canary, the first versions,
autoscaling) and waits for one worker each before it measures again.

Targets (exit status 1 when one is missed): no request never answered, duplicated or
answered wrongly (per client kind; control calls too), no traceback in the daemon log,
no worker alive after the daemon stopped, no model cgroup left without a worker once the
models settled (--cgroups), no more daemon fds at the end than at the start (both
without clients and with one worker per model), daemon RSS growth under 5 % from after
the warm-up (--warmup, 10 % of the run by default) to the end.
"""

import argparse
import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from moltbotd.isolation.cgroups import GROUP_PREFIX
from moltbotd.wire.protocol import MoltError
from moltctl.client import Client
from stress.chaos import CONTROL_TIMEOUT, Chaos, config
from stress.daemon import Daemon, alive, fds, quiet_fds, rss_kb, running_daemon, tracebacks
from stress.load import AsyncLoad, BlockingLoad, Pace, RawLoad, Tally
from stress.models import FACTORS, write_soak_repository
from stress.report import Figure, Outcome, at_most, below, examples, figures_table, growth, table

RSS_GROWTH = 5.0  # percent
SETTLE = 60.0  # seconds for the models to be back to one ready worker each
KINDS = ("raw socket", "AsyncClient", "Client(direct=True)")
CONTROL = "control calls"
# The daemon in a transient scope of its own, with its cgroup delegated (as Delegate=yes
# in moltbotd.service); systemd-run execs it, so the pid is the daemon's.
SCOPE = ("systemd-run", "--scope", "--quiet", "--property=Delegate=yes", "--")


@dataclass(frozen=True)
class Settings:
    seconds: float = 600.0
    seed: int = 0
    rate: float = 40.0  # requests per second per sender (a raw socket, a task, a client)
    raw_depth: int = 8  # a raw socket's requests in flight at most
    async_tasks: int = 4
    direct_clients: int = 2
    chaos_period: float = 0.7  # mean seconds between chaos actions
    warmup: float | None = None  # seconds before the RSS baseline; None: a tenth of the run
    drain: float = 30.0  # seconds the clients wait at the end for answers owed
    log: Path | None = None  # keep the daemon's log here
    cgroups: bool = False  # in a delegated systemd scope; OOM kills through cgroups

    def warmup_seconds(self) -> float:
        return self.warmup if self.warmup is not None else max(5.0, self.seconds / 10)


@dataclass
class Measures:
    fds_start: dict[str, int]
    rss_warm: int | None = None
    rss_end: int | None = None
    fds_end: dict[str, int] | None = None
    settled: bool = False
    crashed: int | None = None
    exit_status: int | None = None
    leaked: tuple[int, ...] = ()
    leaked_groups: tuple[str, ...] | None = None  # None: no cgroups in use
    logged: tuple[str, ...] = ()


def soak(settings: Settings) -> Outcome:
    wrapper = SCOPE if settings.cgroups else ()
    repository, first = write_soak_repository, config(1000, settings.cgroups)
    with running_daemon(repository, first, settings.log, wrapper) as daemon:
        measures = Measures(fds(daemon.pid))
        with daemon.client(CONTROL_TIMEOUT) as control:
            initial = {m["name"]: m["active_version"] for m in control.status()["models"]}
        tallies = {kind: Tally() for kind in (*KINDS, CONTROL)}
        stop = threading.Event()
        pace = Pace(stop, time.monotonic() + settings.seconds, interval=1 / settings.rate)
        chaos = Chaos(daemon, settings.seed, tallies[CONTROL], stop, settings.chaos_period,
                      settings.cgroups)  # fmt: skip
        loads = clients(daemon, settings, tallies, pace)
        for thread in [*loads, chaos]:
            thread.start()
        measures.rss_warm = wait_out(daemon, settings, pace)
        stop.set()
        for thread in [chaos, *loads]:
            thread.join(settings.drain + CONTROL_TIMEOUT)
        finish(daemon, initial, chaos.seen, measures)
    return report(settings, tallies, measures)


def clients(daemon: Daemon, settings: Settings, tallies: dict[str, Tally],
            pace: Pace) -> list[threading.Thread]:  # fmt: skip
    models, drain = list(FACTORS), settings.drain
    raw, asyncs, direct = (tallies[kind] for kind in KINDS)
    # A blocking call may wait for the whole run and the drain: only then is it unanswered.
    patience = settings.seconds + drain
    return [
        RawLoad(daemon.socket, models, raw, pace, 1, settings.raw_depth, drain),
        AsyncLoad(daemon.socket, models, asyncs, pace, 2, settings.async_tasks, drain),
        *(BlockingLoad(daemon.socket, models, direct, pace, 10 + i, direct=True, timeout=patience)
          for i in range(settings.direct_clients)),
    ]  # fmt: skip


def wait_out(daemon: Daemon, settings: Settings, pace: Pace) -> int | None:
    """Sleep through the run (or until the daemon exits); its RSS after the warm-up."""
    warm = time.monotonic() + settings.warmup_seconds()
    rss = None
    while time.monotonic() < pace.until and daemon.proc and daemon.proc.poll() is None:
        if rss is None and time.monotonic() >= warm:
            rss = rss_kb(daemon.pid)
        time.sleep(0.2)
    return rss


def finish(daemon: Daemon, initial: dict[str, str], seen: set[int], measures: Measures) -> None:
    """Put the models back, measure, stop the daemon, look for what outlived it."""
    assert daemon.proc is not None
    measures.crashed = daemon.proc.poll()
    if measures.crashed is None:
        measures.settled = restore(daemon, initial)
        measures.leaked_groups = empty_groups(daemon)
        measures.rss_end, measures.fds_end = rss_kb(daemon.pid), quiet_fds(daemon.pid)
        seen.update(daemon.workers())
        with contextlib.suppress(Exception):
            measures.exit_status = daemon.stop(timeout=60)
    time.sleep(0.5)  # PR_SET_PDEATHSIG is delivered, but the dying takes a moment
    measures.leaked = tuple(sorted(pid for pid in seen if alive(pid)))
    measures.logged = tuple(tracebacks(daemon.log()))


def restore(daemon: Daemon, initial: dict[str, str]) -> bool:
    """Back to the first versions, no canary, autoscaling; True once every model has one
    ready worker again (within SETTLE seconds)."""
    deadline = time.monotonic() + SETTLE
    with daemon.client(CONTROL_TIMEOUT) as control:
        for model, version in initial.items():
            with contextlib.suppress(MoltError):
                if control.status(model)["models"][0].get("canary"):
                    control.rollback(model)
            with contextlib.suppress(MoltError):
                control.switch(version, model)
            with contextlib.suppress(MoltError):
                control.scale(model, None)
        while time.monotonic() < deadline:
            if settled(control, initial) and len(daemon.workers()) == len(initial):
                return True
            time.sleep(0.2)
    return False


def empty_groups(daemon: Daemon) -> tuple[str, ...] | None:
    """Model groups without a process: left behind by a version that stopped. None
    where the daemon enforces no limits."""
    with daemon.client(CONTROL_TIMEOUT) as control:
        subtree = control.status()["isolation"]["cgroup"]
    if subtree is None:
        return None
    groups = Path(subtree).glob(GROUP_PREFIX + "*")
    return tuple(sorted(g.name for g in groups if not (g / "cgroup.procs").read_text().split()))


def settled(control: Client, initial: dict[str, str]) -> bool:
    models = {m["name"]: m for m in control.status()["models"]}
    return all(
        models[name]["active_version"] == version
        and not models[name].get("canary")
        and set(control.health()["models"].values()) == {"ready"}
        for name, version in initial.items()
    )


def report(settings: Settings, tallies: dict[str, Tally], measures: Measures) -> Outcome:
    figures = [Figure("run", f"{settings.seconds:g}s, seed {settings.seed}")]
    for kind, tally in tallies.items():
        figures += [
            at_most(f"{kind}: never answered", tally.counts["unanswered"], 0),
            at_most(f"{kind}: duplicated", tally.counts["duplicated"], 0),
            at_most(f"{kind}: wrong answers", tally.counts["wrong"], 0),
        ]
    figures += daemon_figures(measures)
    clients_table = table(
        [client_row(kind, tallies[kind]) for kind in KINDS],
        ("client", "requests", "ok", "wrong", "duplicated", "never answered", "errors"),
    )
    control = tallies[CONTROL].counts
    chaos_table = table(sorted((k, str(v)) for k, v in control.items()), ("chaos action", "count"))
    notes = "".join(
        examples(f"{kind}: {outcome}", found)
        for kind, tally in tallies.items()
        for outcome, found in tally.examples.items()
        if outcome in ("unanswered", "duplicated", "wrong")
    )
    text = "\n\n".join([
        clients_table, chaos_table, figures_table(figures),
        notes + examples("tracebacks in the daemon log", list(measures.logged)),
    ])  # fmt: skip
    return Outcome(figures, text)


def client_row(kind: str, tally: Tally) -> tuple[str, ...]:
    counts = tally.counts
    errors = ", ".join(f"{code[6:]} {n}" for code, n in sorted(tally.errors().items()))
    return (kind, str(tally.total()), str(counts["ok"]), str(counts["wrong"]),
            str(counts["duplicated"]), str(counts["unanswered"]), errors or "-")  # fmt: skip


def daemon_figures(m: Measures) -> list[Figure]:
    figures = [
        at_most("daemon crashes", 0 if m.crashed is None else 1, 0),
        at_most("tracebacks in the daemon log", len(m.logged), 0),
        Figure("models settled back after the run", "yes" if m.settled else "no", "yes", m.settled),
        Figure(
            "leaked worker processes", ", ".join(map(str, m.leaked)) or "none", "none", not m.leaked
        ),
        Figure("daemon exit status at stop", str(m.exit_status)),
    ]
    if m.leaked_groups is not None:
        leaked = ", ".join(m.leaked_groups) or "none"
        figures.append(Figure("model cgroups left empty", leaked, "none", not m.leaked_groups))
    if m.fds_end is not None:
        start, end = sum(m.fds_start.values()), sum(m.fds_end.values())
        figures += [
            at_most("daemon fds: end - start", end - start, 0),
            Figure(
                "daemon fds by kind", f"start {fd_kinds(m.fds_start)}; end {fd_kinds(m.fds_end)}"
            ),
        ]
    if m.rss_warm and m.rss_end:
        figures += [
            below("daemon RSS growth", growth(m.rss_warm, m.rss_end), RSS_GROWTH, "%"),
            Figure("daemon RSS (kB)", f"{m.rss_warm} after warm-up, {m.rss_end} at end"),
        ]
    else:
        figures.append(Figure("daemon RSS growth", "not measured", f"< {RSS_GROWTH:g}%", False))
    return figures


def fd_kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument("--minutes", type=float, default=defaults.seconds / 60)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="per sender, per s")
    parser.add_argument("--chaos-period", type=float, default=defaults.chaos_period)
    parser.add_argument("--warmup", type=float, help="seconds (default: a tenth of the run)")
    parser.add_argument("--drain", type=float, default=defaults.drain)
    parser.add_argument("--log", type=Path, help="keep the daemon's log here")
    parser.add_argument("--cgroups", action="store_true",
                        help="run the daemon in a delegated systemd scope (systemd as PID 1)"
                        " and OOM-kill workers through their cgroup")  # fmt: skip
    args = parser.parse_args(argv)
    settings = Settings(seconds=args.minutes * 60, seed=args.seed, rate=args.rate,
                        chaos_period=args.chaos_period, warmup=args.warmup,
                        drain=args.drain, log=args.log, cgroups=args.cgroups)  # fmt: skip
    outcome = soak(settings)
    print(outcome.text)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
