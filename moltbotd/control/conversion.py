"""`moltctl quantize` and `moltctl optimize`: a cheaper version of a model, proven and
published like a deploy.

The daemon runs no model, so the work (loading, calibrating, converting, evaluating) is
a job process (moltbotd/convert/) in a sibling of the source version's cgroup, with its
limits. The job writes model.onnx into a staged upload and answers with the accuracy
gate's report; the daemon adds model.yaml (the source's settings and a `made:` record
of how) and report.json, and refuses a result that fails the gate unless forced. What
passes goes through the deploy's own path (`Rollout.publish`): manifest, checksums, a
worker that loads and warms it, one rename; then a switch or a canary if asked.
"""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import yaml

from moltbotd.config import NAME_PATTERN, NAME_RULE, ConfigError
from moltbotd.control.rollout import Phases, Progress, Rollout, canary_in_progress
from moltbotd.control.supervisor import Model, version_not_found
from moltbotd.durable import storage_error
from moltbotd.isolation.cgroups import CgroupError
from moltbotd.logs import get_logger
from moltbotd.serving.jobs import run_job
from moltbotd.serving.process import WorkerSpec
from moltbotd.versions.manifest import build_manifest
from moltbotd.versions.repository import RepoModel
from moltbotd.wire.files import MODEL_YAML, REPORT_FILE, sha256_file
from moltbotd.wire.operations import CONVERSIONS, OPTIMIZATION_LEVELS
from moltbotd.wire.protocol import ErrorCode, MoltError

log = get_logger("convert")
DATA_KINDS = ("calibration", "eval")  # the folders of a `data` upload
SUFFIX = {"int8-dynamic": "int8", "int8-static": "int8-static", "fp16": "fp16",
          "optimize": "opt"}  # fmt: skip


