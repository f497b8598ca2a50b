"""Zero-downtime model versions (issue 5), end to end: switches under load, versions that
must not serve, progress, rollback, pinned and on-demand versions, conflicting operations,
and the active version across restarts and kill -9.

Real daemons, real workers, real onnxruntime; moltctl itself where the CLI is the subject.
"""

import asyncio
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from moltbotd.demo import save, scale_model
from moltbotd.versions.manifest import build_manifest, write_manifest
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.client import AsyncClient, Client, ConnectError, ProtocolError
from tests.conftest import run_moltctl, wait_until
from tests.models import mlp_model, reshape_model, slow_model

FACTOR = {"v1.0": np.float32(2.0), "v2.0": np.float32(10.0)}  # demo: y = factor * x
X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
SLOW_WARMUP_N = 1_000_000  # Loop iterations of a warm-up sample: a second or two of warming


# --- helpers -------------------------------------------------------------------------------


def serving(client: Client, model: str = "demo") -> str:
    """The demo version that answers an unpinned request; its answer must be that version's."""
    out = client.infer(model, {"x": X})
    np.testing.assert_array_equal(out["y"], X * FACTOR[out.version])
    return out.version


def model_status(client: Client, model: str = "demo") -> dict:
    return client.status(model)["models"][0]


def version_entry(client: Client, version: str, model: str = "demo") -> dict:
    [listing] = client.versions(model)["models"]
    return next(v for v in listing["versions"] if v["version"] == version)


def refused(call, *args, **kwargs) -> MoltError:
    with pytest.raises(MoltError) as err:
        call(*args, **kwargs)
    return err.value


async def refused_async(awaitable) -> MoltError:
    with pytest.raises(MoltError) as err:
        await awaitable
    return err.value


def children(daemon) -> set[int]:
    """The daemon's child processes (its workers), from /proc."""
    pid = daemon.proc.pid
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def worker_pids(client: Client) -> set[int]:
    return {m["worker"]["pid"] for m in client.status()["models"] if m["worker"]}


def restart(daemon_factory, old, config: str | None = None, kill: bool = False):
    """Stop (SIGTERM) or kill -9 `old`, then start a new daemon on the same directories."""
    if kill:
        old.kill_group()
    else:
        assert old.stop() == 0, old.log()
    ready = old.log().count("ready: serving")  # the log file is shared: count, not find
    new = daemon_factory(config, wait=False)
    new.wait_for_log("ready: serving", count=ready + 1)
    return new


def new_version(models_dir: Path, version: str, model=None, model_yaml: str = "") -> Path:
    """demo/<version>: a model (y = 3x unless given) and an optional model.yaml."""
    save(model or scale_model(3.0), models_dir, "demo", version)
    folder = models_dir / "demo" / version
    if model_yaml:
        (folder / "model.yaml").write_text(model_yaml)
    return folder


def on_demand(model: str) -> str:
    """A config that loads MODEL's pinned versions on demand and unloads them after 1s idle."""
    return f"models:\n  {model}:\n    on_demand: true\non_demand_idle: 1s\n"


# --- switching under load ------------------------------------------------------------------


class Traffic:
    """What the request streams saw: (sent_at, version, answer right for that version)."""

    def __init__(self) -> None:
        self.answers: list[tuple[float, str, bool]] = []
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def stream(self, socket: Path, seed: int) -> None:
        """One client connection sending infer requests back to back until stopped."""
        rng = np.random.default_rng(seed)
        async with AsyncClient(socket) as c:
            while not self.stop.is_set():
                x = rng.standard_normal((2, 4)).astype(np.float32)
                sent = time.monotonic()
                try:
                    out = await c.infer("demo", {"x": x})
                except (MoltError, ProtocolError) as exc:
                    self.failures.append(repr(exc))
                    continue
                factor = FACTOR.get(out.version)
                right = factor is not None and np.array_equal(out["y"], x * factor)
                self.answers.append((sent, out.version, right))

    async def answered_since(self, moment: float, count: int, timeout: float = 30) -> None:
        """Wait until `count` requests sent after `moment` have been answered."""
        deadline = time.monotonic() + timeout
        while sum(sent > moment for sent, _, _ in self.answers[-4 * count :]) < count:
            assert time.monotonic() < deadline, f"fewer than {count} answers in {timeout}s"
            await asyncio.sleep(0.01)


