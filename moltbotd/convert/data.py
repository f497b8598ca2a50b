"""Calibration and evaluation inputs: .npy and .npz files, or model.yaml's samples.

A .npy file holds the value of a model's only input; a .npz file holds one array per
input, named after it. Every value is checked against the source model's signature
(wire/signature.py, the check a request gets) before any work starts, so data that does
not fit the model is refused with the input named, what it expects and what came.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moltbotd.wire.protocol import ErrorCode, MoltError, decode_tensor, encode_tensor
from moltbotd.wire.signature import Signature, check_inputs

Feed = dict[str, np.ndarray]  # input name -> value: one run of the model
SUFFIXES = (".npy", ".npz")


def from_files(files: Sequence[str], signature: Signature, what: str) -> list[Feed]:
    """One feed per file, in the order given (the client sends them sorted by name)."""
    return [_from_file(Path(file), signature, what) for file in files]


def from_samples(samples: Sequence[Mapping[str, Any]], signature: Signature) -> list[Feed]:
    """model.yaml's samples (nested lists), as the worker's warm-up reads them."""
    return [_checked(f"model.yaml sample {number}", signature, dict(sample))
            for number, sample in enumerate(samples, 1)]  # fmt: skip


def _from_file(file: Path, signature: Signature, what: str) -> Feed:
    where = f"{what} file {file.name}"
    if file.suffix not in SUFFIXES:
        raise MoltError(ErrorCode.INVALID_INPUT, f"{where}: expected a .npy or .npz file")
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"": loaded}  # a .npy file: the value of the model's only input
        else:
            with loaded:
                arrays = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError) as exc:
        raise MoltError(ErrorCode.INVALID_INPUT, f"{where}: cannot read it ({exc})") from None
    if "" in arrays:
        if len(signature.inputs) != 1:
            names = ", ".join(spec.describe() for spec in signature.inputs)
            raise MoltError(
                ErrorCode.INVALID_INPUT,
                f"{where}: a .npy file holds one array, but the model has inputs {names}:"
                " give a .npz file with one array per input, named after it",
            )
        arrays = {signature.inputs[0].name: arrays[""]}
    return _checked(where, signature, {name: encode_tensor(a) for name, a in arrays.items()})


def _checked(where: str, signature: Signature, values: dict[str, Any]) -> Feed:
    checked = check_inputs(where, signature, values)
    return {name: decode_tensor(tensor) for name, tensor in checked.items()}


def rows(feed: Feed, count: int) -> Feed:
    """The feed with `count` rows along the first dimension (its rows repeated or cut),
    for latency at a given batch size."""
    return {name: np.resize(value, (count, *value.shape[1:])) for name, value in feed.items()}
