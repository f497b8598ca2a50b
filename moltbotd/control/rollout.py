"""How a version becomes the one serving: switch, canary, promote, rollback, deploy.

Every path goes through the same two steps. `_candidate` proves the new version before
any request reaches it: the files match the manifest written when it was deployed, the
model loads, warms up (model.yaml's samples, or zeros), and its signature is compatible
with the serving version's (or --force accepts the listed changes). `_cut_over` then
records the choice durably and routes new requests to it in one step, and the old
version drains its requests before it stops. A failure anywhere before the cut-over
leaves the old version serving, and the error says why.
"""

import asyncio
import contextlib
import dataclasses
import errno
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from moltbotd.config import NAME_PATTERN, NAME_RULE
from moltbotd.control.canary import CanaryRoute
from moltbotd.control.state import Canary, ModelState
from moltbotd.control.supervisor import Model, Supervisor, exclusive, version_not_found
from moltbotd.durable import fsync_dir, storage_error
from moltbotd.logs import get_logger
from moltbotd.serving.pool import Pool
from moltbotd.serving.states import WorkerState
from moltbotd.versions.manifest import (
    Manifest,
    ManifestError,
    build_manifest,
    read_manifest,
    verify,
    write_manifest,
)
from moltbotd.versions.repository import RepoModel
from moltbotd.versions.uploads import Uploads
from moltbotd.wire.files import MANIFEST_FILE, MODEL_FILE
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltbotd.wire.signature import compare
from moltbotd.wire.units import plural

log = get_logger("rollout")
Progress = Callable[[str, str], None]  # (phase, detail): shown by `moltctl switch` as it goes


def no_progress(phase: str, detail: str) -> None:
    """For callers nobody watches (a reload's restart)."""


class Phases:
    """The phases of one operation: timed, shown in status, reported as progress."""

    def __init__(self, model: Model, operation: str, progress: Progress) -> None:
        self.model, self.operation, self.progress = model, operation, progress
        self.seconds: dict[str, float] = {}
        self._phase, self._since = "", time.monotonic()

    def __call__(self, phase: str, detail: str = "") -> None:
        self._close()
        self._phase, self._since = phase, time.monotonic()
        self.model.operation = f"{self.operation}: {phase}"
        self.progress(phase, detail)

    def _close(self) -> None:
        if self._phase:
            spent = time.monotonic() - self._since
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + spent

    def done(self) -> dict[str, float]:
        self._close()
        self._phase = ""
        return self.seconds


@dataclasses.dataclass
class Candidate:
    pool: Pool
    changes: list[str]  # accepted with --force: what changes for clients
    checksum: str  # "verified", or why it was not checked


