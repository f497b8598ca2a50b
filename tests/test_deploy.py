"""`moltctl deploy` end to end against the real daemon, the daemon's own checks of an
upload, `moltctl versions`, and moltctl.deploying's helpers."""

import asyncio
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moltbotd.demo import save, scale_model
from moltbotd.versions.uploads import INCOMING
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.cli import EXIT_ERROR, EXIT_NO_ROOM, EXIT_USAGE
from moltctl.client import AsyncClient
from moltctl.deploying import DeployError, folder_files, next_version
from tests.conftest import run_moltctl
from tests.models import mlp_model
from tests.test_cli import fails, ok
from tests.test_rollout import slow_to_warm, while_warming

X = np.array([[1, 2, 3, 4]], dtype=np.float32)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """Only demo (v1.0 2x, v2.0 10x): the one served model a deploy may leave unnamed."""
    repo = tmp_path / "models"
    save(scale_model(2.0), repo, "demo", "v1.0")
    save(scale_model(10.0), repo, "demo", "v2.0")
    return repo


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_folder(parent: Path, name: str, model: onnx.ModelProto | None = None) -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    onnx.save(model or scale_model(3.0), str(folder / "model.onnx"))
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def incoming(models_dir: Path) -> list[str]:
    root = models_dir / INCOMING
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def versions_on_disk(models_dir: Path) -> list[str]:
    return sorted(p.name for p in (models_dir / "demo").iterdir())


def active_version(daemon) -> str:
    with daemon.client() as client:
        return client.status("demo")["models"][0]["active_version"]


def infer(daemon, version: str | None = None):
    with daemon.client() as client:
        return client.infer("demo", {"x": X}, version)


# --- moltctl deploy ---------------------------------------------------------------------------


