"""Fuzz moltbotd's socket with malformed frames while good requests check it still serves.

    make fuzz N=100000                       # or: .venv/bin/python -m stress.fuzz --frames N
    .venv/bin/python -m stress.fuzz --seed 3 --case 1234      # replay one case, verbosely

Starts the daemon on a temporary socket and repository (demo v1.0 and v2.0, iris,
multi), then sends --frames frames from stress.frames (each case on its own connection,
--connections at a time), while one Client sends a good infer request to demo every
--interval-ms on a connection of its own and checks its answer. Stops by itself after
--frames frames or --max-seconds, or when the daemon exits.

Targets (exit status 1 when one is missed): the daemon never exits, no INTERNAL
answer, no traceback in its log, every good request answered (and rightly), its RSS
grows less than 10 % from after the warm-up (the first tenth of the frames) to the end
(with a small log ring: stress.daemon.SMALL_LOG_RING says why).
As docs/protocol.md promises, every whole frame a client sent before it half-closed is
answered and the daemon then closes: a fuzz frame left unanswered, or a connection
kept open 30 s after EOF, is a miss too. Also reported: answers by code, its fds.
"""

import argparse
import contextlib
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from moltbotd.wire.protocol import FrameDecoder, MoltError
from stress.daemon import (
    SMALL_LOG_RING,
    Daemon,
    fds,
    quiet_fds,
    rss_kb,
    running_daemon,
    tracebacks,
)
from stress.frames import Case, make_case
from stress.load import BlockingLoad, Pace, Tally, describe
from stress.models import write_fuzz_repository
from stress.report import Figure, Outcome, at_most, below, examples, figures_table, growth

CASE_TIMEOUT = 30.0  # seconds for the daemon to answer a case and close (a switch is slow)
RSS_GROWTH = 10.0  # percent
EXAMPLES_SHOWN = 3


@dataclass
class Findings:
    """What the cases found, shared by the sending threads."""

    seed: int
    frames: int = 0
    cases: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    internal: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    hanging: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, index: int, case: Case, answers: list[Any] | None) -> None:
        where = f"case {index} ({case.kind}; replay: --seed {self.seed} --case {index})"
        with self.lock:
            self.cases += 1
            self.frames += case.frames or 1
            if answers is None:
                self.hanging.append(where)
                return
            for answer in answers:
                code = answer_code(answer)
                self.codes[code] += 1
                if code == "INTERNAL":
                    self.internal.append(f"{where}: sent {describe(case.writes)}")
            if case.frames is not None and not case.abort and len(answers) < case.frames:
                self.unanswered.append(f"{where}: {len(answers)} of {case.frames} answered")


def answer_code(answer: Any) -> str:
    if isinstance(answer, MoltError):
        return "unreadable answer"
    if answer.get("ok") is True:
        return "ok"
    error = answer.get("error")
    return str(error.get("code")) if isinstance(error, dict) else "malformed answer"


def exchange(path: Path, case: Case) -> list[Any] | None:
    """Send a case on a new connection and read every answer until the daemon closes;
    None when it keeps the connection open past CASE_TIMEOUT."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(CASE_TIMEOUT)
        sock.connect(str(path))
        try:
            for i, chunk in enumerate(case.writes):
                if i:
                    time.sleep(0.001)  # the daemon reads a partial frame
                sock.sendall(chunk)
            if case.abort:
                return []
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed on an oversized header: read what it said before
        try:
            return read_all(sock)
        except TimeoutError:
            return None


def read_all(sock: socket.socket) -> list[Any]:
    """Answers up to EOF; progress frames are not answers."""
    decoder, answers = FrameDecoder(1 << 30), []
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(1 << 16):
            answers += decoder.feed(data)
    return [a for a in answers if isinstance(a, MoltError) or "progress" not in a]


class Sender(threading.Thread):
    """Sends cases by index from a shared counter until the budget is spent."""

    def __init__(self, daemon: Daemon, findings: Findings, budget: "Budget") -> None:
        super().__init__(daemon=True)
        self.path, self.proc, self.findings, self.budget = (
            daemon.socket,
            daemon.proc,
            findings,
            budget,
        )

    def run(self) -> None:
        while (index := self.budget.take(self.findings.frames)) is not None:
            case = make_case(self.findings.seed, index)
            try:
                answers = exchange(self.path, case)
            except OSError:  # refused or reset at connect: the daemon is gone
                return
            self.findings.record(index, case, answers)


@dataclass
class Budget:
    frames: int
    until: float
    stop: threading.Event
    next_case: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, sent: int) -> int | None:
        """The next case's index, or None when frames or time are spent."""
        with self.lock:
            if sent >= self.frames or time.monotonic() > self.until or self.stop.is_set():
                return None
            self.next_case += 1
            return self.next_case - 1


@dataclass
class Sample:
    rss_kb: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> "Sample":
        return cls(rss_kb(pid), sum(fds(pid).values()))

    @classmethod
    def quiet(cls, pid: int) -> "Sample":
        """Once the connections the run closed are closed in the daemon too."""
        return cls(rss_kb(pid), sum(quiet_fds(pid).values()))


@dataclass
class Run:
    """The daemon's side of a run: its samples, how it ended, what it logged."""

    first: Sample
    baseline: Sample | None = None  # after the warm-up
    end: Sample | None = None
    crashed: int | None = None  # its exit status, when it exited by itself
    exit_status: int | None = None  # at the stop
    logged: list[str] = field(default_factory=list)  # tracebacks
    seconds: float = 0.0

    def ending(self) -> str:
        if self.crashed is not None:
            return f"{self.crashed} (it exited by itself)"
        return f"{self.exit_status} at the stop"


