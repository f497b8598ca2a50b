"""Manifests of deployed version folders, on real files: hashing, parsing, verifying, copying."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from moltbotd.versions.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    build_manifest,
    copy_tree,
    read_manifest,
    tree_size,
    verify,
    write_manifest,
)
from moltbotd.wire.files import MANIFEST_FILE, MODEL_FILE, sha256_file

MODEL_BYTES = bytes(range(256)) * 5000  # > 1 MiB: hashing crosses a block boundary
YAML_BYTES = b"batch: 4\n"
DATA_BYTES = b"vocabulary\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def version(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "demo" / "v1"
    (folder / "assets" / "deep").mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(MODEL_BYTES)
    (folder / "model.yaml").write_bytes(YAML_BYTES)
    (folder / "assets" / "deep" / "vocab.txt").write_bytes(DATA_BYTES)
    (folder / "assets" / "empty").write_bytes(b"")
    return folder


def manifest_of(folder: Path) -> Manifest:
    return build_manifest(folder, "demo", "v1", "uid 1000", "/home/me/demo")


def sample() -> Manifest:
    return Manifest(
        model="demo",
        version="v1",
        files={MODEL_FILE: FileEntry(sha(b"m"), 1), "sub/x.bin": FileEntry(sha(b""), 0)},
        deployed_at=1_700_000_000.25,
        deployed_by="uid 1000",
        source="/srv/build/demo",
    )


def body() -> dict:
    return json.loads(sample().to_json())


def test_to_json_round_trip():
    manifest = sample()
    assert Manifest.from_json(manifest.to_json(), "m.json") == manifest
    assert manifest.model_sha256 == sha(b"m")


def test_to_json_is_stable_and_sorted():
    data = sample().to_json()
    assert data.endswith(b"\n")
    assert list(json.loads(data)["files"]) == [MODEL_FILE, "sub/x.bin"]
    assert sample().to_json() == data


def test_model_sha256_none_without_model_file():
    manifest = Manifest("demo", "v1", {"other": FileEntry(sha(b""), 0)}, 0.0, "", "")
    assert manifest.model_sha256 is None


def test_from_json_accepts_integer_time():
    raw = body() | {"deployed_at": 1700000000}
    manifest = Manifest.from_json(json.dumps(raw).encode(), "m.json")
    assert manifest.deployed_at == 1700000000.0
    assert isinstance(manifest.deployed_at, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "m.json: not valid JSON"),
        (b"\xff\xfe\x00garbage", "m.json: not valid JSON"),
        (b"", "m.json: not valid JSON"),
        (b"[1, 2]", "m.json: expected a JSON object, got an array"),
        (b'"text"', "m.json: expected a JSON object, got a string"),
    ],
)
def test_from_json_not_a_manifest(data, message):
    with pytest.raises(ManifestError, match="^" + message):
        Manifest.from_json(data, "m.json")


@pytest.mark.parametrize("key", ["schema", "model", "version", "files", "deployed_at",
                                 "deployed_by", "source"])  # fmt: skip
def test_from_json_missing_key(key):
    raw = body()
    del raw[key]
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(json.dumps(raw).encode(), "/models/demo/v1/manifest.json")
    assert str(caught.value) == f"/models/demo/v1/manifest.json: missing key {key!r}"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model", 3, "key 'model' must be a string, got an integer"),
        ("version", None, "key 'version' must be a string, got null"),
        ("deployed_at", "yesterday", "key 'deployed_at' must be a number, got a string"),
        ("deployed_at", True, "key 'deployed_at' must be a number, got a boolean"),
        ("deployed_by", ["root"], "key 'deployed_by' must be a string, got an array"),
        ("source", 1.5, "key 'source' must be a string, got a number"),
        ("files", [], "key 'files' must be an object, got an array"),
        ("schema", "1", "key 'schema' must be an integer, got a string"),
        ("schema", 2, "schema 2 is not the known schema 1"),
    ],
)
def test_from_json_wrong_type(key, value, message):
    raw = body() | {key: value}
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(json.dumps(raw).encode(), "m.json")
    assert str(caught.value) == f"m.json: {message}"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("abc", "files['model.onnx'] must be an object, got a string"),
        ({"size": 1}, "missing key 'sha256' in files['model.onnx']"),
        ({"sha256": sha(b"m")}, "missing key 'size' in files['model.onnx']"),
        ({"sha256": sha(b"m"), "size": "1"},
         "key 'size' in files['model.onnx'] must be an integer, got a string"),
        ({"sha256": sha(b"m"), "size": 1.0},
         "key 'size' in files['model.onnx'] must be an integer, got a number"),
        ({"sha256": sha(b"m"), "size": -1}, "key 'size' in files['model.onnx'] is negative (-1)"),
        ({"sha256": "ab12", "size": 1},
         "key 'sha256' in files['model.onnx'] is not 64 lowercase hex digits"),
        ({"sha256": sha(b"m").upper(), "size": 1},
         "key 'sha256' in files['model.onnx'] is not 64 lowercase hex digits"),
    ],
)  # fmt: skip
def test_from_json_bad_file_entry(entry, message):
    raw = body()
    raw["files"][MODEL_FILE] = entry
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(json.dumps(raw).encode(), "m.json")
    assert str(caught.value) == f"m.json: {message}"


@pytest.mark.parametrize(
    "rel", ["", "/etc/passwd", "../other/v1/model.onnx", "a/../../x", "a//b", "./a", "a/",
            MANIFEST_FILE],
)  # fmt: skip
def test_from_json_refuses_paths_outside_the_folder(rel):
    raw = body()
    raw["files"][rel] = {"sha256": sha(b""), "size": 0}
    with pytest.raises(ManifestError, match="is not a relative path inside the folder"):
        Manifest.from_json(json.dumps(raw).encode(), "m.json")


def test_sha256_file_matches_hashlib(tmp_path):
    for size in (0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(path) == sha(data)


def test_build_manifest_hashes_every_file(version):
    manifest = manifest_of(version)
    assert manifest.files == {
        MODEL_FILE: FileEntry(sha(MODEL_BYTES), len(MODEL_BYTES)),
        "model.yaml": FileEntry(sha(YAML_BYTES), len(YAML_BYTES)),
        "assets/deep/vocab.txt": FileEntry(sha(DATA_BYTES), len(DATA_BYTES)),
        "assets/empty": FileEntry(sha(b""), 0),
    }
    assert list(manifest.files) == sorted(manifest.files)
    assert manifest.model_sha256 == sha(MODEL_BYTES)
    assert (manifest.model, manifest.version) == ("demo", "v1")
    assert (manifest.deployed_by, manifest.source) == ("uid 1000", "/home/me/demo")


def test_build_manifest_skips_its_own_file_only_at_the_top(version):
    (version / MANIFEST_FILE).write_bytes(b"an older manifest")
    (version / "assets" / MANIFEST_FILE).write_bytes(b"data that happens to be called so")
    manifest = manifest_of(version)
    assert MANIFEST_FILE not in manifest.files
    assert f"assets/{MANIFEST_FILE}" in manifest.files


def test_build_manifest_time_is_now(version):
    before = time.time()
    manifest = manifest_of(version)
    assert before <= manifest.deployed_at <= time.time()


@pytest.mark.parametrize("target", ["model.yaml", "assets", "/nonexistent"])
def test_build_manifest_refuses_symlinks(version, target):
    link = version / "assets" / "link"
    link.symlink_to(target)
    with pytest.raises(ManifestError, match=f"^{link} is a symbolic link"):
        manifest_of(version)


def test_build_manifest_refuses_special_files(version):
    fifo = version / "assets" / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ManifestError, match=f"^{fifo} is not a regular file or folder \\(a FIFO"):
        manifest_of(version)


def test_write_then_read_manifest(version):
    manifest = manifest_of(version)
    write_manifest(version, manifest)
    assert read_manifest(version) == manifest
    assert sorted(p.name for p in version.iterdir()) == [
        "assets", MANIFEST_FILE, MODEL_FILE, "model.yaml"
    ]  # fmt: skip
    assert verify(version, manifest) == []  # the manifest file is not an extra problem
    assert manifest_of(version).files == manifest.files  # nor is it hashed by a rebuild


def test_read_manifest_absent(version):
    assert read_manifest(version) is None


def test_read_manifest_corrupt(version):
    (version / MANIFEST_FILE).write_bytes(b'{"schema": 1')
    with pytest.raises(ManifestError, match=f"^{version / MANIFEST_FILE}: not valid JSON"):
        read_manifest(version)


def test_read_manifest_unreadable(version):
    (version / MANIFEST_FILE).mkdir()
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(version)


def test_verify_ok(version):
    assert verify(version, manifest_of(version)) == []


def test_verify_ignores_extra_files(version):
    manifest = manifest_of(version)
    (version / "notes.txt").write_text("added later")
    (version / "assets" / "more").mkdir()
    assert verify(version, manifest) == []


def test_verify_changed_byte(version):
    manifest = manifest_of(version)
    damaged = bytearray(MODEL_BYTES)
    damaged[len(damaged) // 2] ^= 0x01
    (version / MODEL_FILE).write_bytes(damaged)
    assert verify(version, manifest) == [
        f"model.onnx: sha256 {sha(bytes(damaged))[:12]}..., "
        f"manifest says {sha(MODEL_BYTES)[:12]}..."
    ]


def test_verify_truncated(version):
    manifest = manifest_of(version)
    os.truncate(version / MODEL_FILE, 1200)
    assert verify(version, manifest) == [
        f"model.onnx: size 1200 bytes, manifest says {len(MODEL_BYTES)}"
    ]


def test_verify_size_checked_before_hashing(version, monkeypatch):
    manifest = manifest_of(version)
    os.truncate(version / MODEL_FILE, 10)
    hashed: list[str] = []
    real = sha256_file

    def spy(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr("moltbotd.versions.manifest.sha256_file", spy)
    assert verify(version, manifest) == [
        f"model.onnx: size 10 bytes, manifest says {len(MODEL_BYTES)}"
    ]
    assert MODEL_FILE not in hashed
    assert "vocab.txt" in hashed


def test_verify_missing(version):
    manifest = manifest_of(version)
    (version / "assets" / "deep" / "vocab.txt").unlink()
    (version / MODEL_FILE).unlink()
    assert verify(version, manifest) == [
        f"assets/deep/vocab.txt: missing, manifest says {len(DATA_BYTES)} bytes",
        f"model.onnx: missing, manifest says {len(MODEL_BYTES)} bytes",
    ]


def test_verify_missing_folder_and_file_in_place_of_folder(version):
    manifest = manifest_of(version)
    (version / "assets" / "deep" / "vocab.txt").unlink()
    (version / "assets" / "deep").rmdir()
    (version / "assets" / "deep").write_bytes(b"a file where a folder was")
    problems = verify(version, manifest)
    assert problems == [f"assets/deep/vocab.txt: missing, manifest says {len(DATA_BYTES)} bytes"]


def test_verify_symlink_in_place_of_file(version, tmp_path):
    manifest = manifest_of(version)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(MODEL_BYTES)  # the same bytes, but not in the folder
    (version / MODEL_FILE).unlink()
    (version / MODEL_FILE).symlink_to(elsewhere)
    assert verify(version, manifest) == [
        f"model.onnx: a symbolic link, manifest says a regular file of {len(MODEL_BYTES)} bytes"
    ]


def test_tree_size(version):
    expected = len(MODEL_BYTES) + len(YAML_BYTES) + len(DATA_BYTES)
    assert tree_size(version) == expected
    (version / "link").symlink_to(version / MODEL_FILE)  # not followed, not counted
    assert tree_size(version) == expected
    assert tree_size(version / "assets" / "deep") == len(DATA_BYTES)


def test_tree_size_empty(tmp_path):
    assert tree_size(tmp_path) == 0


def tree(folder: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for a folder)."""
    return {
        p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def test_copy_tree_copies_exactly(version, tmp_path):
    (version / "assets" / "hollow").mkdir()  # empty folders are copied too
    target = tmp_path / "copy"
    copy_tree(version, target)
    assert tree(target) == tree(version)
    assert "assets/hollow" in tree(target)
    assert verify(target, manifest_of(version)) == []
    assert not (target / MODEL_FILE).is_symlink()
    assert (target / MODEL_FILE).stat().st_ino != (version / MODEL_FILE).stat().st_ino


def test_copy_tree_creates_missing_parents(version, tmp_path):
    target = tmp_path / "new" / "model" / "v1"
    copy_tree(version, target)
    assert tree(target) == tree(version)


def test_copy_tree_fsyncs_files_and_folders(version, tmp_path, fsynced):
    synced = fsynced
    target = tmp_path / "copy"
    copy_tree(version, target)
    for path in [target, *target.rglob("*"), target.parent]:
        assert path.stat().st_ino in synced, path


@pytest.mark.parametrize("existing", ["folder", "file", "dangling link"])
def test_copy_tree_refuses_an_existing_target(version, tmp_path, existing):
    target = tmp_path / "copy"
    if existing == "folder":
        target.mkdir()
    elif existing == "file":
        target.write_bytes(b"x")
    else:
        target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match=f"^{target} already exists"):
        copy_tree(version, target)
    assert not (tmp_path / "nowhere").exists()


def test_copy_tree_refuses_symlink(version, tmp_path):
    link = version / "assets" / "deep" / "link.onnx"
    link.symlink_to(version / MODEL_FILE)
    with pytest.raises(ManifestError, match=f"^{link} is a symbolic link"):
        copy_tree(version, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()  # no half copy left in the way of a retry


def test_copy_tree_refuses_special_files(version, tmp_path):
    fifo = version / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ManifestError, match=f"^{fifo} is not a regular file or folder"):
        copy_tree(version, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_copy_tree_refuses_a_target_inside_the_source(version):
    with pytest.raises(ManifestError, match="cannot copy a folder into itself"):
        copy_tree(version, version / "assets" / "copy")
    assert not (version / "assets" / "copy").exists()


def test_copy_tree_refuses_a_missing_source(tmp_path):
    with pytest.raises(ManifestError, match="is not a folder"):
        copy_tree(tmp_path / "absent", tmp_path / "copy")
