"""moltbotd against in-process onnxruntime, on the same models and the same machine.

    make bench                      # or: .venv/bin/python bench/bench.py
    .venv/bin/python bench/bench.py --quick --json /tmp/bench.json

Builds a throwaway model repository (a tiny y = 2x model and an MLP of 3 x 1024->1024
Gemm + Relu), then measures each model twice, batch 1 everywhere:

  in-process  onnxruntime session.run, 1 intra-op / 1 inter-op thread, CPU provider:
              latency of sequential calls; throughput of 16 threads sharing the session
  moltbotd    the daemon started as a subprocess with its default settings:
              latency with the blocking Client; throughput of 16 asyncio tasks on one
              pipelined AsyncClient connection, and on 4 connections (4 tasks each)

Also printed: the CPU time each process (client, supervisor, worker) spent per request,
from /proc/PID/stat; the round trip of a bare socketpair between two Python processes,
the floor of one hop; and the CPU other processes took meanwhile (a busy machine
makes every figure worse). Every measurement stops at a request count or a time limit,
whichever comes first (about a minute in all; --quick: about 10 s), and the daemon is
always stopped (SIGTERM, then SIGKILL) before the script exits.
docs/performance.md has the figures and what limits them.
"""

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnxruntime as ort

from moltbotd.demo import save, scale_model
from moltctl.client import AsyncClient, Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.models import mlp_model

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 16
CONNECTIONS = 4
VERSION = "v1"
READY_MARK = "ready: serving"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0

Call = Callable[[], Any]


# --- settings and results -------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Each measurement ends at `requests` or `seconds`, whichever comes first."""

    warmup: int  # requests before a latency run (and per connection before throughput)
    warmup_seconds: float  # a short unrecorded concurrent run before each throughput run
    latency_requests: int
    throughput_requests: int
    seconds: float


FULL = Limits(
    warmup=200, warmup_seconds=1.0, latency_requests=50_000, throughput_requests=200_000, seconds=5
)
QUICK = Limits(
    warmup=20, warmup_seconds=0.2, latency_requests=1_000, throughput_requests=10_000, seconds=1
)


@dataclass(frozen=True)
class Latency:
    p50_us: float
    p99_us: float
    mean_us: float
    requests: int
    cpu_us: dict[str, float]  # CPU time per request, by process role


@dataclass(frozen=True)
class Throughput:
    rps: float
    requests: int
    seconds: float
    cpu_us: dict[str, float]  # CPU time per request, by process role

    def cores(self, role: str) -> float:
        """How many CPUs the role kept busy on average."""
        return self.cpu_us[role] * self.rps / 1e6


@dataclass(frozen=True)
class Row:
    model: str
    measure: str
    unit: str
    in_process: float
    moltbotd: float

    @property
    def ratio(self) -> float:
        return self.moltbotd / self.in_process


# --- the model repository -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    path: Path
    inputs: dict[str, np.ndarray]


def build_repository(models_dir: Path) -> list[Case]:
    rng = np.random.default_rng(1)
    tiny = save(scale_model(2.0), models_dir, "tiny", VERSION)
    mlp = save(mlp_model(width=1024, layers=3), models_dir, "mlp", VERSION)
    return [
        Case("tiny", "y = 2x, x float32 [1, 4]", tiny, {"x": _floats(rng, 4)}),
        Case("mlp", "3 x (Gemm 1024x1024 + Relu), x [1, 1024]", mlp, {"x": _floats(rng, 1024)}),
    ]


def _floats(rng: np.random.Generator, width: int) -> np.ndarray:
    return rng.standard_normal((1, width)).astype(np.float32)


# --- measuring --------------------------------------------------------------------------


def measure_latency(call: Call, limits: Limits, roles: dict[str, int]) -> Latency:
    """Sequential calls (concurrency 1) after a warm-up; per-call wall time."""
    for _ in range(limits.warmup):
        call()
    samples: list[float] = []
    end = time.perf_counter() + limits.seconds
    with CpuMeter(roles) as cpu:
        while len(samples) < limits.latency_requests:
            started = time.perf_counter()
            if started >= end:
                break
            call()
            samples.append(time.perf_counter() - started)
    micros = np.array(samples) * 1e6
    return Latency(
        p50_us=float(np.percentile(micros, 50)),
        p99_us=float(np.percentile(micros, 99)),
        mean_us=float(micros.mean()),
        requests=len(samples),
        cpu_us=cpu.per_request(len(samples)),
    )


