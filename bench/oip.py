"""The Open Inference Protocol paths: moltbotd and Triton Inference Server measured in the
same run with NVIDIA's own tritonclient (HTTP and gRPC, default settings), beside
in-process onnxruntime.

Triton comes from the package index with pytriton (bench/triton_server.py, in a virtual
environment of its own under ~/.cache/moltbot, made on first use) and runs the same ONNX
files through onnxruntime on one intra-op thread, with its dynamic batching for the
batched entries, as moltbotd runs them. Rows: tiny p50 at c=1; tiny and the MLP at c=16
with batching. The targets (issue 18): moltbotd >= 3x Triton's throughput at c=16 and
p50 <= 1/2 of Triton's, on both protocols. Servers run one at a time; each measurement
ends after --seconds. Last, tritonclient against bench/null_server.py, which answers at
once and does no work: the ceiling this machine sets on any server's rate with this client
sharing its cores. docs/performance.md has the figures.
"""

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml

from bench import (
    BATCHED,
    CONCURRENCY,
    DEFAULT_BATCHING,
    FULL,
    QUICK,
    Case,
    CpuMeter,
    Limits,
    Target,
    build_repository,
    daemon_config,
    format_machine,
    format_targets,
    machine,
    measure_latency,
    open_session,
    running_daemon,
)

HERE = Path(__file__).resolve().parent
TRITON_VENV = Path(os.environ.get("MOLTBOT_TRITON_VENV",
                                  Path.home() / ".cache" / "moltbot" / "bench-triton"))  # fmt: skip
SYSTEM_PYTHON = "/usr/bin/python3"  # Triton's Python backend embeds this one's libpython
TRITON_PACKAGES = ("nvidia-pytriton==0.7.0", "onnxruntime")
START_TIMEOUT = 300.0
PROTOCOLS = ("http", "grpc")
CPU: dict[tuple[str, str, str], dict[str, float]] = {}  # us of CPU per request, by role


@dataclass(frozen=True)
class Server:
    name: str
    http: str  # host:port
    grpc: str
    group: int  # its process group: every process serving (the CPU they use is shown)

    def pids(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if entry.name.isdigit() and os.getpgid(int(entry.name)) == self.group:
                    found.append(int(entry.name))
        return found


# --- the servers -------------------------------------------------------------------------


def triton_python() -> Path:
    """The Python of Triton's environment, made (once) when missing."""
    python, done = TRITON_VENV / "bin" / "python", TRITON_VENV / ".installed"
    if not done.exists():
        print(f"triton: installing pytriton into {TRITON_VENV} ...", flush=True)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--clear", str(TRITON_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *TRITON_PACKAGES],
                       check=True)  # fmt: skip
        done.touch()
    return python


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_triton(cases: list[Case], workdir: Path) -> Iterator[Server]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    models = {}
    for case in cases:
        width = int(case.inputs["x"].shape[1])
        models[case.name] = [str(case.path), width]
        models[case.name + BATCHED] = [str(case.path), width]
    with spawned("Triton", [str(triton_python()), str(HERE / "triton_server.py")],
                 {**ports, "models": models}, workdir) as server:  # fmt: skip
        yield server


@contextlib.contextmanager
def running_null(workdir: Path) -> Iterator[Server]:
    """bench/null_server.py: canned answers at once, for the ceiling line."""
    ports = {"http": free_port(), "grpc": free_port(), "models": {"tiny_batched": []}}
    with spawned("null", [sys.executable, str(HERE / "null_server.py")], ports,
                 workdir) as server:  # fmt: skip
        yield server


