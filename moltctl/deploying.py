"""`moltctl deploy`: send a model folder to moltbotd in chunks, then ask it to publish.

moltctl hashes every file as it reads it; the daemon hashes what it received and
refuses the deploy when the two differ, so a damaged or partial upload never becomes
a version. `moltctl quantize` sends its calibration and evaluation files the same way.
"""

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moltbotd.wire.files import MANIFEST_FILE, MODEL_FILE, sha256_file, version_key
from moltctl.client import Client, OnProgress

CHUNK_BYTES = 4 * 2**20
FRAME_OVERHEAD = 64 * 1024  # the request's envelope around a chunk
_FIRST_NUMBER = re.compile(r"\d+")
DATA_SUFFIXES = (".npy", ".npz")  # calibration and evaluation inputs


class DeployError(Exception):
    """The folder cannot be deployed as given; the message says why."""


def folder_files(folder: Path) -> dict[str, Path]:
    """Every regular file under folder by its relative path; links and the like refused."""
    if not folder.exists():
        raise DeployError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DeployError(f"{folder} is not a folder: give the folder holding {MODEL_FILE}")
    if not (folder / MODEL_FILE).is_file():
        raise DeployError(f"{folder} has no {MODEL_FILE}")
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise DeployError(f"{path} is not a regular file or folder: copy the real file in")
        if path.is_file() and relative != MANIFEST_FILE:
            files[relative] = path
    return files


def next_version(versions: list[str]) -> str:
    """The version after the newest one: its first number plus one, the others zeroed
    (v1.2 -> v2.0), so an unnamed deploy still sorts last."""
    if not versions:
        return "v1"
    newest = max(versions, key=version_key)
    match = _FIRST_NUMBER.search(newest)
    if match is None:
        raise DeployError(f"cannot guess the version after {newest!r}: give --version")
    rest = _FIRST_NUMBER.sub(lambda m: "0" * len(m.group()), newest[match.end() :])
    return f"{newest[: match.start()]}{int(match.group()) + 1}{rest}"


def chunks(path: Path, size: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        chunk = file.read(size)
        yield chunk  # an empty file is one empty chunk: it must still arrive
        while chunk := file.read(size):
            yield chunk


def data_files(folders: dict[str, Path | None]) -> dict[str, Path]:
    """The .npy and .npz files of each folder given, as KIND/NAME: calibration/a.npy."""
    files = {}
    for kind, folder in folders.items():
        if folder is None:
            continue
        found = sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not found:
            raise DeployError(f"{folder} has no .npy or .npz file for --{kind}")
        files.update({f"{kind}/{path.name}": path for path in found})
    return files


def send_files(client: Client, files: dict[str, Path], max_frame: int,
               on_file: Callable[[str, int], None]) -> tuple[str, dict[str, str]]:  # fmt: skip
    """Upload files in chunks; the upload's token and each file's sha256 as read."""
    size = max(1, min(CHUNK_BYTES, max_frame - FRAME_OVERHEAD))
    token: str | None = None
    hashes = {}
    sizes = {relative: path.stat().st_size for relative, path in files.items()}
    total = sum(sizes.values())  # announced: a folder too big is refused before a byte
    for relative, path in files.items():
        on_file(relative, sizes[relative])
        offset = 0
        for chunk in chunks(path, size):
            announced = total if token is None else None
            token = client.upload(relative, offset, chunk, token, announced)["upload"]
            offset += len(chunk)
        hashes[relative] = sha256_file(path)
    assert token is not None
    return token, hashes


def send_folder(client: Client, folder: Path, files: dict[str, Path], model: str, version: str,
                options: dict[str, Any], max_frame: int, on_file: Callable[[str, int], None],
                on_progress: OnProgress | None) -> Any:  # fmt: skip
    """Upload files (folder_files of folder), then deploy them; options: activate, force."""
    token, hashes = send_files(client, files, max_frame, on_file)
    activate, force = options.get("activate", False), options.get("force", False)
    source = str(folder.resolve())
    return client.deploy(token, model, version, hashes, activate, force, source, on_progress)
