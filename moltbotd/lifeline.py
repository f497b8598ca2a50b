"""A child of the daemon (a worker, a conversion job) dies with it.

The kernel sends the child SIGKILL when its parent thread ends (PR_SET_PDEATHSIG), even
when the daemon itself was killed with SIGKILL: no orphan keeps a model loaded, or a
cgroup busy, after the daemon is gone.
"""

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the daemon dies, even by SIGKILL: no orphans."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