@dataclass(frozen=True)
class Settings:
    frames: int = 100_000
    seed: int = 0
    connections: int = 2  # cases sent at once
    interval_ms: float = 5.0  # between good requests
    max_seconds: float = 3600.0
    log: Path | None = None  # keep the daemon's log here

    def warmup_frames(self) -> int:
        return min(self.frames, max(200, self.frames // 10))


def fuzz(settings: Settings) -> Outcome:
    with running_daemon(write_fuzz_repository, SMALL_LOG_RING, settings.log) as daemon:
        findings, good = Findings(settings.seed), Tally()
        stop = threading.Event()
        budget = Budget(settings.frames, time.monotonic() + settings.max_seconds, stop)
        pace = Pace(stop, budget.until, interval=settings.interval_ms / 1000)
        checker = BlockingLoad(daemon.socket, ["demo"], good, pace, number=0, timeout=10.0)
        senders = [Sender(daemon, findings, budget) for _ in range(settings.connections)]
        started, run = time.monotonic(), Run(Sample.of(daemon.pid))
        for thread in [checker, *senders]:
            thread.start()
        run.baseline = watch(daemon, findings, senders, settings.warmup_frames())
        stop.set()
        checker.join(30)
        run.seconds = time.monotonic() - started
        assert daemon.proc is not None
        run.crashed = daemon.proc.poll()
        if run.crashed is None:
            run.end = Sample.quiet(daemon.pid)
            run.exit_status = daemon.stop(timeout=60)
        run.logged = tracebacks(daemon.log())
    return report(findings, good, run)


def watch(daemon: Daemon, findings: Findings, senders: list[Sender], warmup: int) -> Sample | None:
    """Wait for the senders; the daemon's figures once the warm-up frames are sent."""
    baseline = None
    while any(s.is_alive() for s in senders) and daemon.proc and daemon.proc.poll() is None:
        if baseline is None and findings.frames >= warmup:
            baseline = Sample.of(daemon.pid)
        time.sleep(0.1)
    for sender in senders:
        sender.join(CASE_TIMEOUT + 5)
    return baseline


def report(findings: Findings, good: Tally, run: Run) -> Outcome:
    first, baseline, end, logged = run.first, run.baseline, run.end, run.logged
    seconds = f"{run.seconds:.0f}s"
    figures = [
        Figure("frames sent", f"{findings.frames} in {findings.cases} connections, {seconds}"),
        Figure("answers by code", ", ".join(f"{c} {n}" for c, n in findings.codes.most_common())),
        at_most("daemon crashes", 0 if run.crashed is None else 1, 0),
        at_most("INTERNAL answers", len(findings.internal), 0),
        at_most("tracebacks in the daemon log", len(logged), 0),
        at_most("good requests unanswered", good.counts["unanswered"], 0),
        at_most("good requests answered wrongly", good.counts["wrong"], 0),
        Figure("good requests", ", ".join(f"{k} {v}" for k, v in good.counts.most_common())),
        at_most("fuzz frames unanswered", len(findings.unanswered), 0),
        at_most("connections kept open after EOF", len(findings.hanging), 0),
        Figure("daemon exit status", run.ending()),
    ]
    if baseline and end:
        figures += [
            below("daemon RSS growth", growth(baseline.rss_kb, end.rss_kb), RSS_GROWTH, "%"),
            Figure(
                "daemon RSS (kB)",
                f"{first.rss_kb} at start, {baseline.rss_kb} after warm-up, {end.rss_kb} at end",
            ),
            Figure(
                "daemon fds",
                f"{first.fds} at start, {baseline.fds} after warm-up, {end.fds} at end",
            ),
        ]
    else:
        figures.append(Figure("daemon RSS growth", "not measured", "< 10%", met=False))
    text = figures_table(figures) + "\n\n" + "".join([
        examples("INTERNAL answers", findings.internal, EXAMPLES_SHOWN),
        examples("tracebacks in the daemon log", logged, EXAMPLES_SHOWN),
        examples("good requests not ok", list(chain(*good.examples.values())), EXAMPLES_SHOWN),
        examples("fuzz frames unanswered", findings.unanswered, EXAMPLES_SHOWN),
        examples("connections kept open after EOF", findings.hanging, EXAMPLES_SHOWN),
    ])  # fmt: skip
    return Outcome(figures, text)


def replay(seed: int, index: int) -> int:
    """One case against a fresh daemon: what was sent, what came back, what it logged."""
    case = make_case(seed, index)
    with running_daemon(write_fuzz_repository) as daemon:
        answers = exchange(daemon.socket, case)
        time.sleep(0.5)  # let a worker's or a task's late traceback reach the log
        logged = tracebacks(daemon.log())
    print(f"case {index} of seed {seed}: {case.kind}, {case.frames} frames owed,"
          f" abort={case.abort}\nwrites: {describe(case.writes, 2000)}")  # fmt: skip
    print("answers:", "none (kept open)" if answers is None else describe(answers, 4000))
    print(examples("tracebacks in the daemon log", logged, 10) or "no traceback in the log")
    return 1 if logged or any(answer_code(a) == "INTERNAL" for a in answers or []) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument("--frames", type=int, default=defaults.frames)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--connections", type=int, default=defaults.connections,
                        help="cases sent at once")  # fmt: skip
    parser.add_argument("--interval-ms", type=float, default=defaults.interval_ms,
                        help="between good requests")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--log", type=Path, help="keep the daemon's log here")
    parser.add_argument("--case", type=int, help="replay this one case and show it")
    args = parser.parse_args(argv)
    if args.case is not None:
        return replay(args.seed, args.case)
    outcome = fuzz(Settings(args.frames, args.seed, args.connections, args.interval_ms,
                            args.max_seconds, args.log))  # fmt: skip
    print(outcome.text)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