def test_deploy_model_path_as_documented(daemon, tmp_path, models_dir):
    source = model_folder(tmp_path, "src")
    result = run_moltctl("deploy", "--model-path", str(source), socket=daemon.socket)
    assert ok(result) == "demo: v3.0 is ready\n"
    assert f"deploying {source} as demo v3.0" in result.stderr
    assert "sending     model.onnx (" in result.stderr
    assert active_version(daemon) == "v2.0"  # deployed, not activated
    served = infer(daemon)
    assert served.version == "v2.0"
    np.testing.assert_array_equal(served["y"], X * 10)

    target = models_dir / "demo" / "v3.0"
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "model.onnx"]
    assert (target / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["model"] == "demo" and manifest["version"] == "v3.0"
    assert manifest["files"] == {
        "model.onnx": {"sha256": sha256(source / "model.onnx"),
                       "size": (source / "model.onnx").stat().st_size},
    }  # fmt: skip
    assert manifest["source"] == str(source.resolve())
    assert re.fullmatch(rf"pid \d+ uid {os.getuid()}", manifest["deployed_by"])
    assert incoming(models_dir) == []
    assert versions_on_disk(models_dir) == ["v1.0", "v2.0", "v3.0"]
    assert "model demo v3.0 deployed" in daemon.log()
    assert "deploy requested" in daemon.log()  # the audit line a refused deploy must not have

    # the next unnamed deploy goes after it
    again = model_folder(tmp_path, "src2", scale_model(4.0))
    out = ok(run_moltctl("deploy", str(again), "-o", "json", socket=daemon.socket))
    report = json.loads(out)
    assert report["to"] == "v4.0" and report["changed"] is False
    assert report["deployed"] == str(models_dir / "demo" / "v4.0")
    assert report["sha256"] == sha256(again / "model.onnx")


def test_deploy_without_model_takes_the_folders_name_among_several(daemon_factory, tmp_path,
                                                                  models_dir):  # fmt: skip
    save(scale_model(5.0), models_dir, "other", "v1")
    daemon = daemon_factory()
    named = model_folder(tmp_path / "build", "other", scale_model(6.0))
    result = run_moltctl("deploy", "--model-path", str(named), socket=daemon.socket)
    assert ok(result) == "other: v2 is ready\n"
    assert f"deploying {named} as other v2" in result.stderr
    src = model_folder(tmp_path, "src")
    err = fails(run_moltctl("deploy", str(src), socket=daemon.socket), EXIT_USAGE)
    assert ("2 models served (demo, other) and none is named 'src' like the folder: name the"
            " model with --model") in err  # fmt: skip
    assert versions_on_disk(models_dir) == ["v1.0", "v2.0"]


def test_deploy_and_activate(daemon, tmp_path, models_dir):
    source = model_folder(tmp_path, "src")
    out = ok(run_moltctl("deploy", str(source), "--model", "demo", "--version", "v3",
                         "--activate", socket=daemon.socket))  # fmt: skip
    assert out.startswith("demo: v2.0 -> v3 in ")
    assert active_version(daemon) == "v3"
    served = infer(daemon)
    assert served.version == "v3"
    np.testing.assert_array_equal(served["y"], X * 3)
    state = json.loads((daemon.state_dir / "state.json").read_text())["models"]["demo"]
    assert state["active"] == "v3" and state["history"][-1] == "v2.0"
    assert (models_dir / "demo" / "v3" / "manifest.json").is_file()
    assert incoming(models_dir) == []


def test_deploy_existing_version_is_refused(daemon, tmp_path, models_dir):
    source = model_folder(tmp_path, "src")
    before = tree(models_dir / "demo" / "v1.0")
    result = run_moltctl("deploy", str(source), "--version", "v1.0", socket=daemon.socket)
    err = fails(result, EXIT_USAGE)
    assert "model demo already has a version v1.0" in err and "choose a new --version" in err
    assert "sending" not in err  # refused before a byte was sent
    assert "deploy requested" not in daemon.log()
    assert incoming(models_dir) == []
    assert tree(models_dir / "demo" / "v1.0") == before

    # the daemon checks again, for clients that do not
    data = (source / "model.onnx").read_bytes()
    with daemon.client() as client:
        token = client.upload("model.onnx", 0, data)["upload"]
        with pytest.raises(MoltError) as info:
            client.deploy(token, "demo", "v1.0", {"model.onnx": sha256(source / "model.onnx")})
    assert info.value.code == ErrorCode.ALREADY_EXISTS
    assert "model demo already has a version v1.0" in info.value.message
    assert tree(models_dir / "demo" / "v1.0") == before
    assert incoming(models_dir) == []  # a refused deploy leaves its upload behind neither
    assert active_version(daemon) == "v2.0"


def test_deploy_folder_without_model(daemon, tmp_path, models_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.yaml").write_text("intra_op_threads: 1\n")
    err = fails(run_moltctl("deploy", str(empty), socket=daemon.socket), EXIT_USAGE)
    assert f"{empty} has no model.onnx" in err
    missing = tmp_path / "missing"
    err = fails(run_moltctl("deploy", str(missing), socket=daemon.socket), EXIT_USAGE)
    assert f"{missing}: no such folder" in err
    (tmp_path / "file").write_bytes(b"x")
    err = fails(run_moltctl("deploy", str(tmp_path / "file"), socket=daemon.socket), EXIT_USAGE)
    assert f"Directory '{tmp_path / 'file'}' is a file" in err
    err = fails(run_moltctl("deploy", socket=daemon.socket), EXIT_USAGE)
    assert "give the model folder once" in err
    err = fails(run_moltctl("deploy", str(empty), "--model-path", str(empty),
                            socket=daemon.socket), EXIT_USAGE)  # fmt: skip
    assert "give the model folder once" in err
    assert incoming(models_dir) == []
    assert versions_on_disk(models_dir) == ["v1.0", "v2.0"]


@pytest.mark.parametrize("link", ["extra.onnx", "sub/data.bin", "model.onnx", "subdir"])
def test_deploy_folder_with_a_symlink_is_refused(daemon, tmp_path, models_dir, link):
    source = model_folder(tmp_path, "src")
    (source / "sub").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "real.onnx").write_bytes((source / "model.onnx").read_bytes())
    if link == "model.onnx":
        (source / "model.onnx").unlink()
    (source / link).symlink_to(target / "real.onnx" if link != "subdir" else target)
    err = fails(run_moltctl("deploy", str(source), socket=daemon.socket), EXIT_USAGE)
    assert f"{source / link} is not a regular file or folder: copy the real file in" in err
    assert incoming(models_dir) == []
    assert versions_on_disk(models_dir) == ["v1.0", "v2.0"]


def test_damaged_upload_is_refused(daemon, tmp_path, models_dir):
    source = model_folder(tmp_path, "src")
    data = (source / "model.onnx").read_bytes()
    good = sha256(source / "model.onnx")
    cases = [
        ({"model.onnx": "0" * 64}, "model.onnx: moltctl sent sha256 000000000000, moltbotd"
                                   f" received {good[:12]}"),
        ({"model.onnx": good, "extra.txt": "1" * 64},
         "extra.txt: moltctl sent sha256 111111111111, moltbotd received None"),
        ({}, f"model.onnx: moltctl sent sha256 None, moltbotd received {good[:12]}"),
    ]  # fmt: skip
    with daemon.client() as client:
        for files, message in cases:
            token = client.upload("model.onnx", 0, data[:10])["upload"]
            client.upload("model.onnx", 10, data[10:], token)
            with pytest.raises(MoltError) as info:
                client.deploy(token, "demo", "v3.0", files)
            assert info.value.code == ErrorCode.BAD_REQUEST, info.value
            assert message in info.value.message
            assert "the upload is incomplete or damaged; deploy again" in info.value.message
        # a partial upload: the daemon got fewer bytes than moltctl hashed
        token = client.upload("model.onnx", 0, data[:-1])["upload"]
        with pytest.raises(MoltError) as info:
            client.deploy(token, "demo", "v3.0", {"model.onnx": good})
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert f"model.onnx: moltctl sent sha256 {good[:12]}" in info.value.message
        # an upload without model.onnx
        token = client.upload("other.bin", 0, b"x")["upload"]
        with pytest.raises(MoltError) as info:
            client.deploy(token, "demo", "v3.0", {"other.bin": sha256_bytes(b"x")})
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert "the upload has no model.onnx" in info.value.message
    assert versions_on_disk(models_dir) == ["v1.0", "v2.0"]
    assert incoming(models_dir) == []
    assert active_version(daemon) == "v2.0"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_deploy_of_a_broken_model(daemon, tmp_path, models_dir):
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.onnx").write_bytes(b"this is not an onnx model" * 10)
    for args in ([], ["--activate"]):
        result = run_moltctl("deploy", str(source), *args, socket=daemon.socket)
        err = fails(result, EXIT_ERROR)
        assert "model demo v3.0 is not serving (worker fatal): cannot load" in err, err
        assert "Protobuf parsing failed" in err and "v2.0 keeps serving [MODEL_UNAVAILABLE]" in err
        assert versions_on_disk(models_dir) == ["v1.0", "v2.0"]
        assert incoming(models_dir) == []
        with daemon.client() as client:  # a version that was never published is not "broken"
            assert client.status("demo")["models"][0]["broken"] == {}
        served = infer(daemon)
        assert served.version == "v2.0"
        np.testing.assert_array_equal(served["y"], X * 10)
    assert ok(run_moltctl("health", socket=daemon.socket)).startswith("ok\n")


def test_deploy_with_failing_sample_is_refused(daemon, tmp_path, models_dir):
    """model.yaml's samples travel with the upload and are run before it is published."""
    source = model_folder(tmp_path, "src")
    (source / "model.yaml").write_text("samples:\n  - {x: [[1.0, 2.0]]}\n")
    err = fails(run_moltctl("deploy", str(source), socket=daemon.socket), EXIT_ERROR)
    assert "warm-up sample 1 of 1: input 'x': expected float32 with shape [N, 4]" in err, err
    assert "v2.0 keeps serving [MODEL_UNAVAILABLE]" in err
    assert versions_on_disk(models_dir) == ["v1.0", "v2.0"]
    assert incoming(models_dir) == []


def test_multi_file_version_round_trip(daemon, tmp_path, models_dir):
    source = model_folder(tmp_path, "src")
    (source / "model.yaml").write_text(
        "intra_op_threads: 2\nsamples:\n  - {x: [[1.0, 2.0, 3.0, 4.0]]}\n"
    )
    (source / "assets" / "deeper").mkdir(parents=True)
    (source / "assets" / "labels.txt").write_text("cat\ndog\n")
    (source / "assets" / "deeper" / "blob.bin").write_bytes(bytes(range(256)) * 1000)
    (source / "assets" / "empty").write_bytes(b"")
    (source / "manifest.json").write_text('{"stale": true}')  # an old one: not sent
    out = ok(run_moltctl("deploy", str(source), "--version", "v5", "--activate",
                         socket=daemon.socket))  # fmt: skip
    assert out.startswith("demo: v2.0 -> v5 in ")
    target = models_dir / "demo" / "v5"
    sent = {k: v for k, v in tree(source).items() if k != "manifest.json"}
    got = tree(target)
    manifest = json.loads(got.pop("manifest.json"))
    assert got == sent
    assert set(manifest["files"]) == set(sent)
    for name, data in sent.items():
        assert manifest["files"][name] == {"sha256": sha256_bytes(data), "size": len(data)}
    with daemon.client() as client:
        worker = client.status("demo")["models"][0]["worker"]
    assert worker["version"] == "v5"
    assert worker["session"]["intra_op_threads"] == 2  # its model.yaml applies
    np.testing.assert_array_equal(infer(daemon)["y"], X * 3)
    assert incoming(models_dir) == []


def test_files_larger_than_one_chunk(daemon_factory, tmp_path, models_dir):
    daemon = daemon_factory(config="max_frame_bytes: 1MiB\n")
    model = mlp_model(width=512)
    source = model_folder(tmp_path, "src", model)
    size = (source / "model.onnx").stat().st_size
    assert size > 3 * 2**20  # several chunks of 1 MiB less the frame overhead
    (source / "weights.bin").write_bytes(os.urandom(2 * 2**20 + 17))
    err = fails(run_moltctl("deploy", str(source), "--model", "demo", "--version", "v3",
                            socket=daemon.socket), EXIT_ERROR)  # fmt: skip
    assert "is not a drop-in replacement" in err and "--force" in err  # [N, 512], not [N, 4]
    assert incoming(models_dir) == []
    out = ok(run_moltctl("deploy", str(source), "--model", "demo", "--version", "v3",
                         "--activate", "--force", socket=daemon.socket))  # fmt: skip
    assert "accepted with --force" in out
    target = models_dir / "demo" / "v3"
    assert (target / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    assert (target / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()
    x = np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)
    expected = ort.InferenceSession(str(source / "model.onnx")).run(None, {"x": x})[0]
    with daemon.client() as client:
        result = client.infer("demo", {"x": x})
    assert result.version == "v3"
    np.testing.assert_allclose(result["y"], expected, rtol=1e-5, atol=1e-5)


# --- moltctl versions -------------------------------------------------------------------------


def test_versions_table_and_json(daemon, tmp_path, models_dir):
    ok(run_moltctl("deploy", str(model_folder(tmp_path, "src")), socket=daemon.socket))
    report = json.loads(ok(run_moltctl("versions", "-o", "json", socket=daemon.socket)))
    assert [m["name"] for m in report["models"]] == ["demo"]
    versions = {v["version"]: v for v in report["models"][0]["versions"]}
    assert list(versions) == ["v3.0", "v2.0", "v1.0"]  # newest first
    assert {v: e["state"] for v, e in versions.items()} == {
        "v3.0": "available", "v2.0": "active", "v1.0": "available",
    }  # fmt: skip
    for version, entry in versions.items():
        file = models_dir / "demo" / version / "model.onnx"
        assert entry["sha256"] == sha256(file)
        assert entry["size"] == sum(p.stat().st_size for p in file.parent.iterdir())
    deployed = versions["v3.0"]
    assert re.fullmatch(rf"pid \d+ uid {os.getuid()}", deployed["deployed_by"])
    assert deployed["verified"] is True and deployed["problem"] is None
    assert versions["v1.0"]["deployed_by"] is None and versions["v1.0"]["verified"] is None
    assert versions["v2.0"]["pid"] > 0

    lines = ok(run_moltctl("versions", "demo", socket=daemon.socket)).splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "SIZE", "SHA256", "DEPLOYED",
                                "MADE", "DETAIL"]  # fmt: skip
    rows = {line.split()[1]: line for line in lines[1:]}
    assert list(rows) == ["v3.0", "v2.0", "v1.0"]
    for version, row in rows.items():
        fields = row.split()
        assert fields[0] == "demo"
        assert fields[2] == versions[version]["state"]
        assert versions[version]["sha256"][:12] in fields
    assert f" by {deployed['deployed_by']} " in rows["v3.0"]
    assert rows["v3.0"].rstrip().endswith(" -")  # no detail
    assert " by " not in rows["v1.0"]
    assert "(changed!)" not in "\n".join(lines)
    no_legend = ok(run_moltctl("versions", "--no-legend", socket=daemon.socket)).splitlines()
    assert [line.split()[1] for line in no_legend] == ["v3.0", "v2.0", "v1.0"]
    err = fails(run_moltctl("versions", "nope", socket=daemon.socket), EXIT_ERROR)
    assert "[MODEL_NOT_FOUND]" in err


def test_changed_deployed_model_is_broken(daemon, tmp_path, models_dir):
    ok(run_moltctl("deploy", str(model_folder(tmp_path, "src")), socket=daemon.socket))
    file = models_dir / "demo" / "v3.0" / "model.onnx"
    recorded = sha256(file)
    onnx.save(scale_model(7.0), str(file))  # a valid model, but not what was deployed
    report = json.loads(ok(run_moltctl("versions", "demo", "-o", "json", socket=daemon.socket)))
    entry = next(v for v in report["models"][0]["versions"] if v["version"] == "v3.0")
    assert entry["state"] == "broken"
    assert entry["verified"] is False
    assert entry["error"] == "model.onnx differs from its manifest"
    assert entry["sha256"] == sha256(file) != recorded
    table = ok(run_moltctl("versions", "demo", socket=daemon.socket))
    row = next(line for line in table.splitlines() if " v3.0 " in line)
    assert f"{sha256(file)[:12]} (changed!)" in row and "broken" in row
    assert "model.onnx differs from its manifest" in row

    err = fails(run_moltctl("switch", "demo", "v3.0", socket=daemon.socket), EXIT_ERROR)
    assert "[VALIDATION_FAILED]" in err
    assert "does not match its manifest.json: model.onnx: " in err
    assert "v2.0 keeps serving" in err
    assert active_version(daemon) == "v2.0"
    np.testing.assert_array_equal(infer(daemon)["y"], X * 10)


# --- moltctl.deploying ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        (["v1.0", "v1.2"], "v2.0"),
        (["v9", "v2"], "v10"),
        (["1", "3", "2"], "4"),
        ([], "v1"),
        (["v2.0", "v10.0", "v9.5"], "v11.0"),
        (["v1.10.3"], "v2.00.0"),
        (["model-7b-v1"], "model-8b-v0"),
        (["2024.01"], "2025.00"),
    ],
)
def test_next_version(versions, expected):
    assert next_version(versions) == expected
    assert expected not in versions


