"""moltbotd against in-process onnxruntime, on the same models and the same machine.

    make bench                      # or: .venv/bin/python bench/bench.py   (about 2.5 min)
    .venv/bin/python bench/bench.py --quick --json /tmp/bench.json            (about 30 s)
    .venv/bin/python bench/bench.py --quick --models tiny,cnn --batching '{max_batch_size: 16}'

Builds a throwaway model repository with three models:

  tiny  y = 2x, x float32 [N, 4]
  mlp   3 x (Gemm 1024x1024 + Relu), x float32 [N, 1024]
  cnn   Conv 3->16 k3 s2 + Relu, Conv 16->32 k3 s2 + Relu, GlobalAveragePool, Flatten,
        Gemm 32->10, x float32 [N, 3, 224, 224]

Each model is in the repository twice, as NAME and NAME_batched (NAME_batched/v1/model.onnx
is a symbolic link to NAME's file); the config the script writes gives both
intra_op_threads 1 and NAME_batched dynamic batching (--batching, by default
{max_batch_size: 32, timeout_ms: 2}). Every request carries one sample (batch 1).

  in-process  onnxruntime, 1 intra-op / 1 inter-op thread, CPU provider: latency of
              sequential calls (p50, p99); throughput of batch 1 on one thread (runs/s)
              and on 16 threads sharing the session; throughput of batch 32 on one thread
              (samples/s)
  moltbotd    the daemon started as a subprocess, with its default settings but for
              one intra-op thread per model, NAME_batched's batching, and the batched
              MLP's two lanes (BATCHED_SETTINGS); for NAME and NAME_batched:
              latency at concurrency 1 with the library's Client() as a script makes it
              (default settings: a direct channel), and as diagnostics Client(direct=False)
              and a raw client (one blocking Unix socket, the request frame encoded once,
              on the socket and on a direct channel); throughput at concurrency 16 with the
              library's AsyncClient() (16 asyncio tasks pipelined on its direct channel)
              and, as diagnostics, AsyncClient(direct=False) and the raw client (frames
              encoded once, exactly 16 requests outstanding, every response decoded and
              checked `ok`)

Ratios are taken against the in-process figures of the same run. The targets are judged
on the library with default settings only, each against in-process onnxruntime on as
many cores: the batched MLP on two lanes against two threads sharing one session at the
batch size the daemon formed (measured after the daemon's run). A missed target never
fails the script.

Also printed: the CPU time each process (client, supervisor, worker) spent per request,
from /proc/PID/stat; the batches the batched entries formed; the round trip of a bare
socketpair between two Python processes, the floor of one hop; and the CPU other
processes took meanwhile (a busy machine makes every figure worse). Every measurement
stops at a request count or a time limit, whichever comes first, and the daemon is always
stopped (SIGTERM, then SIGKILL) before the script exits.
docs/performance.md has the figures and what limits them.
"""

import argparse
import asyncio
import contextlib
import datetime
import functools
import itertools
import json
import multiprocessing
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnxruntime as ort
import yaml

from moltbotd.demo import save, scale_model
from moltbotd.wire.protocol import FrameDecoder, MoltError, encode_frame, request
from moltctl.client import AsyncClient, Client, DirectChannel, encode_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.models import cnn_model, mlp_model

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 16
METRICS_ROUNDS = 9  # metrics on/off pairs measured side by side: the median is judged
Roles = dict[str, list[int]]  # client, supervisor, worker (every instance): their pids
BATCH = 32  # the in-process batched run
VERSION = "v1"
BATCHED = "_batched"  # NAME_batched: the same model file, with dynamic batching
DEFAULT_BATCHING = "{max_batch_size: 32, timeout_ms: 2}"
READY_MARK = "ready: serving"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
RECV_BYTES = 1 << 16  # the raw client's receive buffer, allocated once
MAX_RESPONSE_BYTES = 1 << 30
CPUCLOCK_SCHED = 2  # Linux: a process's CPU clock id is (~pid << 3) | 2
# Workers (scheduling.busy_poll_us) and the direct clients poll this long before sleeping:
# on a VM a sleeping vCPU wakes slowly and runs the next ~60 us of work 3-4x slower; 1 ms
# covers the CNN's ~500 us answer (200 us let the client sleep: 569 against 495 us p50).
BUSY_POLL_US = 1000

Call = Callable[[], Any]


# --- settings and results -------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Each measurement ends at `requests` or `seconds`, whichever comes first."""

    warmup: int  # requests before a sequential run (at most warmup_seconds of them)
    warmup_seconds: float  # also: a short unrecorded run before each concurrent one
    latency_requests: int
    throughput_requests: int
    seconds: float


