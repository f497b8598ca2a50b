"""Uploads: chunks staged under MODELS_DIR/.incoming/TOKEN, in a tmp_path."""

import errno
import os
from pathlib import Path

import pytest

from moltbotd.config import UploadSettings
from moltbotd.versions import uploads as uploads_module
from moltbotd.versions.uploads import INCOMING, MAX_DEPTH, Uploads
from moltbotd.wire.protocol import ErrorCode, MoltError
from tests.disks import fill, free_bytes, small_disk


@pytest.fixture
def uploads(tmp_path: Path) -> Uploads:
    return Uploads(models(tmp_path), UploadSettings(abandoned_after=100.0, keep_free=0))


def models(parent: Path) -> Path:
    """The daemon's models_dir: it exists before any upload (moltbotd starts only then)."""
    (parent / "models").mkdir()
    return parent / "models"


def refused(call, *args) -> str:
    with pytest.raises(MoltError) as info:
        call(*args)
    assert info.value.code == ErrorCode.BAD_REQUEST
    return info.value.message


def tokens(uploads: Uploads) -> list[str]:
    return sorted(p.name for p in uploads.root.iterdir()) if uploads.root.exists() else []


def test_first_write_opens_an_upload(uploads, tmp_path):
    reply = uploads.write(None, "model.onnx", 0, b"abc")
    token = reply["upload"]
    assert reply == {"upload": token, "path": "model.onnx", "size": 3}
    assert isinstance(token, str) and token.isalnum() and len(token) == 16
    folder = tmp_path / "models" / INCOMING / token
    assert folder.is_dir()
    assert (folder / "model.onnx").read_bytes() == b"abc"
    assert uploads.folder(token) == folder
    other = uploads.write(None, "model.onnx", 0, b"x")["upload"]
    assert other != token and tokens(uploads) == sorted([token, other])


def test_sequential_chunks_append(uploads):
    token = uploads.write(None, "model.onnx", 0, b"0123")["upload"]
    assert uploads.write(token, "model.onnx", 4, b"4567")["size"] == 8
    assert uploads.write(token, "model.onnx", 8, b"")["size"] == 8
    assert uploads.write(token, "sub/dir/data.bin", 0, b"xy")["size"] == 2
    assert uploads.write(token, "sub/dir/data.bin", 2, b"z")["size"] == 3
    folder = uploads.folder(token)
    assert (folder / "model.onnx").read_bytes() == b"01234567"
    assert (folder / "sub" / "dir" / "data.bin").read_bytes() == b"xyz"


def test_empty_file_is_created(uploads):
    token = uploads.write(None, "model.onnx", 0, b"m")["upload"]
    assert uploads.write(token, "empty.txt", 0, b"")["size"] == 0
    assert (uploads.folder(token) / "empty.txt").read_bytes() == b""


@pytest.mark.parametrize("offset", [3, 5])  # a gap, an overlap
def test_chunk_out_of_order_is_refused(uploads, offset):
    token = uploads.write(None, "model.onnx", 0, b"0123")["upload"]
    message = refused(uploads.write, token, "model.onnx", offset, b"x")
    assert message == (
        f"upload {token}: model.onnx has 4 bytes, a chunk at offset {offset} would leave a gap"
        " or overwrite: send chunks in order"
    )
    assert (uploads.folder(token) / "model.onnx").read_bytes() == b"0123"  # untouched


def test_first_chunk_not_at_zero_is_refused_and_leaves_nothing(uploads):
    message = refused(uploads.write, None, "model.onnx", 10, b"x")
    assert "model.onnx has 0 bytes, a chunk at offset 10" in message
    assert tokens(uploads) == []


