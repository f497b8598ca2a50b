"""Model folders on their way into the repository: `moltctl deploy` sends them in chunks.

The daemon receives the bytes itself rather than reading the client's path: under
systemd it runs sandboxed (ProtectHome, PrivateTmp), so a folder in someone's home is
not visible to it, and the socket is already the permission boundary. Uploads are
staged under MODELS_DIR/.incoming/TOKEN (the same file system as the repository, and
skipped by its scan), made durable, then published with one rename.

The models_dir file system also holds what the daemon cannot do without (published
versions, often the state file), so an upload is bounded (`uploads:` settings) and
must leave `keep_free` bytes free: checked against the total a client announces before
the first byte, and again before every chunk. A chunk is written whole or not at all,
and an upload refused for lack of space is removed at once, giving its space back.

Chunks are written and fsynced in one thread of their own (`receive`), and folders
removed in threads, so a deploy never stalls the event loop that serves requests; a
lock keeps the records of open uploads consistent between those threads.
"""

import asyncio
import errno
import functools
import os
import re
import secrets
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from moltbotd.config import UploadSettings
from moltbotd.durable import SPACE_ERRORS, fsync_dir, storage_error
from moltbotd.wire.files import MANIFEST_FILE
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltbotd.wire.units import format_size

INCOMING = ".incoming"
MAX_DEPTH = 8
NAME_MAX = 255  # bytes in one file name (Linux file systems); more is ENAMETOOLONG
_TOKEN = re.compile(r"[0-9a-f]{16}")  # secrets.token_hex(8): nothing else names an upload
# A path the client sent that cannot be a file here: its own mistake, not the disk's.
_CLIENT_ERRORS = frozenset({errno.EEXIST, errno.ENOTDIR, errno.EISDIR})


@dataclass
class _Received:
    """One upload in progress: the bytes it received, the total it announced."""

    received: int = 0
    announced: int | None = None

    def still_due(self) -> int:
        return max(0, (self.announced or 0) - self.received)