def test_next_version_needs_a_number():
    with pytest.raises(
        DeployError, match=r"cannot guess the version after 'latest': give --version"
    ):
        next_version(["latest"])


def test_folder_files(tmp_path):
    folder = model_folder(tmp_path, "src")
    (folder / "model.yaml").write_text("samples: []\n")
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "c.bin").write_bytes(b"c")
    (folder / "a" / "manifest.json").write_text("{}")  # only the top one is left out
    (folder / "manifest.json").write_text("{}")
    (folder / "empty").mkdir()
    assert folder_files(folder) == {
        "a/b/c.bin": folder / "a" / "b" / "c.bin",
        "a/manifest.json": folder / "a" / "manifest.json",
        "model.onnx": folder / "model.onnx",
        "model.yaml": folder / "model.yaml",
    }


def test_folder_files_refusals(tmp_path):
    folder = tmp_path / "src"
    with pytest.raises(DeployError, match=r"src: no such folder$"):
        folder_files(folder)
    folder.write_bytes(b"x")
    with pytest.raises(DeployError, match=r"src is not a folder: give the folder holding model"):
        folder_files(folder)
    folder.unlink()
    folder.mkdir()
    with pytest.raises(DeployError, match=r"has no model\.onnx"):
        folder_files(folder)
    (folder / "model.onnx").mkdir()  # a folder of that name is no model
    with pytest.raises(DeployError, match=r"has no model\.onnx"):
        folder_files(folder)
    (folder / "model.onnx").rmdir()
    (folder / "model.onnx").write_bytes(b"m")
    os.mkfifo(folder / "pipe")
    with pytest.raises(DeployError, match="pipe is not a regular file or folder"):
        folder_files(folder)
    (folder / "pipe").unlink()
    (folder / "link").symlink_to(folder / "model.onnx")
    with pytest.raises(DeployError, match="link is not a regular file or folder"):
        folder_files(folder)
    (folder / "link").unlink()
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DeployError, match="dangling is not a regular file or folder"):
        folder_files(folder)


