"""Budgets: max_tokens per request and cost_limit per caller and period, against the real
daemon with the library's default client; the ledger across a kill -9 and a clean stop."""

import asyncio
import json
import signal
import time

import pytest

from moltbotd.config import Budget, ConfigError, load
from moltbotd.control.budgets import Budgets, Ledger, LedgerError, period_of
from moltbotd.demo import save, scale_model
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.client import Client
from tests.conftest import run_moltctl, wait_until

X = [[1.0, 2.0, 3.0, 4.0]]  # demo's x: 4 tokens along dimension 1


def budgeted(**budget: object) -> str:
    return "models:\n  demo:\n    budget: " + json.dumps(budget) + "\n"


def test_a_request_over_max_tokens_is_refused_naming_the_limit(daemon_factory):
    daemon = daemon_factory(budgeted(max_tokens=3))
    with Client(daemon.socket) as client, pytest.raises(MoltError) as over:
        client.infer("demo", {"x": X})
    assert over.value.code == ErrorCode.BUDGET_EXCEEDED
    assert over.value.message == (
        "model demo takes at most 3 tokens per request (max_tokens: dimension 1 of the first"
        " input); this one has 4"
    )
    assert over.value.details["limit"] == "max_tokens"


def test_a_caller_past_its_cost_limit_is_refused_and_errors_cost_nothing(daemon_factory):
    daemon = daemon_factory(budgeted(cost_limit=5, cost_per_request=1, period="day"))
    with Client(daemon.socket) as client:
        with pytest.raises(MoltError) as bad:
            client.infer("demo", {"x": [[1.0]]})  # the worker refuses it: given back
        assert bad.value.code == ErrorCode.INVALID_INPUT
        for _ in range(5):
            client.infer("demo", {"x": X})
        with pytest.raises(MoltError) as spent:
            client.infer("demo", {"x": X})
        usage = client.budgets("demo")["usage"]
        metrics = client.metrics()
    assert spent.value.code == ErrorCode.BUDGET_EXCEEDED
    assert spent.value.message.startswith("uid 0 spent 5 of model demo's cost_limit 5 this day")
    assert [(u["caller"], u["spent"], u["remaining"]) for u in usage] == [("uid 0", 5.0, 0.0)]
    assert (
        f'moltbot_budget_spent{{caller="uid 0",model="demo",period="{usage[0]["period"]}"}} 5.0'
        in (metrics)
    )
    shown = run_moltctl("budgets", socket=daemon.socket)
    assert shown.returncode == 0 and "uid 0" in shown.stdout and "5" in shown.stdout


def test_past_its_cost_limit_the_fallback_answers_and_says_why(models_dir, daemon_factory):
    save(scale_model(3.0), models_dir, "thrice", "v1")
    config = budgeted(cost_limit=2) + "    fallback: thrice\n"
    daemon = daemon_factory(config)
    with Client(daemon.socket) as client:
        answers = [client.infer("demo", {"x": X}) for _ in range(3)]
    assert [a.model for a in answers] == ["demo", "demo", "thrice"]
    assert answers[2].fallback_for == "demo"
    assert answers[2].fallback_reason["code"] == "BUDGET_EXCEEDED"
    assert answers[2]["y"][0][0] == 3.0


def test_a_kill_9_never_lets_a_caller_spend_more_and_costs_at_most_the_reserve(daemon_factory):
    daemon = daemon_factory(budgeted(cost_limit=1000, reserve=0.01))
    with Client(daemon.socket) as client:
        for _ in range(25):
            client.infer("demo", {"x": X})
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.kill_group()  # its workers
    daemon.start(wait=False)
    daemon.wait_for_log("ready: serving", count=2)
    with Client(daemon.socket) as client:
        [after_kill] = client.budgets()["usage"]
        client.infer("demo", {"x": X})
    assert 25 <= after_kill["spent"] <= 25 + 10  # the reserve: 1% of 1000
    spent_before_stop = after_kill["spent"] + 1
    daemon.stop()
    daemon.start(wait=False)
    daemon.wait_for_log("ready: serving", count=3)
    with Client(daemon.socket) as client:
        [after_stop] = client.budgets()["usage"]
    assert after_stop["spent"] == spent_before_stop  # a clean stop writes what was spent


