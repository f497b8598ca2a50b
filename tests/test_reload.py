"""Reload (SIGHUP, moltctl reload), sd_notify messages, and isolation modes on this host.

This host has cgroup v2 without controllers: best-effort runs without limits, strict
refuses to start. The kernel-enforced side is proven in the VM (tests/e2e).
"""

import signal
import socket
import time

import numpy as np
import pytest

from moltbotd.control.daemon import EXIT_ISOLATION
from moltbotd.wire.protocol import ErrorCode, MoltError
from tests.conftest import run_moltctl


def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    return sock


def messages_until(sock, wanted: str) -> list[str]:
    seen = []
    while not any(wanted in m for m in seen):
        seen.append(sock.recv(4096).decode())
    return seen


def test_sd_notify_ready_watchdog_reloading_stopping(daemon_factory, tmp_path):
    sock = notify_socket(tmp_path)
    daemon = daemon_factory(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                 "WATCHDOG_USEC": "200000"})  # fmt: skip
    seen = messages_until(sock, "READY=1")
    assert seen[0] == "STATUS=loading models"
    assert seen[-1] == "READY=1\nSTATUS=serving 4 models, 0 failed"
    assert messages_until(sock, "WATCHDOG=1")[-1] == "WATCHDOG=1"
    assert messages_until(sock, "WATCHDOG=1")[-1] == "WATCHDOG=1"  # it keeps coming
    daemon.proc.send_signal(signal.SIGHUP)
    reload = next(m for m in messages_until(sock, "RELOADING=1") if "RELOADING" in m)
    assert reload.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert int(reload.split("=")[-1]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert "READY=1" in messages_until(sock, "READY=1")
    daemon.wait_for_log("configuration reloaded")
    daemon.stop()
    assert "STOPPING=1" in messages_until(sock, "STOPPING=1")
    sock.close()


def test_reload_updates_limits_without_restarting_the_worker(daemon_factory):
    daemon = daemon_factory("models:\n  demo:\n    limits:\n      memory: {limit: 1GiB}\n")
    with daemon.client() as c:
        before = c.status("demo")["models"][0]["worker"]
    assert before["limits"]["memory_max"] == 1 << 30
    daemon.config_path.write_text(
        "models:\n  demo:\n    limits:\n      memory: {limit: 2GiB}\n      pids: {max: 64}\n"
    )
    result = run_moltctl("reload", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    assert "demo   limits updated, not enforced" in result.stdout
    assert "iris   unchanged" in result.stdout
    with daemon.client() as c:
        after = c.status("demo")["models"][0]["worker"]
        assert c.infer("demo", {"x": [[1, 2, 3, 4]]})["y"][0, 0] == 10
    assert after["pid"] == before["pid"]  # the same process
    assert after["limits"]["memory_max"] == 2 << 30 and after["limits"]["pids_max"] == 64


def test_reload_with_new_session_settings_restarts_the_worker(daemon_factory):
    daemon = daemon_factory("")
    with daemon.client() as c:
        before = c.status("demo")["models"][0]["worker"]
        daemon.config_path.write_text("models:\n  demo:\n    intra_op_threads: 2\n")
        outcome = c.reload()
        after = c.status("demo")["models"][0]["worker"]
        iris_pid = c.status("iris")["models"][0]["worker"]["pid"]
        assert c.infer("demo", {"x": np.ones((1, 4), np.float32)}).version == "v2.0"
    assert outcome == {"models": {"demo": "restarted: session settings changed",
                                  "iris": "unchanged", "multi": "unchanged",
                                  "slow": "unchanged"}, "restart_needed": []}  # fmt: skip
    assert after["pid"] != before["pid"] and after["session"]["intra_op_threads"] == 2
    assert iris_pid  # untouched models keep their worker


def test_reload_of_a_bad_config_keeps_the_running_one(daemon_factory):
    daemon = daemon_factory("log_level: info\n")
    daemon.config_path.write_text("limits:\n  cpu:\n    quota: lots\n")
    with daemon.client() as c:
        with pytest.raises(MoltError) as err:
            c.reload()
        assert err.value.code is ErrorCode.INVALID_CONFIG
        assert "limits.cpu.quota: expected a CPU share such as 150%" in err.value.message
        assert err.value.message.endswith("; the running configuration is unchanged")
        assert c.health()["status"] == "ok"
    result = run_moltctl("reload", socket=daemon.socket)
    assert result.returncode == 1 and "[INVALID_CONFIG]" in result.stderr


def test_reload_reports_settings_that_need_a_restart(daemon_factory):
    daemon = daemon_factory("")
    daemon.config_path.write_text("drain_timeout: 5s\nmax_frame_bytes: 1MiB\n")
    with daemon.client() as c:
        assert c.reload()["restart_needed"] == ["max_frame_bytes"]
        assert c.infer("demo", {"x": [[1, 2, 3, 4]]}).version == "v2.0"


def test_strict_isolation_refuses_to_start_here_and_says_why(daemon_factory):
    daemon = daemon_factory("isolation: strict\n", wait=False)
    assert daemon.proc.wait(60) == EXIT_ISOLATION
    log = daemon.log()
    assert "cannot start: isolation: strict, but " in log
    assert "run moltbotd under systemd with Delegate=yes" in log
    assert not daemon.socket.exists()


def test_best_effort_warns_once_and_status_says_no_limits(daemon):
    assert daemon.log().count("running without resource limits (isolation: best-effort)") == 1
    with daemon.client() as c:
        status = c.status()
    assert status["isolation"]["mode"] == "best-effort"
    assert status["isolation"]["enforced"] is False and status["isolation"]["reason"]
    assert all("usage" not in m["worker"] for m in status["models"])


def test_isolation_off_never_looks(daemon_factory):
    daemon = daemon_factory("isolation: off\n")  # YAML reads a bare off as false: accepted
    assert "running without resource limits" not in daemon.log()
    with daemon.client() as c:
        assert c.status()["isolation"] == {"mode": "off", "enforced": False,
                                           "reason": "isolation is off in the config",
                                           "cgroup": None}  # fmt: skip


def test_a_reloaded_drain_timeout_is_the_one_used_at_stop(daemon_factory):
    daemon = daemon_factory("drain_timeout: 30s\n")
    daemon.config_path.write_text("drain_timeout: 7s\n")
    with daemon.client() as c:
        c.reload()
    daemon.stop()
    assert "stopping: draining requests, then workers drain_timeout=7.0" in daemon.log()