FULL = Limits(
    warmup=200, warmup_seconds=0.5, latency_requests=50_000, throughput_requests=300_000, seconds=3
)
QUICK = Limits(
    warmup=20, warmup_seconds=0.1, latency_requests=5_000, throughput_requests=50_000, seconds=0.5
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
    rps: float  # requests (or session runs) per second
    samples_per_s: float  # rps x the samples in each request or run
    requests: int
    seconds: float
    cpu_us: dict[str, float]  # CPU time per request or run, by process role
    batches: dict[str, Any] | None = None  # what a batched entry formed meanwhile

    def cores(self, role: str) -> float:
        """How many CPUs the role kept busy on average."""
        return self.cpu_us[role] * self.rps / 1e6


@dataclass(frozen=True)
class Row:
    model: str
    entry: str  # "no batching" or "batching"
    measure: str
    client: str  # "raw socket" or "library"
    unit: str
    moltbotd: float
    in_process: float  # latency: the same percentile; throughput: batch 1, one thread
    in_process_batch: float | None = None  # throughput rows: batch 32 samples/s

    @property
    def ratio(self) -> float:
        return self.moltbotd / self.in_process


@dataclass(frozen=True)
class Target:
    goal: str
    reached: str
    met: bool
    value: float
    threshold: float


# --- the model repository -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    path: Path
    inputs: dict[str, np.ndarray]  # one sample

    def batch(self, size: int) -> dict[str, np.ndarray]:
        return {name: np.repeat(value, size, axis=0) for name, value in self.inputs.items()}


MODELS: dict[str, tuple[Callable[[], Any], str, tuple[int, ...]]] = {
    "tiny": (lambda: scale_model(2.0), "y = 2x, x float32 [1, 4]", (1, 4)),
    "mlp": (
        lambda: mlp_model(width=1024, layers=3),
        "3 x (Gemm 1024x1024 + Relu), x [1, 1024]",
        (1, 1024),
    ),
    "cnn": (
        cnn_model,
        "2 x (Conv k3 s2 + Relu) 3->16->32, GlobalAveragePool, Gemm 32->10, x [1, 3, 224, 224]",
        (1, 3, 224, 224),
    ),
}


def build_repository(models_dir: Path, names: list[str]) -> list[Case]:
    """NAME/v1/model.onnx for each model, and NAME_batched/v1/model.onnx linking to it."""
    rng = np.random.default_rng(1)
    cases = []
    for name in names:
        build, description, shape = MODELS[name]
        path = save(build(), models_dir, name, VERSION)
        twin = models_dir / f"{name}{BATCHED}" / VERSION
        twin.mkdir(parents=True)
        (twin / path.name).symlink_to(Path("..", "..", name, VERSION, path.name))
        inputs = {"x": rng.standard_normal(shape).astype(np.float32)}
        cases.append(Case(name, description, path, inputs))
    return cases


# A compute-bound model on two vCPUs: one worker serving channels on two threads, so one
# computes while the other's requests and answers cross, on one copy of the weights; a
# short poll catches the client's next requests (a longer one takes the client's CPU).
BATCHED_SETTINGS = {"mlp": {"channel_threads": 2, "busy_poll_us": 100}}


def daemon_config(cases: list[Case], batching: dict[str, Any]) -> dict[str, Any]:
    """One intra-op thread per model (in-process runs on one too); every other setting is
    moltbotd's default, as users run it, but for NAME_batched's batching and the MLP's
    lanes."""
    models: dict[str, Any] = {}
    for case in cases:
        common = {"intra_op_threads": 1}
        models[case.name] = common
        batched = {**common, **BATCHED_SETTINGS.get(case.name, {})}
        models[case.name + BATCHED] = {"batching": batching, **batched}
    return {"models": models}


# --- measuring --------------------------------------------------------------------------


def warm_up(call: Call, limits: Limits) -> None:
    end = time.perf_counter() + limits.warmup_seconds
    for _ in range(limits.warmup):
        call()
        if time.perf_counter() >= end:
            break


def measure_latency(call: Call, limits: Limits, roles: Roles) -> Latency:
    """Sequential calls (concurrency 1) after a warm-up; per-call wall time."""
    warm_up(call, limits)
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


def sequential_throughput(call: Call, limits: Limits, samples: int) -> Throughput:
    """One thread calling in a loop: runs per second (each run `samples` samples)."""
    warm_up(call, limits)
    runs = 0
    with CpuMeter({"client": [os.getpid()]}) as cpu:
        started = time.perf_counter()
        end = started + limits.seconds
        while runs < limits.throughput_requests and time.perf_counter() < end:
            call()
            runs += 1
        elapsed = time.perf_counter() - started
    rate = runs / elapsed
    return Throughput(rate, rate * samples, runs, elapsed, cpu.per_request(runs))


def threaded_throughput(call: Call, limits: Limits, seconds: float, threads: int = CONCURRENCY,
                        samples: int = 1) -> Throughput:  # fmt: skip
    """Threads calling in a loop until the time or the request budget is spent; each call
    runs `samples` samples."""
    tickets = itertools.count()  # next() on a count is atomic under the GIL
    done = [0] * threads
    barrier = threading.Barrier(threads + 1)
    end = 0.0

    def loop(slot: int) -> None:
        barrier.wait()
        while time.perf_counter() < end and next(tickets) < limits.throughput_requests:
            call()
            done[slot] += 1

    running = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for thread in running:
        thread.start()
    with CpuMeter({"client": [os.getpid()]}) as cpu:
        end = time.perf_counter() + seconds
        barrier.wait()
        started = time.perf_counter()
        for thread in running:
            thread.join()
        elapsed = time.perf_counter() - started
    rate = sum(done) / elapsed
    return Throughput(rate, rate * samples, sum(done), elapsed, cpu.per_request(sum(done)))


def shared_session_throughput(case: Case, limits: Limits, threads: int, batch: int) -> Throughput:
    """`threads` threads sharing one session, each running batches of `batch`: in process,
    what a worker's lanes do with the batches the daemon formed."""
    session = open_session(case.path)
    inputs = case.batch(batch)
    call = functools.partial(session.run, None, inputs)
    threaded_throughput(call, limits, limits.warmup_seconds, threads, batch)
    return threaded_throughput(call, limits, limits.seconds, threads, batch)


async def library_throughput(
    daemon: "Daemon",
    model: str,
    case: Case,
    limits: Limits,
    seconds: float,
    direct: bool,
    together: Any = None,
) -> Throughput:
    """CONCURRENCY asyncio tasks calling through one AsyncClient, pipelined on its direct
    channel (the default: the warm-up waits until it is granted), or with direct=False on
    its connection to moltbotd's socket. `together`: a barrier the measured part waits
    at, once warm (another process measures another daemon at the same time)."""
    roles = daemon.roles(model)
    async with AsyncClient(daemon.socket, direct=direct) as client:
        for _ in range(min(limits.warmup, 20)):
            await client.infer(model, case.inputs)
        while direct and not daemon.status(model)["worker"]["channels"]:  # no task runs yet
            await client.infer(model, case.inputs)
        if together is not None:
            together.wait()
        tickets = itertools.count()
        end = time.perf_counter() + seconds

        async def loop() -> int:
            count = 0
            while time.perf_counter() < end and next(tickets) < limits.throughput_requests:
                await client.infer(model, case.inputs)
                count += 1
            return count

        with CpuMeter(roles) as cpu:
            started = time.perf_counter()
            counts = await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
            elapsed = time.perf_counter() - started
    rate = sum(counts) / elapsed
    return Throughput(rate, rate, sum(counts), elapsed, cpu.per_request(sum(counts)))


class RawConnection:
    """One blocking Unix socket sending a request frame encoded once; every response is
    decoded (moltbotd.wire.protocol.FrameDecoder) and must be `ok`. Ids are all the same: the
    responses are counted, not matched. With `direct`, the socket is a direct channel to
    the model's worker (asked for with the `channel` operation), polled for BUSY_POLL_US
    before each blocking read, and inputs of SHARE_BYTES or more travel in the channel's
    shared region: copied there before each call (c=1), once for a throughput run."""

    def __init__(self, socket_path: Path, model: str, inputs: dict[str, np.ndarray],
                 direct: bool = False) -> None:  # fmt: skip
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.decoder = FrameDecoder(MAX_RESPONSE_BYTES)
        self.buffer = bytearray(RECV_BYTES)
        self.view = memoryview(self.buffer)
        self.poll = 0.0
        params = {"model": model, "inputs": encode_inputs(inputs, view=True)}
        self.share: Callable[[], Any] = lambda: None
        if direct:
            channel = self._channel(model)
            params = channel.share(params)
            self.share = lambda: channel.share({"inputs": encode_inputs(inputs, view=True)})
            self.sock, self.poll = channel.sock, BUSY_POLL_US / 1e6
        self.frame = encode_frame(request(1, "infer", params))

    def _channel(self, model: str) -> DirectChannel:
        with self.sock:
            self.sock.sendall(encode_frame(request(1, "channel", {"model": model})))
            data, fds, _, _ = socket.recv_fds(self.sock, RECV_BYTES, 1)
        [answer] = self.decoder.feed(data)
        if not fds:
            raise RuntimeError(f"moltbotd granted no direct channel: {answer!r}"[:500])
        return DirectChannel(socket.socket(fileno=fds[0]), answer["result"], 0.0, START_TIMEOUT)

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def call(self) -> None:
        """One request, and wait for its response."""
        self.share()
        self.sock.sendall(self.frame)
        while not self.receive():
            pass

    def receive(self) -> int:
        """Read what arrived; the number of responses it completed (each checked)."""
        size = self._poll() or self.sock.recv_into(self.buffer)
        if not size:
            raise RuntimeError("moltbotd closed the connection")
        messages = self.decoder.feed(self.view[:size])
        for message in messages:
            if isinstance(message, MoltError) or message.get("ok") is not True:
                raise RuntimeError(f"moltbotd answered with an error: {message!r}"[:500])
        return len(messages)

    def _poll(self) -> int:
        until = time.perf_counter() + self.poll
        while time.perf_counter() < until:
            with contextlib.suppress(BlockingIOError):
                return self.sock.recv_into(self.buffer, 0, socket.MSG_DONTWAIT)
        return 0


def raw_throughput(socket_path: Path, model: str, case: Case, limits: Limits, seconds: float,
                   roles: Roles, channels: int = 0) -> Throughput:  # fmt: skip
    """Exactly CONCURRENCY requests outstanding, on moltbotd's socket (`channels` 0) or
    spread over that many direct channels (one per lane of the model's workers: a channel
    goes to one): as responses arrive on one, as many requests go out again on it, in one
    send (a slice of CONCURRENCY frames built once)."""
    direct = channels > 0
    count = max(1, channels)
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(RawConnection(socket_path, model, case.inputs, direct))
                 for _ in range(count)]  # fmt: skip
        ready = selectors.DefaultSelector()
        for conn in conns:
            ready.register(conn.sock, selectors.EVENT_READ, conn)
        cpu = stack.enter_context(CpuMeter(roles))
        started = time.perf_counter()
        end = started + seconds
        bursts = {conn: memoryview(conn.frame * CONCURRENCY) for conn in conns}
        for slot, conn in enumerate(conns):
            share = len(range(slot, CONCURRENCY, count))
            conn.sock.sendall(bursts[conn][: share * len(conn.frame)])
        sent, done = CONCURRENCY, 0
        while done < sent:
            for conn in _answering(ready, conns):
                got = conn.receive()
                done += got
                if got and sent < limits.throughput_requests and time.perf_counter() < end:
                    refill = min(got, limits.throughput_requests - sent)
                    conn.sock.sendall(bursts[conn][: refill * len(conn.frame)])
                    sent += refill
        elapsed = time.perf_counter() - started
    rate = done / elapsed
    return Throughput(rate, rate, done, elapsed, cpu.per_request(done))