class Conversions:
    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout
        self.sup = rollout.sup

    async def convert(self, p: dict[str, Any], peer: str, progress: Progress) -> dict[str, Any]:
        """The `convert` operation; the data upload it names is used up either way."""
        try:
            return await self._convert(p, peer, progress)
        except ConfigError as exc:  # the source's model.yaml
            raise MoltError(ErrorCode.INVALID_CONFIG, str(exc)) from None
        finally:
            if p.get("data"):
                await asyncio.to_thread(self.sup.uploads.discard, p["data"])

    async def _convert(self, p: dict[str, Any], peer: str, progress: Progress) -> dict[str, Any]:
        _check_options(p)
        name = p["model"]
        repo = await self.sup.scan()
        repo_model = repo.get(name)
        if repo_model is None:
            self.sup.model(name)  # MODEL_NOT_FOUND, naming the models there are
            raise version_not_found(name, p.get("version", "?"), None)
        source = p.get("version") or self._active(name, repo_model)
        if source not in repo_model.versions:
            raise version_not_found(name, source, repo_model)
        await asyncio.to_thread(_check_source, repo_model, source, p["method"])
        target = p.get("to") or _derived_name(source, p["method"], repo_model)
        if not NAME_PATTERN.match(target):
            raise MoltError(ErrorCode.BAD_REQUEST, f"version {target[:80]!r}: must be {NAME_RULE}")
        if target in repo_model.versions:
            raise MoltError(ErrorCode.ALREADY_EXISTS, f"model {name} already has a version"
                            f" {target}; choose another name (--as)",
                            {"model": name, "version": target})  # fmt: skip
        data = self.sup.uploads.folder(p["data"]) if p.get("data") else None
        async with self.sup.changing(name, f"convert {source} to {target}") as model:
            if p.get("canary") and model.canary:
                raise canary_in_progress(model)
            if p.get("canary") and not model.active:
                raise MoltError(ErrorCode.BAD_REQUEST, f"model {name} is not served: a canary"
                                " needs a version serving beside it; use --activate")  # fmt: skip
            phases = Phases(model, f"convert {target}", progress)
            staged = await asyncio.to_thread(self.sup.uploads.stage)
            try:
                return await self._make(p, model, repo_model, source, target, data, staged,
                                        peer, phases)  # fmt: skip
            finally:  # published (renamed away) or refused: the staging is over either way
                await asyncio.to_thread(self.sup.uploads.discard, staged)

    def _active(self, name: str, repo_model: RepoModel) -> str:
        model = self.sup.models.get(name)
        return model.active.spec.version if model and model.active else repo_model.latest

    async def _make(self, p: dict[str, Any], model: Model, repo_model: RepoModel, source: str,
                    target: str, data: Path | None, staged: str, peer: str,
                    phases: Phases) -> dict[str, Any]:  # fmt: skip
        name, method, force = model.name, p["method"], bool(p.get("force"))
        source_dir = repo_model.version_dir(source)
        spec, scheduling = self.sup.spec(name, source, source_dir)
        folder = self.sup.uploads.folder(staged)
        job = self._job(p, f"model {name} {source}", spec, folder, data)
        job["batch"] = scheduling.batching.max_batch_size
        group = None
        try:  # the group's files, then the job's move into it (pids.max may refuse it)
            group = self.sup.isolation.place(name, source, spec.limits, job="convert")
            done = await run_job(job, group, spec.limits, self.sup.config.conversion.timeout,
                                 job["label"], phases)  # fmt: skip
        except CgroupError as exc:
            raise MoltError(ErrorCode.RESOURCE_EXHAUSTED, f"model {name} {source}: {exc}") from None
        finally:
            if group:
                await self.sup.isolation.forget(group)
        passed = done["report"]["passed"]
        report = {"model": name, "version": target, "source": source, "method": method,
                  **done["report"], "forced": force and not passed}  # fmt: skip
        log.info("model {model}: {method} of {source} {verdict} the gate", model=name,
                 method=method, source=source,
                 verdict="passed" if passed else "failed")  # fmt: skip
        if not passed and not force:
            raise MoltError(ErrorCode.VALIDATION_FAILED, f"model {name}: the {method} version of"
                            f" {source} fails the accuracy gate: {'; '.join(report['failures'])};"
                            " nothing was published (--force publishes it anyway)",
                            {"report": report})  # fmt: skip
        phases("writing", f"{MODEL_YAML} with how it was made, {REPORT_FILE}")
        digest = await asyncio.to_thread(sha256_file, spec.path)
        made = {**done["made"], "source": {"version": source, "sha256": digest},
                "made_at": time.time(), "made_by": peer}  # fmt: skip
        try:
            manifest = await asyncio.to_thread(_write_version, folder, source_dir, made, report,
                                               name, target, peer)  # fmt: skip
        except OSError as exc:
            raise storage_error(exc, f"cannot write the new version in {folder}") from None
        result = await self.rollout.publish(model, staged, manifest, force, phases,
                                            bool(p.get("activate")), p.get("canary"))  # fmt: skip
        return {**result, "report": report}

    def _job(self, p: dict[str, Any], label: str, spec: WorkerSpec, folder: Path,
             data: Path | None) -> dict[str, Any]:  # fmt: skip
        """What the job process is told: the source, where to write, how, on what inputs."""
        gate = self.sup.config.conversion
        bounds = {"min_top1": p.get("min_top1", gate.min_top1_agreement),
                  "max_relative_error": p.get("max_error", gate.max_relative_error)}  # fmt: skip
        options = {key: p[key] for key in ("per_channel", "exclude", "level") if key in p}
        return {"label": label, "method": p["method"], "source": str(spec.path),
                "target": str(folder), "options": options, "gate": bounds,
                **{kind: _files(data, kind) for kind in DATA_KINDS},
                "samples": list(spec.samples),
                "threads": spec.session.intra_op_threads}  # fmt: skip


