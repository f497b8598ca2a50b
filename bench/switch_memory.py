"""Memory, file descriptors and threads of moltbotd across many version switches.

    make bench-switch                              # or: .venv/bin/python bench/switch_memory.py
    .venv/bin/python bench/switch_memory.py --cycles 400 --series 50

Starts the real daemon (bench.py's running_daemon, built-in defaults) on a throwaway
copy of the demo repository (moltbotd.demo: demo v1.0 y = 2x, demo v2.0 y = 10x, iris
v1), then switches demo back and forth between v1.0 and v2.0 with the blocking Client.
One cycle is one switch: --cycles 200 makes 200 measured switches (100 to each version),
after --warmup switches (10) that are not measured, so one-time costs (imports, the
first allocations of each code path) are left out.

Meanwhile a thread sends a light stream of infer requests to demo (one every
--interval seconds on its own connection) and checks every answer against the version
that gave it. A request that fails or answers wrongly is counted and printed.

Sampled after the warm-up and after the last switch (and every --series switches):
the daemon's (supervisor's) VmRSS and, from /proc/PID/smaps_rollup, its Pss and
anonymous memory; the total RSS and Pss of its worker processes (its live children,
found by their parent pid in /proc/PID/stat); the daemon's open file descriptors
(/proc/PID/fd) and threads; and how many log entries it has written (its in-memory ring
keeps the newest log_ring_size, 10,000 by default, so it grows until then: about four
entries a switch). Printed as a table with the growth between the two samples, and the
duration of the switch calls (median, p95, max).

Exits 1 if a request (an infer or a switch) failed, whatever the memory figures say:
this is a benchmark that reports; the tests are what assert.
docs/performance.md ("Memory across version switches") has figures and what they mean.
"""

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import format_machine, machine, running_daemon
from moltbotd.demo import write_demo_repository
from moltctl.client import Client

MODEL = "demo"
FACTORS = {"v1.0": 2.0, "v2.0": 10.0}  # y = factor * x, per moltbotd.demo
CALL_TIMEOUT = 120.0  # seconds for one switch or infer call
SETTLE = 0.5  # seconds to wait after a switch before sampling


