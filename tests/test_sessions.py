"""Sessions of a stateful model, against the real daemon and a real GRU: the state stays
in moltbotd between requests, hot, spilled and restored, across a worker's SIGKILL and a
compatible switch, and answers bit for bit what the same conversation gives in process
with the state passed by hand."""

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from moltbotd.config import ConfigError, parse_model_yaml
from moltbotd.demo import save
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.client import AsyncClient, Client
from tests.conftest import run_moltctl, wait_until
from tests.models import gru_model
from tests.test_daemon import worker_pid

STATE_YAML = "state:\n  - {input: h, output: h_next}\n"
HIDDEN = 8


def add_gru(models_dir: Path, version: str = "v1", hidden: int = HIDDEN, extra: str = "") -> None:
    save(gru_model(hidden=hidden), models_dir, "gru", version)
    (models_dir / "gru" / version / "model.yaml").write_text(STATE_YAML + extra)


def turns(count: int, seed: int) -> list[np.ndarray]:
    """A conversation's inputs: `count` turns of one row and 3 steps each."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 4)).astype(np.float32) for _ in range(count)]


def in_process(models_dir: Path, xs: list[np.ndarray], version: str = "v1",
               hidden: int = HIDDEN) -> list[np.ndarray]:  # fmt: skip
    """The same conversation in process: the caller passes the state by hand."""
    session = ort.InferenceSession(str(models_dir / "gru" / version / "model.onnx"))
    h, ys = np.zeros((1, hidden), np.float32), []
    for x in xs:
        y, h = session.run(["y", "h_next"], {"x": x, "h": h})
        ys.append(y)
    return ys


def say(client: Client, session: str, x: np.ndarray) -> np.ndarray:
    result = client.infer("gru", {"x": x}, session=session)
    assert set(result) == {"y"}  # the state stays in moltbotd
    return result["y"]


def where(client: Client, session: str) -> str | None:
    rows = client.sessions("gru")["sessions"]
    return next((row["where"] for row in rows if row["session"] == session), None)


@pytest.fixture
def gru_dir(models_dir: Path) -> Path:
    add_gru(models_dir)
    return models_dir


CONFIG = """
models:
  gru:
    batching: {max_batch_size: 8}
    sessions: {spill_after: %s}
