"""moltctl end to end: real invocations against the real daemon, output and exit codes."""

import json
import re
import signal
import socket
import subprocess
import threading

import numpy as np
import pytest

from moltctl.cli import EXIT_ERROR, EXIT_PROTOCOL, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.conftest import run_moltctl, start_moltctl


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    return result.stderr


def test_status_table_and_json(daemon):
    out = ok(run_moltctl("status", socket=daemon.socket))
    lines = out.splitlines()
    assert lines[0].startswith("moltbotd 0.1.0 (pid ")
    assert lines[0].endswith("isolation best-effort: no limits enforced")
    assert lines[1].split() == [
        "MODEL", "VERSION", "STATE", "PID", "INST", "UPTIME", "REQUESTS", "ERRORS",
        "RESTARTS", "QUEUE", "INFLIGHT", "CPU", "MEMORY", "DETAIL",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["demo"][1:3] == ["v2.0", "ready"]
    assert rows["demo"][4] == "1"  # one instance
    detail = ok(run_moltctl("status", "demo", socket=daemon.socket))
    assert "queue    0 waiting (high 0, normal 0, low 0), max 1000;" in detail
    assert "instances 1 (autoscaling 1-1): " in detail
    report = json.loads(ok(run_moltctl("status", "demo", "-o", "json", socket=daemon.socket)))
    assert [m["name"] for m in report["models"]] == ["demo"]
    assert report["models"][0]["worker"]["state"] == "ready"


def test_status_interval_repeats(daemon):
    out = ok(run_moltctl("status", "--interval", "0.2", "--count", "3", "--no-legend",
                         socket=daemon.socket))  # fmt: skip
    assert [line.split()[0] for line in out.splitlines() if line].count("demo") == 3


def test_status_interval_stops_quietly_on_ctrl_c(daemon):
    proc = start_moltctl("status", "--interval", "5", socket=daemon.socket)
    assert "demo" in proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0  # Ctrl-C is how it is meant to end, as journalctl -f's
    assert "Traceback" not in err


def test_switch_as_documented(daemon):
    """`moltctl switch v2.0`: the model may be left out when only one has that version."""
    result = run_moltctl("switch", "v1.0", socket=daemon.socket)
    out = ok(result)
    assert re.match(
        r"demo: v2.0 -> v1.0 in \S+ \(validating \S+, loading \S+, warming \S+,"
        r" switching \S+, draining \S+\)\n",
        out,
    ), out
    assert "checksum" not in out  # the demo's versions carry their manifests
    assert result.stderr.splitlines()[0] == (
        "  validating  sha256 of v1.0's files against its manifest.json"
    )
    phases = [line.split()[0] for line in result.stderr.splitlines()]
    assert phases == ["validating", "loading", "warming", "validating", "switching", "draining"]
    assert ok(run_moltctl("switch", "demo", "v1.0", socket=daemon.socket)) == (
        "demo: already serving v1.0\n"
    )
    ok(run_moltctl("switch", "v2.0", socket=daemon.socket))
    result = json.loads(ok(run_moltctl("infer", "demo", "-i", "x=[[1,2,3,4]]", "-o", "json",
                                       socket=daemon.socket)))  # fmt: skip
    assert result["version"] == "v2.0"
    assert result["outputs"]["y"]["data"] == [[10.0, 20.0, 30.0, 40.0]]


def test_a_version_without_a_manifest_is_switched_to_and_says_so(daemon, models_dir):
    copied = models_dir / "demo" / "v3.0"
    copied.mkdir()
    (copied / "model.onnx").write_bytes((models_dir / "demo" / "v1.0" / "model.onnx").read_bytes())
    result = run_moltctl("switch", "demo", "v3.0", socket=daemon.socket)
    assert result.stderr.splitlines()[0] == (
        "  validating  v3.0's files: not checked, it has no manifest.json"
    )
    assert ok(result).splitlines()[1] == (
        f"  checksum not checked: {copied} has no manifest.json (it was not deployed with moltctl)"
    )


def test_scale_shows_new_instances_starting_and_counts_in_words(daemon_factory):
    daemon = daemon_factory("models:\n  demo:\n    instances: {max: 3}\n")
    out = ok(run_moltctl("scale", "demo", "1", socket=daemon.socket))
    assert out.splitlines()[0] == "model demo v2.0: 1 instance (set by hand)"
    rows = [
        line.split()
        for line in ok(run_moltctl("scale", "demo", "3", socket=daemon.socket)).splitlines()[2:]
    ]
    assert [row[:2] for row in rows[1:]] == [["-", "starting"], ["-", "starting"]]  # no pid yet
    assert rows[0][1] == "ready"
    err = fails(run_moltctl("scale", "demo", "4", socket=daemon.socket), EXIT_ERROR)
    assert "model demo may run at most 3 instances (instances.max)" in err


def test_status_model_says_unlimited_and_how_auto_memory_was_derived(daemon_factory):
    daemon = daemon_factory("models:\n  iris:\n    limits: {memory: {limit: max}}\n")
    lines = ok(run_moltctl("status", "demo", socket=daemon.socket)).splitlines()
    assert ", 4 models served, " in lines[0]  # the daemon's, though one is shown
    (limits,) = [line for line in lines if line.startswith("limits ")]
    assert re.fullmatch(
        r"limits   cpu unlimited, weight 100 \| memory \S+iB, high unlimited, swap unlimited"
        r" \(auto: 80% of the host's \S+iB over 4 models\) \| io unlimited \| pids unlimited",
        limits,
    ), limits
    iris = ok(run_moltctl("status", "iris", socket=daemon.socket))
    assert "| memory unlimited | io unlimited |" in iris


def test_switch_errors(daemon):
    err = fails(run_moltctl("switch", "v1", socket=daemon.socket), EXIT_ERROR)
    assert "all have a version v1: name the model" in err and "[BAD_REQUEST]" in err
    err = fails(run_moltctl("switch", "demo", "v7", socket=daemon.socket), EXIT_ERROR)
    assert "moltctl: model demo has no version v7 (versions: v1.0, v2.0) [VERSION_NOT_FOUND]" in err
    fails(run_moltctl("switch", "a", "b", "c", socket=daemon.socket), EXIT_USAGE)


def test_infer_from_npy_file_and_json(daemon, tmp_path):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "x.npy", x)
    out = ok(run_moltctl("infer", "demo", "--input", f"x=@{tmp_path / 'x.npy'}",
                         socket=daemon.socket))  # fmt: skip
    assert out.splitlines()[0] == "model demo v2.0"
    assert out.splitlines()[2].split()[:4] == ["y", "float32", "[2,", "4]"]
    iris = json.loads(ok(run_moltctl("infer", "iris", "-i", "x=[[5.1, 3.5, 1.4, 0.2]]",
                                     "-o", "json", socket=daemon.socket)))  # fmt: skip
    assert iris["outputs"]["label"]["data"] == [0]
    assert iris["outputs"]["probabilities"]["dtype"] == "sequence"
    assert set(iris["outputs"]["probabilities"]["data"][0]) == {"0", "1", "2"}


