"""glibc malloc settings for processes that move large tensors.

By default glibc serves allocations over 128 KiB with mmap and gives freed heap memory
back to the kernel, so every request with a 600 KB tensor (a 1x3x224x224 image) costs
fresh page faults: measured about 460 faults and 1 ms of the daemon's CPU per request.
Keeping freed memory for reuse costs at most the largest requests' working set.
"""

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations below this come from the reused heap; glibc refuses an mmap threshold
# above 32 MiB on 64-bit systems.
KEEP_BYTES = 32 * 2**20


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it; False where it cannot."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
