"""The worker's onnxruntime session: what the settings make of it."""

import dataclasses
import socket
import subprocess
import sys

import onnx
import pytest

from moltbotd.config import Scheduling, SessionSettings
from moltbotd.demo import save, scale_model
from moltbotd.wire.protocol import encode_frame
from moltbotd.worker.main import DaemonLink, load_session
from tests.models import mlp_model


@pytest.mark.parametrize("spinning", [False, True])
def test_session_settings_reach_onnxruntime(tmp_path, spinning):
    path = tmp_path / "model.onnx"
    onnx.save(mlp_model(), path)
    settings = SessionSettings(intra_op_threads=2, inter_op_threads=3, spinning=spinning)
    session, providers = load_session({"path": str(path), **dataclasses.asdict(settings)})
    options = session.get_session_options()
    assert providers == ["CPUExecutionProvider"]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
    expected = "1" if spinning else "0"
    for pool in ("intra_op", "inter_op"):
        assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == expected


def test_a_channel_closed_with_reports_unread_is_an_eof_not_a_crash():
    """The daemon stopping a worker closes its end while the lanes' reports may still
    wait unread there: the kernel then resets the channel, and the worker must stop as at
    EOF (it died with a ConnectionResetError traceback in the journal)."""
    ours, daemons = socket.socketpair()
    channel = DaemonLink(ours)
    channel.send({"stats": {"requests": 1}})
    daemons.close()  # unread: the worker's next read is reset
    assert channel.receive_ready() is None
    assert channel.receive_all() is None


def test_a_worker_whose_daemon_closes_its_channel_while_loading_exits_quietly(tmp_path):
    """A stop during the load (a switch or scale-down under chaos) closes the channel before
    the worker says `warming`: that is the daemon's EOF, not a crash with a traceback."""
    save(scale_model(2.0), tmp_path, "demo", "v1")
    ours, theirs = socket.socketpair()
    handoff, their_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    model = tmp_path / "demo" / "v1" / "model.onnx"
    spec = {"path": str(model), **dataclasses.asdict(SessionSettings()),
            "intra_op_threads": 1, "samples": [], "batched": False, "state": [],
            "direct": {"model": "demo", "version": "v1", "max_frame_bytes": 1 << 20,
                       "scheduling": dataclasses.asdict(Scheduling())}}  # fmt: skip
    relay, their_relay = socket.socketpair()
    ends = (theirs, their_handoff, their_relay)
    with theirs, their_handoff, their_relay:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moltbotd.worker", *(str(end.fileno()) for end in ends)],
            pass_fds=[end.fileno() for end in ends], stderr=subprocess.PIPE,
        )  # fmt: skip
    ours.sendall(encode_frame(spec))
    ours.close()  # before the worker can answer: its `warming` finds the channel closed
    handoff.close()
    relay.close()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
