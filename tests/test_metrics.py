"""Prometheus metrics: the worker's histograms, the series a real daemon exposes on both
request paths (through `moltctl metrics` and over HTTP with curl), and the listener's
answers to what is not a scrape."""

import asyncio
import bisect
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moltbotd import __version__
from moltbotd.config import listen_address
from moltbotd.demo import save
from moltbotd.scheduler import Pending
from moltbotd.wire.histogram import LATENCY_BUCKETS, PHASES, Histogram
from moltbotd.wire.protocol import ErrorCode, FrameDecoder, MoltError, encode_frame, request
from moltbotd.worker.hub import Counts, _phases
from moltctl.client import AsyncClient, Client, DirectChannel
from stress.daemon import Daemon
from tests.conftest import run_moltctl, wait_until
from tests.test_daemon import running
from tests.test_scheduling import LONG, SLOW_N, rows_inputs, rows_model, slow_inputs

X = np.ones((1, 4), np.float32)
LISTEN = "metrics: {listen: '127.0.0.1:0'}\n"

# what systemd does before it execs a socket-activated service: the socket as fd 3
ACTIVATE = """import os, sys
os.dup2(int(sys.argv[1]), 3)
os.close(int(sys.argv[1]))
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
"""
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- the histogram a worker sends -------------------------------------------------------


def test_histogram_buckets_are_upper_bounds_and_add_up():
    h = Histogram()
    h.observe_many(np.array([LATENCY_BUCKETS[0], 3e-5, 0.2, 100.0]))
    cumulative = dict(h.cumulative())
    assert cumulative[repr(LATENCY_BUCKETS[0])] == 1  # a bound counts in its own bucket
    assert cumulative["5e-05"] == 2
    assert cumulative["0.25"] == 3
    assert cumulative["30.0"] == 3 and cumulative["+Inf"] == 4
    total = Histogram()
    total.add(h.to_wire())
    total.add(h.to_wire())
    assert total.cumulative()[-1] == ("+Inf", 8)
    assert total.sum == pytest.approx(2 * (LATENCY_BUCKETS[0] + 3e-5 + 0.2 + 100.0))


@pytest.mark.parametrize("wire", [None, {"counts": [1, 2]}, {"counts": ["x"] * 21}, [1]])
def test_a_report_of_another_shape_adds_nothing(wire):
    h = Histogram()
    h.add(wire)
    assert not h and h.sum == 0.0


