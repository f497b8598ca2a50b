"""Budgets: how large one request may be (`max_tokens`) and what a caller may spend per
period (`cost_limit`), per model; the spending kept in a ledger that a crash cannot turn
in a caller's favour.

A request's cost is `cost_per_request + cost_per_token * tokens + cost_per_element *
elements`, its tokens the size of one dimension of one input (`tokens_input`,
`tokens_dim`). It is charged when the request is admitted and given back if its answer is
an error. The caller is who the request's rights name: `uid 1000` on the Unix socket,
`the token of 'alice'` on the network listener.

The ledger (`state_dir/budgets.json`) holds, per period, model and caller, an amount
**reserved** ahead of the spending: a charge that fits under its reservation is admitted
at once; one that does not extends the reservation by `reserve` of the limit and waits
until the file is written (write, fsync, rename; one write for every charge waiting). A
restart counts the whole reservation as spent, so a `kill -9` can cost a caller at most
`reserve x cost_limit` and never lets anyone spend past `cost_limit`. A clean stop
writes what was really spent.
"""

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moltbotd.config import Budget
from moltbotd.durable import atomic_write, storage_error
from moltbotd.logs import get_logger
from moltbotd.wire.protocol import ErrorCode, MoltError

log = get_logger("budgets")
LEDGER = "budgets.json"
Key = tuple[str, str, str]  # period, model, caller ("*": the model's only account)
PERIODS = {"month": "%Y-%m", "day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H"}


def period_of(kind: str, now: float) -> str:
    return time.strftime(PERIODS[kind], time.gmtime(now))


@dataclass(frozen=True)
class Charge:
    key: Key
    amount: float
    written: "asyncio.Future[None] | None"  # the reservation it needs, once on disk


class LedgerError(Exception):
    """The ledger cannot be read: moltbotd does not start rather than forget spending."""


class Ledger:
    """Spent and reserved amounts; the file holds the reservations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reserved: dict[Key, float] = self._read()
        self.spent = dict(self.reserved)  # what a crash left: all of it counts as spent
        self.waiting: list[asyncio.Future[None]] = []
        self.wake = asyncio.Event()

    def _read(self) -> dict[Key, float]:
        try:
            saved = json.loads(self.path.read_text())
            return {(period, model, caller): float(value)
                    for period, models in saved["reserved"].items()
                    for model, callers in models.items()
                    for caller, value in callers.items()}  # fmt: skip
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise LedgerError(f"cannot read the budget ledger {self.path}: {exc!r}; restore"
                              " it, or move it away to start the period with nothing spent"
                              ) from None  # fmt: skip

    def take(self, key: Key, amount: float, limit: float, reserve: float) -> Charge:
        """Charge `amount`; BUDGET_EXCEEDED (with what was spent) when it does not fit."""
        spent = self.spent.get(key, 0.0)
        if spent + amount > limit * (1 + 1e-12):
            raise MoltError(ErrorCode.BUDGET_EXCEEDED, "", {"spent": spent, "limit": limit,
                                                            "cost": amount})  # fmt: skip
        self.spent[key] = spent + amount
        if spent + amount <= self.reserved.get(key, 0.0):
            return Charge(key, amount, None)
        self.reserved[key] = min(limit, spent + amount + reserve * limit)
        written = asyncio.get_running_loop().create_future()
        self.waiting.append(written)
        self.wake.set()
        return Charge(key, amount, written)

    def give_back(self, charge: Charge) -> None:
        self.spent[charge.key] = max(0.0, self.spent.get(charge.key, 0.0) - charge.amount)

    async def keep(self) -> None:
        """Write the reservations whenever a charge waits for them (the supervising task)."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            waiting, self.waiting = self.waiting, []
            try:
                await asyncio.to_thread(self._write, self.reserved)
            except OSError as exc:  # a full disk: the charges waiting are refused, said why
                error = storage_error(exc, f"cannot write the budget ledger {self.path}")
                log.error("cannot write the budget ledger {path}", path=str(self.path),
                          error=error.message)  # fmt: skip
                for future in waiting:
                    if not future.done():
                        future.set_exception(error)
                continue
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    def close(self) -> None:
        """A clean stop: what was spent, not what was reserved."""
        for future in self.waiting:
            if not future.done():
                future.set_exception(MoltError(ErrorCode.SHUTTING_DOWN, "moltbotd is stopping"))
        with contextlib.suppress(OSError):
            self._write(self.spent)

    def _write(self, amounts: dict[Key, float]) -> None:
        current = {period_of(kind, time.time()) for kind in PERIODS}
        tree: dict[str, dict[str, dict[str, float]]] = {}
        for (period, model, caller), value in list(amounts.items()):
            if period in current:  # past periods are over: their spending is forgotten
                tree.setdefault(period, {}).setdefault(model, {})[caller] = value
        atomic_write(self.path, json.dumps({"reserved": tree}, indent=1).encode(), 0o600)

    def usage(self) -> list[dict[str, Any]]:
        return [{"period": period, "model": model, "caller": caller, "spent": value}
                for (period, model, caller), value in sorted(self.spent.items())]  # fmt: skip


Run = Callable[[MoltError | None], "asyncio.Future[Any]"]  # the request, or its fallback