def test_infer_casts_a_npy_to_the_models_dtype_where_numpy_calls_it_same_kind(daemon, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 4)))  # float64: np.save's default
    out = ok(run_moltctl("infer", "demo", "-i", f"x=@{tmp_path / 'x.npy'}", "-o", "json",
                         socket=daemon.socket))  # fmt: skip
    assert json.loads(out)["outputs"]["y"]["data"] == [[10.0] * 4] * 2
    np.save(tmp_path / "i.npy", np.ones((1, 4), np.int64))  # int to float: same kind too
    ok(run_moltctl("infer", "demo", "-i", f"x=@{tmp_path / 'i.npy'}", socket=daemon.socket))
    np.save(tmp_path / "u.npy", np.full((1, 4), "a"))  # text to float: not the same kind
    err = fails(run_moltctl("infer", "demo", "-i", f"x=@{tmp_path / 'u.npy'}",
                            socket=daemon.socket), EXIT_ERROR)  # fmt: skip
    assert "expected float32 with shape [N, 4], got dtype string [INVALID_INPUT]" in err


def test_infer_refuses_a_file_that_is_not_npy_by_name(daemon, tmp_path):
    (tmp_path / "x.npy").write_text("[[1, 2, 3, 4]]\n")
    err = fails(run_moltctl("infer", "demo", "-i", f"x=@{tmp_path / 'x.npy'}",
                            socket=daemon.socket), EXIT_USAGE)  # fmt: skip
    assert f"cannot read {tmp_path / 'x.npy'}: not a .npy file (numpy's format" in err
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    err = fails(run_moltctl("infer", "demo", "-i", f"x=@{tmp_path / 'o.npy'}",
                            socket=daemon.socket), EXIT_USAGE)  # fmt: skip
    assert "a .npy file of Python objects cannot be sent" in err