def _answering(selector: selectors.BaseSelector, conns: list[RawConnection]) -> list[Any]:
    """The connections to read now: the only one (its receive polls, then sleeps), or
    those with answers, waited for without polling (with a worker per vCPU, a polling
    client takes the CPU they need: measured 31 against 10 us per request)."""
    if len(conns) == 1:
        return conns
    return [key.data for key, _ in selector.select()]


class CpuMeter:
    """CPU time (user + system, all threads) some processes used during a block."""

    def __init__(self, roles: Roles) -> None:
        self.roles = roles
        self.used: dict[str, float] = {}

    def __enter__(self) -> "CpuMeter":
        self._start = {role: sum(map(cpu_seconds, pids)) for role, pids in self.roles.items()}
        return self

    def __exit__(self, *_: object) -> None:
        for role, pids in self.roles.items():
            self.used[role] = sum(map(cpu_seconds, pids)) - self._start[role]

    def per_request(self, requests: int) -> dict[str, float]:
        """Microseconds of CPU per request, by role."""
        return {role: round(used * 1e6 / max(requests, 1), 1) for role, used in self.used.items()}


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads (those gone included), in nanoseconds: its
    CPU clock, as clock_getcpuclockid(3) makes it; else utime + stime from /proc/PID/stat,
    in clock ticks (10 ms), too coarse for short runs."""
    with contextlib.suppress(OSError):
        return time.clock_gettime((~pid << 3) | CPUCLOCK_SCHED)
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


def bench_in_process(case: Case, limits: Limits) -> dict[str, Any]:
    session = open_session(case.path)
    batch = case.batch(BATCH)

    def call() -> Any:
        return session.run(None, case.inputs)

    results: dict[str, Any] = {"latency": measure_latency(call, limits, {"client": [os.getpid()]})}
    results["batch1_1thread"] = sequential_throughput(call, limits, 1)
    threaded_throughput(call, limits, limits.warmup_seconds)
    results[f"batch1_{CONCURRENCY}threads"] = threaded_throughput(call, limits, limits.seconds)
    results[f"batch{BATCH}_1thread"] = sequential_throughput(
        lambda: session.run(None, batch), limits, BATCH
    )
    return results


# --- moltbotd ---------------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    config: dict[str, Any] = field(default_factory=dict)

    def status(self, model: str) -> dict[str, Any]:
        with Client(self.socket) as client:
            return client.status(model)["models"][0]

    def lanes(self, model: str) -> int:
        """The threads that serve the model's direct channels, over all its instances."""
        worker = self.status(model)["worker"]
        return len(worker["instances"]) * worker["session"]["channel_threads"]

    def roles(self, model: str) -> Roles:
        """The bench (client), the daemon (supervisor) and the model's worker processes."""
        workers = [i["pid"] for i in self.status(model)["worker"]["instances"]]
        return {"client": [os.getpid()], "supervisor": [self.proc.pid], "worker": workers}