@pytest.mark.parametrize(
    "path",
    ["../x", "/abs", "a//b", ".", "a/./b", "a/../b", "", "a/", "x\0y",
     "/".join(["d"] * MAX_DEPTH + ["f"])],
)  # fmt: skip
def test_bad_paths_are_refused(uploads, path):
    message = refused(uploads.write, None, path, 0, b"x")
    assert f"upload path {path!r} must be relative" in message
    assert tokens(uploads) == []  # no upload opened for a refused first chunk
    token = uploads.write(None, "model.onnx", 0, b"m")["upload"]
    refused(uploads.write, token, path, 0, b"x")
    assert sorted(p.name for p in uploads.folder(token).iterdir()) == ["model.onnx"]
    assert tokens(uploads) == [token]  # nothing written beside it, as ../x would


def test_deepest_allowed_path(uploads):
    path = "/".join(["d"] * (MAX_DEPTH - 1) + ["f"])
    token = uploads.write(None, path, 0, b"deep")["upload"]
    assert (uploads.folder(token) / path).read_bytes() == b"deep"


def test_manifest_is_refused(uploads):
    message = refused(uploads.write, None, "manifest.json", 0, b"{}")
    assert "manifest.json is written by moltbotd" in message
    assert tokens(uploads) == []
    token = uploads.write(None, "sub/manifest.json", 0, b"{}")["upload"]  # only the top one
    assert (uploads.folder(token) / "sub" / "manifest.json").exists()


def test_file_and_folder_of_one_name_are_refused(uploads):
    token = uploads.write(None, "a", 0, b"file")["upload"]
    assert "cannot write a/b" in refused(uploads.write, token, "a/b", 0, b"x")
    uploads.write(token, "c/d", 0, b"x")
    assert "cannot write c" in refused(uploads.write, token, "c", 0, b"x")


@pytest.mark.parametrize("token", ["0123456789abcdef", "../models", "", "a/b", ".."])
def test_unknown_token_is_refused(uploads, token):
    uploads.write(None, "model.onnx", 0, b"x")  # another upload exists
    message = refused(uploads.write, token, "model.onnx", 0, b"x")
    assert f"no upload {token!r} in progress" in message and "send the files again" in message
    assert f"no upload {token!r} in progress" in refused(uploads.folder, token)


def test_sweep_removes_only_old_uploads(uploads):
    old = uploads.write(None, "model.onnx", 0, b"old")["upload"]
    new = uploads.write(None, "model.onnx", 0, b"new")["upload"]
    now = 1_000_000.0
    os.utime(uploads.root / old, (now - 101, now - 101))
    os.utime(uploads.root / new, (now - 99, now - 99))
    assert uploads.sweep(now=now) == [old]
    assert tokens(uploads) == [new]
    refused(uploads.folder, old)
    assert uploads.sweep(now=now) == []
    assert uploads.sweep(now=float("inf")) == [new]  # the daemon's start: everything
    assert tokens(uploads) == []


def test_sweep_without_uploads(tmp_path):
    assert Uploads(tmp_path / "nothing").sweep() == []


def test_a_chunk_keeps_an_upload_alive(uploads):
    """Appending to a file already there counts as activity, not only new files."""
    token = uploads.write(None, "model.onnx", 0, b"a")["upload"]
    os.utime(uploads.root / token, (0, 0))  # as if written long ago
    uploads.write(token, "model.onnx", 1, b"b")
    assert uploads.sweep() == []
    os.utime(uploads.root / token, (0, 0))
    uploads.write(token, "deep/er/file", 0, b"c")  # a new file in a new subfolder
    assert uploads.sweep() == []
    assert tokens(uploads) == [token]


def test_discard(uploads):
    keep = uploads.write(None, "model.onnx", 0, b"x")["upload"]
    token = uploads.write(None, "model.onnx", 0, b"x")["upload"]
    uploads.write(token, "a/b/c", 0, b"x")
    uploads.discard(token)
    assert tokens(uploads) == [keep]
    refused(uploads.write, token, "model.onnx", 1, b"y")
    uploads.discard(token)  # twice: no error
    uploads.discard("unknown")


