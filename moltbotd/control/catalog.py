"""`moltctl versions`: every version on disk, its state, size, checksum and deploy time,
and for a version `moltctl quantize` or `optimize` made, its accuracy gate's report.

Hashing a model is slow (a second per GB), so a file's sha256 is remembered by its
path, size and modification time, and hashing runs in a thread, off the event loop.
"""

import asyncio
import json
from pathlib import Path
from typing import Any

from moltbotd.control.supervisor import Model, Supervisor
from moltbotd.versions.manifest import Manifest, ManifestError, read_manifest, tree_size
from moltbotd.versions.repository import RepoModel
from moltbotd.wire.files import MODEL_FILE, REPORT_FILE, sha256_file


class Catalog:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self._hashes: dict[tuple[Path, int, int], str] = {}

    async def versions(self, name: str | None) -> dict[str, Any]:
        repo = await self.sup.scan()
        if name is not None:
            if name not in repo:
                self.sup.model(name)  # MODEL_NOT_FOUND, naming what is served
            repo = {name: repo[name]}
        return {"models": [await self._model(repo_model) for repo_model in repo.values()]}

    async def _model(self, repo_model: RepoModel) -> dict[str, Any]:
        model = self.sup.models.get(repo_model.name)
        versions = []
        for version in reversed(repo_model.versions):  # newest first, as people read them
            entry = await asyncio.to_thread(self._describe, repo_model.version_dir(version))
            versions.append({"version": version, **entry, **_state(model, version, entry)})
        return {"name": repo_model.name, "served": model is not None, "versions": versions}

    def _describe(self, version_dir: Path) -> dict[str, Any]:
        """Size, sha256 and deploy facts of one version folder (runs in a thread)."""
        sha256 = self._sha256(version_dir / MODEL_FILE)
        try:
            manifest: Manifest | None = read_manifest(version_dir)
        except ManifestError as exc:
            return {"size": tree_size(version_dir), "sha256": sha256, "verified": False,
                    "problem": str(exc), "deployed_at": None, "deployed_by": None}  # fmt: skip
        recorded = manifest.model_sha256 if manifest else None
        verified = None if manifest is None else recorded == sha256
        problem = None if verified is not False else f"{MODEL_FILE} differs from its manifest"
        deployed_at = (
            manifest.deployed_at if manifest else (version_dir / MODEL_FILE).stat().st_mtime
        )
        return {"size": tree_size(version_dir), "sha256": sha256, "verified": verified,
                "problem": problem, "deployed_at": deployed_at,
                "deployed_by": manifest.deployed_by if manifest else None,
                "report": _report(version_dir)}  # fmt: skip

    def _sha256(self, file: Path) -> str:
        stat = file.stat()
        key = (file, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(file)
        return self._hashes[key]


def _report(version_dir: Path) -> dict[str, Any] | None:
    """The accuracy gate's report of a converted version (None for any other); one that
    cannot be read says so rather than hiding the version."""
    try:
        report = json.loads((version_dir / REPORT_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"problem": f"{REPORT_FILE} cannot be read: {exc}"}
    return report if isinstance(report, dict) else {"problem": f"{REPORT_FILE} is no object"}


def _state(model: Model | None, version: str, entry: dict[str, Any]) -> dict[str, Any]:
    """active, canary, loaded (on demand), broken or available; with the reason if broken."""
    if model and model.active and model.active.spec.version == version:
        return {"state": "active", "pid": model.active.primary.pid}
    if model and model.canary and model.canary.version == version and model.canary_pool:
        return {
            "state": "canary",
            "pid": model.canary_pool.primary.pid,
            "share": model.canary.share,
        }
    if model and version in model.on_demand:
        return {"state": "loaded", "pid": model.on_demand[version].primary.pid}
    why = (model.broken.get(version) if model else None) or entry["problem"]
    return {"state": "broken", "error": why} if why else {"state": "available"}
