"""What a version's folder holds, as the daemon and `moltctl deploy` both name it: the
model file, the version's settings, the manifest, versions in natural order, and the
SHA-256 a deploy announces for each file."""

import hashlib
import re
from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"
MODEL_YAML = "model.yaml"
MANIFEST_FILE = "manifest.json"  # in the version folder, next to model.onnx
REPORT_FILE = "report.json"  # a converted version's accuracy gate (moltctl quantize)
BLOCK = 1 << 20  # models can be gigabytes: hash and copy them 1 MiB at a time
_DIGITS = re.compile(r"(\d+)")


def version_key(version: str) -> tuple[Any, ...]:
    """Natural order: v1.0 < v2.0 < v10.0 (digit runs compare as numbers).

    re.split with a capturing group alternates text and digits, so the element types of
    two keys line up position by position and always compare.
    """
    parts = _DIGITS.split(version)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def sort_versions(versions: list[str]) -> list[str]:
    return sorted(versions, key=version_key)


def hash_file(path: Path) -> tuple[str, int]:
    """The hex SHA-256 and the size of a file's content from one read (1 MiB blocks), so
    they agree even if the file changes meanwhile."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while block := file.read(BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    return hash_file(path)[0]