class Uploads:
    def __init__(self, models_dir: Path, settings: UploadSettings | None = None) -> None:
        self.root = models_dir / INCOMING
        self.settings = settings or UploadSettings()
        self._open: dict[str, _Received] = {}
        self._lock = threading.RLock()  # write calls discard when a first chunk fails
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="uploads")

    async def receive(self, token: str | None, path: str, offset: int, data: bytes,
                      total: int | None = None) -> dict[str, object]:  # fmt: skip
        """`write`, in the uploads thread: chunks are written one at a time, off the loop."""
        call = functools.partial(self.write, token, path, offset, data, total)
        return await asyncio.get_running_loop().run_in_executor(self._writer, call)

    def write(self, token: str | None, path: str, offset: int, data: bytes,
              total: int | None = None) -> dict[str, object]:  # fmt: skip
        """Append one chunk; the first call (no token) opens a new upload, announcing the
        total bytes of all its files when the client knows it."""
        with self._lock:
            return self._write(token, path, offset, data, total)

    def _write(self, token: str | None, path: str, offset: int, data: bytes,
               total: int | None) -> dict[str, object]:  # fmt: skip
        relative = _relative(path)  # before a new upload's folder exists: none is left over
        if token is not None:
            return self._append(token, relative, offset, data)
        if offset != 0:
            raise _out_of_order("(new)", path, 0, offset)
        token = self._open_upload(total)
        try:
            return self._append(token, relative, offset, data)
        except MoltError:
            self.discard(token)  # a first chunk that fails leaves no upload behind
            raise

    def stage(self) -> str:
        """A new, empty upload the daemon fills itself (a conversion's result): staged,
        bounded in time and published like one a client sent."""
        with self._lock:
            return self._open_upload(None)

    def folder(self, token: str) -> Path:
        folder = self.root / token
        if not (_TOKEN.fullmatch(token) and token in self._open and folder.is_dir()):
            raise MoltError(
                ErrorCode.BAD_REQUEST,
                f"no upload {token[:40]!r} in progress (uploads untouched for"
                f" {self.settings.abandoned_after:g}s are removed): send the files again",
            )
        return folder

    def make_durable(self, token: str) -> None:
        """fsync every file and folder, so the rename that publishes them publishes data."""
        folder = self.folder(token)
        for directory, _, files in os.walk(folder):
            for name in files:
                fd = os.open(Path(directory) / name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(directory))

    def discard(self, token: str) -> None:
        """Remove an upload (also one already published: then only its record goes)."""
        if _TOKEN.fullmatch(token):
            with self._lock:
                self._open.pop(token, None)
                shutil.rmtree(self.root / token, ignore_errors=True)

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove abandoned uploads; returns their tokens."""
        if not self.root.is_dir():
            return []
        now = time.time() if now is None else now
        removed = []
        for folder in self.root.iterdir():
            try:
                mtime = folder.stat().st_mtime
            except FileNotFoundError:  # published or discarded meanwhile (in a thread)
                continue
            if now - mtime > self.settings.abandoned_after:
                with self._lock:
                    self._open.pop(folder.name, None)
                    shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    # --- one chunk -----------------------------------------------------------------------

    def _open_upload(self, total: int | None) -> str:
        if total is not None:
            if total < 0:
                raise MoltError(ErrorCode.BAD_REQUEST, f"upload total {total}: must be >= 0")
            self._check_bound("the upload", total, "max_version_bytes")
            self._check_space(None, total, f"the upload's {format_size(total)}")
        token = secrets.token_hex(8)
        try:
            (self.root / token).mkdir(parents=True, mode=0o750)
        except OSError as exc:
            raise storage_error(exc, f"cannot open an upload in {self.root}") from None
        self._open[token] = _Received(announced=total)
        return token

    def _append(self, token: str, relative: PurePosixPath, offset: int,
                data: bytes) -> dict[str, object]:  # fmt: skip
        folder = self.folder(token)
        path, file = relative.as_posix(), folder / relative
        size = file.stat().st_size if file.is_file() else 0
        if offset != size:
            raise _out_of_order(token, path, size, offset)
        upload = self._open[token]
        try:
            self._check_chunk(token, upload, path, size, len(data))
            file.parent.mkdir(parents=True, exist_ok=True)
            _write_whole(file, size, data)
        except OSError as exc:
            raise self._write_failed(token, path, offset, exc) from None
        except MoltError:  # over a bound or the free space: it cannot complete, so it goes
            self.discard(token)
            raise
        upload.received += len(data)
        os.utime(folder)  # appending to a file leaves the folder's mtime: sweep reads it
        return {"upload": token, "path": path, "size": size + len(data)}

    def _check_chunk(self, token: str, upload: _Received, path: str, size: int,
                     length: int) -> None:  # fmt: skip
        self._check_bound(path, size + length, "max_file_bytes")
        self._check_bound(f"upload {token}", upload.received + length, "max_version_bytes")
        if upload.announced is not None and upload.received + length > upload.announced:
            raise MoltError(
                ErrorCode.BAD_REQUEST,
                f"upload {token} announced {upload.announced} bytes; this chunk of {path}"
                f" brings it to {upload.received + length}; the upload was removed",
            )
        self._check_space(token, length, f"a chunk of {format_size(length)}")

    def _check_bound(self, what: str, size: int, setting: str) -> None:
        limit = getattr(self.settings, setting)
        if size > limit:
            raise _exhausted(
                f"{what} would reach {format_size(size)}, over uploads.{setting}"
                f" ({format_size(limit)}); raise it in moltbotd.yaml if this is right",
                {"limit": f"uploads.{setting}", "bytes": limit},
            )

    def _check_space(self, token: str | None, size: int, what: str) -> None:
        """Free space after `size` more bytes, less what other uploads announced and have
        not sent yet, must stay above keep_free."""
        models_dir = self.root.parent
        try:
            stat = os.statvfs(models_dir)
        except OSError as exc:
            raise storage_error(exc, f"cannot read the free space of {models_dir}") from None
        free = stat.f_bavail * stat.f_frsize
        due = sum(u.still_due() for t, u in self._open.items() if t != token)
        keep = self.settings.keep_free
        if free - size < keep + due:
            others = f" ({format_size(due)} of it announced by other uploads)" if due else ""
            raise _exhausted(
                f"{models_dir} has {format_size(free)} free{others}: {what} would leave less"
                f" than uploads.keep_free ({format_size(keep)}); free space there",
                {"path": str(models_dir), "free": free, "keep_free": keep},
            )

    def _write_failed(self, token: str, path: str, offset: int, exc: OSError) -> MoltError:
        if exc.errno in _CLIENT_ERRORS:  # a/b after a file a, or a after a folder a
            return MoltError(
                ErrorCode.BAD_REQUEST,
                f"upload {token}: cannot write {path}: {exc.strerror or exc}",
            )
        error = storage_error(exc, f"upload {token}: cannot write {path} at offset {offset}")
        error.details.update({"path": path, "written": False})
        if exc.errno in SPACE_ERRORS:
            self.discard(token)
            error.message += "; the chunk was not written and the upload was removed"
        else:
            error.message += "; the chunk was not written (send it again)"
        return error


def _write_whole(file: Path, size: int, data: bytes) -> None:
    """Write data at `size` (the bytes acknowledged so far) and fsync; on failure cut the
    file back to `size`, so a chunk is in the file whole or not at all."""
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            view, at = memoryview(data), size
            while view:  # a write may be short: a disk filling up takes part of it
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _exhausted(why: str, details: dict[str, object]) -> MoltError:
    return MoltError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"{why}; nothing of this chunk was written, and the upload was removed",
        {**details, "written": False},
    )


def _out_of_order(token: str, path: str, size: int, offset: int) -> MoltError:
    return MoltError(
        ErrorCode.BAD_REQUEST,
        f"upload {token}: {path} has {size} bytes, a chunk at offset {offset} would"
        " leave a gap or overwrite: send chunks in order",
    )


def _relative(path: str) -> PurePosixPath:
    """A path inside the upload: relative, no '..', not the manifest, not too deep or long."""
    pure = PurePosixPath(path)
    parts = path.split("/")
    bad = (
        not path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in parts)
        or "\0" in path
        or len(pure.parts) > MAX_DEPTH
    )
    if bad:
        raise MoltError(
            ErrorCode.BAD_REQUEST,
            f"upload path {path[:300]!r} must be relative, without '.' or '..' parts, at most"
            f" {MAX_DEPTH} deep",
        )
    long = [part for part in parts if len(part.encode()) > NAME_MAX]
    if long:
        raise MoltError(
            ErrorCode.BAD_REQUEST,
            f"upload path {path[:80]!r}...: a file or folder name is {len(long[0].encode())}"
            f" bytes long; at most {NAME_MAX} bytes per name",
        )
    if pure.as_posix() == MANIFEST_FILE:
        raise MoltError(
            ErrorCode.BAD_REQUEST,
            f"{MANIFEST_FILE} is written by moltbotd when it deploys a version; leave it out",
        )
    return pure