class Rollout:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    # --- switch, canary, promote, rollback -----------------------------------------------

    async def switch(
        self,
        name: str | None,
        version: str,
        force: bool = False,
        canary: float | None = None,
        progress: Progress = no_progress,
    ) -> dict[str, Any]:
        repo = await self.sup.scan()
        name = name or self._only_model_with(repo, version)
        if name not in repo:
            self.sup.model(name)  # MODEL_NOT_FOUND, unless served (VERSION_NOT_FOUND below)
        what = f"canary {version}" if canary else f"switch to {version}"
        async with self.sup.changing(name, what) as model:
            if model.canary:
                raise canary_in_progress(model)
            repo_model = repo.get(name)
            if repo_model is None or version not in repo_model.versions:
                raise version_not_found(name, version, repo_model)
            active = model.active.spec.version if model.active else None
            if active == version and not canary and model.active.state is WorkerState.READY:  # type: ignore[union-attr]
                return {"model": name, "from": active, "to": version, "changed": False}
            if active == version and canary:
                raise MoltError(ErrorCode.BAD_REQUEST, f"{version} is already serving {name}")
            phases = Phases(model, what, progress)
            found = await self._candidate(model, version, repo_model.version_dir(version),
                                          force, phases)  # fmt: skip
            async with self._or_retire(found):
                if canary:
                    return await self._start_canary(model, found, canary, phases)
                return await self._cut_over(model, found, phases)

    async def restart(self, model: Model, version: str) -> None:
        """A new worker of the same version replaces the active one (a reload's session
        change), validated and cut over like a switch."""
        phases = Phases(model, "reload", no_progress)
        # The same version: its signature cannot change, and zeros failed before too.
        found = await self._candidate(model, version, model.active.spec.path.parent,  # type: ignore[union-attr]
                                      True, phases)  # fmt: skip
        async with self._or_retire(found):
            await self._cut_over(model, found, phases)

    async def promote(self, name: str | None, progress: Progress = no_progress) -> dict[str, Any]:
        model = self.sup.model(name or self._only_model(lambda m: m.canary is not None, "promote"))
        async with exclusive(model, "promote"):
            route, pool = model.canary, model.canary_pool
            if route is None or pool is None:
                raise MoltError(
                    ErrorCode.BAD_REQUEST,
                    f"model {model.name} has no canary to promote; start one with:"
                    f" moltctl switch {model.name} VERSION --canary 10%",
                )
            phases = Phases(model, "promote", progress)
            # While the state is written, the canary takes no unpinned share and its
            # answers no longer count: an automatic rollback cannot retire the pool
            # being promoted (requests pinned to its version still reach it).
            self.sup.suspend_canary(model)
            try:
                return await self._cut_over(model, Candidate(pool, [], "verified"), phases)
            finally:
                self.sup.suspend_canary(model, False)  # a no-op once promoted

    async def rollback(self, name: str | None, progress: Progress = no_progress) -> dict[str, Any]:
        """End a canary, or return to the version that served before the active one."""
        model = self.sup.model(name or self._only_model(lambda m: True, "rollback"))
        async with exclusive(model, "rollback"):
            if model.canary:
                version = model.canary.version
                if written := self.sup.end_canary(model, "rolled back by hand"):
                    # shielded: a client gone meanwhile must not cancel the state write
                    await asyncio.shield(written)
                active = model.active.spec.version if model.active else None
                return {"model": model.name, "from": version, "to": active, "changed": True,
                        "canary_ended": True, "seconds": {}}  # fmt: skip
            repo_model = (await self.sup.scan()).get(model.name)
            saved = self.sup.state.model(model.name)
            earlier = [v for v in saved.history if repo_model and v in repo_model.versions]
            if not earlier or repo_model is None:
                raise MoltError(
                    ErrorCode.BAD_REQUEST,
                    f"model {model.name} has no earlier version to return to"
                    f" (remembered: {', '.join(saved.history) or 'none'})",
                )
            phases = Phases(model, f"rollback to {earlier[-1]}", progress)
            # It served before: its signature is the one clients knew, so no --force needed.
            found = await self._candidate(model, earlier[-1], repo_model.version_dir(earlier[-1]),
                                          True, phases)  # fmt: skip
            async with self._or_retire(found):
                return await self._cut_over(model, found, phases, rollback=True)

    # --- the two steps -------------------------------------------------------------------

    async def _candidate(
        self,
        model: Model,
        version: str,
        version_dir: Path,
        force: bool,
        phases: Phases,
        manifest: Manifest | None = None,
    ) -> Candidate:
        """A ready worker of `version`, proven fit to replace the active one."""
        old = model.active
        keeps = f"; {old.spec.version} keeps serving" if old else ""
        if manifest or (version_dir / MANIFEST_FILE).exists():
            phases("validating", f"sha256 of {version}'s files against its {MANIFEST_FILE}")
        else:
            phases("validating", f"{version}'s files: not checked, it has no {MANIFEST_FILE}")
        checksum = "verified" if manifest else await _checksum(version_dir, keeps)
        phases("loading", f"{version} in a new worker")
        pool = self.sup.spawn(model, version, version_dir)
        if pool is None:
            raise MoltError(
                ErrorCode.MODEL_UNAVAILABLE, f"model {model.name} {version}: "
                f"{model.broken.get(version)}{keeps}",
            )  # fmt: skip
        pool.on_phase = lambda phase: phases(phase, f"{version}: {_WHAT[phase]}")
        try:
            await pool.wait_ready(self.sup.config.workers.start_timeout)
        except MoltError as exc:
            await self.sup.retire(pool)
            model.broken[version] = exc.message
            raise MoltError(exc.code, exc.message + keeps, exc.details) from None
        pool.on_phase = None
        phases("validating", f"{version}'s signature against the serving version's")
        changes = self._changes(old, pool)
        if changes and not force:
            await self.sup.retire(pool)
            raise MoltError(
                ErrorCode.VALIDATION_FAILED,
                f"model {model.name} {version} is not a drop-in replacement: "
                + "; ".join(changes) + f" (moltctl switch --force accepts this){keeps}",
                {"model": model.name, "version": version, "changes": changes},
            )  # fmt: skip
        model.broken.pop(version, None)
        return Candidate(pool, changes, checksum)

    @staticmethod
    def _changes(old: Pool | None, new: Pool) -> list[str]:
        changes = []
        if old and old.signature and new.signature and old is not new:
            changes = compare(old.signature, new.signature)
        if (reset := sessions_reset(old, new)) is not None:
            changes.append(reset)
        if new.primary.ready_info.get("warmup_error"):
            changes.append(
                f"the warm-up run on zeros failed ({new.primary.ready_info['warmup_error']}); give"
                " model.yaml `samples:` inputs the model accepts"
            )
        return changes

    async def _cut_over(
        self, model: Model, found: Candidate, phases: Phases, rollback: bool = False
    ) -> dict[str, Any]:
        new, old = found.pool, model.active
        version, previous = new.spec.version, old and old.spec.version
        phases("switching", f"new requests go to {version}")
        pin = self.sup.config_pin(model.name)
        keeps = f"{previous} keeps serving" if previous else f"{model.name} is not served yet"
        await self._record(model, lambda s: (s.return_to if rollback else s.activate)(version, pin),
                           keeps)  # fmt: skip
        self.sup.activate(model, new)
        drained = True
        reset = sessions_reset(old, new) is not None
        if old:
            phases("draining", f"{plural(old.inflight, 'request')} in flight on {previous}")
            drained = await self.sup.retire(old, drain=True)
            if reset:  # its sessions cannot go on in the new version: they are gone
                await asyncio.to_thread(shutil.rmtree, sessions_dir(old), True)
        log.info("model {model}: now serving {version}", model=model.name,
                 version=version, previous=previous)  # fmt: skip
        kind = phases.operation.split()[0]  # switch, promote, rollback, deploy, reload
        model.event(kind, f"{previous or 'nothing'} -> {version}", version=version)
        return {"model": model.name, "from": previous, "to": version, "changed": True,
                "drained": drained, "changes": found.changes, "checksum": found.checksum,
                "sessions_reset": reset, "seconds": phases.done()}  # fmt: skip

    async def _start_canary(
        self, model: Model, found: Candidate, share: float, phases: Phases
    ) -> dict[str, Any]:
        version = found.pool.spec.version
        phases("switching", f"{share:.0%} of requests go to {version}")
        route = CanaryRoute(version, share, self.sup.config.canary)
        saved = Canary(version, share, route.started)
        await self._record(model, lambda s: setattr(s, "canary", saved), "no canary started")
        self.sup.start_canary(model, route, found.pool)
        active = model.active.spec.version if model.active else None
        log.info("model {model}: canary {version} takes {share:.0%} of requests",
                 model=model.name, version=version, share=share)  # fmt: skip
        model.event("canary", f"{version} takes {share:.0%} of requests", version=version)
        return {"model": model.name, "from": active, "to": version, "changed": True,
                "canary": share, "changes": found.changes, "checksum": found.checksum,
                "seconds": phases.done()}  # fmt: skip

    async def _record(self, model: Model, change: Callable[[ModelState], None],
                      keeps: str) -> None:  # fmt: skip
        """Make the change durable before any request sees it; if the state file cannot
        be written (a full disk), nothing changes and the error says what keeps serving."""
        try:
            await self.sup.save(model.name, change)
        except MoltError as exc:
            raise MoltError(exc.code, f"{exc.message}; {keeps}", exc.details) from None

    @contextlib.asynccontextmanager
    async def _or_retire(self, found: Candidate) -> AsyncIterator[None]:
        """A proven candidate that then does not come to serve is stopped, its group too."""
        try:
            yield
        except BaseException:
            await self.sup.retire(found.pool)
            raise

    # --- deploy --------------------------------------------------------------------------

    async def deploy(
        self,
        upload: str,
        name: str,
        version: str,
        files: dict[str, str],
        activate: bool = False,
        force: bool = False,
        source: str = "",
        peer: str = "",
        progress: Progress = no_progress,
    ) -> dict[str, Any]:
        """Check what arrived, prove it like a switch would, publish it with one rename.
        A refused deploy leaves nothing behind: neither its upload nor a broken version."""
        try:
            for what, value in (("model", name), ("version", version)):
                if not NAME_PATTERN.match(value):
                    raise MoltError(ErrorCode.BAD_REQUEST,
                                    f"{what} {value[:80]!r}: must be {NAME_RULE}")  # fmt: skip
            folder = self.sup.uploads.folder(upload)
            async with self.sup.changing(name, f"deploy {version}") as model:
                phases = Phases(model, f"deploy {version}", progress)
                try:
                    return await self._deploy(model, upload, folder, version, files, activate,
                                              force, source, peer, phases)  # fmt: skip
                except MoltError:
                    if not (self.sup.config.models_dir / name / version).exists():
                        model.broken.pop(version, None)
                    raise
        finally:  # published (renamed away) or refused: the upload is over either way
            await asyncio.to_thread(self.sup.uploads.discard, upload)

    async def _deploy(self, model: Model, upload: str, folder: Path, version: str,
                      files: dict[str, str], activate: bool, force: bool, source: str,
                      peer: str, phases: Phases) -> dict[str, Any]:  # fmt: skip
        name = model.name
        target = self.sup.config.models_dir / name / version
        if target.exists():
            raise _already_exists(name, version, target)
        phases("receiving", f"sha256 of {plural(len(files), 'file')}")
        manifest = await self._received(folder, name, version, files, source, peer)
        return await self.publish(model, upload, manifest, force, phases, activate)

    async def publish(self, model: Model, upload: str, manifest: Manifest, force: bool,
                      phases: Phases, activate: bool = False,
                      canary: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Prove a staged version (an upload, a conversion's result) like a switch would,
        publish it with one rename, then switch to it, start it as a canary, or stop it."""
        name, version = model.name, manifest.version
        target = self.sup.config.models_dir / name / version
        folder = self.sup.uploads.folder(upload)
        found = await self._candidate(model, version, folder, force, phases, manifest)
        phases("publishing", f"{target}")
        async with self._or_retire(found):
            try:
                await asyncio.to_thread(_publish, self.sup.uploads, upload, manifest, target)
            except OSError as exc:
                raise storage_error(exc, f"cannot publish {target}") from None
            found.pool.set_spec(dataclasses.replace(found.pool.spec, path=target / MODEL_FILE))
            log.info("model {model} {version} deployed", model=name, version=version,
                     peer=manifest.deployed_by)  # fmt: skip
            if canary:
                result = await self._published_as(model, found, target,
                                                  self._start_canary(model, found, canary,
                                                                     phases))  # fmt: skip
            elif activate:
                result = await self._published_as(model, found, target,
                                                  self._cut_over(model, found, phases))  # fmt: skip
        if not (activate or canary):
            await self.sup.retire(found.pool)
            result = {"model": name, "to": version, "changed": False,
                      "changes": found.changes, "seconds": phases.done()}  # fmt: skip
        return {**result, "deployed": str(target), "sha256": manifest.model_sha256}

    @staticmethod
    async def _published_as(model: Model, found: Candidate, target: Path,
                            routing: Awaitable[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        """A published version's switch or canary; one that fails leaves it published."""
        try:
            return await routing
        except MoltError as exc:  # published all the same: say so, a retry needs a switch
            raise MoltError(exc.code, f"{target} was deployed but not activated: {exc.message}"
                            f" (moltctl switch {model.name} {found.pool.spec.version} once"
                            " it can be recorded)", exc.details) from None  # fmt: skip

    @staticmethod
    async def _received(
        folder: Path, name: str, version: str, files: dict[str, str], source: str, peer: str
    ) -> Manifest:
        try:
            manifest = await asyncio.to_thread(build_manifest, folder, name, version, peer, source)
        except ManifestError as exc:
            raise MoltError(ErrorCode.BAD_REQUEST, str(exc)) from None
        got = {path: entry.sha256 for path, entry in manifest.files.items()}
        if MODEL_FILE not in got:
            raise MoltError(ErrorCode.BAD_REQUEST, f"the upload has no {MODEL_FILE}")
        for path in sorted(got.keys() | files.keys()):
            if got.get(path) != files.get(path):
                raise MoltError(
                    ErrorCode.BAD_REQUEST,
                    f"{path}: moltctl sent sha256 {str(files.get(path))[:12]}, moltbotd"
                    f" received {str(got.get(path))[:12]}: the upload is incomplete or"
                    " damaged; deploy again",
                )
        return manifest

    # --- which model ---------------------------------------------------------------------

    def _only_model_with(self, repo: dict[str, RepoModel], version: str) -> str:
        having = [n for n, m in repo.items() if version in m.versions and n in self.sup.models]
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

    def _only_model(self, test: Callable[[Model], bool], operation: str) -> str:
        """The model an operation means when it names none: the only one it can apply to."""
        having = [m.name for m in self.sup.models.values() if test(m)]
        if len(having) != 1:
            raise MoltError(
                ErrorCode.BAD_REQUEST,
                f"name the model: moltctl {operation} MODEL"
                f" ({operation} applies to: {', '.join(having) or 'none'})",
            )
        return having[0]


_WHAT = {"warming": "running the warm-up inputs"}


async def _checksum(version_dir: Path, keeps: str) -> str:
    try:
        manifest = read_manifest(version_dir)
    except ManifestError as exc:
        raise MoltError(ErrorCode.VALIDATION_FAILED, f"{exc}{keeps}") from None
    if manifest is None:
        return (
            f"not checked: {version_dir} has no {MANIFEST_FILE} (it was not deployed with moltctl)"
        )
    problems = await asyncio.to_thread(verify, version_dir, manifest)
    if problems:
        raise MoltError(
            ErrorCode.VALIDATION_FAILED,
            f"{version_dir} does not match its {MANIFEST_FILE}: {'; '.join(problems)}{keeps}",
        )
    return "verified"


def _publish(uploads: Uploads, token: str, manifest: Manifest, target: Path) -> None:
    folder = uploads.folder(token)
    write_manifest(folder, manifest)
    uploads.make_durable(token)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(folder, target)  # fails if target appeared meanwhile: versions never change
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise _already_exists(manifest.model, manifest.version, target) from None
        raise
    fsync_dir(target.parent)
    fsync_dir(folder.parent)


def _already_exists(name: str, version: str, target: Path) -> MoltError:
    return MoltError(
        ErrorCode.ALREADY_EXISTS,
        f"model {name} already has a version {version} ({target}); a deployed version"
        " never changes: deploy under a new version",
        {"model": name, "version": version},
    )


def canary_in_progress(model: Model) -> MoltError:
    assert model.canary is not None
    return MoltError(
        ErrorCode.CONFLICT,
        f"model {model.name} has a canary of {model.canary.version} in progress"
        f" ({model.canary.share:.0%} of requests): promote it (moltctl promote {model.name})"
        f" or end it (moltctl rollback {model.name}) first",
        {"model": model.name, "operation": f"canary {model.canary.version}"},
    )


def _state_of(pool: Pool | None) -> dict[str, Any] | None:
    """A stateful version's state pairs and their key, as its worker reported them."""
    return pool.primary.ready_info.get("state") if pool and pool.workers else None


def sessions_reset(old: Pool | None, new: Pool) -> str | None:
    """Why the old version's sessions cannot go on in the new one, if they cannot: its
    state pairs differ (the new version finds the sessions only under the same key)."""
    was, now = _state_of(old), _state_of(new)
    if was is None or old is new or (now is not None and now["key"] == was["key"]):
        return None
    return (f"its session state changes (was {_pairs(was)}; now {_pairs(now)}): every session"
            " starts over")  # fmt: skip


def _pairs(state: dict[str, Any] | None) -> str:
    if state is None:
        return "none"
    return ", ".join(f"{p['output']} -> {p['input']} {p['shape']}" for p in state["pairs"])


def sessions_dir(pool: Pool) -> Path:
    """Where a stateful version's sessions spill (worker/sessions.py)."""
    return Path(str(pool.spec.sessions_dir)) / _state_of(pool)["key"]  # type: ignore[index]
