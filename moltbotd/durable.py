"""Writes of the daemon's own files that must survive a crash: atomic replacement, the
directory fsync that makes a rename durable, and a failed write phrased for clients."""

import contextlib
import errno
import os
from pathlib import Path

from moltbotd.wire.protocol import ErrorCode, MoltError

# A full disk or quota: the operator frees space and the same request then succeeds.
SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_error(exc: OSError, doing: str) -> MoltError:
    """A write of the daemon's own files that failed, phrased for the client: what it was
    doing (naming the path) and the errno. No space is RESOURCE_EXHAUSTED; anything else
    (EACCES, EROFS, EIO) is the host's problem, INTERNAL, but still named."""
    name = errno.errorcode.get(exc.errno or 0, "unknown errno")
    code = ErrorCode.RESOURCE_EXHAUSTED if exc.errno in SPACE_ERRORS else ErrorCode.INTERNAL
    return MoltError(code, f"{doing}: {exc.strerror or exc} ({name})", {"errno": name})


def atomic_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace path with data so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
