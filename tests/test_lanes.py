"""The worker's lanes in process: where channels go, what a report says, a lane that
fails. Real Directs and sockets; no model runs here (tests/test_direct.py runs them)."""

import dataclasses
import selectors
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moltbotd.config import Scheduling
from moltbotd.wire.handoff import HANDOFF
from moltbotd.wire.protocol import FrameDecoder
from moltbotd.wire.signature import Signature
from moltbotd.worker.direct import Direct, Poller, Stream
from moltbotd.worker.lanes import EXIT_LANE_FAILED, Lanes
from moltbotd.worker.main import take_handoffs
from moltctl.client import DirectChannel, ProtocolError
from tests.conftest import wait_until

SCHEDULING = dataclasses.asdict(Scheduling())
SETTINGS = {"model": "m", "version": "v1", "max_frame_bytes": 1 << 20,
            "scheduling": SCHEDULING}  # fmt: skip


def direct() -> Direct:
    return Direct(SETTINGS, Signature((), ()), lambda batch, concat: [])


def channel() -> tuple[Stream, socket.socket]:
    ours, client = socket.socketpair()
    return Stream(ours, SETTINGS["max_frame_bytes"]), client


def test_new_channels_spread_over_the_lanes_even_before_they_take_them():
    sent: list[dict] = []
    group = Lanes([direct(), direct()], sent.append, SCHEDULING)
    try:
        pairs = [channel() for _ in range(4)]
        for stream, _ in pairs:  # back to back: the lanes have not taken any yet
            group.attach(stream)
        assert [lane.given for lane in group.lanes] == [2, 2]
        wait_until(lambda: [len(lane.direct.streams) for lane in group.lanes] == [2, 2],
                   what="each lane serving two channels")  # fmt: skip
        # every report counts the whole worker's channels, whichever lane sends it
        wait_until(lambda: sent, what="a report")
        assert all(report["stats"]["channels"] == 4 for report in sent[-2:])
    finally:
        group.stop()
    assert not any(lane.thread.is_alive() for lane in group.lanes)


def test_orders_reach_every_lane_and_close_its_channels():
    group = Lanes([direct(), direct()], lambda report: None, SCHEDULING)
    try:
        clients = []
        for _ in range(2):
            stream, client = channel()
            group.attach(stream)
            clients.append(client)
        wait_until(lambda: all(lane.direct.streams for lane in group.lanes), what="attached")
        group.tell_all(lambda d: d.close_all("switching", 30))
        for client in clients:
            decoder = FrameDecoder()
            client.settimeout(10)
            got: list = []
            while len(got) < 2:  # the region offer, then the closing notice
                got += decoder.feed(client.recv(1 << 16))
            assert got[1] == {"closing": "switching"}
    finally:
        group.stop()


def test_a_lane_that_fails_ends_the_worker_with_its_traceback():
    """A dead lane would leave its channels unanswered in a worker that looks healthy:
    the process exits instead, so its clients see EOF and the supervisor restarts it."""
    script = textwrap.dedent("""
        import threading, time
        from tests.test_lanes import SCHEDULING, direct
        from moltbotd.worker.lanes import Lanes

        def broken(d):
            raise RuntimeError("a bug in a lane")

        group = Lanes([direct()], lambda report: None, SCHEDULING)
        group.tell_all(broken)
        time.sleep(30)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=60, check=False)  # fmt: skip
    assert done.returncode == EXIT_LANE_FAILED
    assert "RuntimeError: a bug in a lane" in done.stderr


def test_every_handoff_waiting_is_taken_before_the_orders_of_the_same_wake():
    """Two channels handed over, then (in the same wake) an order to close channels:
    both must be attached first, or the second client would never be told."""
    group = Lanes([direct()], lambda report: None, SCHEDULING)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)  # as serve() sets it
    poller = Poller()
    poller.selector.register(ours, selectors.EVENT_READ, ours)
    try:
        clients = []
        for _ in range(2):
            stream_end, client = socket.socketpair()
            socket.send_fds(theirs, [HANDOFF.pack(1000)], [stream_end.fileno()])
            stream_end.close()
            clients.append(client)
        take_handoffs(poller, ours, group, SETTINGS["max_frame_bytes"])
        assert group.lanes[0].given == 2
        theirs.close()  # the daemon stopping: EOF unregisters the handoff
        take_handoffs(poller, ours, group, SETTINGS["max_frame_bytes"])
        assert ours not in [key.fileobj for key in poller.selector.get_map().values()]
    finally:
        group.stop()


def hand_over(theirs: socket.socket, uid: int) -> socket.socket:
    """A channel handed over as the daemon does it; the client's end."""
    worker_end, client = socket.socketpair()
    socket.send_fds(theirs, [HANDOFF.pack(uid)], [worker_end.fileno()])
    worker_end.close()
    return client


def test_the_worker_refuses_channels_past_its_bounds_and_counts_them_by_uid():
    """The backstop of the daemon's bounds: past max_channels_per_uid, or max_channels,
    a channel's first frame says why and the client library gives up on it (and uses the
    socket); a channel closed frees its place, and every report counts them by uid."""
    bounds = {**SCHEDULING, "max_channels": 3, "max_channels_per_uid": 2}
    sent: list[dict] = []
    group = Lanes([direct(), direct()], sent.append, bounds)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    poller = Poller()
    try:
        clients = [hand_over(theirs, uid) for uid in (1000, 1000, 1000, 1001, 1002)]
        take_handoffs(poller, ours, group, SETTINGS["max_frame_bytes"])
        info = {"model": "m", "version": "v1"}
        for refused, reason in ((clients[2], "uid 1000 holds 2 direct channels to the worker,"
                                 " the limit per user (max_channels_per_uid)"),
                                (clients[4], "the worker serves 3 direct channels, its limit"
                                 " (max_channels)")):  # fmt: skip
            with pytest.raises(ProtocolError) as err:
                DirectChannel(refused, info, 0, 10)
            assert f"refused the channel: direct channel refused: {reason}" in str(err.value)
        assert group.held == {1000: 2, 1001: 1}
        wait_until(lambda: sent and sent[-1]["stats"]["by_uid"] == {1000: 2, 1001: 1},
                   what="the channels reported by uid")  # fmt: skip
        clients[0].close()  # its lane closes the channel: uid 1000 may open one again
        wait_until(lambda: group.held == {1000: 1, 1001: 1}, what="the closed channel released")
        again = hand_over(theirs, 1000)
        take_handoffs(poller, ours, group, SETTINGS["max_frame_bytes"])
        assert DirectChannel(again, info, 0, 10).region is not None
    finally:
        group.stop()