async def switch_under_load(socket: Path, switches: int, clients: int):
    """Alternate demo between v1.0 and v2.0 while `clients` connections send requests.

    Returns the traffic and per switch (began, returned, target). After each switch the
    next waits until every client had a few answers to requests sent after it returned.
    """
    traffic = Traffic()
    streams = [asyncio.ensure_future(traffic.stream(socket, seed)) for seed in range(clients)]
    windows = []
    try:
        await traffic.answered_since(0, clients)  # the streams are running
        async with AsyncClient(socket) as c:
            for k in range(switches):
                target = ("v1.0", "v2.0")[k % 2]
                began = time.monotonic()
                result = await c.switch(target, "demo")
                returned = time.monotonic()
                assert (result["to"], result["changed"]) == (target, True), result
                windows.append((began, returned, target))
                await traffic.answered_since(returned, 3 * clients)
    finally:
        traffic.stop.set()
        await asyncio.gather(*streams)
    return traffic, windows


def test_switches_under_load_lose_no_request_and_cut_over_at_once(daemon):
    traffic, windows = asyncio.run(switch_under_load(daemon.socket, switches=20, clients=8))
    print(f"\n{len(traffic.answers)} requests answered during 20 switches")
    assert traffic.failures == []
    assert {version for _, version, _ in traffic.answers} == {"v1.0", "v2.0"}
    assert all(right for _, _, right in traffic.answers), "an answer was not its version's"
    # A request sent after a switch returned (and before the next began) gets the new version.
    for (_, returned, target), (began_next, _, _) in zip(
        windows, [*windows[1:], (float("inf"), 0, "")], strict=True
    ):
        after = [v for sent, v, _ in traffic.answers if returned < sent < began_next]
        assert len(after) >= 24
        assert set(after) == {target}, f"sent after the switch to {target} returned: {after}"
    with daemon.client() as c:
        assert model_status(c)["active_version"] == "v2.0"
        assert children(daemon) == worker_pids(c), "a retired worker is still running"
    assert daemon.log().count("model demo: now serving") == 20
    assert "internal error" not in daemon.log()


# --- versions that must not serve ----------------------------------------------------------


def corrupt_file(models_dir: Path) -> Path:
    folder = models_dir / "demo" / "v3.0"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX model")
    return folder


def sample_of_wrong_shape(models_dir: Path) -> Path:
    return new_version(models_dir, "v3.0", model_yaml="samples:\n  - {x: [[1.0, 2.0, 3.0]]}\n")


def sample_failing_at_run_time(models_dir: Path) -> Path:
    samples = (
        "samples:\n  - {x: [1, 2, 3, 4], shape: [2, 2]}\n  - {x: [1, 2, 3, 4], shape: [3, 3]}\n"
    )
    return new_version(models_dir, "v3.0", reshape_model(), samples)


def edited_after_deploy(models_dir: Path) -> Path:
    folder = new_version(models_dir, "v3.0")
    write_manifest(folder, build_manifest(folder, "demo", "v3.0", "uid 0", "tests"))
    save(scale_model(4.0), models_dir, "demo", "v3.0")  # same size, other bytes
    return folder