def threaded_throughput(call: Call, limits: Limits, seconds: float) -> Throughput:
    """CONCURRENCY threads calling in a loop until the time or the request budget is spent."""
    tickets = itertools.count()  # next() on a count is atomic under the GIL
    done = [0] * CONCURRENCY
    barrier = threading.Barrier(CONCURRENCY + 1)
    end = 0.0

    def loop(slot: int) -> None:
        barrier.wait()
        while time.perf_counter() < end and next(tickets) < limits.throughput_requests:
            call()
            done[slot] += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    with CpuMeter({"client": os.getpid()}) as cpu:
        end = time.perf_counter() + seconds
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    return Throughput(sum(done) / elapsed, sum(done), elapsed, cpu.per_request(sum(done)))


async def pipelined_throughput(
    socket_path: Path,
    case: Case,
    connections: int,
    limits: Limits,
    seconds: float,
    roles: dict[str, int],
) -> Throughput:
    """CONCURRENCY asyncio tasks spread over `connections` AsyncClient connections."""
    clients = [AsyncClient(socket_path) for _ in range(connections)]
    try:
        for client in clients:
            await client.connect()
            for _ in range(min(limits.warmup, 20)):
                await client.infer(case.name, case.inputs)
        tickets = itertools.count()
        end = time.perf_counter() + seconds

        async def loop(client: AsyncClient) -> int:
            count = 0
            while time.perf_counter() < end and next(tickets) < limits.throughput_requests:
                await client.infer(case.name, case.inputs)
                count += 1
            return count

        with CpuMeter(roles) as cpu:
            started = time.perf_counter()
            counts = await asyncio.gather(
                *(loop(clients[i % connections]) for i in range(CONCURRENCY))
            )
            elapsed = time.perf_counter() - started
    finally:
        for client in clients:
            await client.close()
    return Throughput(sum(counts) / elapsed, sum(counts), elapsed, cpu.per_request(sum(counts)))


class CpuMeter:
    """CPU time (user + system, all threads) some processes used during a block."""

    def __init__(self, roles: dict[str, int]) -> None:
        self.roles = roles
        self.used: dict[str, float] = {}

    def __enter__(self) -> "CpuMeter":
        self._start = {role: cpu_seconds(pid) for role, pid in self.roles.items()}
        return self

    def __exit__(self, *_: object) -> None:
        for role, pid in self.roles.items():
            self.used[role] = cpu_seconds(pid) - self._start[role]

    def per_request(self, requests: int) -> dict[str, float]:
        """Microseconds of CPU per request, by role."""
        return {role: round(used * 1e6 / max(requests, 1), 1) for role, used in self.used.items()}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- in-process onnxruntime -------------------------------------------------------------


def open_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_in_process(case: Case, limits: Limits) -> tuple[Latency, Throughput]:
    session = open_session(case.path)

    def call() -> Any:
        return session.run(None, case.inputs)

    latency = measure_latency(call, limits, {"client": os.getpid()})
    threaded_throughput(call, limits, limits.warmup_seconds)
    return latency, threaded_throughput(call, limits, limits.seconds)


# --- moltbotd ---------------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def roles(self, model: str) -> dict[str, int]:
        """The bench (client), the daemon (supervisor) and the model's worker process."""
        with Client(self.socket) as client:
            worker = client.status(model)["models"][0]["worker"]
        return {"client": os.getpid(), "supervisor": self.proc.pid, "worker": worker["pid"]}


@contextlib.contextmanager
def running_daemon(models_dir: Path, workdir: Path) -> Iterator[Daemon]:
    config = workdir / "moltbotd.yaml"
    config.write_text("{}\n")  # the built-in defaults, whatever /etc/moltbot holds
    socket_path, log = workdir / "moltbotd.sock", workdir / "moltbotd.log"
    command = [sys.executable, "-m", "moltbotd", "--config", str(config)]
    command += [
        "--socket",
        str(socket_path),
        "--models-dir",
        str(models_dir),
        "--state-dir",
        str(workdir / "state"),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers can be found
        )
    try:
        wait_ready(proc, log)
        yield Daemon(proc, socket_path, log)
    finally:
        stop_daemon(proc)