"""


def test_two_conversations_interleaved_match_the_state_passed_by_hand(gru_dir, daemon_factory):
    """Both paths (direct channel and the socket), interleaved, batched together."""
    daemon = daemon_factory(CONFIG % "30m")
    alice, bob = turns(6, seed=1), turns(6, seed=2)
    with Client(daemon.socket) as direct, Client(daemon.socket, direct=False) as relayed:
        got_a, got_b = [], []
        for number, (a, b) in enumerate(zip(alice, bob, strict=True)):
            got_a.append(say(direct if number % 2 else relayed, "alice", a))
            got_b.append(say(relayed if number % 2 else direct, "bob", b))
        listed = direct.sessions("gru")
    for got, want in ((got_a, in_process(gru_dir, alice)), (got_b, in_process(gru_dir, bob))):
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert listed["hot"] == 2 and listed["spilled"] == 0
    assert {row["session"]: row["turns"] for row in listed["sessions"]} == {"alice": 6, "bob": 6}
    assert listed["hot_bytes"] == 2 * HIDDEN * 4


def test_pipelined_turns_of_one_session_run_in_order(gru_dir, daemon_factory):
    """Sent at once on one connection, a session's requests still run one after the
    other: each gets the state the previous one left."""
    daemon = daemon_factory(CONFIG % "30m")
    xs = turns(20, seed=3)

    async def send_all() -> list[np.ndarray]:
        async with AsyncClient(daemon.socket) as client:
            answers = [client.infer("gru", {"x": x}, session="carol") for x in xs]
            return [result["y"] for result in await asyncio.gather(*answers)]

    got = asyncio.run(send_all())
    assert all(np.array_equal(g, w) for g, w in zip(got, in_process(gru_dir, xs), strict=True))


def test_spilled_sessions_restore_and_survive_a_worker_sigkill(gru_dir, daemon_factory):
    daemon = daemon_factory(CONFIG % "200ms")
    xs = turns(6, seed=4)
    want = in_process(gru_dir, xs)
    with Client(daemon.socket) as client:
        got = [say(client, "dave", x) for x in xs[:2]]
        wait_until(lambda: where(client, "dave") == "spilled", what="dave spilled")
        files = list((daemon.state_dir / "sessions" / "gru").glob("*/dave.state"))
        assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
        got.append(say(client, "dave", xs[2]))  # restored
        assert where(client, "dave") == "hot"
        wait_until(lambda: where(client, "dave") == "spilled", what="dave spilled again")
        pid = worker_pid(client, "gru")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (p := client.status("gru")["models"][0]["worker"]).get("pid") != pid
                   and p["state"] == "ready", timeout=30, what="a new worker")  # fmt: skip
        got += [say(client, "dave", x) for x in xs[3:]]
        assert client.sessions("gru")["counts"]["restored"] >= 1
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_a_hot_session_killed_with_its_worker_is_lost_until_reset(gru_dir, daemon_factory):
    daemon = daemon_factory(CONFIG % "30m")
    xs = turns(3, seed=5)
    with Client(daemon.socket, direct=False) as client:
        say(client, "erin", xs[0])
        pid = worker_pid(client, "gru")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (p := client.status("gru")["models"][0]["worker"]).get("pid") != pid
                   and p["state"] == "ready", timeout=30, what="a new worker")  # fmt: skip
        with pytest.raises(MoltError) as lost:
            say(client, "erin", xs[1])
        assert lost.value.code == ErrorCode.SESSION_LOST
        assert "session erin was lost" in lost.value.message
        assert where(client, "erin") == "lost"
        other = say(client, "frank", xs[0])  # other sessions go on
        result = run_moltctl("reset-session", "gru", "erin", socket=daemon.socket)
        assert result.returncode == 0, result.stderr
        assert "session erin of gru v1: reset" in result.stdout
        again = say(client, "erin", xs[0])  # from the first state again
    assert np.array_equal(again, other) and np.array_equal(again, in_process(gru_dir, xs)[0])


def test_end_forgets_and_reset_starts_over(gru_dir, daemon_factory):
    daemon = daemon_factory(CONFIG % "30m")
    xs = turns(2, seed=6)
    first = in_process(gru_dir, xs)[0]
    with Client(daemon.socket) as client:
        say(client, "gina", xs[0])
        assert client.reset_session("gru", "gina")["found"]
        assert np.array_equal(say(client, "gina", xs[0]), first)
        assert client.end_session("gru", "gina")["found"]
        assert where(client, "gina") is None
        assert not client.end_session("gru", "gina")["found"]
        assert np.array_equal(say(client, "gina", xs[0]), first)
    listed = run_moltctl("sessions", "gru", socket=daemon.socket)
    assert listed.returncode == 0, listed.stderr
    assert "gru v1: 1 hot" in listed.stdout and "gina" in listed.stdout


def test_status_and_metrics_show_the_sessions(gru_dir, daemon_factory):
    daemon = daemon_factory(CONFIG % "200ms")
    xs = turns(2, seed=11)
    with Client(daemon.socket) as client:
        for name in ("ivan", "jill"):
            say(client, name, xs[0])
        wait_until(lambda: where(client, "ivan") == "spilled", what="ivan spilled")
        say(client, "ivan", xs[1])  # restored
        counted = wait_until(lambda: (s := client.status("gru")["models"][0]["worker"]["sessions"])
                             and s["counts"]["restored"] == 1 and s, what="the report")  # fmt: skip
        metrics = client.metrics()
    assert counted["counts"]["spilled"] >= 2
    assert 'moltbot_session_restores_total{model="gru",version="v1"} 1.0' in metrics
    assert 'moltbot_sessions_hot{model="gru",version="v1"}' in metrics
    shown = run_moltctl("status", "gru", socket=daemon.socket)
    assert shown.returncode == 0 and "1 restores" in shown.stdout, shown.stdout + shown.stderr


def test_a_request_without_a_session_starts_from_the_first_state(gru_dir, daemon_factory):
    daemon = daemon_factory(CONFIG % "30m")
    [x] = turns(1, seed=7)
    with Client(daemon.socket) as client:
        once = client.infer("gru", {"x": x})["y"]
        twice = client.infer("gru", {"x": x})["y"]
        assert client.sessions("gru")["hot"] == 0
        with pytest.raises(MoltError) as bad:
            client.infer("gru", {"x": x}, session="../etc")
        assert bad.value.code == ErrorCode.BAD_REQUEST and "session must be" in bad.value.message
        with pytest.raises(MoltError) as state_sent:
            client.infer("gru", {"x": x, "h": np.zeros((1, HIDDEN), np.float32)}, session="s")
        assert state_sent.value.code == ErrorCode.INVALID_INPUT
        with pytest.raises(MoltError) as stateless:
            client.infer("demo", {"x": [[1.0, 2.0, 3.0, 4.0]]}, session="s")
        assert "keeps no sessions" in stateless.value.message
    assert np.array_equal(once, twice) and np.array_equal(once, in_process(gru_dir, [x])[0])


def test_model_yaml_state_is_checked(tmp_path):
    file = tmp_path / "model.yaml"
    file.write_text("state: [{input: h}]\n")
    with pytest.raises(ConfigError, match="state: expected a list of"):
        parse_model_yaml(file)
    file.write_text("state: [{input: h, output: a}, {input: h, output: b}]\n")
    with pytest.raises(ConfigError, match="an input is fed by two pairs"):
        parse_model_yaml(file)
    file.write_text(STATE_YAML)
    assert parse_model_yaml(file).state == ({"input": "h", "output": "h_next"},)


def test_a_state_that_does_not_fit_the_model_fails_its_load(models_dir, daemon_factory):
    add_gru(models_dir)
    (models_dir / "gru" / "v1" / "model.yaml").write_text("state: [{input: h, output: y}]\n")
    daemon = daemon_factory()
    with Client(daemon.socket) as client:
        status = client.status("gru")["models"][0]
    assert status["worker"]["state"] == "fatal"
    assert (
        "state: output 'y' (shape [N, 2]) cannot feed input 'h' (shape [N, 8])"
        in (status["worker"]["error"])
    )


def test_a_switch_with_the_same_state_goes_on_another_needs_force(gru_dir, daemon_factory):
    """v2 serves first (the newest); v1 has the same weights and state; v0 another state."""
    add_gru(gru_dir, "v2")
    add_gru(gru_dir, "v0", hidden=16)
    # the old version waits this long for the idle direct channel of `client` to close
    daemon = daemon_factory("drain_timeout: 2s\n" + CONFIG % "30m")
    xs = turns(4, seed=8)
    with Client(daemon.socket) as client:
        got = [say(client, "hana", x) for x in xs[:2]]
        switched = client.switch("v1", "gru")
        assert switched["sessions_reset"] is False
        [folder] = (daemon.state_dir / "sessions" / "gru").iterdir()
        switched_key = folder.name
        got += [say(client, "hana", x) for x in xs[2:]]
        assert np.array_equal(np.concatenate(got), np.concatenate(in_process(gru_dir, xs)))
        refused = run_moltctl("switch", "gru", "v0", socket=daemon.socket)
        assert refused.returncode != 0
        assert "its session state changes (was h_next -> h [1, 8]; now h_next -> h [1, 16])" in (
            refused.stderr
        )
        forced = client.switch("v0", "gru", force=True)
        assert forced["sessions_reset"] is True
        assert client.sessions("gru")["hot"] == 0
        fresh = client.infer("gru", {"x": xs[0]}, session="hana")["y"]
    assert np.array_equal(fresh, in_process(gru_dir, xs[:1], "v0", hidden=16)[0])
    [kept] = (daemon.state_dir / "sessions" / "gru").iterdir()  # v1 and v2's are gone
    assert kept.name != switched_key


def rss_bytes(pid: int) -> int:
    """Anonymous memory resident: the heap, not the libraries' pages (onnxruntime's code
    for batches of new sizes is paged in as they first run)."""
    fields = Path(f"/proc/{pid}/status").read_text().split("RssAnon:")[1].split()
    return int(fields[0]) * 1024


def test_ten_thousand_sessions_stay_within_the_hot_budget(models_dir, daemon_factory):
    """10,000 sessions of 2 KiB each through a hot budget of 1 MiB: the worker keeps 512,
    spills the rest, its memory grows by less than half their states once the budget is
    full, and a sample of the spilled sessions comes back right."""
    hidden, count, warm = 512, 10_000, 2_000
    add_gru(models_dir, hidden=hidden)
    daemon = daemon_factory(
        "models:\n  gru:\n    batching: {max_batch_size: 8}\n    sessions: {hot_bytes: 1MiB}\n"
    )
    rng = np.random.default_rng(9)
    firsts = rng.standard_normal((count, 1, 3, 4)).astype(np.float32)
    second = turns(1, seed=10)[0]

    async def talk(xs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        async with AsyncClient(daemon.socket) as client:
            answers = [client.infer("gru", {"x": x}, session=f"s{n}") for n, x in xs.items()]
            return dict(zip(xs, [r["y"] for r in await asyncio.gather(*answers)], strict=True))

    with Client(daemon.socket) as client:
        pid = worker_pid(client, "gru")
        rss = [rss_bytes(pid)]
        for start in range(0, count, 100):
            asyncio.run(talk({n: firsts[n] for n in range(start, start + 100)}))
            if start + 100 in (warm, count):
                rss.append(rss_bytes(pid))
        listed = client.sessions("gru", 0)
    state_bytes = hidden * 4
    print(f"worker RssAnon {rss[0] / 2**20:.1f} MiB at start, {rss[1] / 2**20:.1f} MiB after"
          f" {warm} sessions, {rss[2] / 2**20:.1f} MiB after {count}"
          f" ({count * state_bytes / 2**20:.1f} MiB of state); hot {listed['hot']}"
          f" ({listed['hot_bytes'] / 2**20:.1f} MiB), spilled {listed['spilled']}")  # fmt: skip
    assert listed["hot_bytes"] <= 1 << 20 and listed["hot"] == (1 << 20) // state_bytes
    assert listed["spilled"] + listed["hot"] == count
    assert rss[2] - rss[1] < (count - warm) * state_bytes / 2  # they are not all in memory
    sample = [int(n) for n in rng.choice(count, 50, replace=False)]
    got = asyncio.run(talk(dict.fromkeys(sample, second)))
    session, zeros = ort.InferenceSession(str(models_dir / "gru" / "v1" / "model.onnx")), 0.0
    for n in sample:
        h = np.full((1, hidden), zeros, np.float32)
        _, h = session.run(["y", "h_next"], {"x": firsts[n], "h": h})
        [want] = session.run(["y"], {"x": second, "h": h})
        assert np.array_equal(got[n], want), n


def test_sessions_batched_together_each_get_their_own_state(gru_dir, daemon_factory):
    """Eight sessions' turns sent at once are batched, their states concatenated and
    split again: each conversation still matches its own, run alone in process."""
    daemon = daemon_factory(CONFIG % "30m")
    talks = {f"t{n}": turns(5, seed=20 + n) for n in range(8)}

    async def converse() -> dict[str, list[np.ndarray]]:
        got: dict[str, list[np.ndarray]] = {name: [] for name in talks}
        async with AsyncClient(daemon.socket, direct=False) as client:
            for turn in range(5):
                sent = [client.infer("gru", {"x": xs[turn]}, session=name)
                        for name, xs in talks.items()]  # fmt: skip
                for name, result in zip(talks, await asyncio.gather(*sent), strict=True):
                    got[name].append(result["y"])
        return got

    got = asyncio.run(converse())

    def batches() -> dict[str, int] | None:  # once the worker reported all 40 requests
        sizes = client.status("gru")["models"][0]["worker"]["batching"]["batch_sizes"]
        return sizes if sum(int(size) * n for size, n in sizes.items()) == 40 else None

    with Client(daemon.socket) as client:
        sizes = wait_until(batches, what="the batches reported")
    assert any(int(size) > 1 for size in sizes), sizes
    for name, xs in talks.items():
        want = in_process(gru_dir, xs)
        assert all(np.array_equal(g, w) for g, w in zip(got[name], want, strict=True)), name