@pytest.mark.parametrize(
    ("make", "code", "message", "listed"),
    [
        (corrupt_file, ErrorCode.MODEL_UNAVAILABLE,
         "model demo v3.0 is not serving (worker fatal): cannot load {folder}/model.onnx: ",
         "cannot load {folder}/model.onnx"),
        (sample_of_wrong_shape, ErrorCode.MODEL_UNAVAILABLE,
         "cannot load {folder}/model.onnx: warm-up sample 1 of 1: input 'x': expected float32"
         " with shape [N, 4], got shape [1, 3]",
         "warm-up sample 1 of 1: input 'x'"),
        (sample_failing_at_run_time, ErrorCode.MODEL_UNAVAILABLE,
         "cannot load {folder}/model.onnx: warm-up sample 2 of 2 failed: ",
         "warm-up sample 2 of 2 failed"),
        (edited_after_deploy, ErrorCode.VALIDATION_FAILED,
         "{folder} does not match its manifest.json: model.onnx: sha256 ",
         "model.onnx differs from its manifest"),
    ],
    ids=["corrupt-file", "sample-of-wrong-shape", "sample-fails-at-run-time", "checksum"],
)  # fmt: skip
def test_a_broken_version_leaves_the_old_one_serving(daemon, models_dir, make, code, message,
                                                     listed):  # fmt: skip
    folder = make(models_dir)
    with daemon.client() as c:
        pid = model_status(c)["worker"]["pid"]
        error = refused(c.switch, "v3.0", "demo")
        assert error.code is code
        assert message.format(folder=folder) in error.message
        assert error.message.endswith("; v2.0 keeps serving")
        assert serving(c) == "v2.0"
        assert model_status(c)["worker"]["pid"] == pid  # the same worker, never interrupted
        entry = version_entry(c, "v3.0")
        assert entry["state"] == "broken"
        assert listed.format(folder=folder) in entry["error"]
        assert version_entry(c, "v2.0")["state"] == "active"
        assert children(daemon) == worker_pids(c), "the failed version's worker is left over"


def test_an_incompatible_signature_needs_force_and_lists_the_changes(daemon, models_dir):
    new_version(models_dir, "v3.0", mlp_model(width=8))
    changes = ["input 'x': shape [N, 4] -> [N, 8]", "output 'y': shape [N, 4] -> [N, 8]"]
    with daemon.client() as c:
        error = refused(c.switch, "v3.0", "demo")
        assert error.code is ErrorCode.VALIDATION_FAILED
        assert error.message == (
            "model demo v3.0 is not a drop-in replacement: " + "; ".join(changes)
            + " (moltctl switch --force accepts this); v2.0 keeps serving"
        )  # fmt: skip
        assert error.details["changes"] == changes
        assert serving(c) == "v2.0"
        # The model itself is sound, so it is not listed as broken: --force can serve it.
        assert version_entry(c, "v3.0")["state"] == "available"
        assert children(daemon) == worker_pids(c), "the refused version's worker is left over"
        result = c.switch("v3.0", "demo", force=True)
        assert (result["from"], result["to"], result["changes"]) == ("v2.0", "v3.0", changes)
        out = c.infer("demo", {"x": np.ones((1, 8), np.float32)})
        assert out.version == "v3.0" and out["y"].shape == (1, 8)
        assert c.rollback("demo")["to"] == "v2.0"  # it served before: no --force needed back
        assert serving(c) == "v2.0"


# --- progress ------------------------------------------------------------------------------


def test_switch_reports_its_phases_in_order_and_times_them(daemon):
    seen = []
    with daemon.client() as c:
        result = c.switch("v1.0", "demo", on_progress=seen.append)
    phases = [p["phase"] for p in seen]
    assert phases == ["validating", "loading", "warming", "validating", "switching", "draining"]
    assert all(p["detail"] for p in seen)
    assert "new requests go to v1.0" in seen[4]["detail"]
    assert set(result["seconds"]) == {"validating", "loading", "warming", "switching", "draining"}
    assert all(s >= 0 for s in result["seconds"].values())
    assert result["seconds"]["loading"] > 0  # a real worker process started


# --- rollback ------------------------------------------------------------------------------


def test_rollback_returns_to_the_earlier_version_once(daemon):
    with daemon.client() as c:
        assert c.switch("v1.0", "demo")["to"] == "v1.0"
        result = c.rollback("demo")
        assert (result["from"], result["to"], result["changed"]) == ("v1.0", "v2.0", True)
        assert serving(c) == "v2.0"
        error = refused(c.rollback, "demo")
        assert error.code is ErrorCode.BAD_REQUEST
        assert error.message == (
            "model demo has no earlier version to return to (remembered: none)"
        )
        assert serving(c) == "v2.0"
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["models"]["demo"]["active"] == "v2.0"
    assert state["models"]["demo"]["history"] == []


