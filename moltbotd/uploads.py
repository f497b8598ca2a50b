"""Model folders on their way into the repository: `moltctl deploy` sends them in chunks.

The daemon receives the bytes itself rather than reading the client's path: under
systemd it runs sandboxed (ProtectHome, PrivateTmp), so a folder in someone's home is
not visible to it, and the socket is already the permission boundary. Uploads are
staged under MODELS_DIR/.incoming/TOKEN (the same file system as the repository, and
skipped by its scan), made durable, then published with one rename.
"""

import os
import secrets
import shutil
import time
from pathlib import Path, PurePosixPath

from moltbotd.manifest import MANIFEST_FILE
from moltbotd.protocol import ErrorCode, MoltError
from moltbotd.state import fsync_dir

INCOMING = ".incoming"
MAX_DEPTH = 8


class Uploads:
    def __init__(self, models_dir: Path, max_age: float = 3600.0) -> None:
        self.root = models_dir / INCOMING
        self.max_age = max_age  # an upload untouched this long was abandoned

    def write(self, token: str | None, path: str, offset: int, data: bytes) -> dict[str, object]:
        """Append one chunk; the first call (no token) opens a new upload."""
        relative = _relative(path)  # before a new upload's folder exists: none is left over
        if token is None:
            if offset != 0:
                raise _out_of_order("(new)", path, 0, offset)
            token = secrets.token_hex(8)
            (self.root / token).mkdir(parents=True, mode=0o750)
        folder = self.folder(token)
        file = folder / relative
        size = file.stat().st_size if file.is_file() else 0
        if offset != size:
            raise _out_of_order(token, path, size, offset)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with file.open("ab") as out:
                out.write(data)
        except OSError as exc:  # a/b after a file a, or a after a folder a
            raise MoltError(
                ErrorCode.BAD_REQUEST,
                f"upload {token}: cannot write {path}: {exc.strerror or exc}",
            ) from None
        os.utime(folder)  # appending to a file leaves the folder's mtime: sweep reads it
        return {"upload": token, "path": path, "size": size + len(data)}

    def folder(self, token: str) -> Path:
        folder = self.root / token
        if not token.isalnum() or not folder.is_dir():
            raise MoltError(
                ErrorCode.BAD_REQUEST,
                f"no upload {token!r} in progress (uploads older than {self.max_age:g}s are"
                " removed): send the files again",
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
            if now - mtime > self.max_age:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed


def _out_of_order(token: str, path: str, size: int, offset: int) -> MoltError:
    return MoltError(
        ErrorCode.BAD_REQUEST,
        f"upload {token}: {path} has {size} bytes, a chunk at offset {offset} would"
        " leave a gap or overwrite: send chunks in order",
    )


def _relative(path: str) -> PurePosixPath:
    """A path inside the upload: relative, no '..', not the manifest, not too deep."""
    pure = PurePosixPath(path)
    bad = (
        not path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
        or "\0" in path
        or len(pure.parts) > MAX_DEPTH
    )
    if bad:
        raise MoltError(
            ErrorCode.BAD_REQUEST,
            f"upload path {path!r} must be relative, without '.' or '..' parts, at most"
            f" {MAX_DEPTH} deep",
        )
    if pure.as_posix() == MANIFEST_FILE:
        raise MoltError(
            ErrorCode.BAD_REQUEST,
            f"{MANIFEST_FILE} is written by moltbotd when it deploys a version; leave it out",
        )
    return pure
