"""The demo repository `make run` and the package serve: manifests, and a second run
that leaves a live demo's files alone."""

import shutil
import subprocess
import sys

from moltbotd.demo import DEMO, write_demo_repository
from moltbotd.versions.manifest import read_manifest, verify


def test_every_demo_version_carries_a_manifest_that_verifies(tmp_path):
    assert write_demo_repository(tmp_path) == ["demo/v1.0", "demo/v2.0", "iris/v1"]
    for name, version in DEMO:
        folder = tmp_path / name / version
        manifest = read_manifest(folder)
        assert manifest is not None
        assert (manifest.model, manifest.version) == (name, version)
        assert list(manifest.files) == ["model.onnx"]
        assert verify(folder, manifest) == []
    assert [p.name for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")] == []


def test_a_second_run_keeps_what_is_there_and_adds_what_is_missing(tmp_path):
    write_demo_repository(tmp_path)
    model = tmp_path / "demo" / "v1.0" / "model.onnx"
    before = model.stat()
    shutil.rmtree(tmp_path / "iris" / "v1")
    assert write_demo_repository(tmp_path) == ["iris/v1"]
    after = model.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_command_line_reports_and_writes_a_folder_to_deploy(tmp_path):
    def demo(*args: str, env: dict[str, str] | None = None) -> str:
        argv = [sys.executable, "-m", "moltbotd.demo", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout

    assert demo(str(tmp_path / "m")) == f"demo model repository in {tmp_path / 'm'}: 3 written\n"
    assert demo(str(tmp_path / "m")) == (
        f"demo model repository in {tmp_path / 'm'}: 0 written, 3 already there"
        " (kept as they are)\n"
    )
    assert demo("--scale", "3", str(tmp_path / "build" / "demo")) == (
        f"{tmp_path / 'build' / 'demo' / 'model.onnx'}: y = 3 * x, for x float32 [N, 4]\n"
    )
    assert [p.name for p in (tmp_path / "build" / "demo").iterdir()] == ["model.onnx"]
    demo(str(tmp_path / "r"), env={"SOURCE_DATE_EPOCH": "1700000000", "PATH": "/usr/bin:/bin"})
    manifest = read_manifest(tmp_path / "r" / "iris" / "v1")
    assert manifest is not None and manifest.deployed_at == 1700000000.0  # reproducible .deb