# --- issue 14: concurrent deploys, long names, limits -----------------------------------------


def test_two_deploys_of_one_new_model_and_version_meet_one_lock(daemon, tmp_path, models_dir):
    """The second was INTERNAL 'Directory not empty' at the rename: each deploy of a model
    not served took a Model (and lock) of its own. Now it gets CONFLICT at once."""
    source = tmp_path / "src"
    slow_to_warm(tmp_path, "src", "v1")
    folder = source / "v1"
    files = {name: sha256(folder / name) for name in ("model.onnx", "model.yaml")}

    async def upload(client) -> str:
        token = None
        for name in files:
            token = (await client.upload(name, 0, (folder / name).read_bytes(), token))["upload"]
        return token

    async def scenario():
        async with AsyncClient(daemon.socket) as a, AsyncClient(daemon.socket) as b:
            first, second = await upload(a), await upload(b)
            return await while_warming(
                lambda progress: a.deploy(first, "fresh", "v1", files, on_progress=progress),
                lambda: b.deploy(second, "fresh", "v1", files),
            )

    deployed, error = asyncio.run(scenario())
    assert deployed["deployed"] == str(models_dir / "fresh" / "v1")
    assert error.code is ErrorCode.CONFLICT
    assert (
        error.message == "model fresh is busy with 'deploy v1: warming'; try again when it is done"
    )
    assert incoming(models_dir) == []  # the refused one's upload is gone too
    assert sorted(p.name for p in (models_dir / "fresh" / "v1").iterdir()) == [
        "manifest.json", "model.onnx", "model.yaml"
    ]  # fmt: skip