@contextlib.contextmanager
def running_daemon(models_dir: Path, workdir: Path, settings: dict[str, Any]) -> Iterator[Daemon]:
    config = workdir / "moltbotd.yaml"
    # only these settings, and the built-in defaults, whatever /etc/moltbot holds
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
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
        yield Daemon(proc, socket_path, log, settings)
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


def batch_counts(daemon: Daemon, model: str) -> tuple[int, int]:
    """(batches, requests) the model's worker pool has run so far; (0, 0) if not reported."""
    batching = daemon.status(model)["worker"].get("batching") or {}
    sizes = batching.get("batch_sizes") or {}
    return batching.get("batches") or 0, sum(int(size) * n for size, n in sizes.items())


def with_batches(daemon: Daemon, model: str, before: tuple[int, int], run: Throughput) -> Any:
    """The run, with the batches the model formed since `before` (batched entries only)."""
    if not model.endswith(BATCHED):
        return run
    batches, requests = (b - a for a, b in zip(before, batch_counts(daemon, model), strict=True))
    queue_ms = (daemon.status(model)["worker"].get("batching") or {}).get("queue_ms")
    formed = {
        "batches": batches,
        "requests": requests,
        "mean_batch": requests / batches if batches else None,
        "queue_ms": queue_ms,  # the daemon's latest 2,048 waits in the queue
    }
    return Throughput(**{**asdict(run), "batches": formed})