class Budgets:
    """Each model's budget, applied to the requests that reach it (on the socket or the
    network listener: a model with a budget grants no direct channel)."""

    def __init__(self, budget_of: Callable[[str], Budget]) -> None:
        self.budget_of = budget_of  # a served model's settings (they change at a reload)
        self.ledger: Ledger | None = None
        self._keeper: asyncio.Task[None] | None = None

    def open(self, path: Path) -> None:
        """Read the ledger and keep it written from now on."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(path)
        self._keeper = asyncio.get_running_loop().create_task(self.ledger.keep())
        self._keeper.add_done_callback(_keeper_ended)

    def close(self) -> None:
        if self._keeper:
            self._keeper.remove_done_callback(_keeper_ended)
            self._keeper.cancel()
        if self.ledger:
            self.ledger.close()

    def infer(self, params: dict[str, Any], caller: str, run: Run) -> "asyncio.Future[Any]":
        """Admit a request, charge it and run it; one past its caller's cost_limit goes to
        the model's fallback (`run` with the refusal) or is refused."""
        try:
            charge = self.admit(params["model"], caller, params)
        except MoltError as exc:
            if exc.details.get("limit") == "cost_limit":
                return run(exc)
            raise
        if charge is None:
            return run(None)
        return self.charged(charge, lambda: run(None))

    def admit(self, model: str, caller: str, params: dict[str, Any]) -> Charge | None:
        """Check a request against its model's budget and charge it; None: nothing to
        charge. BUDGET_EXCEEDED names the limit."""
        budget = self.budget_of(model)
        if not budget.on:
            return None
        tokens, elements = _measure(budget, params["inputs"])
        if budget.max_tokens is not None and tokens > budget.max_tokens:
            raise MoltError(ErrorCode.BUDGET_EXCEEDED, f"model {model} takes at most"
                            f" {budget.max_tokens} tokens per request (max_tokens: dimension"
                            f" {budget.tokens_dim} of {_which(budget)}); this one has {tokens}",
                            {"limit": "max_tokens", "max_tokens": budget.max_tokens,
                             "tokens": tokens})  # fmt: skip
        if budget.cost_limit is None:
            return None
        cost = (budget.cost_per_request + budget.cost_per_token * tokens
                + budget.cost_per_element * elements)  # fmt: skip
        key = (period_of(budget.period, time.time()), model, caller if budget.per_caller else "*")
        try:
            return self.ledger.take(key, cost, budget.cost_limit, budget.reserve)  # type: ignore[union-attr]
        except MoltError as exc:
            who = caller if budget.per_caller else f"model {model}"
            exc.message = (f"{who} spent {exc.details['spent']:g} of model {model}'s"
                           f" cost_limit {budget.cost_limit:g} this {budget.period}"
                           f" ({key[0]}); this request costs {cost:g}")  # fmt: skip
            exc.details.update({"limit": "cost_limit", "period": key[0]})
            raise

    def charged(self, charge: Charge, run: Callable[[], "asyncio.Future[Any]"]) -> Any:
        """Run a charged request once its charge is on disk; an error gives it back."""
        ledger = self.ledger
        assert ledger is not None

        def settle(answer: "asyncio.Future[Any]") -> None:
            if answer.cancelled() or answer.exception() is not None:
                ledger.give_back(charge)

        if charge.written is None:
            answer = run()
            answer.add_done_callback(settle)
            return answer

        async def after_writing() -> Any:
            try:
                await charge.written  # type: ignore[misc]
            except MoltError:
                ledger.give_back(charge)
                raise
            answer = run()
            answer.add_done_callback(settle)
            return await answer

        return asyncio.ensure_future(after_writing())

    def report(self, model: str | None) -> dict[str, Any]:
        """Spent and remaining this period, by model and caller, for `moltctl budgets`."""
        usage = self.ledger.usage() if self.ledger else []
        rows = [row for row in usage if model in (None, row["model"])]
        for row in rows:
            budget = self.budget_of(row["model"])
            limit = budget.cost_limit
            row.update({"limit": limit, "remaining": None if limit is None
                        else max(0.0, limit - row["spent"])})  # fmt: skip
        return {"ledger": str(self.ledger.path) if self.ledger else None, "usage": rows}


def _keeper_ended(task: "asyncio.Task[None]") -> None:
    """The ledger's writer never ends by itself: if it raised, say so loudly (charges
    waiting for it would wait for ever)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the budget ledger's writer failed; restart moltbotd",
                  exc_info=task.exception())  # fmt: skip


def _which(budget: Budget) -> str:
    return f"input {budget.tokens_input!r}" if budget.tokens_input else "the first input"


def _measure(budget: Budget, inputs: dict[str, Any]) -> tuple[int, int]:
    """A request's tokens and its inputs' elements."""
    shapes = {name: _shape(value) for name, value in inputs.items()}
    elements = sum(math.prod(shape) for shape in shapes.values())
    name = budget.tokens_input or next(iter(shapes), None)
    shape = shapes.get(name, ()) if name is not None else ()
    tokens = shape[budget.tokens_dim] if len(shape) > budget.tokens_dim else 1
    return int(tokens), int(elements)


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, dict) and isinstance(value.get("shape"), list):
        return tuple(int(d) for d in value["shape"] if isinstance(d, int))
    with contextlib.suppress(ValueError):
        return np.shape(value)
    return ()