def test_long_names_are_refused_precisely_and_leave_nothing(daemon, models_dir):
    """Names over 255 bytes were ENAMETOOLONG answered INTERNAL, with a folder left."""
    with daemon.client() as client:
        for path in ("x" * 256, "sub/" + "y" * 300 + "/model.onnx"):
            with pytest.raises(MoltError) as info:
                client.upload(path, 0, b"m")
            assert info.value.code == ErrorCode.BAD_REQUEST
            assert "at most 255 bytes per name" in info.value.message
        token = client.upload("model.onnx", 0, b"m")["upload"]
        for bad_token in ("a" * 256, token + "0"):
            with pytest.raises(MoltError) as info:
                client.upload("model.onnx", 1, b"m", bad_token)
            assert info.value.code == ErrorCode.BAD_REQUEST
            with pytest.raises(MoltError) as info:
                client.deploy(bad_token, "demo", "v9", {})
            assert info.value.code == ErrorCode.BAD_REQUEST
        with pytest.raises(MoltError) as info:
            client.deploy(token, "m" * 100, "v9", {})
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert "must be 1-64 letters" in info.value.message
    assert incoming(models_dir) == []
    assert "internal error" not in daemon.log()


def test_a_version_over_the_upload_limit_is_refused_with_its_own_exit_code(
    daemon_factory, tmp_path, models_dir
):
    daemon = daemon_factory(config="uploads:\n  max_version_bytes: 64KiB\n")
    source = model_folder(tmp_path, "src")
    (source / "weights.bin").write_bytes(os.urandom(100 * 1024))
    err = fails(run_moltctl("deploy", str(source), socket=daemon.socket), EXIT_NO_ROOM)
    # refused at the first chunk, for the total it announced, before a byte was written
    assert "the upload would reach 10" in err
    assert "over uploads.max_version_bytes (64.0KiB); raise it in moltbotd.yaml" in err
    assert err.rstrip().endswith("[RESOURCE_EXHAUSTED]")
    assert incoming(models_dir) == []
    assert versions_on_disk(models_dir) == ["v1.0", "v2.0"]