def test_infer_errors(daemon, tmp_path):
    err = fails(run_moltctl("infer", "demo", "-i", "x=[[1,2]]", socket=daemon.socket), EXIT_ERROR)
    assert "expected float32 with shape [N, 4], got shape [1, 2] [INVALID_INPUT]" in err
    err = fails(run_moltctl("infer", "demo", "-i", "x=[[1,", socket=daemon.socket), EXIT_USAGE)
    assert "input x: '[[1,' is not JSON" in err
    missing = tmp_path / "missing.npy"
    err = fails(run_moltctl("infer", "demo", "-i", f"x=@{missing}", socket=daemon.socket),
                EXIT_USAGE)  # fmt: skip
    assert f"cannot read {missing}" in err
    fails(run_moltctl("infer", "demo", "-i", "nonsense", socket=daemon.socket), EXIT_USAGE)


def test_models_and_health(daemon, models_dir):
    out = ok(run_moltctl("models", socket=daemon.socket))
    assert "demo   v2.0    v1.0, v2.0" in out
    assert ok(run_moltctl("health", socket=daemon.socket)).startswith("ok\n")
    (models_dir / "demo" / "v3.0").mkdir()
    (models_dir / "demo" / "v3.0" / "model.onnx").write_bytes(b"broken")
    fails(run_moltctl("switch", "demo", "v3.0", socket=daemon.socket), EXIT_ERROR)
    assert ok(run_moltctl("health", socket=daemon.socket)).startswith("ok\n")  # v2.0 serves on


def test_health_degraded_exits_1(daemon_factory, models_dir):
    (models_dir / "broken" / "v1").mkdir(parents=True)
    (models_dir / "broken" / "v1" / "model.onnx").write_bytes(b"broken")
    daemon = daemon_factory()
    result = run_moltctl("health", socket=daemon.socket)
    assert fails(result, EXIT_ERROR) == ""
    assert result.stdout.startswith("degraded\n") and "broken  fatal" in result.stdout


def test_logs_filter_error_last_hour_as_documented(daemon, models_dir):
    (models_dir / "demo" / "v3.0").mkdir()
    (models_dir / "demo" / "v3.0" / "model.onnx").write_bytes(b"broken")
    run_moltctl("switch", "demo", "v3.0", socket=daemon.socket)
    out = ok(run_moltctl("logs", "--filter", "ERROR", "--last", "1h", socket=daemon.socket))
    lines = out.splitlines()
    assert lines, "the failed switch must have logged an error"
    assert all("] [ERROR] [" in line or "] [CRITICAL] [" in line for line in lines)
    assert any("model demo v3.0 failed to load" in line for line in lines)
    assert ok(run_moltctl("logs", "-p", "err", "--since", "1h", socket=daemon.socket)) == out


def test_logs_filters(daemon):
    ok(run_moltctl("switch", "v1.0", socket=daemon.socket))
    demo = ok(run_moltctl("logs", "--model", "demo", "-p", "info", socket=daemon.socket))
    assert "[worker] Model demo v1.0 loaded pid=" in demo
    assert "model=iris" not in demo
    assert len(ok(run_moltctl("logs", "-n", "2", socket=daemon.socket)).splitlines()) == 2
    text = ok(run_moltctl("logs", "--filter", "now serving", socket=daemon.socket))
    assert text.count("\n") == 1 and "model demo: now serving v1.0" in text
    assert ok(run_moltctl("logs", "--until", "2000-01-01", socket=daemon.socket)) == ""
    entry = json.loads(ok(run_moltctl("logs", "-n", "1", "-o", "json", socket=daemon.socket)))
    assert set(entry) == {"seq", "time", "level", "logger", "event", "message", "fields"}
    err = fails(run_moltctl("logs", "-p", "loud", socket=daemon.socket), EXIT_USAGE)
    assert "unknown log level 'loud'" in err
    err = fails(run_moltctl("logs", "--since", "last tuesday", socket=daemon.socket), EXIT_USAGE)
    assert "cannot read 'last tuesday' as a time" in err