def bench_entry(daemon: Daemon, model: str, case: Case, limits: Limits) -> dict[str, Any]:
    """One repository entry (NAME or NAME_batched): c=1 latency and c=16 throughput with
    the library as a script uses it, with default settings (Client() for c=1, 16 tasks on
    one AsyncClient() for c=16: direct channels), and as diagnostics the same with
    direct=False (moltbotd's socket) and the raw load generator on the socket and on a
    direct channel."""
    roles = daemon.roles(model)
    results: dict[str, Any] = {}
    for client_name, settings in (("library", {}), ("library_socket", {"direct": False})):
        with Client(daemon.socket, **settings) as client:
            check_answer(case, client.infer(model, case.inputs)["y"])
            call = functools.partial(client.infer, model, case.inputs)
            results[f"latency_{client_name}"] = measure_latency(call, limits, roles)
    for client, direct in (("raw", False), ("direct", True)):
        with RawConnection(daemon.socket, model, case.inputs, direct) as conn:
            results[f"latency_{client}"] = measure_latency(conn.call, limits, roles)
        channels = daemon.lanes(model) if direct else 0
        raw_throughput(daemon.socket, model, case, limits, limits.warmup_seconds, roles, channels)
        before = batch_counts(daemon, model)
        run = raw_throughput(daemon.socket, model, case, limits, limits.seconds, roles, channels)
        results[f"throughput_{client}"] = with_batches(daemon, model, before, run)
    for client_name, direct in (("library", True), ("library_socket", False)):
        warm = library_throughput(daemon, model, case, limits, limits.warmup_seconds, direct)
        asyncio.run(warm)
        before = batch_counts(daemon, model)
        run = asyncio.run(library_throughput(daemon, model, case, limits, limits.seconds, direct))
        results[f"throughput_{client_name}"] = with_batches(daemon, model, before, run)
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
        return measure_latency(call, limits, {"client": [os.getpid()], "echo": [echo.pid]})
    finally:
        ours.close()  # EOF: the echo process exits
        echo.wait(STOP_TIMEOUT)


def check_answer(case: Case, answer: np.ndarray) -> None:
    expected = open_session(case.path).run(None, case.inputs)[0]
    if not np.allclose(answer, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"moltbotd answered {case.name} differently from onnxruntime")


# --- report ---------------------------------------------------------------------------

ENTRIES = {"plain": "no batching", "batched": "batching"}
CLIENTS = {
    "library": "library",
    "library_socket": "library direct=False",
    "raw": "raw socket",
    "direct": "raw direct",
}


def rows_for(model: str, local: dict[str, Any], served: dict[str, dict[str, Any]]) -> list[Row]:
    lat = local["latency"]
    one, batch = local["batch1_1thread"].rps, local[f"batch{BATCH}_1thread"].samples_per_s
    rows = []
    for entry, label in ENTRIES.items():
        runs = served[entry]
        for client, name in CLIENTS.items():
            latency = runs[f"latency_{client}"]
            rows += [
                Row(model, label, "p50 latency, c=1", name, "us", latency.p50_us, lat.p50_us),
                Row(model, label, "p99 latency, c=1", name, "us", latency.p99_us, lat.p99_us),
            ]
        for client, name in CLIENTS.items():
            rps = runs[f"throughput_{client}"].rps
            measure = f"throughput, c={CONCURRENCY}"
            rows.append(Row(model, label, measure, name, "req/s", rps, one, batch))
    return rows


def format_in_process(local: dict[str, dict[str, Any]]) -> str:
    header = (
        "model",
        "p50 c=1 (us)",
        "p99 c=1 (us)",
        "batch 1, 1 thread (runs/s)",
        f"batch 1, {CONCURRENCY} threads (runs/s)",
        f"batch {BATCH}, 1 thread (samples/s)",
    )
    body = [
        (
            model,
            f"{r['latency'].p50_us:,.1f}",
            f"{r['latency'].p99_us:,.1f}",
            f"{r['batch1_1thread'].rps:,.0f}",
            f"{r[f'batch1_{CONCURRENCY}threads'].rps:,.0f}",
            f"{r[f'batch{BATCH}_1thread'].samples_per_s:,.0f}",
        )
        for model, r in local.items()
    ]
    title = "in-process onnxruntime (1 intra-op, 1 inter-op thread, CPU provider):"
    return title + "\n" + _table(header, body, left=1)


