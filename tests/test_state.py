"""State that survives restarts: atomic writes, the JSON form, activation history, the store."""

import errno
import json
import os
import time
from pathlib import Path

import pytest

from moltbotd.control.state import (
    HISTORY,
    SCHEMA,
    STATE_FILE,
    Canary,
    ModelState,
    State,
    StateStore,
)
from moltbotd.durable import atomic_write, fsync_dir
from tests.disks import fill, small_disk


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sample() -> State:
    state = State()
    state.model("demo").activate("v1.0", None)
    state.model("demo").activate("v2.0", "v2.0")
    state.model("demo").canary = Canary("v3.0", 0.1, started=1_700_000_000.5)
    state.model("iris").activate("v1", None)
    return state


# atomic_write


def test_atomic_write_creates(tmp_path):
    path = tmp_path / "file.json"
    atomic_write(path, b"first")
    assert path.read_bytes() == b"first"
    assert names(tmp_path) == ["file.json"]
    assert path.stat().st_mode & 0o777 == 0o640 & ~umask()


def test_atomic_write_mode(tmp_path):
    path = tmp_path / "file.json"
    atomic_write(path, b"x", 0o600)
    assert path.stat().st_mode & 0o777 == 0o600 & ~umask()


def test_atomic_write_replaces(tmp_path):
    path = tmp_path / "file.json"
    path.write_bytes(b"old content, longer than the new one")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert names(tmp_path) == ["file.json"]


def test_atomic_write_empty(tmp_path):
    path = tmp_path / "file.json"
    path.write_bytes(b"old")
    atomic_write(path, b"")
    assert path.read_bytes() == b""


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch, error):
    path = tmp_path / "file.json"
    path.write_bytes(b"old")

    def fsync(fd: int) -> None:
        raise error

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(type(error)):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["file.json"]  # no temporary file left


