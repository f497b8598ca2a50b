"""Real file systems for tests of disk faults: a small tmpfs to fill, an ext4 to stall."""

import contextlib
import os
import subprocess
import threading
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


class StallingDisk:
    """A real ext4 file system on a loop device whose writes can be stalled: while frozen
    (fsfreeze), every write and fsync on it waits, as on a saturated or failing disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def frozen(self, at_most: float = 120.0) -> Iterator[Path]:
        """Frozen for the block, and thawed after `at_most` seconds whatever happens to
        the test (a frozen file system would leave its writers unkillable)."""
        subprocess.run(["fsfreeze", "--freeze", str(self.path)], check=True)
        thaw = threading.Timer(at_most, self.thaw)
        thaw.start()
        try:
            yield self.path
        finally:
            thaw.cancel()
            self.thaw()

    def thaw(self) -> None:
        subprocess.run(["fsfreeze", "--unfreeze", str(self.path)], check=False,
                       capture_output=True)  # fmt: skip


@contextlib.contextmanager
def stalling_disk(path: Path, size: str = "32M") -> Iterator[StallingDisk]:
    """An ext4 image of `size` mounted at path (root only: mount(2), a loop device)."""
    path.mkdir(parents=True, exist_ok=True)
    image = path.with_name(path.name + ".img")
    subprocess.run(["truncate", "--size", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    mount = subprocess.run(["mount", "-o", "loop", str(image), str(path)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a disk to stall here: mount -o loop: {mount.stderr.strip()}")
    disk = StallingDisk(path)
    try:
        yield disk
    finally:
        disk.thaw()
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # not over a failure
        image.unlink()