def wait_ready(proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if READY_MARK in text:
            line = next(x for x in text.splitlines() if READY_MARK in x)
            if ", 0 failed" not in line:
                raise RuntimeError(f"moltbotd started with failed models:\n{_tail(text)}")
            return
        if proc.poll() is not None:
            raise RuntimeError(f"moltbotd exited with {proc.returncode}:\n{_tail(text)}")
        time.sleep(0.05)
    raise RuntimeError(f"moltbotd not ready after {START_TIMEOUT:g}s:\n{_tail(log.read_text())}")


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait; SIGKILL the whole group if it hangs; kill any worker left over."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"moltbotd did not stop in {STOP_TIMEOUT:g}s; killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group is still ours
            proc.wait()
    # A group with members left cannot have its id reused, so these are still the daemon's.
    for pid in group_members(proc.pid):
        print(f"moltbotd left process {pid} behind; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name) for every process."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(entry.name), (entry / "stat").read_text().rsplit(")", 1)[1].split()


def group_members(pgid: int) -> list[int]:
    """Live processes of a group (a zombie waits for its parent, or for init, to reap it)."""
    return sorted(
        pid for pid, fields in _proc_stats() if int(fields[2]) == pgid and fields[0] not in "ZX"
    )


def bench_daemon(daemon: Daemon, case: Case, limits: Limits) -> dict[str, Any]:
    roles = daemon.roles(case.name)
    with Client(daemon.socket) as client:
        check_answer(case, client.infer(case.name, case.inputs)["y"])
        latency = measure_latency(lambda: client.infer(case.name, case.inputs), limits, roles)
    results: dict[str, Any] = {"latency": latency}
    for connections in (1, CONNECTIONS):
        asyncio.run(
            pipelined_throughput(
                daemon.socket, case, connections, limits, limits.warmup_seconds, roles
            )
        )
        results[f"throughput_{connections}conn"] = asyncio.run(
            pipelined_throughput(daemon.socket, case, connections, limits, limits.seconds, roles)
        )
    return results


ECHO = """
import socket, sys
peer = socket.socket(fileno=int(sys.argv[1]))
while data := peer.recv(65536):
    peer.sendall(data)
"""


def socket_round_trip(limits: Limits) -> Latency:
    """The floor of one hop: a 100-byte message to a Python echo process and back."""
    ours, theirs = socket.socketpair()
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    message = b"x" * 100

    def call() -> None:
        ours.sendall(message)
        ours.recv(65536)

    try:
        return measure_latency(call, limits, {"client": os.getpid(), "echo": echo.pid})
    finally:
        ours.close()  # EOF: the echo process exits
        echo.wait(STOP_TIMEOUT)


def check_answer(case: Case, answer: np.ndarray) -> None:
    expected = open_session(case.path).run(None, case.inputs)[0]
    if not np.allclose(answer, expected, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"moltbotd answered {case.name} differently from onnxruntime")


# --- report ---------------------------------------------------------------------------


def rows_for(case: Case, local: tuple[Latency, Throughput], served: dict[str, Any]) -> list[Row]:
    lat, thr = local
    one, many = served["throughput_1conn"], served[f"throughput_{CONNECTIONS}conn"]
    return [
        Row(case.name, "p50 latency, c=1", "us", lat.p50_us, served["latency"].p50_us),
        Row(case.name, "p99 latency, c=1", "us", lat.p99_us, served["latency"].p99_us),
        Row(case.name, f"throughput, c={CONCURRENCY}, 1 conn", "req/s", thr.rps, one.rps),
        Row(
            case.name,
            f"throughput, c={CONCURRENCY}, {CONNECTIONS} conns",
            "req/s",
            thr.rps,
            many.rps,
        ),
    ]


def format_ratio(row: Row) -> str:
    if row.unit == "us":
        return f"{row.ratio:.1f}x slower"
    return f"{row.ratio:.2f} of in-process"


def format_table(rows: list[Row]) -> str:
    header = ("model", "measure", "in-process", "moltbotd", "moltbotd/in-process")
    body = [
        (
            r.model,
            f"{r.measure} ({r.unit})",
            f"{r.in_process:,.0f}" if r.unit == "req/s" else f"{r.in_process:,.1f}",
            f"{r.moltbotd:,.0f}" if r.unit == "req/s" else f"{r.moltbotd:,.1f}",
            format_ratio(r),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [_join(header, widths), _join(tuple("-" * w for w in widths), widths)]
    return "\n".join(lines + [_join(line, widths) for line in body])


def _join(cells: tuple[str, ...], widths: list[int]) -> str:
    left = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
    right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
    return "  ".join(left + right)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "loadavg_at_start": os.getloadavg()[0],
    }


class Background:
    """CPU that other processes (and the hypervisor, as steal) took while the bench ran."""

    def __enter__(self) -> "Background":
        self._start = (time.perf_counter(), system_cpu(), own_cpu())
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.perf_counter() - self._start[0]
        (busy, steal), (busy0, steal0) = system_cpu(), self._start[1]
        own = own_cpu() - self._start[2]
        self.others = max(busy - busy0 - own, 0.0) / wall  # cores, on average
        self.steal = (steal - steal0) / wall


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children (the daemon and its workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def format_background(background: Background) -> str:
    line = (
        f"other load during the run: {background.others:.2f} cores busy outside the bench"
        f" on average, {background.steal:.2f} cores of steal"
    )
    if background.others > 0.1 or background.steal > 0.1:
        line += "\nWARNING: the machine was not idle; these figures are lower than they can be"
    return line


def format_machine(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}; "
        f"python {info['python']}, onnxruntime {info['onnxruntime']}, "
        f"numpy {info['numpy']}, msgpack {info['msgpack']}; "
        f"load average {info['loadavg_at_start']:.2f} at start; {info['date']}"
    )


def format_cpu(local: dict[str, Any], served: dict[str, dict[str, Any]]) -> str:
    """Where the CPU went: per request and process; for throughput runs, cores kept busy."""
    lines = ["CPU time per request by process (us), and cores busy in the throughput runs:"]
    for model, (lat, thr) in local.items():
        runs = [
            ("in-process c=1", lat),
            (f"in-process c={CONCURRENCY} threads", thr),
            ("moltbotd c=1", served[model]["latency"]),
        ]
        runs += [
            (f"moltbotd c={CONCURRENCY}, {n} conn", served[model][f"throughput_{n}conn"])
            for n in (1, CONNECTIONS)
        ]
        lines += [f"  {model:5} {label:26} {_cpu(run)}" for label, run in runs]
    return "\n".join(lines)


def _cpu(run: Latency | Throughput) -> str:
    if isinstance(run, Latency):
        return ", ".join(f"{role} {us:.0f}" for role, us in run.cpu_us.items())
    return ", ".join(
        f"{role} {us:.0f} ({run.cores(role):.2f} cores)" for role, us in run.cpu_us.items()
    )


def to_json(info: dict[str, Any], limits: Limits, rows: list[Row], raw: dict[str, Any]) -> str:
    results = [{**asdict(r), "ratio": r.ratio} for r in rows]
    document = {"machine": info, "limits": asdict(limits), "results": results, "raw": raw}
    return json.dumps(document, indent=2, default=asdict)


# --- main -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1 s per measurement")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save the numbers here")
    parser.add_argument("--seconds", type=float, help="time limit of each measurement")
    return parser.parse_args(argv)


def run(limits: Limits, workdir: Path) -> tuple[list[Row], dict[str, Any]]:
    cases = build_repository(workdir / "models")
    print(f"models: {'; '.join(f'{c.name}: {c.description}' for c in cases)}", flush=True)
    local = {}
    for case in cases:
        print(f"in-process onnxruntime: {case.name} ...", flush=True)
        local[case.name] = bench_in_process(case, limits)
    print("socket round trip ...", flush=True)
    floor = socket_round_trip(limits)
    served = {}
    print("starting moltbotd ...", flush=True)
    with running_daemon(workdir / "models", workdir) as daemon:
        for case in cases:
            print(f"moltbotd: {case.name} ...", flush=True)
            served[case.name] = bench_daemon(daemon, case, limits)
    rows = [row for case in cases for row in rows_for(case, local[case.name], served[case.name])]
    return rows, {"in_process": local, "moltbotd": served, "socket_round_trip": floor}


def format_floor(floor: Latency) -> str:
    return (
        "floor of one hop: a 100-byte round trip over a socketpair to a Python echo process:"
        f" p50 {floor.p50_us:.1f} us, p99 {floor.p99_us:.1f} us\n"
        "(a moltbotd request makes two such hops: client to daemon, daemon to worker)"
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    limits = QUICK if args.quick else FULL
    if args.seconds:
        limits = Limits(**{**asdict(limits), "seconds": args.seconds})
    # SIGTERM unwinds like Ctrl-C, so the daemon is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    info = machine()
    with Background() as background, tempfile.TemporaryDirectory(prefix="moltbench-") as tmp:
        rows, raw = run(limits, Path(tmp))
    info["other_load_cores"] = round(background.others, 3)
    info["steal_cores"] = round(background.steal, 3)
    report = [
        format_machine(info),
        f"limits per measurement: {limits.seconds:g} s or the request budget; batch 1",
        format_table(rows),
        format_cpu(raw["in_process"], raw["moltbotd"]),
        format_floor(raw["socket_round_trip"]),
        format_background(background),
    ]
    print("\n" + "\n\n".join(report))
    if args.json:
        args.json.write_text(to_json(info, limits, rows, raw) + "\n")
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