def test_make_durable_syncs_nested_folders(uploads, monkeypatch):
    token = uploads.write(None, "model.onnx", 0, b"m")["upload"]
    uploads.write(token, "a/b/deep.bin", 0, b"d")
    uploads.write(token, "a/top.txt", 0, b"t")
    files, folders = [], []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        files.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(uploads_module.os, "fsync", fsync)
    monkeypatch.setattr(uploads_module, "fsync_dir", lambda path: folders.append(Path(path)))
    uploads.make_durable(token)
    folder = uploads.folder(token)
    assert sorted(files) == sorted(
        str(folder / p) for p in ("model.onnx", "a/b/deep.bin", "a/top.txt")
    )
    assert sorted(folders) == sorted([folder, folder / "a", folder / "a" / "b"])
    assert "no upload 'gone'" in refused(uploads.make_durable, "gone")


# --- long names, bounds, free space (issue 14) ----------------------------------------------


def exhausted(call, *args, **kwargs) -> MoltError:
    with pytest.raises(MoltError) as info:
        call(*args, **kwargs)
    assert info.value.code == ErrorCode.RESOURCE_EXHAUSTED, info.value
    assert info.value.details["written"] is False
    return info.value


@pytest.mark.parametrize("path", ["n" * 256, "sub/" + "é" * 128, "d/" * 3 + "x" * 300])
def test_a_name_over_255_bytes_is_refused_and_leaves_nothing(uploads, path):
    """It was ENAMETOOLONG answered as INTERNAL, with an empty upload folder left."""
    message = refused(uploads.write, None, path, 0, b"x")
    assert "at most 255 bytes per name" in message
    assert tokens(uploads) == []
    token = uploads.write(None, "model.onnx", 0, b"m")["upload"]
    refused(uploads.write, token, path, 0, b"x")
    assert sorted(p.name for p in uploads.folder(token).iterdir()) == ["model.onnx"]
    uploads.write(token, "n" * 255, 0, b"x")  # the longest name a file system takes


@pytest.mark.parametrize(
    "token", ["a" * 256, "f" * 16 + "0", "ABCDEF0123456789", "\uff11" * 16]
)  # a fullwidth digit is alnum
def test_a_token_that_no_upload_has_is_refused(uploads, token):
    uploads.write(None, "model.onnx", 0, b"x")
    assert "in progress" in refused(uploads.write, token, "model.onnx", 0, b"x")
    assert "in progress" in refused(uploads.folder, token)


def test_a_file_over_max_file_bytes_removes_the_upload(tmp_path):
    uploads = Uploads(models(tmp_path), UploadSettings(max_file_bytes=10, keep_free=0))
    token = uploads.write(None, "model.onnx", 0, b"0123456789")["upload"]
    error = exhausted(uploads.write, token, "model.onnx", 10, b"x")
    assert error.message.startswith("model.onnx would reach 11B, over uploads.max_file_bytes")
    assert "raise it in moltbotd.yaml" in error.message
    assert "the upload was removed" in error.message
    assert error.details["limit"] == "uploads.max_file_bytes"
    assert tokens(uploads) == []
    exhausted(uploads.write, None, "big.bin", 0, b"x" * 11)  # a first chunk: nothing opened
    assert tokens(uploads) == []


def test_a_version_over_max_version_bytes_removes_the_upload(tmp_path):
    settings = UploadSettings(max_version_bytes=10, keep_free=0)
    uploads = Uploads(models(tmp_path), settings)
    token = uploads.write(None, "model.onnx", 0, b"012345")["upload"]
    error = exhausted(uploads.write, token, "weights.bin", 0, b"6789x")
    assert f"upload {token} would reach 11B, over uploads.max_version_bytes" in error.message
    assert tokens(uploads) == []
    error = exhausted(uploads.write, None, "model.onnx", 0, b"m", total=11)  # announced
    assert "the upload would reach 11B, over uploads.max_version_bytes" in error.message
    assert tokens(uploads) == []


