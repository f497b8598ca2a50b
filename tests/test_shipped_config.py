"""The shipped etc/moltbot/moltbotd.yaml lists every setting at its default, as
docs/configuration.md promises: walked from moltbotd/config.py's declarations, so a
setting added there without its line in the file fails here.

(tests/test_moltbotd_cli.py checks that the file loads to the defaults; that alone
passes for a file that leaves settings out, as it left all of `scheduling:` out.)
"""

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from moltbotd.config import Config

SHIPPED = Path(__file__).resolve().parent.parent / "etc/moltbot/moltbotd.yaml"


def settings(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """Every setting under `cls` by its dotted key; sections walked, `models` (a map of
    entries, not a setting) left out."""
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            yield from settings(f.metadata["section"], f"{prefix}{f.name}.")
        elif "convert" in f.metadata:
            yield f"{prefix}{f.name}", f


def shipped_value(key: str) -> Any:
    data = yaml.safe_load(SHIPPED.read_text())
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            pytest.fail(f"{SHIPPED.name} does not set {key} (add it at its default, commented)")
        data = data[part]
    return data


@pytest.mark.parametrize(
    ("key", "declared"), [pytest.param(key, f, id=key) for key, f in settings(Config)]
)
def test_the_shipped_file_sets_every_setting_to_its_default(key, declared) -> None:
    value = declared.metadata["convert"](shipped_value(key))
    assert value == declared.default, f"{key}: {value!r} in the file, default {declared.default!r}"
