"""The model repository on disk: natural version order and what a scan keeps or skips."""

import itertools
import random
from pathlib import Path

import pytest

from moltbotd.config import NAME_RULE, ConfigError, Overrides
from moltbotd.versions.repository import RepoModel, Scan, scan
from moltbotd.wire.files import MODEL_FILE, sort_versions, version_key


def add_version(models_dir: Path, model: str, version: str) -> Path:
    folder = models_dir / model / version
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(b"not really onnx: the scan only looks for the file")
    return folder


@pytest.mark.parametrize(
    "ordered",
    [
        ["v1.0", "v2.0", "v10.0"],
        ["1", "2", "10"],
        ["v1.2", "v1.10", "v2.0"],
        ["v9", "v10", "v100"],
        ["2024-01-05", "2024-01-20", "2025-01-01"],
    ],
)
def test_version_key_natural_order(ordered):
    shuffled = list(reversed(ordered))
    random.Random(0).shuffle(shuffled)
    assert sort_versions(shuffled) == ordered
    assert all(version_key(a) < version_key(b) for a, b in itertools.pairwise(ordered))


def test_version_key_of_mixed_forms_never_raises():
    versions = ["v2.0", "v2", "2", "v10", "beta", "v2.0-rc1", "v2.0.1", "1.0", "V3", "v2a", "a1b2"]
    ordered = sort_versions(versions)
    assert sorted(ordered) == sorted(versions)
    for a in versions:
        for b in versions:
            version_key(a) < version_key(b)  # noqa: B015 - must compare, whatever the forms
    # a prefix comes first
    assert ordered.index("v2") < ordered.index("v2.0") < ordered.index("v2.0.1")


def test_version_key_compares_digit_runs_as_numbers():
    assert version_key("v10.0") == ("v", 10, ".", 0, "")
    assert version_key("v01") == version_key("v1")


def test_scan_sorts_versions_naturally(tmp_path):
    for version in ("v10.0", "v2.0", "v1.0"):
        add_version(tmp_path, "demo", version)
    add_version(tmp_path, "iris", "v1")
    result = scan(tmp_path)
    assert isinstance(result, Scan)
    assert set(result.models) == {"demo", "iris"}
    demo = result.models["demo"]
    assert demo == RepoModel("demo", tmp_path / "demo", ("v1.0", "v2.0", "v10.0"))
    assert demo.latest == "v10.0"
    assert demo.version_dir("v2.0") == tmp_path / "demo" / "v2.0"
    assert result.skipped == []


def test_scan_ignores_hidden_entries_and_stray_files_silently(tmp_path):
    add_version(tmp_path, "demo", "v1")
    add_version(tmp_path, ".trash", "v1")  # hidden model
    add_version(tmp_path, "demo", ".v2.tmp")  # hidden version, e.g. an upload in progress
    (tmp_path / "README").write_text("models live here")
    (tmp_path / "demo" / "notes.txt").write_text("a file beside the versions")
    result = scan(tmp_path)
    assert set(result.models) == {"demo"}
    assert result.models["demo"].versions == ("v1",)
    assert result.skipped == []


def test_scan_reports_a_version_without_model_onnx(tmp_path):
    add_version(tmp_path, "demo", "v1")
    empty = tmp_path / "demo" / "v2"
    empty.mkdir()
    (empty / "model.yaml").write_text("intra_op_threads: 2\n")
    result = scan(tmp_path)
    assert result.models["demo"].versions == ("v1",)
    assert result.skipped == [f"{empty}: no {MODEL_FILE} in it"]


def test_scan_reports_model_onnx_that_is_a_folder(tmp_path):
    add_version(tmp_path, "demo", "v1")
    (tmp_path / "demo" / "v2" / MODEL_FILE).mkdir(parents=True)
    result = scan(tmp_path)
    assert result.models["demo"].versions == ("v1",)
    assert result.skipped == [f"{tmp_path / 'demo' / 'v2'}: no {MODEL_FILE} in it"]


def test_scan_reports_a_badly_named_version(tmp_path):
    add_version(tmp_path, "demo", "v1")
    bad = add_version(tmp_path, "demo", "v 2")
    result = scan(tmp_path)
    assert result.models["demo"].versions == ("v1",)
    assert result.skipped == [f"{bad}: version name must be {NAME_RULE}"]


def test_scan_reports_a_badly_named_model(tmp_path):
    add_version(tmp_path, "demo", "v1")
    add_version(tmp_path, "my model", "v1")
    result = scan(tmp_path)
    assert set(result.models) == {"demo"}
    assert result.skipped == [f"{tmp_path / 'my model'}: model name must be {NAME_RULE}"]


def test_scan_reports_a_model_with_no_versions(tmp_path):
    add_version(tmp_path, "demo", "v1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-broken" / "v1").mkdir(parents=True)
    result = scan(tmp_path)
    assert set(result.models) == {"demo"}
    assert f"{tmp_path / 'empty'}: no version folder with a {MODEL_FILE}" in result.skipped
    assert f"{tmp_path / 'only-broken' / 'v1'}: no {MODEL_FILE} in it" in result.skipped
    assert f"{tmp_path / 'only-broken'}: no version folder with a {MODEL_FILE}" in result.skipped
    assert len(result.skipped) == 3


def test_scan_of_an_empty_repository(tmp_path):
    assert scan(tmp_path) == Scan({}, [])


def test_scan_missing_models_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        scan(missing)
    assert str(info.value) == f"models_dir {missing} is not a directory"


def test_scan_models_dir_that_is_a_file(tmp_path):
    file = tmp_path / "models"
    file.write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        scan(file)


def test_model_yaml_reads_and_validates(tmp_path):
    folder = add_version(tmp_path, "demo", "v1")
    (folder / "model.yaml").write_text(
        "intra_op_threads: 3\ngraph_optimization: BASIC\nlimits:\n  memory: {limit: 512MiB}\n"
    )
    add_version(tmp_path, "demo", "v2")
    model = scan(tmp_path).models["demo"]
    assert model.model_yaml("v1") == Overrides(
        {"intra_op_threads": 3, "graph_optimization": "basic"}, {"memory": {"limit": 512 << 20}}
    )
    assert model.model_yaml("v2") == Overrides()


def test_model_yaml_error_names_the_file(tmp_path):
    folder = add_version(tmp_path, "demo", "v1")
    file = folder / "model.yaml"
    file.write_text("intra_op_threads: many\n")
    model = scan(tmp_path).models["demo"]
    with pytest.raises(ConfigError) as info:
        model.model_yaml("v1")
    assert str(info.value) == (
        f"{file}: intra_op_threads: expected an integer from 1 to 256 or auto, got 'many'"
    )


def test_model_yaml_unknown_key(tmp_path):
    folder = add_version(tmp_path, "demo", "v1")
    (folder / "model.yaml").write_text("batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"model\.yaml: batch_size: unknown setting"):
        scan(tmp_path).models["demo"].model_yaml("v1")