def test_logs_say_on_stderr_when_nothing_matches(daemon):
    result = run_moltctl("logs", "--filter", "no such words", socket=daemon.socket)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "-- no entries match --\n")
    proc = start_moltctl("logs", "-f", "--filter", "no such words", socket=daemon.socket)
    assert proc.stderr.readline() == "-- no entries match yet; following (Ctrl-C stops) --\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out, err) == (0, "", "")


def test_logs_follow(daemon):
    proc = start_moltctl("logs", "-f", "--filter", "serving", socket=daemon.socket)
    try:
        # the backlog ("ready: serving") printed: what the switch logs can only come by -f
        assert "serving" in proc.stdout.readline()
        ok(run_moltctl("switch", "v1.0", socket=daemon.socket))
        while "model demo: now serving v1.0" not in (line := proc.stdout.readline()):
            assert line, "moltctl logs -f ended before the switch's entry"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err


def test_not_running_exit_code_and_advice(tmp_path):
    err = fails(run_moltctl("status", socket=tmp_path / "none.sock"), EXIT_UNAVAILABLE)
    assert err == (f"moltctl: moltbotd is not running at {tmp_path / 'none.sock'} (start it with:"
                   " systemctl start moltbotd, or point --socket / MOLTBOT_SOCKET at the daemon's"
                   " socket)\n")  # fmt: skip


def test_default_socket_advice():
    result = run_moltctl("health")
    if result.returncode == EXIT_UNAVAILABLE:
        assert result.stderr == ("moltctl: moltbotd is not running at /run/moltbot/moltbotd.sock"
                                 " (start it with: systemctl start moltbotd)\n")  # fmt: skip
    else:  # a moltbotd really runs on this machine: it answered
        assert result.returncode in (0, EXIT_ERROR)


def test_unreadable_answer_exit_code(tmp_path):
    """A peer that is not moltbotd (it hangs up): exit 4, no traceback."""
    path = tmp_path / "liar.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    err = fails(run_moltctl("status", socket=path), EXIT_PROTOCOL)
    assert err == "moltctl: moltbotd closed the connection before answering\n"
    server.close()


@pytest.mark.parametrize("args", [["nope"], ["status", "--interval", "0"], ["logs", "-n", "0"]])
def test_usage_errors_exit_2(args, tmp_path):
    fails(run_moltctl(*args, socket=tmp_path / "unused.sock"), EXIT_USAGE)


def test_limits_text_shows_a_memory_high_without_a_max_and_unmeasured_usage_as_dash():
    from moltbotd.config import Limits, MemoryLimits
    from moltbotd.isolation.limits import describe
    from moltctl.status_view import limits_text, model_detail

    high_only = describe(Limits(memory=MemoryLimits(limit=None, high=2**30)))
    assert "| memory unlimited, high 1.0GiB, swap unlimited |" in limits_text(high_only)
    nothing = describe(Limits(memory=MemoryLimits(limit=None)))
    assert "| memory unlimited | io unlimited | pids unlimited" in limits_text(nothing)
    worker = {"limits": nothing, "cgroup": "/sys/fs/cgroup/x",
              "queue": {"depth": 0, "max": 1, "by_priority": {}},
              "batching": {"max_batch_size": 1, "queue_ms": {"p50": None}},
              "scaling": {"manual": None, "min": 1, "max": 1}, "instances": [],
              "priority": "normal", "fallback": None,
              "usage": {"cpu_percent": None, "cpu_throttled_count": 0,
                        "cpu_throttled_seconds": 0.0, "memory_current": 2**20,
                        "memory_peak": None, "oom_kills": 0, "io_read_bytes": 0,
                        "io_write_bytes": 0, "pids_current": 3}}  # fmt: skip
    (usage,) = [line for line in model_detail(worker) if line.startswith("usage ")]
    assert "| memory 1.0MiB (peak -), 0 OOM kills |" in usage