def test_rollback_passes_over_versions_no_longer_on_disk(daemon, models_dir):
    new_version(models_dir, "v3.0")
    with daemon.client() as c:
        c.switch("v3.0", "demo")
        c.switch("v1.0", "demo")  # remembered: v2.0, then v3.0
        shutil.rmtree(models_dir / "demo" / "v3.0")
        result = c.rollback("demo")
        assert (result["from"], result["to"]) == ("v1.0", "v2.0")
        assert serving(c) == "v2.0"
        error = refused(c.rollback, "demo")  # v2.0 came first: nothing is left before it
        assert error.code is ErrorCode.BAD_REQUEST
        assert error.message == (
            "model demo has no earlier version to return to (remembered: none)"
        )
    assert json.loads((daemon.state_dir / "state.json").read_text())["models"]["demo"] == {
        "active": "v2.0", "history": [], "config_pin": None, "canary": None,
        "instances": None}  # fmt: skip


def test_moltctl_rollback(daemon):
    with daemon.client() as c:
        c.switch("v1.0", "demo")
    done = run_moltctl("rollback", "demo", socket=daemon.socket)
    assert done.returncode == 0, done.stderr
    assert re.match(r"demo: v1.0 -> v2.0 in \S+ \(validating ", done.stdout), done.stdout
    assert "Traceback" not in done.stderr
    again = run_moltctl("rollback", "demo", socket=daemon.socket)
    assert again.returncode == 1, (again.stdout, again.stderr)
    assert again.stderr == (
        "moltctl: model demo has no earlier version to return to (remembered: none) [BAD_REQUEST]\n"
    )
    with daemon.client() as c:
        assert serving(c) == "v2.0"


# --- pinned versions -----------------------------------------------------------------------


def test_a_pinned_version_that_is_not_loaded_is_refused(daemon):
    with daemon.client() as c:
        error = refused(c.infer, "demo", {"x": X}, version="v1.0")
        assert error.code is ErrorCode.VERSION_NOT_LOADED
        assert error.details == {"model": "demo", "version": "v1.0", "loaded": ["v2.0"]}
        assert "moltctl switch demo v1.0" in error.message
        assert c.infer("demo", {"x": X}, version="v2.0").version == "v2.0"
        assert model_status(c)["on_demand"] == {}


def test_on_demand_loads_a_pinned_version_and_unloads_it_when_idle(daemon_factory):
    daemon = daemon_factory(on_demand("demo"))
    with daemon.client() as c:
        pinned = c.infer("demo", {"x": X}, version="v1.0")
        status = model_status(c)  # at once: on_demand_idle is 1s
        assert pinned.version == "v1.0"
        np.testing.assert_array_equal(pinned["y"], X * 2)
        assert status["active_version"] == "v2.0"
        assert list(status["on_demand"]) == ["v1.0"]
        loaded_pid = status["on_demand"]["v1.0"]["pid"]
        assert loaded_pid in children(daemon)
        assert version_entry(c, "v1.0")["state"] == "loaded"
        assert serving(c) == "v2.0"  # unpinned requests still get the active version
        wait_until(lambda: model_status(c)["on_demand"] == {}, timeout=5,
                   what="the idle on-demand version's unloading")  # fmt: skip
        wait_until(lambda: loaded_pid not in children(daemon), timeout=10,
                   what="the unloaded version's worker's exit")  # fmt: skip
        assert version_entry(c, "v1.0")["state"] == "available"
        assert serving(c) == "v2.0"
    assert "model demo v1.0: unloading, unused" in daemon.log()