def test_listen_address_forms():
    assert listen_address("127.0.0.1:8474") == ("127.0.0.1", 8474)
    assert listen_address("[::1]:0") == ("::1", 0)
    assert listen_address(None) is None
    for bad in ("8474", ":8474", "host:", "host:65536", "host:http"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            listen_address(bad)


# --- a real daemon ----------------------------------------------------------------------


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def scrape(daemon: Daemon) -> Samples:
    result = run_moltctl("metrics", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    return samples(result.stdout)


def address(daemon: Daemon) -> str:
    found = re.search(r"metrics at http://(\S+)/metrics", daemon.log())
    assert found, daemon.log()
    return found.group(1)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True,
                          text=True, check=False)  # fmt: skip


def test_every_request_is_counted_once_on_either_path(daemon_factory, models_dir):
    daemon = daemon_factory(LISTEN)
    with Client(daemon.socket) as direct, Client(daemon.socket, direct=False) as relayed:
        version = direct.status("demo")["models"][0]["active_version"]
        for client, count in ((direct, 5), (relayed, 3)):
            for _ in range(count):
                client.infer("demo", {"x": X})
            with pytest.raises(MoltError) as bad:
                client.infer("demo", {"x": np.ones((1, 3), np.float32)})
            assert bad.value.code is ErrorCode.INVALID_INPUT
        assert isinstance(direct._channels["demo"], DirectChannel)  # the default path was taken
    demo = {"model": "demo", "version": version}
    sha256 = hashlib.sha256((models_dir / "demo" / version / "model.onnx").read_bytes())
    info = {**demo, "role": "active", "providers": "CPUExecutionProvider",
            "sha256": sha256.hexdigest()}  # fmt: skip

    def counted() -> Samples | None:
        found = scrape(daemon)
        hashed = value(found, "moltbot_model_version_info", **info) == 1  # in a thread
        return found if hashed and value(found, "moltbot_requests_total", code="OK",
                                         **demo) == 8 else None  # fmt: skip

    found = wait_until(counted, what="8 OK answers in moltbot_requests_total, the sha256")
    assert value(found, "moltbot_requests_total", code="INVALID_INPUT", **demo) == 2
    for series in ("request_latency", "queue_wait", "batch_wait", "compute", "transfer"):
        assert value(found, f"moltbot_{series}_seconds_count", **demo) == 8, series
        assert value(found, f"moltbot_{series}_seconds_bucket", le="+Inf", **demo) == 8
    for series in ("request_latency", "queue_wait", "compute", "transfer"):
        assert value(found, f"moltbot_{series}_seconds_sum", **demo) > 0, series
    assert value(found, "moltbot_batch_wait_seconds_sum", **demo) == 0  # no batching
    assert value(found, "moltbot_instances", **demo) == 1
    assert value(found, "moltbot_worker_starts_total", **demo) == 1
    assert value(found, "moltbot_worker_restarts_total", **demo) == 0
    assert value(found, "moltbot_direct_channels", **demo) == 0  # the clients closed theirs
    assert value(found, "moltbot_model_version_info", **info) == 1
    # the same series over HTTP, as Prometheus scrapes them
    web = curl("-f", f"http://{address(daemon)}/metrics")
    assert web.returncode == 0, web.stderr
    assert value(samples(web.stdout), "moltbot_requests_total", code="OK", **demo) == 8


def test_batches_are_counted_by_size(daemon_factory):
    daemon = daemon_factory(LISTEN + "models: {demo: {batching: {max_batch_size: 8}}}\n")

    async def burst() -> None:
        async with AsyncClient(daemon.socket, direct=False) as client:
            await asyncio.gather(*(client.infer("demo", {"x": X}) for _ in range(24)))

    asyncio.run(burst())
    with daemon.client() as c:
        demo = {"model": "demo", "version": c.status("demo")["models"][0]["active_version"]}

    def counted() -> Samples | None:
        found = scrape(daemon)
        return found if value(found, "moltbot_batch_size_sum", **demo) == 24 else None

    found = wait_until(counted, what="24 requests in moltbot_batch_size_sum")
    batches = value(found, "moltbot_batch_size_count", **demo)
    assert batches is not None and 3 <= batches <= 24
    assert value(found, "moltbot_batch_size_bucket", le="+Inf", **demo) == batches
    assert value(found, "moltbot_batch_size_bucket", le="8", **demo) == batches


HOLDING = """models:
  rows:
    channel_threads: 2
    batching: {max_batch_size: 4, timeout_ms: 200}
"""


def test_a_batch_held_to_fill_counts_its_wait(daemon_factory, models_dir):
    """One lane runs a long request; the other, free, holds the next request for company
    (timeout_ms): that wait is batch wait, not queue wait."""
    save(rows_model(), models_dir, "rows", "v1")
    daemon = daemon_factory(LISTEN + HOLDING)

    async def scenario() -> None:
        async with AsyncClient(daemon.socket, direct=False) as client:
            long = asyncio.ensure_future(
                client.infer("rows", rows_inputs(np.zeros((1, 3), np.float32), LONG))
            )
            await running(client, "rows", 1)  # out of the queue: the next one is alone
            await client.infer("rows", rows_inputs(np.ones((1, 3), np.float32)))
            await long

    asyncio.run(scenario())
    rows = {"model": "rows", "version": "v1"}

    def counted() -> Samples | None:
        found = scrape(daemon)
        return found if value(found, "moltbot_batch_wait_seconds_count", **rows) == 2 else None

    found = wait_until(counted, what="2 requests in moltbot_batch_wait_seconds")
    held = value(found, "moltbot_batch_wait_seconds_sum", **rows)
    assert held is not None and held > 0
    # the held request's wait is one of the two; the long one ran at once
    assert value(found, "moltbot_batch_wait_seconds_bucket", le="1e-05", **rows) == 1


def test_switches_canaries_and_scaling_are_counted(daemon_factory):
    daemon = daemon_factory("models: {demo: {instances: {max: 2}}}\n")
    with Client(daemon.socket) as client:
        client.switch("v1.0", "demo")
        client.switch("v2.0", "demo", canary=0.5)
        for _ in range(20):
            client.infer("demo", {"x": X})
        during = scrape(daemon)
        client.rollback("demo")  # ends the canary
        client.scale("demo", 2)
    events = {kind: value(scrape(daemon), "moltbot_model_events_total", model="demo", kind=kind)
              for kind in ("switch", "canary", "canary-rollback", "scale", "scale-up")}  # fmt: skip
    assert events == {"switch": 1, "canary": 1, "canary-rollback": 1, "scale": 1, "scale-up": 1}
    canary = {"model": "demo", "version": "v2.0"}
    assert value(during, "moltbot_canary_share", **canary) == 0.5
    took = value(during, "moltbot_canary_requests_total", outcome="ok", **canary)
    assert took is not None and 0 < took < 20  # its share of the 20, all answered
    assert value(during, "moltbot_canary_requests_total", outcome="failed", **canary) == 0
    assert value(scrape(daemon), "moltbot_canary_share", **canary) is None  # it ended


def test_the_socket_counts_what_it_answered_before_any_model_did(daemon):
    with Client(daemon.socket, direct=False) as client:
        client.infer("demo", {"x": X})
        for model in ("nothing", "nothing"):
            with pytest.raises(MoltError):
                client.infer(model, {"x": X})
        client.status()
    with socket.socket(socket.AF_UNIX) as raw:  # the client library checks ops first
        raw.connect(str(daemon.socket))
        raw.sendall(encode_frame(request(1, "no_such_op", {})))
        decoder, answers = FrameDecoder(), []
        while not answers:
            answers = decoder.feed(raw.recv(65536))
    assert answers[0]["error"]["code"] == ErrorCode.UNKNOWN_OPERATION.value
    version = {"model": "demo", "version": "v2.0"}

    def reported() -> Samples | None:  # the worker's counts come in its next report
        found = scrape(daemon)
        return found if value(found, "moltbot_requests_total", code="OK", **version) else None

    found = wait_until(reported, what="the worker's report of its one answer")
    answered = {("infer", "OK"): 1, ("infer", "MODEL_NOT_FOUND"): 2,
                ("unknown", "UNKNOWN_OPERATION"): 1, ("status", "OK"): 1}  # fmt: skip
    for (op, code), count in answered.items():
        assert value(found, "moltbot_socket_requests_total", op=op, code=code) == count, (op, code)
    # the model counted its one answer; the two refused before reaching one are not its
    assert value(found, "moltbot_requests_total", code="OK", **version) == 1
    assert value(found, "moltbot_requests_total", code="MODEL_NOT_FOUND", **version) is None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_queue_inflight_and_channels_move_with_the_load(daemon):
    """A long request runs, three wait behind it (socket path), a direct channel is open:
    the gauges show it while it lasts, and go back to zero."""
    slow = {"model": "slow", "version": "v1"}
    names = ("inflight_requests", "queue_depth", "direct_channels")

    def gauges() -> tuple[float | None, ...]:
        found = scrape(daemon)
        return tuple(value(found, f"moltbot_{name}", **slow) for name in names)

    async def load() -> None:
        async with AsyncClient(daemon.socket, direct=False) as relayed:
            long = asyncio.ensure_future(relayed.infer("slow", slow_inputs(LONG)))
            await running(relayed, "slow", 1)
            waiting = [asyncio.ensure_future(relayed.infer("slow", slow_inputs(1)))
                       for _ in range(3)]  # fmt: skip
            await asyncio.to_thread(wait_until, lambda: gauges() == (4, 3, 1),
                                    what="4 in flight, 3 queued, 1 channel")  # fmt: skip
            await asyncio.gather(long, *waiting)

    with Client(daemon.socket) as direct:
        direct.infer("slow", slow_inputs(1))  # opens its direct channel, kept open
        asyncio.run(load())
    wait_until(lambda: gauges() == (0, 0, 0), what="the gauges back to zero")


def test_a_request_running_when_its_worker_dies_is_counted_by_the_daemon(daemon):
    with Client(daemon.socket, direct=False) as client:
        [entry] = client.status("slow")["models"]
        pid, version = entry["worker"]["pid"], entry["active_version"]
        idle = cpu_seconds(pid)

        def kill_once_it_runs() -> None:  # a run burns CPU; an idle worker does not
            wait_until(lambda: cpu_seconds(pid) > idle + 0.2, what="the slow request running")
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_once_it_runs)
        killer.start()
        with pytest.raises(MoltError) as failed:
            client.infer("slow", slow_inputs(SLOW_N * 50))
        killer.join()
    assert failed.value.code is ErrorCode.WORKER_FAILED, failed.value
    slow = {"model": "slow", "version": version}

    def restarted() -> Samples | None:
        found = scrape(daemon)
        return found if value(found, "moltbot_worker_starts_total", **slow) == 2 else None

    found = wait_until(restarted, timeout=60, what="the second start in moltbot_worker_starts")
    assert value(found, "moltbot_requests_total", code="WORKER_FAILED", **slow) == 1
    assert value(found, "moltbot_worker_restarts_total", **slow) == 1