def format_ratio(row: Row) -> str:
    if row.unit == "us":
        return f"{row.ratio:.1f}x slower" if row.ratio >= 1 else f"{1 / row.ratio:.1f}x faster"
    return f"{row.ratio:.2f}x"


def format_table(rows: list[Row]) -> str:
    header = (
        "model",
        "entry",
        "measure",
        "client",
        "moltbotd",
        "in-process",
        "moltbotd/in-process",
        f"of batch {BATCH}",
    )
    body = [
        (
            r.model,
            r.entry,
            f"{r.measure} ({r.unit})",
            r.client,
            f"{r.moltbotd:,.0f}" if r.unit == "req/s" else f"{r.moltbotd:,.1f}",
            f"{r.in_process:,.0f}" if r.unit == "req/s" else f"{r.in_process:,.1f}",
            format_ratio(r),
            f"{r.moltbotd / r.in_process_batch:.2g}" if r.in_process_batch else "",
        )
        for r in rows
    ]
    note = (
        "latency rows compare with the in-process latency; throughput rows with in-process"
        f" batch 1 on one thread (runs/s), and, last column, batch {BATCH} (samples/s)"
    )
    return _table(header, body, left=4) + "\n" + note


def _table(header: tuple[str, ...], body: list[tuple[str, ...]], left: int) -> str:
    """Columns: the first `left` aligned left, the rest right."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def join(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = tuple("-" * w for w in widths)
    return "\n".join([join(header), join(rule), *(join(line) for line in body)])


def check_targets(local: dict[str, Any], served: dict[str, Any]) -> list[Target]:
    """The goals, judged on the library with default settings: what a script gets."""
    targets = []
    if "tiny" in served:
        base = local["tiny"]["latency"]
        run = served["tiny"]["plain"]["latency_library"]
        targets.append(Target(
            f"tiny p50 at c=1, Client() <= 5x in-process p50 ({base.p50_us:,.1f} us)",
            f"{run.p50_us:,.1f} us = {run.p50_us / base.p50_us:.1f}x",
            run.p50_us <= 5 * base.p50_us, run.p50_us, 5 * base.p50_us))  # fmt: skip
        one = local["tiny"]["batch1_1thread"].rps
        rps = served["tiny"]["batched"]["throughput_library"].rps
        targets.append(Target(
            f"tiny at c={CONCURRENCY}, AsyncClient(), batching >= 1.0x in-process batch 1 on"
            f" one thread ({one:,.0f} runs/s)",
            f"{rps:,.0f} req/s = {rps / one:.2f}x", rps >= one, rps, one))  # fmt: skip
        per_request = sum(run.cpu_us.values()) - base.cpu_us["client"]
        spent = ", ".join(f"{role} {us:.0f}" for role, us in run.cpu_us.items())
        targets.append(Target(
            "CPU per tiny request (client + daemon + worker - in-process run) <= 60 us",
            f"{per_request:,.0f} us ({spent}; in-process {base.cpu_us['client']:.0f})",
            per_request <= 60, per_request, 60))  # fmt: skip
    if "tiny" in served and "metrics" in served["tiny"]:
        found = served["tiny"]["metrics"]
        cost, rounds = found["cost"], ", ".join(f"{c:+.1f}" for c in found["costs"])
        targets.append(Target(
            f"metrics cost at c={CONCURRENCY}, AsyncClient(), tiny batched: histograms on vs"
            " off <= 3 %",
            f"{cost:+.1f} % (median of {METRICS_ROUNDS} rounds: {rounds} %; median rates"
            f" {found['on']:,.0f} vs {found['off']:,.0f} req/s, each with half the machine;"
            f" worker CPU per request {found['worker_us'][0]:.0f} vs"
            f" {found['worker_us'][1]:.0f} us, {found['worker_cpu']:+.1f} %)", cost <= 3, cost,
            3))  # fmt: skip
    if "mlp" in served and "lanes" in local["mlp"]:
        lanes, batch = local["mlp"]["lanes"]
        base = local["mlp"]["lanes_run"].samples_per_s
        rps = served["mlp"]["batched"]["throughput_library"].rps
        targets.append(Target(
            f"mlp at c={CONCURRENCY}, AsyncClient(), batching on {lanes} lanes >= 0.75x"
            f" in-process on {lanes} threads sharing one session at batch {batch}"
            f" ({base:,.0f} samples/s)",
            f"{rps:,.0f} req/s = {rps / base:.2f}x", rps >= 0.75 * base, rps,
            0.75 * base))  # fmt: skip
    if "cnn" in served:
        base = local["cnn"]["latency"].p50_us
        p50 = served["cnn"]["plain"]["latency_library"].p50_us
        targets.append(Target(
            f"cnn p50 at c=1, Client() <= 1.15x in-process ({base:,.1f} us)",
            f"{p50:,.1f} us = {p50 / base:.2f}x", p50 <= 1.15 * base, p50,
            1.15 * base))  # fmt: skip
    return targets


def metrics_cost(workdir: Path, case: Case, limits: Limits,
                 batching: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """tiny_batched at c=16 through AsyncClient with the latency histograms counted and
    not (metrics.histograms), METRICS_ROUNDS times: two daemons, one of each, measured at
    the same time by a client process each. Whatever the machine does meanwhile (its
    rate drifts between runs seconds apart by more than the cost), both see it."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    worker_us: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(METRICS_ROUNDS):
        print(f"moltbotd: {case.name}{BATCHED}, metrics.histograms on and off at once,"
              f" round {round_ + 1} ...", flush=True)  # fmt: skip
        with contextlib.ExitStack() as stack:
            daemons = {}
            for histograms in (True, False):
                folder = workdir / f"metrics-{histograms}"
                folder.mkdir(exist_ok=True)
                settings = {**daemon_config([case], batching),
                            "metrics": {"histograms": histograms}}  # fmt: skip
                daemons[histograms] = stack.enter_context(
                    running_daemon(workdir / "models", folder, settings))  # fmt: skip
            runs = side_by_side(daemons, case.name + BATCHED, case, limits)
        for histograms, run in runs.items():
            rates[histograms].append(run.rps)
            worker_us[histograms].append(run.cpu_us["worker"])
    costs = sorted((1 - on / off) * 100 for on, off in zip(rates[True], rates[False], strict=True))
    cpu = sorted((on / off - 1) * 100 for on, off in zip(worker_us[True], worker_us[False],
                                                          strict=True))  # fmt: skip
    return {
        "cost": statistics.median(costs),
        "costs": costs,
        "on": statistics.median(rates[True]),
        "off": statistics.median(rates[False]),
        "worker_cpu": statistics.median(cpu),
        "worker_us": (statistics.median(worker_us[True]), statistics.median(worker_us[False])),
    }


