"""What was deployed into a version folder, so that a later switch can prove it still is.

A deploy copies a model's files into MODELS_DIR/<model>/<version>/ and writes a
manifest.json next to model.onnx: every file's relative path, size and SHA-256, plus
who deployed it, from where and when. Before the daemon switches traffic to a version
it verifies the folder against its manifest, so the bytes it loads are the bytes that
were deployed: not a file truncated by a full disk, edited by hand, or half-copied.

Deploys copy real bytes: symbolic links and special files (FIFOs, devices, sockets) are
refused wherever a tree is hashed or copied, since a link's target can change after
the manifest was written.
"""

import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from moltbotd.durable import atomic_write, fsync_dir
from moltbotd.wire.files import BLOCK, MANIFEST_FILE, MODEL_FILE, hash_file, sha256_file

SCHEMA = 1
FILE_MODE = 0o644  # less the umask: whatever reads the repository can read a deploy
DIR_MODE = 0o755
_HEX = frozenset("0123456789abcdef")


class ManifestError(Exception):
    """A manifest that cannot be read, or a tree that cannot be hashed or copied."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # hex
    size: int  # bytes


@dataclass(frozen=True)
class Manifest:
    model: str
    version: str
    files: dict[str, FileEntry]  # relative posix path -> entry; never lists the manifest
    deployed_at: float  # unix time
    deployed_by: str  # free text, e.g. "uid 1000"
    source: str  # free text: the path the files were copied from

    @property
    def model_sha256(self) -> str | None:
        entry = self.files.get(MODEL_FILE)
        return entry.sha256 if entry else None

    def to_json(self) -> bytes:
        files = {rel: {"sha256": e.sha256, "size": e.size} for rel, e in sorted(self.files.items())}
        body = {"schema": SCHEMA, "model": self.model, "version": self.version,
                "deployed_at": self.deployed_at, "deployed_by": self.deployed_by,
                "source": self.source, "files": files}  # fmt: skip
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        """Parse a manifest; where (its path) starts every error message."""
        try:
            body = json.loads(data)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
            raise ManifestError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {_kind(body)}")
        schema = _field(body, "schema", int, "an integer", where)
        if schema != SCHEMA:
            raise ManifestError(f"{where}: schema {schema} is not the known schema {SCHEMA}")
        files = _field(body, "files", dict, "an object", where)
        return cls(
            model=_field(body, "model", str, "a string", where),
            version=_field(body, "version", str, "a string", where),
            files={rel: _file_entry(rel, raw, where) for rel, raw in files.items()},
            deployed_at=float(_field(body, "deployed_at", (int, float), "a number", where)),
            deployed_by=_field(body, "deployed_by", str, "a string", where),
            source=_field(body, "source", str, "a string", where),
        )


def _kind(value: Any) -> str:
    """A JSON value's type, for error messages."""
    kinds = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "an array", dict: "an object", type(None): "null"}  # fmt: skip
    return kinds.get(type(value), type(value).__name__)


def _field(
    body: dict[str, Any], key: str, types: type | tuple[type, ...], what: str, where: str,
    context: str = "",
) -> Any:  # fmt: skip
    if key not in body:
        raise ManifestError(f"{where}: missing key {key!r}{context}")
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ManifestError(f"{where}: key {key!r}{context} must be {what}, got {_kind(value)}")
    return value


def _file_entry(rel: str, raw: Any, where: str) -> FileEntry:
    context = f" in files[{rel!r}]"
    parts = rel.split("/")
    if rel == MANIFEST_FILE or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"{where}: files[{rel!r}] is not a relative path inside the folder")
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: files[{rel!r}] must be an object, got {_kind(raw)}")
    sha256 = _field(raw, "sha256", str, "a string", where, context)
    if len(sha256) != 64 or not _HEX.issuperset(sha256):
        raise ManifestError(f"{where}: key 'sha256'{context} is not 64 lowercase hex digits")
    size = _field(raw, "size", int, "an integer", where, context)
    if size < 0:
        raise ManifestError(f"{where}: key 'size'{context} is negative ({size})")
    return FileEntry(sha256, size)


def _walk(directory: Path) -> Iterator[Path]:
    """Every entry under directory, sorted, each folder before its content; links not followed."""
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        yield path
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path)


def _refuse_irregular(path: Path, mode: int) -> None:
    if stat.S_ISLNK(mode):
        raise ManifestError(f"{path} is a symbolic link: a deploy copies real files, not links")
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ManifestError(f"{path} is not a regular file or folder ({_file_type(mode)})")