# --- sampling -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    switches: int  # switches done when it was taken
    daemon_rss_kb: int
    daemon_pss_kb: int
    daemon_anon_kb: int
    workers: int
    each_worker_rss_kb: tuple[int, ...]  # by pid
    workers_rss_kb: int
    workers_pss_kb: int
    fds: int
    threads: int
    log_entries: int  # written since the start; the daemon's ring keeps the newest log_ring_size


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup (Rss, Pss, Anonymous, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[name] = int(value.split()[0])
    return fields


def children(pid: int) -> list[int]:
    """Live processes whose parent is pid (zombies and dying ones left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] not in "ZX":
                found.append(int(entry.name))
    return sorted(found)


def sample(pid: int, switches: int, client: Client) -> Sample:
    daemon = smaps_rollup(pid)
    rss, pss = [], []
    for child in children(pid):
        with contextlib.suppress(OSError):  # it may exit between the listing and the read
            memory = smaps_rollup(child)
            rss.append(memory["Rss"])
            pss.append(memory["Pss"])
    return Sample(
        switches=switches,
        daemon_rss_kb=int(proc_status(pid)["VmRSS"].split()[0]),
        daemon_pss_kb=daemon["Pss"],
        daemon_anon_kb=daemon["Anonymous"],
        workers=len(rss),
        each_worker_rss_kb=tuple(rss),
        workers_rss_kb=sum(rss),
        workers_pss_kb=sum(pss),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(proc_status(pid)["Threads"]),
        log_entries=client.logs(limit=1)["last_seq"],
    )


# --- the request stream ---------------------------------------------------------------


@dataclass
class Stream:
    """Infer requests to MODEL from a thread until stopped; every answer checked."""

    socket: Path
    interval: float
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    by_version: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infer-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        with Client(self.socket, timeout=CALL_TIMEOUT) as client:  # reconnects on its own
            while not self._stop.is_set():
                x = rng.standard_normal((1, 4)).astype(np.float32)
                self.requests += 1
                try:
                    answer = client.infer(MODEL, {"x": x})
                    factor = FACTORS[answer.version]
                    if not np.allclose(answer["y"], factor * x, rtol=1e-6):
                        raise ValueError(f"{answer.version} answered {answer['y']} for {x}")
                    self.by_version[answer.version] = self.by_version.get(answer.version, 0) + 1
                except Exception as exc:
                    self.failures.append(f"infer {self.requests}: {type(exc).__name__}: {exc}")
                self._stop.wait(self.interval)


# --- the run --------------------------------------------------------------------------


@dataclass
class Result:
    samples: list[Sample]
    switch_seconds: list[float]  # the measured switches only
    switch_failures: list[str]
    stream: Stream
    wall_seconds: float


def switch_once(client: Client, number: int, version: str, failures: list[str]) -> float:
    started = time.perf_counter()
    try:
        reply = client.switch(version, MODEL)
        if not reply.get("changed") or reply.get("to") != version:
            failures.append(f"switch {number} to {version}: answered {reply}")
    except Exception as exc:
        failures.append(f"switch {number} to {version}: {type(exc).__name__}: {exc}")
    return time.perf_counter() - started


def run(args: argparse.Namespace, workdir: Path) -> Result:
    models = workdir / "models"
    write_demo_repository(models)
    total = args.warmup + args.cycles
    with running_daemon(models, workdir) as daemon:
        pid = daemon.proc.pid
        stream = Stream(daemon.socket, args.interval)
        stream.start()
        samples, seconds, failures = [], [], []
        started = time.perf_counter()
        try:
            with Client(daemon.socket, timeout=CALL_TIMEOUT) as client:
                serving = client.status(MODEL)["models"][0]["active_version"]
                others = [v for v in FACTORS if v != serving] + [serving]  # the other one first
                for number in range(1, total + 1):
                    version = others[(number - 1) % 2]
                    took = switch_once(client, number, version, failures)
                    if number > args.warmup:
                        seconds.append(took)
                    measured = number - args.warmup
                    series = args.series and measured > 0 and measured % args.series == 0
                    if number in (args.warmup, total) or series:
                        time.sleep(SETTLE)  # let the old worker's exit be reaped
                        samples.append(sample(pid, number, client))
                        print(f"  after {number} switches: {_brief(samples[-1])}", flush=True)
        finally:
            stream.stop()
        wall = time.perf_counter() - started
    return Result(samples, seconds, failures, stream, wall)


def _each(s: Sample) -> str:
    return " + ".join(f"{kb / 1024:.1f}" for kb in s.each_worker_rss_kb)


def _brief(s: Sample) -> str:
    return (
        f"daemon RSS {s.daemon_rss_kb / 1024:.1f} MiB (anon {s.daemon_anon_kb / 1024:.1f}),"
        f" {s.workers} workers RSS {s.workers_rss_kb / 1024:.1f} MiB ({_each(s)}),"
        f" {s.fds} fds, {s.threads} threads, {s.log_entries} log entries"
    )


# --- report ---------------------------------------------------------------------------

METRICS = [
    ("daemon RSS (VmRSS)", "daemon_rss_kb", "MiB"),
    ("daemon Pss", "daemon_pss_kb", "MiB"),
    ("daemon anonymous memory", "daemon_anon_kb", "MiB"),
    ("worker processes", "workers", ""),
    ("workers RSS, total", "workers_rss_kb", "MiB"),
    ("workers Pss, total", "workers_pss_kb", "MiB"),
    ("daemon open fds", "fds", ""),
    ("daemon threads", "threads", ""),
    ("log entries written (ring keeps 10,000)", "log_entries", "entries"),
]


def format_table(first: Sample, last: Sample) -> str:
    header = ("metric", f"after warm-up ({first.switches})", f"at the end ({last.switches})",
              "growth")  # fmt: skip
    body = []
    for label, attr, unit in METRICS:
        before, after = getattr(first, attr), getattr(last, attr)
        growth = f"{(after - before) / before * 100:+.2f} %" if before else "n/a"
        if unit == "entries":
            body.append((label, str(before), str(after), f"{after - before:+d}"))
        elif unit == "MiB":
            body.append((f"{label} (MiB)", f"{before / 1024:.1f}", f"{after / 1024:.1f}", growth))
        else:
            body.append((label, str(before), str(after), growth))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, tuple("-" * w for w in widths), *body]
    ]
    return "\n".join(lines)


def format_timing(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1e3
    return (
        f"switch call ({len(ms)} measured switches): median {np.median(ms):.0f} ms,"
        f" p95 {np.percentile(ms, 95):.0f} ms, max {ms.max():.0f} ms"
    )


def format_series(samples: list[Sample]) -> str:
    lines = ["samples (switches: daemon RSS / anon, workers RSS, MiB; fds; threads; log entries):"]
    lines += [
        f"  {s.switches:5}: {s.daemon_rss_kb / 1024:6.1f} / {s.daemon_anon_kb / 1024:5.1f},"
        f" {s.workers_rss_kb / 1024:6.1f}; {s.fds}; {s.threads}; {s.log_entries}"
        for s in samples
    ]
    return "\n".join(lines)


def report(args: argparse.Namespace, result: Result) -> str:
    stream = result.stream
    versions = ", ".join(f"{v}: {n}" for v, n in sorted(stream.by_version.items()))
    parts = [
        f"{args.cycles} measured switches of {MODEL} between v1.0 and v2.0 (one cycle ="
        f" one switch) after {args.warmup} warm-up switches; {result.wall_seconds:.0f} s",
        format_table(result.samples[0], result.samples[-1]),
        format_timing(result.switch_seconds),
        f"infer stream: {stream.requests} requests ({versions}),"
        f" {len(stream.failures)} failed; switches: {len(result.switch_failures)} failed",
    ]
    if len(result.samples) > 2:
        parts.append(format_series(result.samples))
    failures = result.switch_failures + stream.failures
    if failures:
        shown = failures[:50]
        more = f"\n  ... and {len(failures) - len(shown)} more" if len(failures) > 50 else ""
        parts.append("FAILED:\n" + "\n".join(f"  {f}" for f in shown) + more)
    return "\n\n".join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cycles", type=int, default=200, help="measured switches (one cycle = one switch)"
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="switches before the first sample, not measured"
    )
    parser.add_argument(
        "--interval", type=float, default=0.02, help="seconds between the stream's requests"
    )
    parser.add_argument(
        "--series", type=int, default=0, metavar="N", help="also sample every N measured switches"
    )
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.warmup < 1:
        parser.error("--cycles and --warmup must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the daemon is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    print(format_machine(machine()), flush=True)
    with tempfile.TemporaryDirectory(prefix="moltswitch-") as tmp:
        result = run(args, Path(tmp))
    print("\n" + report(args, result))
    return 1 if result.switch_failures or result.stream.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
