"""The model repositories the stress tools serve, and the answers their models owe.

Every model here is y = factor * x (moltbotd.demo.scale_model) with a factor per
version, so an answer tells which version computed it: a wrong version's answer, or
another request's, does not pass `right_answer`.
"""

from pathlib import Path

import numpy as np

from moltbotd.demo import save, scale_model, write_demo_repository
from tests.models import multi_io_model

# demo's factors are moltbotd.demo's; twin is a second model with two versions.
FACTORS = {"demo": {"v1.0": 2.0, "v2.0": 10.0}, "twin": {"v1": 3.0, "v2": 5.0}}


def write_fuzz_repository(repo: Path) -> None:
    """demo v1.0 and v2.0, iris v1 (non-tensor outputs), multi v1 (two dtypes)."""
    write_demo_repository(repo)
    save(multi_io_model(), repo, "multi", "v1")


def write_soak_repository(repo: Path) -> None:
    for model, versions in FACTORS.items():
        for version, factor in versions.items():
            save(scale_model(factor), repo, model, version)


def tagged(*tag: int) -> np.ndarray:
    """A [1, 4] input that carries the request's tag, so its answer is its own."""
    row = [*tag, 1.0, 1.0, 1.0, 1.0][:4]
    return np.array([row], np.float32)


def right_answer(model: str, version: str, x: np.ndarray, y: object) -> bool:
    """Whether y is what `version` of `model` computes from x."""
    factor = FACTORS[model].get(version)
    return factor is not None and np.array_equal(y, x * np.float32(factor))