def test_an_upload_may_not_send_more_than_it_announced(uploads):
    token = uploads.write(None, "model.onnx", 0, b"0123", total=5)["upload"]
    message = refused(uploads.write, token, "model.onnx", 4, b"45")
    assert f"upload {token} announced 5 bytes; this chunk of model.onnx brings it to 6" in message
    assert tokens(uploads) == []


@pytest.fixture
def disk(tmp_path: Path):
    with small_disk(tmp_path / "disk", "1m") as mounted:
        yield mounted


def test_free_space_is_checked_before_the_first_byte_and_during(disk):
    """Real free space of a 1 MiB tmpfs: an announced total that does not fit is refused
    before anything is written; without one, the chunk that would not fit."""
    keep = 256 * 1024
    uploads = Uploads(models(disk), UploadSettings(keep_free=keep))
    free = free_bytes(disk)
    error = exhausted(uploads.write, None, "model.onnx", 0, b"m", total=free - keep + 1)
    assert error.message.startswith(f"{disk / 'models'} has ")
    assert "would leave less than uploads.keep_free (256.0KiB); free space there" in error.message
    assert error.details["keep_free"] == keep and error.details["path"] == str(disk / "models")
    assert tokens(uploads) == []
    # an announced total is set aside: another upload cannot take that space meanwhile
    first = uploads.write(None, "model.onnx", 0, b"m", total=free - keep - 64 * 1024)["upload"]
    error = exhausted(uploads.write, None, "model.onnx", 0, b"x" * 128 * 1024)
    assert "announced by other uploads" in error.message
    assert tokens(uploads) == [first]
    uploads.discard(first)
    token = uploads.write(None, "model.onnx", 0, b"m")["upload"]
    error = exhausted(uploads.write, token, "model.onnx", 1, b"x" * (free - keep))
    assert tokens(uploads) == []  # its space is given back at once
    assert free_bytes(disk) == free


def test_a_chunk_on_a_full_disk_is_not_written_and_the_upload_goes(disk, monkeypatch):
    """The disk fills between the free-space check and the write (another writer): the
    real ENOSPC is answered RESOURCE_EXHAUSTED with the path and the errno, and nothing of
    the chunk or the upload stays."""
    uploads = Uploads(models(disk), UploadSettings(keep_free=0))
    token = uploads.write(None, "model.onnx", 0, b"0123")["upload"]
    filler = fill(disk, leave=8192)
    roomy = os.statvfs_result((4096, 4096, 10**6, 10**6, 10**6, 100, 100, 100, 0, 255))
    monkeypatch.setattr(uploads_module.os, "statvfs", lambda path: roomy)
    error = exhausted(uploads.write, token, "model.onnx", 4, b"x" * 65536)
    assert error.message == (
        f"upload {token}: cannot write model.onnx at offset 4: No space left on device"
        " (ENOSPC); the chunk was not written and the upload was removed"
    )
    assert error.details == {"errno": "ENOSPC", "path": "model.onnx", "written": False}
    assert tokens(uploads) == []
    filler.unlink()


def test_a_failed_chunk_is_cut_back_to_what_was_acknowledged(uploads, monkeypatch):
    """A write that fails halfway (here EIO after half the bytes) leaves the file as the
    last answer said it was, and the answer says the chunk was not written."""
    token = uploads.write(None, "model.onnx", 0, b"0123")["upload"]
    real_pwrite = os.pwrite

    def half_then_eio(fd: int, data: memoryview, offset: int) -> int:
        if len(data) > 2:
            return real_pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(uploads_module.os, "pwrite", half_then_eio)
    with pytest.raises(MoltError) as info:
        uploads.write(token, "model.onnx", 4, b"456789")
    assert info.value.code == ErrorCode.INTERNAL
    assert info.value.message.endswith(
        "Input/output error (EIO); the chunk was not written (send it again)"
    )
    assert (uploads.folder(token) / "model.onnx").read_bytes() == b"0123"
    monkeypatch.undo()
    assert uploads.write(token, "model.onnx", 4, b"456789")["size"] == 10