def test_the_ledger_reserves_ahead_and_reads_back_what_it_reserved(tmp_path):
    async def scenario() -> tuple[Ledger, list[bool]]:
        ledger = Ledger(tmp_path / "budgets.json")
        keeper = asyncio.ensure_future(ledger.keep())
        key = (period_of("month", time.time()), "m", "uid 1")
        waited = []
        for _ in range(12):
            charge = ledger.take(key, 1.0, 100.0, 0.05)
            waited.append(charge.written is not None)
            if charge.written:
                await charge.written
        with pytest.raises(MoltError) as over:
            ledger.take(key, 90.0, 100.0, 0.05)
        assert over.value.details == {"spent": 12.0, "limit": 100.0, "cost": 90.0}
        keeper.cancel()
        return ledger, waited

    ledger, waited = asyncio.run(scenario())
    # one write per 5 (5% of 100): the charges 1 and 7 waited, the others fit
    assert waited == [True] + [False] * 5 + [True] + [False] * 5
    again = Ledger(tmp_path / "budgets.json")
    assert list(again.spent.values()) == list(ledger.reserved.values()) == [12.0]


def test_a_ledger_that_cannot_be_read_stops_the_start(tmp_path, daemon_factory):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(LedgerError, match="restore it, or move it away"):
        Ledger(tmp_path / "broken.json")
    daemon = daemon_factory(start=False)
    daemon.state_dir.mkdir(parents=True, exist_ok=True)
    (daemon.state_dir / "budgets.json").write_text("[]")
    daemon.start(wait=False)
    wait_until(lambda: daemon.proc.poll() is not None, what="moltbotd to exit")
    assert "cannot read the budget ledger" in daemon.log()


def test_each_caller_has_its_own_limit_unless_the_model_shares_one(tmp_path):
    settings = {"a": Budget(cost_limit=2.0), "b": Budget(cost_limit=2.0, per_caller=False)}
    params = {"inputs": {"x": {"dtype": "float32", "shape": [1, 4], "data": b"\0" * 16}}}

    async def scenario() -> dict[str, list[str]]:
        budgets = Budgets(settings.__getitem__)
        budgets.open(tmp_path / "budgets.json")
        refused: dict[str, list[str]] = {"a": [], "b": []}
        for model in ("a", "b"):
            for caller in ("uid 1", "uid 2", "uid 1", "uid 2", "uid 1"):
                try:
                    charge = budgets.admit(model, caller, params)
                    if charge and charge.written:
                        await charge.written
                except MoltError:
                    refused[model].append(caller)
        budgets.close()
        return refused

    refused = asyncio.run(scenario())
    assert refused == {"a": ["uid 1"], "b": ["uid 1", "uid 2", "uid 1"]}


def test_model_pool_is_read_as_the_documents_write_it(tmp_path):
    file = tmp_path / "moltbotd.yaml"
    file.write_text("model_pool:\n  demo:\n    max_tokens: 512\n    cost_limit: 100\n"
                    "    priority: high\n    fallback: tiny\n")  # fmt: skip
    config = load(file)
    scheduling = config.scheduling_for("demo", config.models["demo"].overrides)
    assert (scheduling.budget.max_tokens, scheduling.budget.cost_limit) == (512, 100.0)
    assert (scheduling.priority, scheduling.fallback) == ("high", "tiny")
    file.write_text("model_pool: {}\nmodels: {}\n")
    with pytest.raises(ConfigError, match="model_pool and models are one setting"):
        load(file)
    file.write_text("models:\n  demo:\n    budget: {cost_limit: -1}\n")
    with pytest.raises(ConfigError, match="cost_limit"):
        load(file)


def test_a_budgeted_model_grants_no_direct_channel(daemon_factory):
    daemon = daemon_factory(budgeted(max_tokens=8))
    with Client(daemon.socket) as client, pytest.raises(MoltError) as refused:
        client._call("channel", {"model": "demo"})
    assert refused.value.code == ErrorCode.CONFLICT
    assert "its budget (max_tokens, cost_limit) is checked here" in refused.value.message
