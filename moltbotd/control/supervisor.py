"""The supervisor: which models are served, which pool answers each request.

It owns the routing table: per model the active Pool (a version's worker processes and
its queue), a canary Pool with its share, and versions loaded on demand; a request goes
to its model's route, or to the model's fallback when that one is overloaded or failed.
How a version becomes active (switch, canary, promote, rollback, deploy) is rollout.py's;
this file starts, routes, reloads and reports.
"""

import asyncio
import contextlib
import copy
import dataclasses
import functools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moltbotd.config import Budget, Config, ConfigError, Overrides, Scheduling
from moltbotd.control.canary import CanaryRoute
from moltbotd.control.state import ModelState, State, StateStore
from moltbotd.durable import storage_error
from moltbotd.isolation.cgroups import CgroupError, Group
from moltbotd.isolation.limits import host_memory, intra_op_threads, resolve
from moltbotd.isolation.policy import Isolation
from moltbotd.logs import get_logger
from moltbotd.scheduler import overloaded
from moltbotd.serving.circuit import CircuitState
from moltbotd.serving.exits import Exits
from moltbotd.serving.pool import Pool, Relayed
from moltbotd.serving.process import WorkerProcess, WorkerSpec
from moltbotd.serving.states import WorkerState
from moltbotd.versions.repository import RepoModel, read_model_yaml, scan
from moltbotd.versions.uploads import Uploads
from moltbotd.wire.files import MODEL_FILE, sha256_file
from moltbotd.wire.protocol import ErrorCode, MoltError, Packed, pack_with
from moltbotd.wire.units import plural

FallbackFor = tuple[str, MoltError]  # the model a fallback answers for, and why
log = get_logger("supervisor")
# Settings a reload applies at once; any other change waits for a restart of the daemon.
LIVE_SETTINGS = frozenset({"limits", "defaults", "models", "drain_timeout", "canary",
                           "on_demand_idle", "scheduling", "uploads", "access"})  # fmt: skip
# seconds a direct channel's client waits to hear how its worker died (it saw EOF first)
CHANNEL_END_WAIT = 2.0
REAP_EVERY = 30.0  # seconds between looks for idle on-demand versions and stale uploads


@contextlib.asynccontextmanager
async def exclusive(model: "Model", operation: str) -> AsyncIterator[None]:
    """One state-changing operation per model at a time; another one gets CONFLICT."""
    if model.lock.locked():
        raise MoltError(
            ErrorCode.CONFLICT,
            f"model {model.name} is busy with '{model.operation}'; try again when it is done",
            {"model": model.name, "operation": model.operation},
        )
    async with model.lock:
        model.operation = operation
        try:
            yield
        finally:
            model.operation = None


async def _to_the_end(write: Callable[[bytes], None], data: bytes) -> None:
    """Run a state write in a thread and hold the caller (and its lock) until the thread
    is done, even if the caller is cancelled meanwhile: a write cut off at its await would
    let the next one run beside it on the same temporary file."""
    thread = asyncio.ensure_future(asyncio.to_thread(write, data))
    try:
        await asyncio.shield(thread)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await thread
        raise


def version_not_found(name: str, version: str, repo_model: RepoModel | None) -> MoltError:
    on_disk = repo_model.versions if repo_model else ()
    return MoltError(
        ErrorCode.VERSION_NOT_FOUND,
        f"model {name} has no version {version} (versions: {', '.join(on_disk)})",
        {"model": name, "version": version, "versions": list(on_disk)},
    )


@dataclass
class Model:
    name: str
    active: Pool | None = None
    canary: CanaryRoute | None = None
    canary_pool: Pool | None = None
    on_demand: dict[str, Pool] = field(default_factory=dict)  # version -> its pool
    broken: dict[str, str] = field(default_factory=dict)  # version -> why it could not serve
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    counts: Counter[str] = field(default_factory=Counter)  # events by kind, for metrics
    error: str | None = None  # why it has no worker at all (e.g. a bad model.yaml)
    operation: str | None = None  # the state-changing operation in progress
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def loaded(self) -> dict[str, Pool]:
        """Every version with a worker, by version."""
        workers = dict(self.on_demand)
        if self.canary and self.canary_pool:
            workers[self.canary.version] = self.canary_pool
        if self.active:
            workers[self.active.spec.version] = self.active
        return workers

    def event(self, kind: str, message: str, **details: Any) -> None:
        """Something an operator should see in status (a canary rolled back, ...)."""
        self.events.append({"time": time.time(), "kind": kind, "message": message, **details})
        self.counts[kind] += 1

    def status(self, isolation: Isolation) -> dict[str, Any]:
        return {
            "name": self.name,
            "active_version": self.active and self.active.spec.version,
            "error": self.error,
            "operation": self.operation,
            "worker": self.active and _pool_status(self.active, isolation),
            "canary": self.canary and {
                **self.canary.status(),
                "worker": self.canary_pool and _pool_status(self.canary_pool, isolation),
            },
            "on_demand": {v: _pool_status(w, isolation) for v, w in self.on_demand.items()},
            "broken": self.broken,
            "events": list(self.events),
        }  # fmt: skip


