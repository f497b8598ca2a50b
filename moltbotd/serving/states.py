"""Worker process states and the transitions allowed between them.

Everything that affects the state machine lives in this file (h11's _state.py); the
arcs follow supervisor's: READY only after the model loaded and the handshake came,
a worker that keeps dying goes BACKOFF -> FATAL, and a model that cannot load goes
FATAL at once instead of looping.
"""

import enum


class WorkerState(enum.StrEnum):
    STOPPED = "stopped"  # no process; initial and final
    STARTING = "starting"  # spawned, loading its model
    READY = "ready"  # serving requests
    DRAINING = "draining"  # no new requests; finishing the ones in flight
    STOPPING = "stopping"  # asked to exit; killed if it does not in time
    BACKOFF = "backoff"  # died unexpectedly; waiting before the next start
    FATAL = "fatal"  # its model cannot load, or it failed too often: not restarted


S = WorkerState
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.BACKOFF, S.FATAL, S.STOPPING}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.BACKOFF}),
    S.DRAINING: frozenset({S.STOPPING, S.STOPPED}),  # STOPPED: it died while draining
    S.STOPPING: frozenset({S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.FATAL, S.STOPPED}),
    S.FATAL: frozenset({S.STOPPED}),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: WorkerState, new: WorkerState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"worker cannot go from {old} to {new}")
