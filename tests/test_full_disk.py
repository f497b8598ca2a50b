"""A full disk, for real (issue 14): models_dir and state_dir on a 4 MiB tmpfs that the
test fills. The daemon must answer RESOURCE_EXHAUSTED naming the path and the errno,
change nothing it could not record, leave no upload or worker behind, and serve on."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from moltbotd.demo import save, scale_model
from moltbotd.versions.uploads import INCOMING
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.cli import EXIT_ERROR, EXIT_NO_ROOM
from tests.conftest import run_moltctl, wait_until
from tests.disks import fill, small_disk
from tests.test_cli import fails, ok

X = np.array([[1, 2, 3, 4]], dtype=np.float32)


@pytest.fixture
def disk(tmp_path: Path):
    with small_disk(tmp_path / "disk", "4m") as mounted:
        yield mounted


@pytest.fixture
def models_dir(disk: Path) -> Path:
    repo = disk / "models"
    save(scale_model(2.0), repo, "demo", "v1.0")
    save(scale_model(10.0), repo, "demo", "v2.0")
    return repo


@pytest.fixture
def daemon(daemon_factory, disk):
    """The daemon's socket and log stay off the small disk: only its data is on it."""
    daemon = daemon_factory(config="uploads:\n  keep_free: 0\n", start=False)
    daemon.state_dir = disk / "state"
    return daemon.start()


def incoming(models_dir: Path) -> list[str]:
    root = models_dir / INCOMING
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def workers(daemon) -> int:
    """Worker processes of the daemon (its process group, less itself)."""
    pgid = daemon.proc.pid
    return sum(
        1
        for pid in filter(str.isdigit, os.listdir("/proc"))
        if int(pid) != pgid and _pgid(pid) == pgid
    )


def _pgid(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError):
        return None


def serving(daemon) -> str:
    with daemon.client() as client:
        out = client.infer("demo", {"x": X})
    return out.version


def test_deploy_on_a_full_disk_is_refused_clearly_and_leaves_nothing(
    daemon, tmp_path, models_dir, disk
):
    """It was BAD_REQUEST 'cannot write', part of the chunk on disk, the upload left."""
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(scale_model(3.0), str(source / "model.onnx"))
    (source / "weights.bin").write_bytes(os.urandom(256 * 1024))
    filler = fill(disk, leave=64 * 1024)
    err = fails(run_moltctl("deploy", str(source), "--version", "v3", socket=daemon.socket),
                EXIT_NO_ROOM)  # fmt: skip
    assert f"moltctl: {models_dir} has " in err
    # moltctl announces the folder's total: refused before its first byte
    assert "the upload's 2" in err and "would leave less than uploads.keep_free (0B)" in err
    assert "the upload was removed [RESOURCE_EXHAUSTED]" in err
    assert incoming(models_dir) == []
    assert sorted(p.name for p in (models_dir / "demo").iterdir()) == ["v1.0", "v2.0"]
    filler.unlink()
    ok(run_moltctl("deploy", str(source), "--version", "v3", socket=daemon.socket))
    assert (models_dir / "demo" / "v3" / "weights.bin").stat().st_size == 256 * 1024
    assert incoming(models_dir) == []


def test_switch_canary_and_scale_on_a_full_disk_change_nothing(daemon, disk):
    """They were INTERNAL 'cannot record the change'; a refused canary also left its
    worker running."""
    state_file = daemon.state_dir / "state.json"
    saved = state_file.read_bytes()
    assert workers(daemon) == 1
    filler = fill(disk)
    expected = (f"cannot record the change in {state_file}: No space left on device (ENOSPC);"
                " the change was not applied")  # fmt: skip
    for args in (["switch", "demo", "v1.0"], ["switch", "demo", "v1.0", "--canary", "10%"],
                 ["scale", "demo", "1"]):  # fmt: skip
        err = fails(run_moltctl(*args, socket=daemon.socket), EXIT_ERROR)
        assert expected in err and err.rstrip().endswith("[RESOURCE_EXHAUSTED]"), err
        assert state_file.read_bytes() == saved
        left = sorted(p.name for p in daemon.state_dir.iterdir() if p.name != "audit.jsonl")
        assert left == ["state.json"]  # no tmp
        assert serving(daemon) == "v2.0"
        wait_until(lambda: workers(daemon) == 1, what="the candidate's worker to stop")
    assert "v2.0 keeps serving" in fails(run_moltctl("switch", "demo", "v1.0",
                                                     socket=daemon.socket), EXIT_ERROR)  # fmt: skip
    with daemon.client() as client:
        model = client.status("demo")["models"][0]
    assert model["canary"] is None and model["worker"]["scaling"]["manual"] is None
    assert "cannot record the change" in daemon.log()  # the operator sees it too
    filler.unlink()
    ok(run_moltctl("switch", "demo", "v1.0", socket=daemon.socket))
    assert serving(daemon) == "v1.0"
    assert json.loads(state_file.read_text())["models"]["demo"]["active"] == "v1.0"


def test_a_deploy_whose_manifest_does_not_fit_is_refused_and_leaves_nothing(
    daemon, models_dir, disk
):
    """The upload fits (one page), its manifest.json does not: that was INTERNAL."""
    data = scale_model(3.0).SerializeToString()
    assert len(data) < 4096
    filler = fill(disk, leave=4096)
    with daemon.client() as client:
        token = client.upload("model.onnx", 0, data)["upload"]
        with pytest.raises(MoltError) as info:
            client.deploy(token, "demo", "v3", {"model.onnx": hashlib.sha256(data).hexdigest()})
    assert info.value.code == ErrorCode.RESOURCE_EXHAUSTED, info.value
    assert info.value.message.startswith(
        f"cannot publish {models_dir / 'demo' / 'v3'}: No space left on device (ENOSPC)"
    )
    assert incoming(models_dir) == []
    assert sorted(p.name for p in (models_dir / "demo").iterdir()) == ["v1.0", "v2.0"]
    wait_until(lambda: workers(daemon) == 1, what="the candidate's worker to stop")
    assert serving(daemon) == "v2.0"
    filler.unlink()


def test_a_promote_on_a_full_disk_keeps_its_canary(daemon, disk):
    """The refused promote stopped the canary's worker but kept routing a share to it."""
    ok(run_moltctl("switch", "demo", "v1.0", "--canary", "50%", socket=daemon.socket))
    filler = fill(disk)
    err = fails(run_moltctl("promote", "demo", socket=daemon.socket), EXIT_ERROR)
    assert "No space left on device (ENOSPC); the change was not applied; v2.0 keeps" in err
    with daemon.client() as client:
        canary = client.status("demo")["models"][0]["canary"]
        versions = {client.infer("demo", {"x": X}).version for _ in range(4)}
    assert canary["worker"]["state"] == "ready" and versions == {"v1.0", "v2.0"}
    filler.unlink()
    ok(run_moltctl("promote", "demo", socket=daemon.socket))
    assert serving(daemon) == "v1.0"
