"""The worker's lanes in process: where channels go, what a report says, a lane that
fails. Real channels, hub and sockets; no model runs here (tests/test_direct.py and
tests/test_scheduling.py run them)."""

import dataclasses
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import msgpack
import pytest

from moltbotd.config import Scheduling
from moltbotd.wire.handoff import HANDOFF
from moltbotd.wire.protocol import FrameDecoder, encode_frame
from moltbotd.wire.signature import Signature
from moltbotd.worker.direct import Channels, Poller, RelayStream, Stream
from moltbotd.worker.hub import EXIT_LANE_FAILED, Hub
from moltbotd.worker.lanes import Lanes
from moltbotd.worker.main import take_handoffs
from moltctl.client import DirectChannel, ProtocolError
from tests.conftest import wait_until

SCHEDULING = dataclasses.asdict(Scheduling())
SETTINGS = {"model": "m", "version": "v1", "max_frame_bytes": 1 << 20,
            "scheduling": SCHEDULING}  # fmt: skip


DAEMON_ENDS: list[socket.socket] = []  # the relays' other ends, kept open


def lanes(count: int, send=lambda report: None, scheduling: dict = SCHEDULING) -> Lanes:
    """A worker's intake and lanes as main() builds them, with a relay no one writes to."""
    hub = Hub("model m v1", scheduling)
    ours, theirs = socket.socketpair()
    DAEMON_ENDS.append(theirs)
    channels = Channels(SETTINGS, Signature((), ()), hub)
    relay = RelayStream(ours, 1 << 20)
    return Lanes(channels, lambda batch, concat: [], count, relay, send, scheduling)


def channel() -> tuple[Stream, socket.socket]:
    ours, client = socket.socketpair()
    return Stream(ours, SETTINGS["max_frame_bytes"]), client


def test_channels_are_counted_at_once_and_every_report_says_how_many():
    sent: list[dict] = []
    group = lanes(2, sent.append)
    try:
        pairs = [channel() for _ in range(4)]
        for stream, _ in pairs:  # back to back: the intake has not taken any yet
            group.attach(stream)
        assert group.held == {-1: 4}
        # the intake reads them all, and moltbotd's relay beside them
        wait_until(lambda: len(group.intake.channels.streams) == 5, what="the channels read")
        wait_until(lambda: sent and sent[-1]["stats"]["channels"] == 4, what="a report of 4")
    finally:
        group.stop()
    assert not any(t.is_alive() for t in (group.intake.thread, *(x.thread for x in group.lanes)))


def test_two_lanes_run_two_requests_of_one_channel_at_once():
    """One queue: any free lane takes the next batch, whichever channel it came on. The
    runner waits for a second run to meet it: with one lane it would wait forever."""
    meet = threading.Barrier(2)

    def runner(batch, concat):
        meet.wait(timeout=10)
        return [(msgpack.packb({}), None)] * len(batch)

    hub = Hub("model m v1", SCHEDULING)
    ours, theirs = socket.socketpair()
    DAEMON_ENDS.append(theirs)
    channels = Channels(SETTINGS, Signature((), ()), hub)
    group = Lanes(channels, runner, 2, RelayStream(ours, 1 << 20), lambda r: None, SCHEDULING)
    try:
        stream, client = channel()
        group.attach(stream)
        client.settimeout(20)
        for req_id in (1, 2):
            params = {"model": "m", "inputs": {}}
            client.sendall(encode_frame({"id": req_id, "op": "infer", "params": params}))
        decoder, got = FrameDecoder(), []
        while len(got) < 3:  # the region offer, then both answers
            got += decoder.feed(client.recv(1 << 16))
        assert sorted(answer["id"] for answer in got[1:]) == [1, 2]
        assert all(answer["ok"] for answer in got[1:])
    finally:
        group.stop()


def test_orders_reach_the_intake_and_close_every_channel():
    group = lanes(2)
    try:
        clients = []
        for _ in range(2):
            stream, client = channel()
            group.attach(stream)
            clients.append(client)
        wait_until(lambda: len(group.intake.channels.streams) == 3, what="attached")
        group.tell(lambda channels: channels.close_all("switching", 30))
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
        from tests.test_lanes import lanes

        def broken(channels):
            raise RuntimeError("a bug in a lane")

        group = lanes(1)
        group.tell(broken)
        time.sleep(30)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=60, check=False)  # fmt: skip
    assert done.returncode == EXIT_LANE_FAILED
    assert "RuntimeError: a bug in a lane" in done.stderr


def test_every_handoff_waiting_is_taken_before_the_orders_of_the_same_wake():
    """Two channels handed over, then (in the same wake) an order to close channels:
    both must be attached first, or the second client would never be told."""
    group = lanes(1)
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
        assert group.held == {1000: 2}
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
    group = lanes(2, sent.append, bounds)
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