def test_the_listener_answers_only_a_scrape(daemon_factory):
    daemon = daemon_factory(LISTEN)
    url = f"http://{address(daemon)}"
    for args, status in ((["-X", "POST", f"{url}/metrics"], "405"), ([f"{url}/other"], "404"),
                         (["-H", "X: " + "y" * 9000, f"{url}/metrics"], "431")):  # fmt: skip
        result = curl("-o", "/dev/null", "-w", "%{http_code}", *args)
        assert result.stdout == status, (args[:2], result)
    head = curl("-I", f"{url}/metrics")
    assert "Content-Type: text/plain; version=0.0.4" in head.stdout, head.stdout
    host, port = address(daemon).rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:  # not HTTP at all
        raw.sendall(b"hello\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400 ")
    with daemon.client() as c:  # the daemon is unmoved
        assert c.health()["status"] == "ok"


def test_a_port_in_use_stops_the_start_naming_the_setting(daemon_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = daemon_factory(f"metrics: {{listen: '127.0.0.1:{port}'}}\n", wait=False)
        assert daemon.proc.wait(60) == 1
    assert f"cannot start: cannot serve metrics on 127.0.0.1:{port} (metrics.listen)" in (
        daemon.log())  # fmt: skip


def test_metrics_work_without_a_listener(daemon):
    assert value(scrape(daemon), "moltbot_build_info", version=__version__) == 1
    assert "metrics at http" not in daemon.log()


def test_scrapes_do_not_slow_requests_down_to_a_stop(daemon_factory):
    """Many scrapers at once are bounded; requests still get answered meanwhile."""
    daemon = daemon_factory(LISTEN)
    host, port = address(daemon).rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]
    try:
        time.sleep(0.1)
        with Client(daemon.socket) as client:
            assert client.infer("demo", {"x": X})["y"].shape == (1, 4)
        refused = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{host}:{port}/metrics")
        assert refused.stdout == "503", refused
    finally:
        for conn in idle:
            conn.close()
    wait_until(lambda: curl("-f", f"http://{host}:{port}/metrics").returncode == 0,
               what="a scrape once the idle connections closed")  # fmt: skip


