"""The worker state machine: the allowed arcs, and no state that cannot wind down."""

import itertools
from collections import deque

import pytest

from moltbotd.serving.states import TRANSITIONS, IllegalTransition, WorkerState, check_transition

S = WorkerState
ARCS = [(old, new) for old, targets in TRANSITIONS.items() for new in sorted(targets)]
NON_ARCS = [
    (old, new)
    for old, new in itertools.product(WorkerState, WorkerState)
    if new not in TRANSITIONS[old]
]


def reachable(start: WorkerState) -> set[WorkerState]:
    """States reached from start in one or more steps (start only if a cycle leads back)."""
    seen: set[WorkerState] = set()
    todo = deque([start])
    while todo:
        for nxt in TRANSITIONS[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_has_an_entry():
    assert set(TRANSITIONS) == set(WorkerState)
    assert all(targets <= set(WorkerState) for targets in TRANSITIONS.values())


def test_the_sets_of_arcs_and_non_arcs_cover_every_pair():
    assert len(ARCS) + len(NON_ARCS) == len(WorkerState) ** 2
    assert ARCS
    assert NON_ARCS


@pytest.mark.parametrize(("old", "new"), ARCS, ids=[f"{a}->{b}" for a, b in ARCS])
def test_every_arc_is_allowed(old, new):
    check_transition(old, new)  # raises on failure


@pytest.mark.parametrize(("old", "new"), NON_ARCS, ids=[f"{a}->{b}" for a, b in NON_ARCS])
def test_every_other_pair_is_illegal(old, new):
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert str(info.value) == f"worker cannot go from {old} to {new}"


@pytest.mark.parametrize("state", list(WorkerState))
def test_no_state_loops_onto_itself(state):
    with pytest.raises(IllegalTransition):
        check_transition(state, state)


@pytest.mark.parametrize("state", list(WorkerState))
def test_stopped_is_reachable_from_every_state(state):
    assert S.STOPPED in reachable(state)


def test_every_state_is_reachable_from_stopped():
    assert reachable(S.STOPPED) == set(WorkerState)


def test_stopped_only_leads_to_starting():
    assert TRANSITIONS[S.STOPPED] == frozenset({S.STARTING})
    for new in WorkerState:
        if new is not S.STARTING:
            with pytest.raises(IllegalTransition):
                check_transition(S.STOPPED, new)


def test_ready_only_after_starting():
    assert [old for old, targets in TRANSITIONS.items() if S.READY in targets] == [S.STARTING]


def test_fatal_is_left_only_for_stopped():
    assert TRANSITIONS[S.FATAL] == frozenset({S.STOPPED})