def side_by_side(daemons: dict[Any, "Daemon"], model: str, case: Case,
                 limits: Limits) -> dict[Any, Throughput]:  # fmt: skip
    """library_throughput against each daemon, in a process of its own (forked), the
    measured parts started together."""
    context = multiprocessing.get_context("fork")
    together, results = context.Barrier(len(daemons)), context.Queue()

    def measure(key: Any, daemon: "Daemon") -> None:
        run = asyncio.run(library_throughput(daemon, model, case, limits, limits.seconds,
                                             direct=True, together=together))  # fmt: skip
        results.put((key, run))

    children = [context.Process(target=measure, args=item) for item in daemons.items()]
    for child in children:
        child.start()
    found = dict(results.get(timeout=START_TIMEOUT) for _ in children)
    for child in children:
        child.join()
    return found


def lanes_baseline(case: Case, limits: Limits, served: dict[str, Any]) -> dict[str, Any]:
    """In process, the lanes' work: as many threads sharing one session, at the batch size
    the daemon formed for the library client (known only once it ran)."""
    lanes = BATCHED_SETTINGS[case.name]["channel_threads"]
    formed = served["batched"]["throughput_library"].batches or {}
    batch = max(1, round(formed.get("mean_batch") or 1))
    run = shared_session_throughput(case, limits, lanes, batch)
    return {"lanes": (lanes, batch), "lanes_run": run}


def format_targets(targets: list[Target]) -> str:
    lines = ["targets (never fatal):"]
    for t in targets:
        lines.append(f"  {'MET   ' if t.met else 'MISSED'}  {t.goal}: {t.reached}")
    return "\n".join(lines)


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
        self.wall = wall


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
        f" on average, {background.steal:.2f} cores of steal; the run took"
        f" {background.wall:.0f} s"
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
    for model, runs in local.items():
        rows: list[tuple[str, Latency | Throughput]] = [
            ("in-process c=1", runs["latency"]),
            ("in-process batch 1, 1 thread", runs["batch1_1thread"]),
            (f"in-process {CONCURRENCY} threads", runs[f"batch1_{CONCURRENCY}threads"]),
            (f"in-process batch {BATCH} (per run)", runs[f"batch{BATCH}_1thread"]),
        ]
        for entry, label in ENTRIES.items():
            for client, name in CLIENTS.items():
                rows.append((f"{label}, c=1, {name}", served[model][entry][f"latency_{client}"]))
            for client, name in CLIENTS.items():
                run = served[model][entry][f"throughput_{client}"]
                rows.append((f"{label}, c={CONCURRENCY}, {name}", run))
        width = max(len(label) for label, _ in rows)
        lines += [f"  {model:5} {label:{width}}  {_cpu(run)}" for label, run in rows]
    return "\n".join(lines)


def _cpu(run: Latency | Throughput) -> str:
    if isinstance(run, Latency):
        return ", ".join(f"{role} {us:.0f}" for role, us in run.cpu_us.items())
    return ", ".join(
        f"{role} {us:.0f} ({run.cores(role):.2f} cores)" for role, us in run.cpu_us.items()
    )


