"""The supervisor: which models are served, which worker answers each request, switches.

It owns the routing table (model -> active Worker). Each Worker owns its own process;
the supervisor decides which workers exist. State-changing operations on one model are
serialised by that model's lock, and a second one arriving meanwhile gets CONFLICT.
"""

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from moltbotd.cgroups import CgroupError
from moltbotd.config import Config, ConfigError
from moltbotd.isolation import Isolation
from moltbotd.limits import intra_op_threads
from moltbotd.logs import get_logger
from moltbotd.process import Worker, WorkerSpec
from moltbotd.protocol import ErrorCode, MoltError
from moltbotd.repository import MODEL_FILE, RepoModel, scan
from moltbotd.signature import check_inputs, check_output_names
from moltbotd.states import WorkerState

log = get_logger("supervisor")
# Settings a reload applies at once; any other change waits for a restart of the daemon.
LIVE_SETTINGS = frozenset({"limits", "defaults", "models", "drain_timeout"})


@contextlib.asynccontextmanager
async def _exclusive(model: "Model", operation: str) -> AsyncIterator[None]:
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


@dataclass
class Model:
    name: str
    active: Worker | None = None
    error: str | None = None  # why it has no worker at all (e.g. a bad model.yaml)
    operation: str | None = None  # the state-changing operation in progress
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def status(self, isolation: Isolation) -> dict[str, Any]:
        worker = self.active.status() if self.active else None
        if worker and self.active and self.active.cgroup:
            worker["cgroup"] = str(self.active.cgroup.path)
            worker["usage"] = isolation.usage(self.active.cgroup)
        return {
            "name": self.name,
            "active_version": self.active and self.active.spec.version,
            "error": self.error,
            "operation": self.operation,
            "worker": worker,
        }