def test_an_on_demand_version_slower_to_load_than_the_idle_time_still_answers(
    daemon_factory, models_dir
):
    """Its warm-up takes longer than on_demand_idle: the reaper must not unload it mid-load."""
    save(slow_model(), models_dir, "slow", "v0")
    (models_dir / "slow" / "v0" / "model.yaml").write_text(
        f"samples:\n  - {{n: {SLOW_WARMUP_N}, x: [1, 1, 1, 1]}}\n"
    )
    daemon = daemon_factory(on_demand("slow"))
    with daemon.client(timeout=30) as c:
        out = c.infer("slow", {"n": np.array(10), "x": np.ones(4, np.float32)}, version="v0")
        assert out.version == "v0"
        assert model_status(c, "slow")["active_version"] == "v1"
    assert daemon.log().count("model slow v0: loading on demand") == 1


# --- one operation at a time ---------------------------------------------------------------


def test_a_second_operation_during_a_switch_gets_conflict(daemon, models_dir):
    """slow v2 answers a warm-up sample that takes a while: the switch is in progress."""
    save(slow_model(), models_dir, "slow", "v2")
    (models_dir / "slow" / "v2" / "model.yaml").write_text(
        f"samples:\n  - {{n: {SLOW_WARMUP_N}, x: [1, 1, 1, 1]}}\n"
    )

    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            warming = asyncio.Event()

            def progress(p):
                if p["phase"] == "warming":
                    warming.set()

            switching = asyncio.ensure_future(c.switch("v2", "slow", on_progress=progress))
            await asyncio.wait_for(warming.wait(), 60)
            errors = [
                await refused_async(c.switch("v1", "slow")),
                await refused_async(c.rollback("slow")),
                await refused_async(c.switch("v2", "slow", force=True)),
            ]
            operation = (await c.status("slow"))["models"][0]["operation"]
            old = await c.infer("slow", {"n": np.array(10), "x": np.ones(4, np.float32)})
            other = await c.switch("v1.0", "demo")  # another model is not held up
            return errors, operation, old, other, await switching

    errors, operation, old, other, switched = asyncio.run(scenario())
    assert operation == "switch to v2: warming"
    for error in errors:
        assert error.code is ErrorCode.CONFLICT
        assert error.message == (
            "model slow is busy with 'switch to v2: warming'; try again when it is done"
        )
        assert error.details == {"model": "slow", "operation": "switch to v2: warming"}
    assert old.version == "v1"  # the old version serves while the new one warms
    assert other["to"] == "v1.0"
    assert (switched["from"], switched["to"]) == ("v1", "v2")
    with daemon.client() as c:
        assert model_status(c, "slow")["operation"] is None
        assert c.rollback("slow")["to"] == "v1"  # the model is free again


# --- the active version across restarts ----------------------------------------------------


def test_a_switch_survives_a_restart_and_a_changed_config_pin_wins(daemon_factory):
    daemon = daemon_factory()
    with daemon.client() as c:
        c.switch("v1.0", "demo")
    daemon = restart(daemon_factory, daemon)
    with daemon.client() as c:
        assert serving(c) == "v1.0"  # the state file wins over "the highest version"
    pinned = "models:\n  demo:\n    version: v2.0\n"
    daemon = restart(daemon_factory, daemon, pinned)
    with daemon.client() as c:
        assert serving(c) == "v2.0"  # the pin changed after v1.0 was chosen
        warning = "the remembered version v1.0 was chosen before models.demo.version became v2.0"
        assert warning in daemon.log()
        c.switch("v1.0", "demo")
    daemon = restart(daemon_factory, daemon, pinned)
    with daemon.client() as c:
        assert serving(c) == "v1.0"  # chosen under the same pin: the switch is kept


def test_a_switch_survives_kill_9_right_after_it_returned(daemon_factory):
    daemon = daemon_factory()
    with daemon.client() as c:
        assert c.switch("v1.0", "demo")["to"] == "v1.0"
    daemon = restart(daemon_factory, daemon, kill=True)
    with daemon.client() as c:
        assert serving(c) == "v1.0"
        assert c.health()["status"] == "ok"


