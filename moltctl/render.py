"""Output for humans (aligned tables, humanised numbers) and for scripts (JSON, raw numbers)."""

import json
from typing import Any

import numpy as np

Column = tuple[str, str]  # (header, key in the row)


def table(rows: list[dict[str, Any]], columns: list[Column], legend: bool = True) -> str:
    cells = [[_cell(row.get(key)) for _, key in columns] for row in rows]
    if legend:
        cells.insert(0, [header for header, _ in columns])
    if not cells:
        return ""
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=_jsonable, sort_keys=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def preview(value: Any, limit: int = 200) -> str:
    """A one-line glimpse of an output value for the table view."""
    if isinstance(value, np.ndarray):
        text = np.array2string(value, threshold=20, edgeitems=3, max_line_width=10_000)
    else:
        text = json.dumps(value, default=_jsonable)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