class Supervisor:
    def __init__(self, config: Config, isolation: Isolation) -> None:
        self.config = config
        self.isolation = isolation
        self.models: dict[str, Model] = {}
        self.workers: set[Worker] = set()  # every worker not yet retired, active or not
        self.started = time.time()

    # --- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Start a worker for every model in the repository; wait until each is settled."""
        result = scan(self.config.models_dir)
        for why in result.skipped:
            log.warning(f"model repository: skipped {why}")
        repo = result.models
        for name in self.config.models.keys() - repo.keys():
            log.warning(
                f"models.{name} is configured but {self.config.models_dir}/{name}"
                " has no version with a model.onnx",
                model=name,
            )
        for name, repo_model in repo.items():
            model = self.models[name] = Model(name)
            version = self._initial_version(repo_model)
            if version:
                model.active = self._spawn(repo_model, version, model)
        await asyncio.gather(
            *(
                m.active.wait_ready(self.config.workers.start_timeout)
                for m in self.models.values()
                if m.active
            ),
            return_exceptions=True,
        )

    def _initial_version(self, repo_model: RepoModel) -> str | None:
        wanted = self.config.models.get(repo_model.name)
        version = wanted.version if wanted and wanted.version else repo_model.latest
        if version not in repo_model.versions:
            self.models[repo_model.name].error = (
                f"configured version {version} is not in {repo_model.path}"
                f" (versions there: {', '.join(repo_model.versions)})"
            )
            log.error(
                f"model {repo_model.name}: {self.models[repo_model.name].error}",
                model=repo_model.name,
            )
            return None
        return version

    def _spawn(self, repo_model: RepoModel, version: str, model: Model) -> Worker | None:
        try:
            spec = self._spec(repo_model, version)
            group = self.isolation.place(model.name, version, spec.limits)
        except (ConfigError, CgroupError) as exc:
            model.error = str(exc)
            log.error(f"model {model.name} {version}: {exc}", model=model.name, version=version)
            return None
        worker = Worker(spec, self.config.workers, cgroup=group)
        self.workers.add(worker)
        worker.start()
        return worker

    def _spec(self, repo_model: RepoModel, version: str) -> WorkerSpec:
        model_yaml = repo_model.model_yaml(version)
        limits = self.config.limits_for(repo_model.name, model_yaml)
        session = self.config.session_settings(repo_model.name, model_yaml)
        threads = intra_op_threads(session.intra_op_threads, limits)
        session = dataclasses.replace(session, intra_op_threads=threads)
        path = repo_model.version_dir(version) / MODEL_FILE
        return WorkerSpec(repo_model.name, version, path, session, limits)

    async def _retire(self, worker: Worker, model: Model) -> None:
        """Stop a worker for good and remove its group, unless the active worker shares it."""
        await worker.stop()
        self.workers.discard(worker)
        shared = model.active is not worker and model.active and model.active.cgroup
        if worker.cgroup and worker.cgroup != shared:
            self.isolation.forget(worker.cgroup)

    async def stop(self) -> None:
        """Stop every worker, also one a switch had started but not yet made active."""
        retiring = [self._retire(w, self.models[w.spec.model]) for w in list(self.workers)]
        await asyncio.gather(*retiring)

    def _scan(self) -> dict[str, RepoModel]:
        return scan(self.config.models_dir).models

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

    def route(self, name: str, version: str | None) -> Worker:
        model = self.model(name)
        worker = model.active
        if worker is None:
            raise MoltError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {name} is not serving: {model.error}",
                {"model": name},
            )
        if version is not None and version != worker.spec.version:
            raise self._not_loaded(name, version, worker.spec.version)
        return worker

    def _not_loaded(self, name: str, version: str, active: str) -> MoltError:
        repo_model = self._scan().get(name)
        on_disk = repo_model.versions if repo_model else ()
        if version not in on_disk:
            return MoltError(
                ErrorCode.VERSION_NOT_FOUND,
                f"model {name} has no version {version} (versions: {', '.join(on_disk)})",
                {"model": name, "version": version, "versions": list(on_disk)},
            )
        return MoltError(
            ErrorCode.VERSION_NOT_LOADED,
            f"model {name} {version} is not loaded (loaded: {active});"
            f" switch to it with: moltctl switch {name} {version}",
            {"model": name, "version": version, "loaded": [active]},
        )

    async def infer(
        self, name: str, inputs: dict[str, Any], version: str | None, outputs: list[Any] | None
    ) -> dict[str, Any]:
        worker = self.route(name, version)
        if worker.state is not WorkerState.READY:
            await worker.wait_ready(self.config.workers.start_timeout)
        assert worker.signature is not None
        tensors = check_inputs(worker.label, worker.signature, inputs)
        if outputs:
            check_output_names(worker.label, worker.signature, outputs)
        reply = await worker.infer(tensors, outputs)
        return {"model": name, "version": worker.spec.version, "outputs": reply["outputs"]}

    # --- control -------------------------------------------------------------------------

    async def switch(self, name: str | None, version: str) -> dict[str, Any]:
        repo = self._scan()
        name = name or self._only_model_with(repo, version)
        model = self.model(name)
        async with _exclusive(model, f"switch to {version}"):
            return await self._switch(model, repo.get(name), version)

    async def reload(self, config: Config) -> dict[str, Any]:
        """Apply a re-read config: limits live, session changes by a zero-downtime restart."""
        later = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name not in LIVE_SETTINGS
            and getattr(config, f.name) != getattr(self.config, f.name)
        ]
        # Settings that need a restart keep their running values until then.
        self.config = dataclasses.replace(config, **{k: getattr(self.config, k) for k in later})
        repo = self._scan()
        outcome = {}
        for model in self.models.values():
            outcome[model.name] = await self._reload_model(model, repo.get(model.name))
        log.info("configuration reloaded", restart_needed=",".join(later) or None)
        return {"models": outcome, "restart_needed": later}

    async def _reload_model(self, model: Model, repo_model: RepoModel | None) -> str:
        worker = model.active
        if worker is None or repo_model is None:
            return "unchanged: not serving"
        try:
            spec = self._spec(repo_model, worker.spec.version)
        except ConfigError as exc:
            return f"unchanged: {exc}"
        try:
            async with _exclusive(model, "reload"):
                if spec.session != worker.spec.session:
                    await self._switch(model, repo_model, spec.version, restart=True)
                    return "restarted: session settings changed"
                if spec.limits == worker.spec.limits:
                    return "unchanged"
                if worker.cgroup:
                    self.isolation.apply(worker.cgroup, spec.limits)
                worker.spec = dataclasses.replace(worker.spec, limits=spec.limits)
        except (MoltError, CgroupError) as exc:
            return f"unchanged: {exc}"
        log.info(f"model {model.name}: limits updated", model=model.name, pid=worker.pid)
        return "limits updated" if worker.cgroup else "limits updated, not enforced"

    def _only_model_with(self, repo: dict[str, RepoModel], version: str) -> str:
        having = [n for n, m in repo.items() if version in m.versions and n in self.models]
        if len(having) == 1:
            return having[0]
        if not having:
            raise MoltError(
                ErrorCode.VERSION_NOT_FOUND,
                f"no served model has a version {version}",
                {"version": version},
            )
        raise MoltError(
            ErrorCode.BAD_REQUEST,
            f"models {', '.join(having)} all have a version {version}: name the model"
            f" (moltctl switch MODEL {version})",
            {"models": having},
        )

    async def _switch(
        self, model: Model, repo_model: RepoModel | None, version: str, restart: bool = False
    ) -> dict[str, Any]:
        old = model.active
        previous = old.spec.version if old else None
        if repo_model is None or version not in repo_model.versions:
            raise self._not_loaded(model.name, version, previous or "none")
        if old and previous == version and old.state is WorkerState.READY and not restart:
            return {"model": model.name, "from": previous, "to": version, "changed": False}
        started = time.monotonic()
        log.info(
            f"model {model.name}: switching {previous} -> {version}",
            model=model.name,
            version=version,
        )
        new = self._spawn(repo_model, version, model)
        if new is None:
            raise MoltError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {model.name} {version}: {model.error}; {previous} keeps serving",
            )
        try:
            await new.wait_ready(self.config.workers.start_timeout)
        except MoltError as exc:
            await self._retire(new, model)
            keeps = f"; {previous} keeps serving" if old and old.state is WorkerState.READY else ""
            raise MoltError(exc.code, exc.message + keeps, exc.details) from None
        loaded = time.monotonic()
        model.active, model.error = new, None  # from here on, new requests go to `new`
        drained = await old.drain(self.config.drain_timeout) if old else True
        if old:
            await self._retire(old, model)
        log.info(
            f"model {model.name}: now serving {version}",
            model=model.name,
            version=version,
            previous=previous,
        )
        return {
            "model": model.name,
            "from": previous,
            "to": version,
            "changed": True,
            "load_seconds": loaded - started,
            "drain_seconds": time.monotonic() - loaded,
            "drained": drained,
        }

    # --- views ---------------------------------------------------------------------------

    def status(self, name: str | None) -> dict[str, Any]:
        models = [self.model(name)] if name else list(self.models.values())
        return {
            "uptime": time.time() - self.started,
            "models_dir": str(self.config.models_dir),
            "isolation": self.isolation.status(),
            "models": [m.status(self.isolation) for m in models],
        }

    def health(self) -> dict[str, Any]:
        states = {
            n: (m.active.state.value if m.active else "failed") for n, m in self.models.items()
        }
        healthy = all(s == WorkerState.READY.value for s in states.values())
        return {"status": "ok" if healthy else "degraded", "models": states}

    def repository(self) -> dict[str, Any]:
        repo = self._scan()
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
