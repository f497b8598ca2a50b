"""A real small file system for tests of a full disk: a tmpfs mounted for the test."""

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at path (root only: mount(2) needs CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                            str(path)], capture_output=True, text=True, check=False)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot make a real full disk here: mount -t tmpfs: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(disk: Path, leave: int = 0) -> Path:
    """Take the free space of disk's file system, all but `leave` bytes."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    with filler.open("wb") as file, contextlib.suppress(OSError):  # ENOSPC: full, as wanted
        file.write(b"\0" * (free_bytes(disk) - leave))
    assert free_bytes(disk) <= leave
    return filler