def test_a_socket_systemd_passes_serves_metrics(tmp_path, models_dir):
    """Socket activation as systemd does it (sd_listen_fds): fd 3, LISTEN_PID and the name
    from FileDescriptorName=; metrics.listen in the config is then ignored, said so."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        hand_over = (sys.executable, "-c", ACTIVATE, str(listening.fileno()), "metrics")
        daemon = Daemon(tmp_path, models_dir, "metrics: {listen: '127.0.0.1:1'}\n",
                        wrapper=hand_over, pass_fds=(listening.fileno(),))  # fmt: skip
        try:
            daemon.start()
            assert address(daemon) == f"127.0.0.1:{port}"
            assert "metrics.listen is ignored: systemd passed a socket" in daemon.log()
            web = curl("-f", f"http://127.0.0.1:{port}/metrics")
            assert web.returncode == 0 and "moltbot_build_info" in web.stdout, web
            with daemon.client() as c:  # its workers were not handed the socket
                pid = c.status("demo")["models"][0]["worker"]["pid"]
            ours = os.fstat(listening.fileno())
            theirs = [os.stat(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert not any(os.path.samestat(ours, st) for st in theirs)
        finally:
            daemon.stop()


def test_the_shipped_alerts_and_dashboard_use_only_exported_series(daemon):
    """examples/: every moltbot_* name in the rules, their tests and the dashboard is a
    series moltbotd exports (promtool checks the rules themselves, in the VM)."""
    text = run_moltctl("metrics", socket=daemon.socket).stdout
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    exported = set(families)
    for name, kind in families.items():
        if kind == "histogram":
            exported.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    examples = Path(__file__).resolve().parent.parent / "examples"
    files = [*examples.glob("prometheus/*.yml"), examples / "grafana" / "moltbot-dashboard.json"]
    used = {name for file in files for name in re.findall(r"moltbot_[a-z_]+", file.read_text())}
    assert len(used) >= 15, used
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_phases_folded_at_once_match_one_request_at_a_time():
    """The worker keeps each request's times and counts them at its report (Counts.fold):
    the histograms are those of _phases applied to each request in turn."""
    rng = np.random.default_rng(3)
    items = []
    for index in range(500):
        item = Pending({}, None, "normal", None, 10.0 + index, lambda _: None)
        item.received = item.arrived - rng.uniform(0, 1e-3)
        if index % 5:  # a fifth never ran (answered at a deadline)
            item.taken = None if index % 7 == 0 else item.arrived + rng.uniform(0, 1e-2)
            item.started = (item.taken or item.arrived) + rng.uniform(0, 1e-3)
        items.append(item)
    folded, expected = Counts(), {phase: Histogram() for phase in PHASES}
    for item in items:
        done = (item.started or item.arrived) + rng.uniform(0, 0.5)
        end = done + rng.uniform(0, 1e-4)
        folded.timed(item, done, end)
        request, ran, transfer = _phases(item, done, end)
        for phase, seconds in (*zip(PHASES, (request, *ran), strict=False), ("transfer", transfer)):
            expected[phase].counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            expected[phase].sum += seconds
    folded.fold()
    for phase in PHASES:
        assert folded.phases[phase].counts == expected[phase].counts, phase
        assert folded.phases[phase].sum == pytest.approx(expected[phase].sum), phase
    assert expected["compute"].counts != Histogram().counts  # the test measured something