def format_batches(served: dict[str, dict[str, Any]]) -> str:
    lines = [f"batches the batched entries formed at c={CONCURRENCY}:"]
    for model, entries in served.items():
        for client, name in CLIENTS.items():
            formed = entries["batched"][f"throughput_{client}"].batches or {}
            if not formed.get("batches"):
                lines.append(f"  {model:5} {name:10}  (not reported by status)")
                continue
            queue = formed.get("queue_ms") or {}
            waits = ", ".join(f"{k} {v:.2f}" for k, v in queue.items() if v is not None)
            lines.append(
                f"  {model:5} {name:10}  {formed['batches']:,} batches, mean"
                f" {formed['mean_batch']:.1f} requests; queue wait (ms): {waits}"
            )
    return "\n".join(lines)


def format_floor(floor: Latency) -> str:
    return (
        "floor of one hop: a 100-byte round trip over a socketpair to a Python echo process:"
        f" p50 {floor.p50_us:.1f} us, p99 {floor.p99_us:.1f} us\n"
        "(a moltbotd request makes two such hops: client to daemon, daemon to worker)"
    )


def to_json(info: dict[str, Any], limits: Limits, rows: list[Row], targets: list[Target],
            raw: dict[str, Any]) -> str:  # fmt: skip
    results = [{**asdict(r), "ratio": r.ratio} for r in rows]
    document = {
        "machine": info,
        "limits": asdict(limits),
        "results": results,
        "targets": [asdict(t) for t in targets],
        "raw": raw,
    }
    return json.dumps(document, indent=2, default=asdict)


# --- main -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 0.5 s per measurement")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save the numbers here")
    parser.add_argument("--seconds", type=float, help="time limit of each measurement")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--batching",
        default=DEFAULT_BATCHING,
        metavar="YAML",
        help=f"the batched entries' batching section (default: {DEFAULT_BATCHING})",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    args.batching = yaml.safe_load(args.batching)
    if not isinstance(args.batching, dict):
        parser.error(f"--batching: expected a YAML mapping, got {args.batching!r}")
    return args


def run(limits: Limits, workdir: Path, names: list[str], batching: dict[str, Any]) -> tuple:
    cases = build_repository(workdir / "models", names)
    print(f"models: {'; '.join(f'{c.name}: {c.description}' for c in cases)}", flush=True)
    local = {}
    for case in cases:
        print(f"in-process onnxruntime: {case.name} ...", flush=True)
        local[case.name] = bench_in_process(case, limits)
    print("socket round trip ...", flush=True)
    floor = socket_round_trip(limits)
    served: dict[str, dict[str, Any]] = {}
    settings = daemon_config(cases, batching)
    print(f"starting moltbotd with {json.dumps(settings)} ...", flush=True)
    with running_daemon(workdir / "models", workdir, settings) as daemon:
        for case in cases:
            served[case.name] = {}
            for entry, model in (("plain", case.name), ("batched", case.name + BATCHED)):
                print(f"moltbotd: {model} ...", flush=True)
                served[case.name][entry] = bench_entry(daemon, model, case, limits)
    tiny = [case for case in cases if case.name == "tiny"]
    if tiny:
        served["tiny"]["metrics"] = metrics_cost(workdir, tiny[0], limits, batching)
    for case in cases:
        if case.name in BATCHED_SETTINGS:
            print(f"in-process onnxruntime: {case.name} on the lanes' threads ...", flush=True)
            local[case.name].update(lanes_baseline(case, limits, served[case.name]))
    rows = [row for c in cases for row in rows_for(c.name, local[c.name], served[c.name])]
    raw = {
        "config": settings,
        "in_process": local,
        "moltbotd": served,
        "socket_round_trip": floor,
    }
    return rows, check_targets(local, served), raw


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    limits = QUICK if args.quick else FULL
    if args.seconds:
        limits = Limits(**{**asdict(limits), "seconds": args.seconds})
    # SIGTERM unwinds like Ctrl-C, so the daemon is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    info = machine()
    with Background() as background, tempfile.TemporaryDirectory(prefix="moltbench-") as tmp:
        rows, targets, raw = run(limits, Path(tmp), args.models, args.batching)
    info["other_load_cores"] = round(background.others, 3)
    info["steal_cores"] = round(background.steal, 3)
    info["seconds"] = round(background.wall, 1)
    report = [
        format_machine(info),
        f"limits per measurement: {limits.seconds:g} s or the request budget; every request"
        f" batch 1; concurrency {CONCURRENCY}; moltbotd config: {json.dumps(raw['config'])}",
        format_in_process(raw["in_process"]),
        format_table(rows),
        format_targets(targets),
        format_batches(raw["moltbotd"]),
        format_cpu(raw["in_process"], raw["moltbotd"]),
        format_floor(raw["socket_round_trip"]),
        format_background(background),
    ]
    print("\n" + "\n\n".join(report))
    if args.json:
        args.json.write_text(to_json(info, limits, rows, targets, raw) + "\n")
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
