"""End to end in a Debian bookworm VM with systemd as PID 1 and cgroup v2 (qemu).

`make deb` builds the package once; two VM boots then use it:
- tests/e2e/guest.sh + guest.py: installed by name from the flat apt repository, the
  service, moltctl, cgroup layout, kernel-enforced CPU quota, io.max, live reload,
  OOM containment; each test below asserts on one group of its checks;
- tests/e2e/package-checks.sh: the package's life cycle (install, user, unit, socket,
  completion, man pages, security, reload, watchdog, stop, reinstall, remove, purge).
This host has neither systemd as PID 1 nor cgroup controllers, so this is where the
units, the package and the limits are proven.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moltbotd.demo import save
from tests.models import gru_model, memory_hog_model, slow_model

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]  # one VM boot takes minutes
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VM_TIMEOUT = 1500


def unavailable() -> str | None:
    """Why the VM cannot run here (printed as the skip reason), or None."""
    missing = [t for t in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "dpkg-scanpackages")
               if shutil.which(t) is None]  # fmt: skip
    if missing:
        return f"missing {', '.join(missing)}: run `make e2e-deps` (apt-get install as root)"
    if os.geteuid() != 0:
        return "building the VM image needs root (mmdebstrap --mode=root)"
    return None


@pytest.fixture(scope="session")
def built() -> Path:
    """The VM image (cached outside the checkout) and dist/ from `make deb`."""
    reason = unavailable()
    if reason:
        print(f"\nVM scenarios skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    subprocess.run([str(HERE / "build-image")], check=True, timeout=900)
    subprocess.run(["make", "-C", str(ROOT), "deb"], check=True, timeout=1200)
    return ROOT / "dist"


def boot(share: Path, script: str) -> subprocess.CompletedProcess[str]:
    share.chmod(0o755)  # apt's sandbox user _apt reads the repository in the VM
    done = subprocess.run([str(HERE / "vm-run"), "-t", str(VM_TIMEOUT), str(share), script],
                          capture_output=True, text=True, timeout=VM_TIMEOUT + 60,
                          check=False)  # fmt: skip
    print(done.stdout[-30000:], done.stderr[-5000:], sep="\n")
    return done


def copy_module(name: str, into: Path) -> None:
    """A module of this Python (a package folder or one file) into `into`, where the
    VM's Python finds it (the soak runs from the share)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"{name} is not installed here"
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        shutil.copytree(origin.parent, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(origin, into / origin.name)


@pytest.fixture(scope="session")
def vm(built: Path, tmp_path_factory) -> dict:
    share = tmp_path_factory.mktemp("vm-share")
    shutil.copytree(built / "apt", share / "apt")
    save(slow_model(), share / "models", "slow", "v1")
    save(memory_hog_model(), share / "models", "hog", "v1")
    save(gru_model(), share / "models", "gru", "v1")
    (share / "models" / "gru" / "v1" / "model.yaml").write_text(
        "state: [{input: h, output: h_next}]\n"
    )
    for name in ("guest.sh", "guest.py"):
        shutil.copy(HERE / name, share / name)
    if os.environ.get("MOLTBOT_VM_SCENARIOS"):  # e.g. installed,sessions: the rest not run
        (share / "scenarios").write_text(os.environ["MOLTBOT_VM_SCENARIOS"])
    shutil.copytree(ROOT / "examples", share / "examples")  # the alerts promtool checks
    # the soak's package and the test models it imports, for the package's own Python
    shutil.copytree(ROOT / "stress", share / "stress", ignore=shutil.ignore_patterns("__pycache__"))
    (share / "tests").mkdir()
    for name in ("__init__.py", "models.py"):
        shutil.copy(ROOT / "tests" / name, share / "tests" / name)
    # and NVIDIA's tritonclient, the fleet's client (the same CPython 3.11 and glibc as here)
    for name in ("tritonclient", "geventhttpclient", "gevent", "greenlet", "rapidjson",
                 "brotli", "_brotli", "certifi", "six"):  # fmt: skip
        copy_module(name, share)
    zope = Path(importlib.util.find_spec("zope.event").origin).parent.parent  # a namespace
    shutil.copytree(zope, share / "zope", ignore=shutil.ignore_patterns("__pycache__"))
    done = boot(share, "guest.sh")
    results = share / "results.json"
    assert results.exists(), f"the VM run left no results (exit {done.returncode})"
    return {"results": json.loads(results.read_text()), "output": done.stdout}


@pytest.fixture(scope="session")
def package_run(built: Path, tmp_path_factory) -> subprocess.CompletedProcess[str]:
    share = tmp_path_factory.mktemp("vm-package")
    for deb in built.glob("moltbot_*_amd64.deb"):
        shutil.copy(deb, share / deb.name)
    shutil.copytree(built / "apt", share / "apt")
    shutil.copy(HERE / "package-checks.sh", share / "package-checks.sh")
    return boot(share, "package-checks.sh")


def passed(vm: dict, *names: str) -> None:
    failed = {n: vm["results"].get(n, {"ok": False, "detail": "not run"}) for n in names}
    failed = {n: r["detail"] for n, r in failed.items() if not r["ok"]}
    assert not failed, failed


def test_a_conversion_job_runs_in_its_models_limits(vm):
    passed(vm, "convert-job-in-the-models-limits", "convert-oom-killed-in-its-own-group")


def test_sessions_and_the_budget_ledger_under_the_hardened_unit(vm):
    passed(vm, "sessions-spill-under-the-unit", "sessions-survive-a-worker-kill-bit-identical",
           "budget-ledger-written-by-the-unit")  # fmt: skip


def test_apt_install_by_name_starts_the_service(vm):
    passed(vm, "service-active-after-install", "socket-0666-group-moltbot", "moltctl-status")


def test_structured_journal_and_history_across_restarts(vm):
    passed(vm, "journalctl-finds-entries-by-their-fields", "audit-records-in-the-journal",
           "no-log-line-twice", "moltctl-logs-shows-earlier-runs",
           "moltctl-logs-filter-error-last-1h")  # fmt: skip


def test_roles_by_peer_credentials_with_the_packages_groups(vm):
    passed(vm, "group-moltbot-reads-and-infers", "group-moltbot-may-not-switch",
           "group-moltbot-admin-switches-as-documented", "no-group-no-role",
           "refusal-audited-under-the-clients-own-uid")  # fmt: skip


def test_debians_prometheus_scrapes_the_metrics_socket(vm):
    passed(vm, "promtool-check-rules", "promtool-test-rules", "metrics-socket-127.0.0.1:8474",
           "prometheus-ready", "prometheus-counted-every-request", "prometheus-p99-consistent",
           "prometheus-requests-by-code")  # fmt: skip


def test_moltctl_switch_as_documented(vm):
    passed(vm, "moltctl-switch-v2.0", "infer-after-switch")


def test_versions_survive_kill_9_and_deploy_crosses_the_sandbox(vm):
    passed(vm, "state-file-records-the-switch", "kill-9-restart-serves-the-switched-version",
           "deploy-from-a-home-folder-activates",
           "rollback-returns-and-removes-the-group")  # fmt: skip


def test_http_socket_activation_keeps_the_sandbox(vm):
    passed(vm, "http-socket-activation-keeps-the-sandbox", "http-socket-follows-the-service")


def test_a_fleet_behind_haproxy_loses_no_request(vm):
    passed(vm, "network-drop-in-security", "haproxy-checks-the-example-config",
           "fleet-loses-no-request")  # fmt: skip


def test_systemd_reload_and_security(vm):
    passed(vm, "systemctl-reload-keeps-main-pid", "systemd-analyze-security")


def test_cgroup_layout(vm):
    passed(vm, "daemon-in-supervisor-leaf", "worker-in-model-group",
           "status-shows-limits-enforced", "shipped-memory-auto-in-the-group",
           "status-says-how-auto-memory-was-derived")  # fmt: skip


def test_instances_share_the_version_group(vm):
    passed(vm, "scale-2-instances-in-the-model-group", "scale-auto-returns-to-one-instance")


def test_cpu_quota_is_enforced(vm):
    passed(vm, "strict-isolation-starts-under-systemd", "cpu.max-written", "cpu-quota-20%-enforced")


def test_io_max_on_the_right_device(vm):
    passed(vm, "io.max-on-the-repository-disk")


def test_live_reload_changes_limits_without_restart(vm):
    passed(vm, "reload-changes-cpu.max-same-pid")


def test_chaos_soak_with_oom_kills_through_cgroups(vm):
    passed(vm, "soak-under-systemd-meets-every-target", "soak-oom-kills-reported-as-memory-limit")


def test_oom_kill_is_contained(vm):
    passed(vm, "oom-request-gets-RESOURCE_EXHAUSTED", "oom-worker-restarts", "oom-kill-counted",
           "cgroup-series-move",
           "others-serve-with-zero-errors", "unit-survives-oom")  # fmt: skip


def test_package_life_cycle(package_run):
    failed = re.findall(r"^FAIL (.*)$", package_run.stdout, re.MULTILINE)
    summary = re.search(r"summary: (\d+) passed, (\d+) failed", package_run.stdout)
    assert summary, f"no summary (exit {package_run.returncode}):\n{package_run.stdout[-3000:]}"
    assert not failed and summary.group(2) == "0" and package_run.returncode == 0, failed
    assert int(summary.group(1)) >= 45  # every check ran