@contextlib.contextmanager
def spawned(name: str, argv: list[str], spec: dict[str, Any], workdir: Path) -> Iterator[Server]:
    """A server process given its ports as JSON, waited for until every model of the
    spec is ready over HTTP, and stopped with its process group."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, json.dumps(spec)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: all(_ready(spec["http"], model) for model in spec["models"]), proc, log,
                 name)  # fmt: skip
        yield Server(name, f"127.0.0.1:{spec['http']}", f"127.0.0.1:{spec['grpc']}", proc.pid)
    finally:
        stop(proc)


@contextlib.contextmanager
def running_moltbotd(cases: list[Case], workdir: Path,
                     batching: dict[str, Any]) -> Iterator[Server]:  # fmt: skip
    settings = {**daemon_config(cases, batching),
                "network": {"http": "127.0.0.1:0", "grpc": "127.0.0.1:0"}}  # fmt: skip
    with running_daemon(workdir / "models", workdir, settings) as daemon:
        text = daemon.log.read_text()
        http = re.search(r"Open Inference Protocol at http://(\S+)/v2", text)
        grpc = re.search(r"Open Inference Protocol over gRPC at (\S+)", text)
        if not (http and grpc):
            raise RuntimeError(f"moltbotd logged no listener addresses:\n{text[-3000:]}")
        yield Server("moltbotd", http.group(1), grpc.group(1), daemon.proc.pid)


def _ready(port: int, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/ready",
                                    timeout=5) as answer:  # fmt: skip
            return answer.status == 200
    except OSError:
        return False


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path,
             name: str) -> None:  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} did not come up (exit {proc.poll()}):\n{tail}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- the clients -------------------------------------------------------------------------


def client_for(server: Server, protocol: str) -> Any:
    if protocol == "http":
        return triton_http.InferenceServerClient(server.http)
    return triton_grpc.InferenceServerClient(server.grpc)


def inputs_for(protocol: str, case: Case) -> list[Any]:
    module = triton_http if protocol == "http" else triton_grpc
    x = case.inputs["x"]
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # http: binary data, tritonclient's default
    return [tensor]


def closed_loop(server: Server, protocol: str, model: str, case: Case,
                seconds: float) -> float:  # fmt: skip
    """CONCURRENCY threads, each with a client of its own calling infer in a loop, for
    `seconds`; answers per second. (tritonclient's HTTP async_infer, on gevent, managed
    under 100 requests a second here against either server: threads are what a Python
    program gets concurrency from.)"""
    counts = [0] * CONCURRENCY
    clients = [client_for(server, protocol) for _ in range(CONCURRENCY)]
    going = threading.Event()
    going.set()

    def run(index: int) -> None:
        client, inputs = clients[index], inputs_for(protocol, case)
        while going.is_set():
            client.infer(model, inputs)
            counts[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    start, started = sum(counts), time.perf_counter()
    with CpuMeter({"client": [os.getpid()], "server": server.pids()}) as cpu:
        time.sleep(seconds)
    answered, elapsed = sum(counts) - start, time.perf_counter() - started
    CPU[(server.name, protocol, model)] = cpu.per_request(answered)
    going.clear()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    return answered / elapsed


def measure(server: Server, cases: list[Case], limits: Limits) -> dict[str, dict[str, float]]:
    """Per protocol: tiny's p50 at c=1 (us), and each case's batched throughput at c=16."""
    found: dict[str, dict[str, float]] = {}
    roles = {"client": [os.getpid()]}
    for protocol in PROTOCOLS:
        client = client_for(server, protocol)
        row: dict[str, float] = {}
        for case in cases:
            inputs = inputs_for(protocol, case)
            if case.name == "tiny":
                print(f"{server.name} {protocol}: tiny at c=1 ...", flush=True)
                call = functools.partial(client.infer, case.name, inputs)
                row["tiny_p50_us"] = measure_latency(call, limits, roles).p50_us
            name = case.name + BATCHED
            print(f"{server.name} {protocol}: {name} at c={CONCURRENCY} ...", flush=True)
            closed_loop(server, protocol, name, case, limits.warmup_seconds)
            row[f"{case.name}_rps"] = closed_loop(server, protocol, name, case, limits.seconds)
        client.close()
        found[protocol] = row
    return found


def ceiling(tiny: Case, limits: Limits, workdir: Path) -> dict[str, float]:
    """tiny at c=16 against the null server, by protocol: the most tritonclient makes of
    this machine when the server does no work (the client shares its cores)."""
    found = {}
    with running_null(workdir) as server:
        for protocol in PROTOCOLS:
            print(f"null server {protocol}: tiny at c={CONCURRENCY} ...", flush=True)
            closed_loop(server, protocol, "tiny" + BATCHED, tiny, limits.warmup_seconds)
            found[protocol] = closed_loop(server, protocol, "tiny" + BATCHED, tiny, limits.seconds)
    return found


def ceiling_lines(most: dict[str, float], triton: dict[str, dict[str, float]]) -> str:
    lines = ["Ceiling: tritonclient against bench/null_server.py (canned answers, no work),"
             f" tiny at c={CONCURRENCY}:"]  # fmt: skip
    for protocol, rps in most.items():
        theirs = triton[protocol]["tiny_rps"]
        lines.append(f"  {protocol:<5} {rps:>8,.0f} req/s = {rps / theirs:.2f}x Triton's tiny"
                     f" (3x Triton: {3 * theirs:,.0f} req/s)")  # fmt: skip
    return "\n".join(lines)


def in_process(cases: list[Case], limits: Limits) -> dict[str, float]:
    found = {}
    for case in cases:
        session = open_session(case.path)
        latency = measure_latency(lambda s=session, c=case: s.run(None, c.inputs), limits,
                                  {"client": [os.getpid()]})  # fmt: skip
        found[f"{case.name}_p50_us"] = latency.p50_us
    return found


# --- the report --------------------------------------------------------------------------


def targets(ours: dict[str, dict[str, float]],
            triton: dict[str, dict[str, float]]) -> list[Target]:  # fmt: skip
    found = []
    for protocol in PROTOCOLS:
        mine, theirs = ours[protocol], triton[protocol]
        for key in (k for k in mine if k.endswith("_rps")):
            ratio = mine[key] / theirs[key]
            found.append(Target(
                f"{key[:-4]} at c={CONCURRENCY} with batching, tritonclient {protocol}:"
                " moltbotd >= 3x Triton",
                f"{mine[key]:,.0f} vs {theirs[key]:,.0f} req/s = {ratio:.2f}x",
                ratio >= 3, ratio, 3))  # fmt: skip
        ratio = mine["tiny_p50_us"] / theirs["tiny_p50_us"]
        found.append(Target(
            f"tiny p50 at c=1, tritonclient {protocol}: moltbotd <= 0.5x Triton",
            f"{mine['tiny_p50_us']:,.0f} vs {theirs['tiny_p50_us']:,.0f} us = {ratio:.2f}x",
            ratio <= 0.5, ratio, 0.5))  # fmt: skip
    return found


def table(local: dict[str, float], results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'server':<10} {'protocol':<9} {'tiny p50 c=1':>14} {'tiny c=16':>12}"
             f" {'mlp c=16':>12}"]  # fmt: skip
    for server, by_protocol in results.items():
        for protocol, row in by_protocol.items():
            lines.append(
                f"{server:<10} {protocol:<9} {row['tiny_p50_us']:>11,.0f} us"
                f" {row.get('tiny_rps', 0):>8,.0f} r/s {row.get('mlp_rps', 0):>8,.0f} r/s"
            )
    shown = ", ".join(f"{k[:-7]} p50 {v:,.1f} us" for k, v in local.items())
    lines.append(f"in-process onnxruntime (one thread): {shown}")
    lines.append(f"CPU per request at c={CONCURRENCY} (us; server: every process of its group):")
    for (server, protocol, model), used in CPU.items():
        lines.append(f"  {server:<9} {protocol:<5} {model:<13} client {used['client']:>6,.0f}"
                     f"  server {used['server']:>6,.0f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 0.5 s per measurement")
    parser.add_argument("--seconds", type=float, help="time limit of each measurement")
    args = parser.parse_args(argv)
    limits = QUICK if args.quick else FULL
    if args.seconds:
        limits = Limits(**{**limits.__dict__, "seconds": args.seconds})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    info = machine()
    batching = yaml.safe_load(DEFAULT_BATCHING)
    with tempfile.TemporaryDirectory(prefix="moltbench-oip-") as tmp:
        workdir = Path(tmp)
        cases = build_repository(workdir / "models", ["tiny", "mlp"])
        local = in_process(cases, limits)
        results = {}
        with running_moltbotd(cases, workdir, batching) as server:
            results["moltbotd"] = measure(server, cases, limits)
        with running_triton(cases, workdir) as server:
            results["Triton"] = measure(server, cases, limits)
        most = ceiling(cases[0], limits, workdir)
    print("\n" + "\n\n".join([
        format_machine(info),
        f"tritonclient {importlib.metadata.version('tritonclient')} with default settings"
        f" (c={CONCURRENCY}: as many threads, a client each);"
        f" {limits.seconds:g} s per measurement; batching {DEFAULT_BATCHING} on both",
        table(local, results),
        ceiling_lines(most, results["Triton"]),
        format_targets(targets(results["moltbotd"], results["Triton"])),
    ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