def test_atomic_write_failure_to_rename_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "file.json"
    path.write_bytes(b"old")

    def replace(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["file.json"]


def test_atomic_write_fsyncs_file_then_folder(tmp_path, fsynced):
    synced = fsynced
    path = tmp_path / "file.json"
    atomic_write(path, b"data")
    assert synced == [path.stat().st_ino, tmp_path.stat().st_ino]


def test_fsync_dir(tmp_path):
    fsync_dir(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "file")


# State and ModelState


def test_state_round_trip():
    state = sample()
    assert State.from_json(state.to_json()) == state
    demo = State.from_json(state.to_json()).models["demo"]
    assert demo == ModelState("v2.0", ["v1.0"], "v2.0", Canary("v3.0", 0.1, 1_700_000_000.5))


def test_state_round_trip_empty():
    assert State.from_json(State().to_json()) == State()


def test_state_json_form():
    body = json.loads(sample().to_json())
    assert body["schema"] == SCHEMA
    assert isinstance(body["written"], float)
    assert list(body["models"]) == ["demo", "iris"]
    assert body["models"]["demo"]["canary"] == {"version": "v3.0", "share": 0.1,
                                                "started": 1_700_000_000.5}  # fmt: skip
    assert body["models"]["iris"]["canary"] is None


def test_state_from_json_optional_fields():
    text = json.dumps({"schema": SCHEMA, "models": {"demo": {}}}).encode()
    assert State.from_json(text).models == {"demo": ModelState()}


def test_state_from_json_wrong_schema():
    text = json.dumps({"schema": SCHEMA + 1, "models": {}}).encode()
    with pytest.raises(ValueError, match=f"expected a map with schema {SCHEMA} and models"):
        State.from_json(text)


def test_state_model_creates_once():
    state = State()
    created = state.model("demo")
    assert created == ModelState()
    assert state.model("demo") is created


def test_canary_started_defaults_to_now():
    before = time.time()
    assert before <= Canary("v2", 0.5).started <= time.time()


def test_activate_first_version():
    model = ModelState()
    model.activate("v1", "v1")
    assert model == ModelState("v1", [], "v1", None)


def test_activate_pushes_previous_and_clears_canary():
    model = ModelState("v1", [], None, Canary("v2", 0.2))
    model.activate("v2", "v2")
    assert model == ModelState("v2", ["v1"], "v2", None)
    model.activate("v3", None)
    assert model.history == ["v1", "v2"]  # newest last
    assert model.config_pin is None


def test_activate_same_version_does_not_push():
    model = ModelState("v1", ["v0"], None, Canary("v2", 0.2))
    model.activate("v1", "v1")
    assert model == ModelState("v1", ["v0"], "v1", None)


def test_activate_caps_history():
    model = ModelState()
    versions = [f"v{i}" for i in range(HISTORY + 5)]
    for version in versions:
        model.activate(version, None)
    assert model.active == versions[-1]
    assert model.history == versions[-HISTORY - 1 : -1]
    assert len(model.history) == HISTORY


def test_activate_does_not_alias_history():
    model = ModelState("v1")
    before = model.history
    model.activate("v2", None)
    assert before == []  # a new list: a copy taken earlier is not changed underneath


# StateStore


def test_load_missing_file(tmp_path):
    assert StateStore(tmp_path).load() == State()
    assert StateStore(tmp_path / "absent").load() == State()
    assert names(tmp_path) == []


def test_save_then_load(tmp_path):
    StateStore(tmp_path).save(sample().to_json())
    assert StateStore(tmp_path).load() == sample()
    assert names(tmp_path) == [STATE_FILE]


def test_save_replaces(tmp_path):
    store = StateStore(tmp_path)
    store.save(sample().to_json())
    state = store.load()
    state.model("demo").activate("v4.0", None)
    store.save(state.to_json())
    loaded = StateStore(tmp_path).load()
    assert loaded.models["demo"].active == "v4.0"
    assert loaded.models["demo"].history == ["v1.0", "v2.0"]
    assert names(tmp_path) == [STATE_FILE]


def test_save_creates_the_directory(tmp_path):
    directory = tmp_path / "var" / "lib" / "moltbot"
    StateStore(directory).save(sample().to_json())
    assert (directory / STATE_FILE).is_file()
    assert StateStore(directory).load() == sample()


def assert_set_aside(tmp_path: Path, content: bytes) -> None:
    asides = list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(asides) == 1
    assert asides[0].read_bytes() == content  # kept, never lost
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize(
    "content",
    [
        b'{"schema": 1, "models": {',  # cut short
        b"\xff\xfe not even text",
        b"",
        json.dumps({"schema": SCHEMA + 1, "models": {}}).encode(),  # wrong schema
        json.dumps({"models": {}}).encode(),  # no schema
        json.dumps({"schema": SCHEMA}).encode(),  # no models
        json.dumps({"schema": SCHEMA, "models": {"demo": {"canary": {"version": "v2"}}}}).encode(),
        json.dumps({"schema": SCHEMA, "models": {"demo": {"history": None}}}).encode(),
    ],
)
def test_load_corrupt_file_is_set_aside(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    assert StateStore(tmp_path).load() == State()
    assert_set_aside(tmp_path, content)


def test_save_after_corrupt_load(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    store = StateStore(tmp_path)
    store.load()
    store.save(sample().to_json())
    assert StateStore(tmp_path).load() == sample()
    assert len(list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))) == 1


@pytest.mark.parametrize(
    "content",
    [
        b"[1, 2]",
        b"null",
        json.dumps({"schema": SCHEMA, "models": []}).encode(),
        json.dumps({"schema": SCHEMA, "models": {"demo": 1}}).encode(),
        json.dumps({"schema": SCHEMA, "models": {"demo": {"history": "v1"}}}).encode(),
        json.dumps({"schema": SCHEMA, "models": {"demo": {"active": 3}}}).encode(),
    ],
)
def test_load_wrong_shape_is_set_aside(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    assert StateStore(tmp_path).load() == State()
    assert_set_aside(tmp_path, content)


def test_load_removes_a_temporary_file_a_crash_left(tmp_path):
    store = StateStore(tmp_path)
    store.save(sample().to_json())
    left = tmp_path / f".{STATE_FILE}.4242.tmp"
    left.write_bytes(b'{"half": ')
    assert store.load() == sample()
    assert not left.exists()


def test_return_to_trims_the_history_at_the_version():
    saved = ModelState("v4", ["v1", "v2", "v3"], None, Canary("v5", 0.1, 1.0))
    saved.return_to("v2", "v9")
    assert saved == ModelState("v2", ["v1"], "v9", None)


def test_save_even_if_full_rewrites_a_smaller_state_in_place(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        store = StateStore(disk)
        state = State()
        state.model("demo").activate("v1.0", None)
        state.model("demo").canary = Canary("v2.0", 0.1, 1.0)
        store.save(state.to_json())
        fill(disk)
        state.model("other").activate("v1", None)  # grows: no room, refused
        with pytest.raises(OSError, match="No space left on device") as refused:
            store.save_even_if_full(state.to_json())
        assert refused.value.errno == errno.ENOSPC
        del state.models["other"]
        state.model("demo").canary = None  # shrinks: written over the old bytes
        store.save_even_if_full(state.to_json())
        assert store.load() == state