def _check_options(p: dict[str, Any]) -> None:
    method = p["method"]
    if method not in CONVERSIONS:
        raise MoltError(ErrorCode.BAD_REQUEST, f"method {method[:40]!r}: expected one of"
                        f" {', '.join(CONVERSIONS)}")  # fmt: skip
    if p.get("level", "extended") not in OPTIMIZATION_LEVELS:
        raise MoltError(ErrorCode.BAD_REQUEST, f"level {p['level'][:40]!r}: expected one of"
                        f" {', '.join(OPTIMIZATION_LEVELS)}")  # fmt: skip
    if "level" in p and method != "optimize":
        raise MoltError(ErrorCode.BAD_REQUEST, "level applies to optimize only")
    if method == "optimize" and ("exclude" in p or "per_channel" in p):
        raise MoltError(ErrorCode.BAD_REQUEST, "optimize takes no exclude or per_channel:"
                        " onnxruntime's graph optimizations apply to the whole graph")  # fmt: skip
    if not all(isinstance(name, str) for name in p.get("exclude", ())):
        raise MoltError(ErrorCode.BAD_REQUEST, "exclude: expected a list of node names or"
                        " operator types")  # fmt: skip
    for key in ("min_top1", "max_error"):
        if key in p and not 0 <= p[key] <= 1:
            raise MoltError(ErrorCode.BAD_REQUEST, f"{key}: expected a share from 0 to 1,"
                            f" got {p[key]!r}")  # fmt: skip
    canary = p.get("canary")
    if canary is not None and not 0 < canary < 1:
        raise MoltError(ErrorCode.BAD_REQUEST, f"canary share must be above 0 and below 1"
                        f" (10% is 0.1), got {canary!r}")  # fmt: skip
    if canary and p.get("activate"):
        raise MoltError(ErrorCode.BAD_REQUEST, "give activate or canary, not both")


def _check_source(repo_model: RepoModel, source: str, method: str) -> None:
    """Quantizing a version that is already quantized compounds the error and the
    quantizer fails on its own output: name the version it was made from instead."""
    made = repo_model.model_yaml(source).made or {}
    if method != "optimize" and made.get("method", "optimize") != "optimize":
        origin = made.get("source", {}).get("version", "?")
        raise MoltError(ErrorCode.BAD_REQUEST, f"model {repo_model.name} {source} is already"
                        f" {made['method']} (made from {origin}): convert {origin} instead"
                        f" (moltctl quantize {repo_model.name} {origin} ...)")  # fmt: skip


def _derived_name(source: str, method: str, repo_model: RepoModel) -> str:
    """SOURCE-int8 (-fp16, -opt, ...), or with -2, -3 ... the first that is free; the
    source's part cut so that the whole stays a valid name."""
    suffix = SUFFIX[method]
    for number in range(1, 1000):
        tail = f"-{suffix}" + (f"-{number}" if number > 1 else "")
        name = source[: 64 - len(tail)] + tail
        if name not in repo_model.versions:
            return name
    raise MoltError(ErrorCode.ALREADY_EXISTS, f"{source}-{suffix}: every name is taken; give --as")


def _files(data: Path | None, kind: str) -> list[str]:
    """The data upload's files of one kind, by name: calibration/*.npy, eval/*.npz."""
    folder = data / kind if data else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(str(path) for path in folder.iterdir() if path.is_file())


def _write_version(folder: Path, source_dir: Path, made: dict[str, Any], report: dict[str, Any],
                   name: str, version: str, peer: str) -> Any:  # fmt: skip
    """model.yaml (the source's settings, and how this version was made), report.json,
    then the manifest of all three files: a converted version is a version like any other."""
    source_yaml = source_dir / MODEL_YAML
    settings = yaml.safe_load(source_yaml.read_text()) if source_yaml.exists() else None
    settings = {**(settings or {}), "made": made}
    (folder / MODEL_YAML).write_text(yaml.safe_dump(settings, sort_keys=False))
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    source = f"{made['source']['version']} ({made['method']}, {made['tool']})"
    return build_manifest(folder, name, version, peer, source)
