"""Figures against targets: one table for people, an exit status for make and pytest."""

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure; `target` empty means it is only reported."""

    name: str
    value: str
    target: str = ""
    met: bool = True


def at_most(name: str, value: float, limit: float, unit: str = "") -> Figure:
    shown = f"{value:g}{unit}"
    return Figure(name, shown, f"<= {limit:g}{unit}", value <= limit)


def below(name: str, value: float, limit: float, unit: str = "") -> Figure:
    return Figure(name, f"{value:.2f}{unit}", f"< {limit:g}{unit}", value < limit)


def growth(before: float, after: float) -> float:
    """Relative growth in percent."""
    return 100.0 * (after - before) / before if before else 0.0


def table(rows: Iterable[tuple[str, ...]], header: tuple[str, ...]) -> str:
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def figures_table(figures: list[Figure]) -> str:
    rows = [(f.name, f.value, f.target, "" if not f.target else "ok" if f.met else "MISSED")
            for f in figures]  # fmt: skip
    return table(rows, ("figure", "value", "target", ""))


def missed(figures: list[Figure]) -> list[Figure]:
    return [f for f in figures if not f.met]


def examples(title: str, items: list[str], shown: int = 3) -> str:
    """The first few examples of a finding, indented under a title with the count."""
    if not items:
        return ""
    body = "\n".join("  " + item.replace("\n", "\n  ") for item in items[:shown])
    return f"{title} ({len(items)}, first {min(shown, len(items))}):\n{body}\n"


@dataclass(frozen=True)
class Outcome:
    """A run's figures and the text that shows them."""

    figures: list[Figure]
    text: str

    @property
    def ok(self) -> bool:
        return not missed(self.figures)