def _file_type(mode: int) -> str:
    kinds = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character "
             "device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symbolic link",
             stat.S_IFDIR: "a folder", stat.S_IFREG: "a regular file"}  # fmt: skip
    return kinds.get(stat.S_IFMT(mode), f"file type {stat.S_IFMT(mode):o}")


def _regular_files(directory: Path) -> Iterator[Path]:
    """The regular files under directory; ManifestError on a link or special file."""
    for path in _walk(directory):
        mode = path.lstat().st_mode
        _refuse_irregular(path, mode)
        if stat.S_ISREG(mode):
            yield path


def build_manifest(
    directory: Path, model: str, version: str, deployed_by: str, source: str
) -> Manifest:
    """Hash every regular file under directory (but its manifest file) into a Manifest."""
    files = {}
    for path in _regular_files(directory):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST_FILE:
            files[rel] = FileEntry(*hash_file(path))
    return Manifest(model, version, dict(sorted(files.items())), time.time(), deployed_by, source)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write(directory / MANIFEST_FILE, manifest.to_json(), FILE_MODE)


def read_manifest(directory: Path) -> Manifest | None:
    """The folder's manifest; None when it has none, ManifestError when it is unreadable."""
    path = directory / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return Manifest.from_json(data, str(path))


def verify(directory: Path, manifest: Manifest) -> list[str]:
    """Why directory is not what manifest says, one line per file; [] when it is.

    Files the manifest does not list are not problems.
    """
    problems = []
    for rel, entry in sorted(manifest.files.items()):
        problem = _verify_file(directory / rel, rel, entry)
        if problem:
            problems.append(problem)
    return problems


def _verify_file(path: Path, rel: str, entry: FileEntry) -> str | None:
    try:
        mode, size = (found := path.lstat()).st_mode, found.st_size
    except (FileNotFoundError, NotADirectoryError):
        return f"{rel}: missing, manifest says {entry.size} bytes"
    if not stat.S_ISREG(mode):
        return f"{rel}: {_file_type(mode)}, manifest says a regular file of {entry.size} bytes"
    if size != entry.size:  # before hashing: cheap, and the usual damage (truncation)
        return f"{rel}: size {size} bytes, manifest says {entry.size}"
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return f"{rel}: cannot be read ({exc.strerror or exc})"
    if digest != entry.sha256:
        return f"{rel}: sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}..."
    return None


def tree_size(directory: Path) -> int:
    """Total bytes of the regular files under directory (links are not followed)."""
    total = 0
    for path in _walk(directory):
        found = path.lstat()
        if stat.S_ISREG(found.st_mode):
            total += found.st_size
    return total


def copy_tree(source: Path, target: Path) -> None:
    """Copy source's folders and regular files into target, a folder this creates.

    Refuses links and special files (ManifestError naming them). Every copied file and
    created folder is fsynced, so the tree is durable before a rename publishes it. On
    failure target is removed again (folders made above it for it are left).
    Permissions are not copied: files get 0644 and folders 0755, less the umask.
    """
    if os.path.lexists(target):
        raise ManifestError(f"{target} already exists: copy_tree needs a new folder")
    if not source.is_dir():
        raise ManifestError(f"{source} is not a folder")
    if target.resolve().is_relative_to(source.resolve()):
        raise ManifestError(f"{target} is inside {source}: cannot copy a folder into itself")
    created = _make_dirs(target)
    try:
        created += _copy_content(source, target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # ours alone: it did not exist
        raise
    for folder in reversed(created):  # each folder's entries, then the folder in its parent
        fsync_dir(folder)
    fsync_dir(target.parent)


def _copy_content(source: Path, target: Path) -> list[Path]:
    """Copy what is under source into target; the folders created."""
    created = []
    for path in _walk(source):
        mode = path.lstat().st_mode
        _refuse_irregular(path, mode)
        copy = target / path.relative_to(source)
        if stat.S_ISDIR(mode):
            copy.mkdir(DIR_MODE)
            created.append(copy)
        else:
            _copy_file(path, copy)
    return created


def _make_dirs(path: Path) -> list[Path]:
    """Create path and its missing parents; the folders created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for folder in missing:
        folder.mkdir(DIR_MODE)
        fsync_dir(folder.parent)
    return missing


def _copy_file(source: Path, target: Path) -> None:
    with _open_regular(source) as src:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(target, flags, FILE_MODE), "wb") as dst:
            while block := src.read(BLOCK):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())


def _open_regular(path: Path) -> BinaryIO:
    """Open path for reading only if it is still a regular file (no link, no FIFO wait)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # ELOOP: it became a link since it was listed
        raise ManifestError(f"{path} cannot be copied ({exc.strerror or exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ManifestError(f"{path} is not a regular file ({_file_type(mode)})")
    return os.fdopen(fd, "rb")