def _pool_status(pool: Pool, isolation: Isolation) -> dict[str, Any]:
    status = pool.status()
    if pool.cgroup:
        status["cgroup"] = str(pool.cgroup.path)
        status["usage"] = isolation.usage(pool.cgroup)
    return status


class Supervisor:
    def __init__(self, config: Config, isolation: Isolation) -> None:
        self.config = config
        self.isolation = isolation
        self.models: dict[str, Model] = {}
        # Models a switch or deploy is starting: not served yet, but one object per name,
        # so that a second operation on the name meets the first one's lock.
        self.starting: dict[str, Model] = {}
        self._unsaved = False  # a state write failed: the reaper retries it
        self._writing = asyncio.Lock()  # state writes in the order they were asked for
        self.stopping = False
        self.pools: set[Pool] = set()  # every pool not yet retired, active or not
        self.exits = Exits()  # how workers died, for their direct channels' clients
        self.started = time.time()
        self.store = StateStore(config.state_dir)
        self.state = State()
        self.uploads = Uploads(config.models_dir, config.uploads)
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the remembered (or configured) version of every model, and its canary."""
        result = scan(self.config.models_dir)
        for why in result.skipped:
            log.warning("model repository: skipped {why}", why=why)
        self.state = self.store.load()
        self.uploads.sweep(now=float("inf"))  # whatever a previous run left half-sent
        repo = result.models
        for name in self.config.models.keys() - repo.keys():
            log.warning(
                "models.{model} is configured but {models_dir}/{model} has no version with a"
                " model.onnx",
                model=name,
                models_dir=str(self.config.models_dir),
            )
        for name in repo:  # all known before the first spawn: auto memory limits count them
            self.models[name] = Model(name)
        for name, repo_model in repo.items():
            self.start_model(self.models[name], repo_model)
        await asyncio.gather(
            *(p.wait_ready(self.config.workers.start_timeout) for p in list(self.pools)),
            return_exceptions=True,
        )
        for model in self.models.values():
            self._keep_canary_if_ready(model)
        self._remember_actives()
        self.spawn_task(self._reap_forever())

    def start_model(self, model: Model, repo_model: RepoModel) -> None:
        self.models[model.name] = model
        version = self._initial_version(repo_model)
        if version:
            model.active = self.spawn(model, version, repo_model.version_dir(version))
        saved = self.state.model(model.name).canary
        if model.active and saved and saved.version in repo_model.versions:
            log.info("model {model}: resuming the canary of {version}", model=model.name,
                     version=saved.version)  # fmt: skip
            model.canary = CanaryRoute(saved.version, saved.share, self.config.canary,
                                       started=saved.started)  # fmt: skip
            model.canary_pool = self.spawn(
                model, saved.version, repo_model.version_dir(saved.version)
            )

    def _initial_version(self, repo_model: RepoModel) -> str | None:
        """The version the state file remembers, unless the config's pin changed since."""
        name = repo_model.name
        wanted = self.config.models.get(name)
        pin = wanted.version if wanted else None
        saved = self.state.model(name)
        if saved.active in repo_model.versions and saved.config_pin == pin:
            return saved.active
        if saved.active:
            why = (
                f"is no longer in {repo_model.path}"
                if saved.active not in repo_model.versions
                else f"was chosen before models.{name}.version became {pin}"
            )
            log.warning("model {model}: the remembered version {version} {why}", model=name,
                        version=saved.active, why=why)  # fmt: skip
        version = pin or repo_model.latest
        if version not in repo_model.versions:
            self.models[name].error = (
                f"configured version {version} is not in {repo_model.path}"
                f" (versions there: {', '.join(repo_model.versions)})"
            )
            log.error("model {model}: {problem}", model=name, problem=self.models[name].error)
            return None
        return version

    def _keep_canary_if_ready(self, model: Model) -> None:
        pool = model.canary_pool
        if pool and pool.state is not WorkerState.READY:
            self.end_canary(model, f"it did not start: {pool.error}")

    def _remember_actives(self) -> None:
        """Record what serves now, so the next start (even after kill -9) serves it too."""
        for name, model in self.models.items():
            saved = self.state.model(name)
            if model.active and saved.active != model.active.spec.version:
                saved.activate(model.active.spec.version, self.config_pin(name))
        try:
            self.store.save(self.state.to_json())  # at start, before the socket serves
        except OSError as exc:
            log.error("cannot write {file}: {error}; switches will not survive",
                      file=str(self.store.path), error=str(exc))  # fmt: skip

    def config_pin(self, name: str) -> str | None:
        wanted = self.config.models.get(name)
        return wanted.version if wanted else None

    def spawn(self, model: Model, version: str, version_dir: Path) -> Pool | None:
        """A new pool for a version (started, not yet ready); None if it cannot be, with
        the reason in model.broken."""
        try:
            spec, scheduling = self.spec(model.name, version, version_dir)
            group = self.isolation.place(model.name, version, spec.limits)
        except (ConfigError, CgroupError) as exc:
            model.broken[version] = str(exc)
            model.error = model.error if model.active else str(exc)
            log.error("model {model} {version}: {error}", model=model.name, version=version,
                      error=str(exc))  # fmt: skip
            return None
        pool = Pool(spec, self.config.workers, scheduling, cgroup=group, exits=self.exits)
        pool.manual = self._manual_instances(model.name, scheduling)
        pool.on_event = model.event
        self.pools.add(pool)
        pool.start()
        self.spawn_task(self._fingerprint(pool))
        return pool

    @staticmethod
    async def _fingerprint(pool: Pool) -> None:
        """The sha256 of the model file the version loads, for its info series: hashed in
        a thread (about a second per GB), while the worker loads it."""
        try:
            pool.sha256 = await asyncio.to_thread(sha256_file, pool.spec.path)
        except OSError as exc:
            log.warning("model {model} {version}: cannot hash {file}: {error}",
                        model=pool.spec.model, version=pool.spec.version,
                        file=str(pool.spec.path), error=str(exc))  # fmt: skip

    def _manual_instances(self, name: str, scheduling: Scheduling) -> int | None:
        """The count `moltctl scale` saved, within the version's instances.max (a count
        saved before the bound existed, or before a lower max, is cut down to it)."""
        saved, most = self.state.model(name).instances, scheduling.instances.max
        if saved is not None and saved > most:
            log.warning("model {model}: {saved} instances set by hand, above instances.max;"
                        " running {most}", model=name, saved=saved, most=most)  # fmt: skip
            return most
        return saved

    def spec(self, name: str, version: str, version_dir: Path) -> tuple[WorkerSpec, Scheduling]:
        model_yaml = read_model_yaml(version_dir)
        served = len(self.models.keys() | self.starting.keys() | {name})
        limits, memory_how = resolve(self.config.limits_for(name, model_yaml), host_memory(),
                                     served)  # fmt: skip
        session = self.config.session_settings(name, model_yaml)
        threads = intra_op_threads(session.intra_op_threads, limits)
        session = dataclasses.replace(session, intra_op_threads=threads)
        scheduling = self.config.scheduling_for(name, model_yaml)
        if model_yaml.state:
            scheduling = self._one_instance(name, version, scheduling)
        batched = scheduling.batching.max_batch_size > 1
        path = version_dir / MODEL_FILE
        spec = WorkerSpec(name, version, path, session, limits, model_yaml.samples, batched,
                          self.config.max_frame_bytes, memory_how,
                          self.config.metrics.histograms,
                          self.config.metrics.slow_request, model_yaml.state,
                          self.config.state_dir / "sessions" / name)  # fmt: skip
        return spec, scheduling

    def _one_instance(self, name: str, version: str, scheduling: Scheduling) -> Scheduling:
        """A stateful version runs one instance: its sessions live in that worker."""
        if scheduling.instances.max > 1:
            log.warning("model {model} {version} keeps sessions: one instance, not up to"
                        " {most}", model=name, version=version,
                        most=scheduling.instances.max)  # fmt: skip
        one = dataclasses.replace(scheduling.instances, min=1, max=1)
        return dataclasses.replace(scheduling, instances=one)

    async def retire(self, pool: Pool, drain: bool = False) -> bool:
        """Stop a pool for good (after its requests, with drain) and remove its group
        unless another pool still lives in it; False when the drain timed out."""
        drained = await pool.drain(self.config.drain_timeout) if drain else True
        for item in await pool.stop():
            item.answer(MoltError(ErrorCode.MODEL_UNAVAILABLE, f"{pool.label} stopped before"
                                  " it could run this request; retry it"))  # fmt: skip
        self.pools.discard(pool)
        group = pool.cgroup
        if group and self._unused(group):
            await self.isolation.forget(group, lambda: self._unused(group))
        return drained

    def _unused(self, group: Group) -> bool:
        """No pool lives in the group (a version spawned again while its group was being
        removed keeps it)."""
        return all(p.cgroup != group for p in self.pools)

    async def stop(self) -> None:
        """Stop every pool, also one a switch had started but not yet made active; then
        write the state as it is (a canary's end still queued behind another write must
        not be lost with its cancelled task)."""
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(self.retire(p) for p in list(self.pools)))
        await self._write_or_retry("the state at stop")

    def spawn_task(self, coroutine: Coroutine[Any, Any, Any]) -> "asyncio.Task[Any]":
        """Run in the background; kept referenced (and cancelled at stop)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task {task} failed: {error}", task=task.get_coro().__qualname__,
                      error=repr(exc), exc_info=exc)  # fmt: skip

    async def save(self, name: str, change: Callable[[ModelState], None]) -> None:
        """Make a change to a model's saved state durable, then apply it; or change
        nothing. The write (fsyncs) runs in a thread, one at a time: a stalled disk delays
        the operation that waits for it, never the event loop. The change is written from
        a copy, so changes made meanwhile (a canary's automatic end) are neither lost nor
        undone by a write that fails; they are written by their own write, queued behind."""
        async with self._writing:
            draft = copy.deepcopy(self.state)
            change(draft.model(name))
            try:
                await _to_the_end(self.store.save, draft.to_json())
            except OSError as exc:
                error = storage_error(exc, f"cannot record the change in {self.store.path}")
                error.message += "; the change was not applied"
                log.error("model {model}: {error}", model=name, error=error.message)
                raise error from None
            change(self.state.model(name))

    async def scan(self) -> dict[str, RepoModel]:
        """The repository as it is on disk now, read in a thread (a slow disk or a large
        repository must not stall requests)."""
        return (await asyncio.to_thread(scan, self.config.models_dir)).models

    @contextlib.asynccontextmanager
    async def changing(self, name: str, operation: str) -> AsyncIterator[Model]:
        """Model `name` held for one state-changing operation (CONFLICT while another holds
        it): the served one, or one a switch or deploy starts, which stays in `starting`
        until it serves or the operation ends."""
        model = self.models.get(name) or self.starting.setdefault(name, Model(name))
        try:
            async with exclusive(model, operation):
                yield model
        finally:
            if self.starting.get(name) is model and not model.lock.locked():
                del self.starting[name]

    # --- routing: only these methods change which pool serves a model -------------------

    def activate(self, model: Model, pool: Pool) -> None:
        """Route the model's new requests to `pool` (a rollout's proven, recorded
        candidate), registering a model served for the first time. Called under the
        model's lock, in one step: no await."""
        assert model.lock.locked(), "routing changes only under the model's lock"
        if pool is model.canary_pool:  # promoted
            model.canary, model.canary_pool = None, None
        model.active, model.error = pool, None
        self.models[model.name] = model

    def start_canary(self, model: Model, route: CanaryRoute, pool: Pool) -> None:
        """Give `pool` the route's share of the model's unpinned requests."""
        assert model.lock.locked(), "routing changes only under the model's lock"
        model.canary, model.canary_pool = route, pool
        if model.active:  # its requests must pass through moltbotd to be split
            model.active.close_channels("a canary started")

    @staticmethod
    def suspend_canary(model: Model, suspended: bool = True) -> None:
        """While a promote records itself, unpinned requests all go to the active pool and
        the canary's outcomes no longer count (an automatic rollback cannot retire the
        pool being promoted); requests pinned to its version still reach it."""
        assert model.lock.locked(), "routing changes only under the model's lock"
        if model.canary:
            model.canary.suspended = suspended

    def end_canary(self, model: Model, why: str) -> "asyncio.Task[None] | None":
        """Stop routing to the canary at once; its pool drains in the background. The
        state is written in the background too: await the task to know it was (None: the
        model had no canary)."""
        pool, route = model.canary_pool, model.canary
        if route is None:
            return None
        model.canary, model.canary_pool = None, None
        self.state.model(model.name).canary = None  # routing has changed already: keep it
        written = self._save_or_retry(f"the end of model {model.name}'s canary")
        serving = model.active.spec.version if model.active else "nothing"
        message = f"canary {route.version} rolled back: {why}; {serving} serves every request"
        log.error("model {model}: canary {version} rolled back: {why}; {serving} serves every"
                  " request", model=model.name, version=route.version, why=why,
                  serving=serving)  # fmt: skip
        model.event("canary-rollback", message, version=route.version)
        if pool:
            self.spawn_task(self.retire(pool, drain=True))
        return written

    # --- background ----------------------------------------------------------------------

    def _save_or_retry(self, what: str) -> "asyncio.Task[None]":
        """Make the state as it is now durable, in the background (the change is in effect
        already); if even an in-place write fails, the reaper retries."""
        return self.spawn_task(self._write_or_retry(what))

    async def _write_or_retry(self, what: str) -> None:
        try:
            async with self._writing:
                await _to_the_end(self.store.save_even_if_full, self.state.to_json())
        except OSError as exc:
            self._unsaved = True
            retry = "not written" if self.stopping else f"retrying every {REAP_EVERY:g}s"
            log.error("cannot record {what} in {file}: {error}; {retry}", what=what,
                      file=str(self.store.path), error=str(exc), retry=retry)  # fmt: skip
        else:
            if self._unsaved:
                log.info("{file} is up to date again", file=str(self.store.path))
            self._unsaved = False

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(REAP_EVERY, self.config.on_demand_idle / 2))
            try:
                await self.reap()
            except Exception:  # a bug here must not end the reaping for good
                log.exception("unloading idle versions failed")

    async def reap(self) -> None:
        """Unload versions loaded on demand and idle too long; drop abandoned uploads."""
        if self._unsaved:
            await self._write_or_retry("the state")
        idle_since = time.monotonic() - self.config.on_demand_idle
        for model in list(self.models.values()):  # a switch may add a model meanwhile
            for version, pool in list(model.on_demand.items()):
                # Loading is not idling: requests wait for a pool that is starting.
                used = max(pool.last_used, pool.started_at or 0.0)
                loading = pool.state is WorkerState.STARTING
                if not loading and used < idle_since and not pool.inflight:
                    del model.on_demand[version]
                    log.info(
                        "model {model} {version}: unloading, unused",
                        model=model.name,
                        version=version,
                    )
                    await self.retire(pool)
        for token in await asyncio.to_thread(self.uploads.sweep):
            log.warning("removed upload {upload}: abandoned", upload=token)

    # --- requests ------------------------------------------------------------------------

    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise MoltError(
                ErrorCode.MODEL_NOT_FOUND,
                f"no model {name!r} is served (served: {', '.join(self.models) or 'none'})",
                {"model": name, "served": list(self.models)},
            ) from None

    def route(self, model: Model, version: str | None) -> Pool | None:
        """The pool for a request; None for a pinned version not loaded (ready_pool loads
        it, reading the repository off the event loop)."""
        if version is not None:
            return model.loaded().get(version)
        canary = model.canary_pool
        route = model.canary
        ready = canary and route and not route.suspended and canary.state is WorkerState.READY
        # a canary whose circuit is open leaves its share to the active version
        if ready and route.takes_next() and canary.admits():  # type: ignore[union-attr]
            return canary
        return self._serving(model)

    @staticmethod
    def _serving(model: Model) -> Pool:
        if model.active is None:
            raise MoltError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {model.name} is not serving: {model.error}",
                {"model": model.name},
            )
        return model.active

    async def _load_on_demand(self, model: Model, version: str) -> Pool:
        repo_model = (await self.scan()).get(model.name)
        if pool := model.loaded().get(version):  # a request that came meanwhile loaded it
            return pool
        if self.stopping:
            raise MoltError(ErrorCode.MODEL_UNAVAILABLE, "moltbotd is stopping")
        on_disk = repo_model.versions if repo_model else ()
        loaded = sorted(model.loaded())
        if version not in on_disk:
            raise version_not_found(model.name, version, repo_model)
        entry = self.config.models.get(model.name)
        if not (entry and entry.on_demand) or repo_model is None:
            raise MoltError(
                ErrorCode.VERSION_NOT_LOADED,
                f"model {model.name} {version} is not loaded (loaded: {', '.join(loaded)});"
                f" switch to it with: moltctl switch {model.name} {version}, or set"
                f" models.{model.name}.on_demand: true",
                {"model": model.name, "version": version, "loaded": loaded},
            )
        pool = self.spawn(model, version, repo_model.version_dir(version))
        if pool is None:
            raise MoltError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {model.name} {version}: {model.broken[version]}",
            )
        log.info("model {model} {version}: loading on demand", model=model.name, version=version)
        model.on_demand[version] = pool
        return pool

    async def ready_pool(self, model: Model, version: str | None) -> Pool:
        """The pool for a request, once it is ready. A request that waited for a pool
        a switch then retired is routed again, to the version now serving."""
        pool = self.route(model, version) or await self._load_on_demand(model, version)  # type: ignore[arg-type]
        if pool.state is WorkerState.READY:
            return pool
        try:
            await pool.wait_ready(self.config.workers.start_timeout)
        except MoltError:
            if pool in model.loaded().values():  # still routed to: its failure is real
                raise
            return await self.ready_pool(model, version)
        return pool

    def infer(self, params: dict[str, Any], priority: str | None = None,
              timeout_ms: float | None = None,
              refused: MoltError | None = None) -> "asyncio.Future[Packed]":  # fmt: skip
        """Relay a request (an infer's checked params) to the version that serves it;
        the future gives its packed result. Its worker checks its inputs, as it checks
        a direct channel's (the first request for a version still loading waits for it).
        `refused`: why the model itself may not answer it (its caller's budget is spent):
        its fallback does, or that is the answer."""
        name, version = params["model"], params.get("version")
        model = self.model(name)
        arrived = time.monotonic()
        deadline = arrived + timeout_ms / 1000 if timeout_ms else None
        request = (params, priority, arrived, deadline)
        try:
            if refused is not None:
                raise refused
            pool = self.route(model, version)
            if pool is None:  # a pinned version not loaded yet: load it, then run this
                return asyncio.ensure_future(self._submit_when_ready(model, version, request))
            if version is None and pool.failed():
                raise pool.unavailable()
            if pool.signature is None:  # a version that never loaded yet: wait for it
                return asyncio.ensure_future(self._submit_when_ready(model, version, request))
            if version is None and pool.overloaded():
                raise overloaded(pool.label, len(pool.queue), pool.queue.limit)
            if not pool.admits():  # last: a half-open circuit counts what it lets through
                raise pool.circuit_open()
        except MoltError as exc:
            if version is not None:
                raise
            fallback = self._fallback(model, exc)
            return self._submit(fallback, fallback.active, request, fallback_for=(name, exc))  # type: ignore[arg-type]
        return self._submit(model, pool, request)

    async def _submit_when_ready(self, model: Model, version: str | None,
                                 request: tuple[Any, ...]) -> Packed:  # fmt: skip
        pool = await self.ready_pool(model, version)
        return await self._submit(model, pool, request)

    def _fallback(self, model: Model, error: MoltError) -> Model:
        """The model that answers for an overloaded, failed or open-circuited one; else
        the error."""
        name = self._scheduling(model).fallback
        other = self.models.get(name) if name else None
        pool = other.active if other else None
        if (pool is None or pool.signature is None or pool.failed() or pool.overloaded()
                or not pool.admits()):  # fmt: skip
            if name:
                error.message += f" (its fallback {name} cannot answer either)"
            raise error
        return other  # type: ignore[return-value]

    def budget(self, name: str) -> Budget:
        """A served model's budget (none for a model not served: its request fails)."""
        model = self.models.get(name)
        return self._scheduling(model).budget if model else Budget()

    def _scheduling(self, model: Model) -> Scheduling:
        """The serving version's settings; the config's for a model with no version."""
        if model.active:
            return model.active.scheduling
        try:
            return self.config.scheduling_for(model.name, Overrides())
        except ConfigError:
            return self.config.scheduling

    def _submit(self, model: Model, pool: Pool, request: tuple[Any, ...],
                fallback_for: FallbackFor | None = None) -> "asyncio.Future[Packed]":  # fmt: skip
        """`fallback_for`: the model this one answers for, and why that one did not."""
        params, priority, arrived, deadline = request
        canary = model.canary if pool is model.canary_pool else None
        fields = {"model": model.name, "version": pool.spec.version}
        if fallback_for:
            fields["fallback_for"], why = fallback_for[0], fallback_for[1]
            fields["fallback_reason"] = {"code": why.code.value, "message": why.message}
        if "request_id" in params:
            fields["request_id"] = params["request_id"]
        may_fall_back = fallback_for is None and params.get("version") is None
        future: asyncio.Future[Packed] = asyncio.get_running_loop().create_future()

        def reply(outcome: bytes | MoltError) -> None:
            self._canary_outcome(model, canary, failed=isinstance(outcome, MoltError))
            if future.done():  # the client went away
                return
            if may_fall_back and _overloaded(outcome):  # the worker's queue was full
                self._fall_back(model, request, outcome, future)  # type: ignore[arg-type]
            elif isinstance(outcome, MoltError):
                future.set_exception(outcome)
            else:
                future.set_result(pack_with(fields, "outputs", outcome))

        priority = priority or pool.scheduling.priority
        pool.submit(Relayed(params, priority, deadline, arrived, reply))
        return future

    def _fall_back(self, model: Model, request: tuple[Any, ...], error: MoltError,
                   future: "asyncio.Future[Packed]") -> None:  # fmt: skip
        """Answer a request its model's worker refused as overloaded by its fallback."""
        try:
            other = self._fallback(model, error)
            answer = self._submit(other, other.active, request, fallback_for=(model.name, error))  # type: ignore[arg-type]
        except MoltError as exc:
            future.set_exception(exc)
            return
        answer.add_done_callback(functools.partial(_pass_on, future))

    def channel(self, name: str) -> tuple[Pool, WorkerProcess]:
        """The serving instance a client's direct channel goes to; CONFLICT says why the
        client must use this socket instead (its library then does)."""
        model = self.model(name)
        pool = self._serving(model)
        why = None
        if not pool.scheduling.direct:
            why = "direct channels are turned off for it (scheduling.direct)"
        elif pool.scheduling.fallback:
            why = f"its fallback ({pool.scheduling.fallback}) needs every request to pass here"
        elif pool.scheduling.budget.on:
            why = "its budget (max_tokens, cost_limit) is checked here"
        elif model.canary:
            why = "a canary runs: moltbotd splits its requests"
        elif pool.circuit.state is not CircuitState.CLOSED:
            why = f"its circuit is {pool.circuit.state}: moltbotd routes its requests"
        if why:
            raise MoltError(ErrorCode.CONFLICT, f"model {name} has no direct channel: {why};"
                            " send its requests to this socket", {"reason": why})  # fmt: skip
        return pool, pool.channel()

    async def channel_ended(self, name: str, pid: int) -> dict[str, Any]:
        """The error a direct channel's requests in flight get when its worker `pid`
        closed it: the one this socket's requests got from its death."""
        self.model(name)  # UNKNOWN_MODEL names the models served
        error = await self.exits.why(name, pid, CHANNEL_END_WAIT)
        if error is None:
            error = MoltError(ErrorCode.WORKER_FAILED, f"model {name}: worker pid {pid} closed"
                              " its direct channel before answering")  # fmt: skip
        return {"error": error.to_wire()}

    async def scale(self, name: str, instances: int | None) -> dict[str, Any]:
        """Set the active version's instances by hand (None: autoscaling); remembered.
        Under the model's lock, as every state change: the version whose limit is checked
        is the one scaled, not one a switch made active while the count was written."""
        model = self.model(name)
        async with exclusive(model, "scale"):
            pool = self._serving(model)
            most = pool.scheduling.instances.max
            if instances is not None and instances > most:
                raise MoltError(
                    ErrorCode.BAD_REQUEST,
                    f"model {name} may run at most {plural(most, 'instance')} (instances.max);"
                    f" to allow more, raise models.{name}.instances.max in moltbotd.yaml and"
                    " run moltctl reload",
                    {"model": name, "max": most},
                )
            await self.save(name, lambda s: setattr(s, "instances", instances))
            pool.scale(instances)
            how = f"{instances} by hand" if instances else "autoscaling"
            model.event("scale", f"instances of {pool.label}: {how}")
            return model.status(self.isolation)

    def _canary_outcome(self, model: Model, canary: CanaryRoute | None, failed: bool) -> None:
        if canary is None or model.canary is not canary or canary.suspended:
            return  # not a canary's, ended meanwhile, or being promoted
        why = canary.record(failed)
        if why:
            self.end_canary(model, why)

    # --- reload --------------------------------------------------------------------------

    async def reload(self, config: Config, restart: Callable[..., Any]) -> dict[str, Any]:
        """Apply a re-read config: limits live, session changes by a zero-downtime restart
        (`restart(model, version)`, the rollout's)."""
        later = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name not in LIVE_SETTINGS
            and getattr(config, f.name) != getattr(self.config, f.name)
        ]
        # Settings that need a restart keep their running values until then.
        self.config = dataclasses.replace(config, **{k: getattr(self.config, k) for k in later})
        self.uploads.settings = self.config.uploads
        for model in self.models.values():
            if model.canary:
                model.canary.settings = self.config.canary
        outcome = {}
        for model in list(self.models.values()):  # a switch may add a model meanwhile
            outcome[model.name] = await self._reload_model(model, restart)
        log.info("configuration reloaded", restart_needed=",".join(later) or None)
        return {"models": outcome, "restart_needed": later}

    async def _reload_model(self, model: Model, restart: Callable[..., Any]) -> str:
        pool = model.active
        if pool is None:
            return "unchanged: not serving"
        try:
            spec, scheduling = self.spec(model.name, pool.spec.version, pool.spec.path.parent)
        except ConfigError as exc:
            return f"unchanged: {exc}"
        try:
            async with exclusive(model, "reload"):
                if spec.session != pool.spec.session:
                    await restart(model, spec.version)
                    return "restarted: session settings changed"
                if spec.batched != pool.spec.batched:  # the worker checks the model allows it
                    await restart(model, spec.version)
                    return f"restarted: batching turned {'on' if spec.batched else 'off'}"
                return self._update_live(model, pool, spec, scheduling)
        except (MoltError, CgroupError) as exc:
            return f"unchanged: {exc}"

    def _update_live(self, model: Model, pool: Pool, spec: WorkerSpec,
                     scheduling: Scheduling) -> str:  # fmt: skip
        changes = []
        if spec.limits != pool.spec.limits:
            if pool.cgroup:
                self.isolation.apply(pool.cgroup, spec.limits)
            pool.set_spec(dataclasses.replace(pool.spec, limits=spec.limits))
            log.info("model {model}: limits updated", model=model.name)
            changes.append("limits updated" if pool.cgroup else "limits updated, not enforced")
        if scheduling != pool.scheduling:
            pool.set_scheduling(scheduling)
            manual = self._manual_instances(model.name, scheduling)
            if manual != pool.manual:  # instances.max went below the count set by hand
                pool.scale(manual)
            log.info("model {model}: scheduling updated", model=model.name)
            changes.append("scheduling updated")
        return ", ".join(changes) or "unchanged"

    # --- views ---------------------------------------------------------------------------

    def status(self, name: str | None) -> dict[str, Any]:
        models = [self.model(name)] if name else list(self.models.values())
        return {
            "uptime": time.time() - self.started,
            "served": len(self.models),  # all of them, whichever `models` shows
            "models_dir": str(self.config.models_dir),
            "state_file": str(self.store.path),
            "isolation": self.isolation.status(),
            "models": [m.status(self.isolation) for m in models],
        }

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """A loaded version's signature (the active one's by default) and readiness."""
        model = self.model(name)
        loaded = model.loaded()
        pool = self._serving(model) if version is None else loaded.get(version)
        if pool is None:
            raise MoltError(
                ErrorCode.VERSION_NOT_LOADED,
                f"version {version!r} of {name} is not loaded"
                f" (loaded: {', '.join(loaded) or 'none'})",
                {"model": name, "version": version, "loaded": list(loaded)},
            )
        signature = pool.signature
        return {
            "model": name,
            "version": pool.spec.version,
            "loaded": sorted(loaded),
            "ready": pool.state is WorkerState.READY,
            "signature": signature and signature.to_wire(),
        }

    async def sessions(self, name: str, order: dict[str, Any]) -> dict[str, Any]:
        """Ask the worker of MODEL's active version about its sessions: list them, end one
        or reset one (worker/sessions.py)."""
        pool = self._serving(self.model(name))
        worker = next((w for w in pool.workers if w.state is WorkerState.READY), None)
        if worker is None:
            raise MoltError(ErrorCode.MODEL_UNAVAILABLE, f"{pool.label} has no ready worker"
                            " to ask about its sessions; retry once it is ready")  # fmt: skip
        return {"model": name, "version": pool.spec.version, **await worker.ask(order)}

    def health(self) -> dict[str, Any]:
        states = {n: _health(m.active) for n, m in self.models.items()}
        healthy = all(s == WorkerState.READY.value for s in states.values())
        return {"status": "ok" if healthy else "degraded", "models": states}

    async def repository(self) -> dict[str, Any]:
        repo = await self.scan()
        return {
            "models_dir": str(self.config.models_dir),
            "models": [
                {
                    "name": n,
                    "versions": list(m.versions),
                    "active": (
                        self.models[n].active.spec.version
                        if n in self.models and self.models[n].active
                        else None
                    ),
                    "served": n in self.models,
                }
                for n, m in repo.items()
            ],
        }


def _health(pool: Pool | None) -> str:
    """A served version's state; `unhealthy` when serving but failing its health checks."""
    if pool is None:
        return "failed"
    if pool.state is WorkerState.READY and pool.unhealthy():
        return "unhealthy"
    return pool.state.value


def _overloaded(outcome: bytes | MoltError) -> bool:
    return isinstance(outcome, MoltError) and outcome.code is ErrorCode.OVERLOADED


def _pass_on(future: "asyncio.Future[Packed]", answer: "asyncio.Future[Packed]") -> None:
    """The fallback's answer, as the answer to the request that fell back."""
    if future.done():
        return
    if answer.exception() is not None:
        future.set_exception(answer.exception())  # type: ignore[arg-type]
    else:
        future.set_result(answer.result())