class SwitchAttempt(threading.Thread):
    """A switch sent from another thread; its result, or how it ended, when the daemon died."""

    def __init__(self, socket: Path, version: str) -> None:
        super().__init__(daemon=True)
        self.socket, self.version = socket, version
        self.result: dict | None = None
        self.error: Exception | None = None
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            with Client(self.socket, timeout=60) as c:
                self.connected.set()
                self.result = c.switch(self.version, "demo")
        except Exception as exc:  # the test checks how it ended
            self.error = exc
        finally:
            self.connected.set()


def test_kill_9_during_switches_always_restarts_consistent(daemon_factory):
    """kill -9 at points spread over a switch's duration: each restart serves v1.0 or v2.0,
    the switched-to one if the switch had answered, and state.json agrees with status."""
    daemon = daemon_factory()
    with daemon.client() as c:
        began = time.monotonic()
        c.switch("v1.0", "demo")
        duration = time.monotonic() - began
    outcomes = []
    for delay in np.linspace(0, 1.2 * duration, 6):
        with daemon.client() as c:
            current = serving(c)
        target = {"v1.0": "v2.0", "v2.0": "v1.0"}[current]
        attempt = SwitchAttempt(daemon.socket, target)
        attempt.start()
        attempt.connected.wait(10)
        time.sleep(delay)  # the moment of the crash is the variable under test
        daemon = restart(daemon_factory, daemon, kill=True)
        attempt.join(30)
        assert attempt.result or isinstance(attempt.error, ConnectError | ProtocolError), (
            attempt.error
        )
        with daemon.client() as c:
            assert c.health()["status"] == "ok"
            now = serving(c)
            status = c.status()
        if attempt.result is not None:
            assert now == target, f"the switch to {target} answered, then was lost"
        state = json.loads((daemon.state_dir / "state.json").read_text())
        actives = {m["name"]: m["active_version"] for m in status["models"]}
        assert {n: m["active"] for n, m in state["models"].items()} == actives
        outcomes.append((round(float(delay), 3), target, now, attempt.result is not None))
    print(f"\nkill -9 after (delay, target, serving, switch answered): {outcomes}")


def slow_to_warm(models_dir: Path, name: str, version: str) -> Path:
    """name/version: slow's model with a warm-up sample that takes a second or two."""
    save(slow_model(), models_dir, name, version)
    folder = models_dir / name / version
    (folder / "model.yaml").write_text(f"samples:\n  - {{n: {SLOW_WARMUP_N}, x: [1, 1, 1, 1]}}\n")
    return folder


async def while_warming(start, then):
    """Start one operation (given on_progress), then run `then` while it warms up."""
    warming = asyncio.Event()
    first = asyncio.ensure_future(
        start(lambda p: warming.set() if p["phase"] == "warming" else None)
    )
    warmed = asyncio.ensure_future(warming.wait())
    await asyncio.wait({first, warmed}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if not warmed.done():
        first.result()  # raises what ended it, if it failed
        pytest.fail("the first operation did not reach warming")
    second = await refused_async(then())
    return await first, second


def test_two_switches_of_a_model_not_served_yet_meet_one_lock(daemon, models_dir):
    """A model copied in after the start is not served: each switch took a Model object of
    its own, so both cut over and the first one's worker leaked. Now the second one gets
    CONFLICT and one worker serves."""
    slow_to_warm(models_dir, "fresh", "v1")
    before = children(daemon)

    async def scenario():
        async with AsyncClient(daemon.socket) as a, AsyncClient(daemon.socket) as b:
            return await while_warming(
                lambda progress: a.switch("v1", "fresh", on_progress=progress),
                lambda: b.switch("v1", "fresh"),
            )

    switched, error = asyncio.run(scenario())
    assert (switched["from"], switched["to"]) == (None, "v1")
    assert error.code is ErrorCode.CONFLICT
    assert error.message == (
        "model fresh is busy with 'switch to v1: warming'; try again when it is done"
    )
    with daemon.client() as c:
        assert model_status(c, "fresh")["active_version"] == "v1"
        assert len(children(daemon) - before) == 1  # one new worker, none leaked
        assert c.switch("v1", "fresh")["changed"] is False
