"""The operation registry: parameter checks, lookup, and that server and moltctl cover it."""

import asyncio
import dataclasses
import types

import click
import pytest

from moltbotd.config import Config
from moltbotd.control import server
from moltbotd.control.rollout import no_progress
from moltbotd.logs import Ring
from moltbotd.wire.operations import OPERATIONS, Operation, Param, lookup
from moltbotd.wire.protocol import PROTOCOL_VERSION, ErrorCode, MoltError
from moltctl import cli as moltctl_cli


def bad_request(op: str, params: dict) -> MoltError:
    with pytest.raises(MoltError) as info:
        OPERATIONS[op].check_params(params)
    assert info.value.code == ErrorCode.BAD_REQUEST
    return info.value


def test_valid_params_are_returned_unchanged():
    params = {"model": "demo", "inputs": {"x": [[1.0]]}, "version": "v1.0", "outputs": ["y"]}
    assert OPERATIONS["infer"].check_params(params) == params


def test_unknown_param_is_named_with_the_known_ones():
    err = bad_request("infer", {"model": "demo", "inputs": {}, "bogus": 1})
    assert "operation 'infer' takes no parameter 'bogus'" in err.message
    takes = (
        "model, inputs, version, outputs, priority, request_id, timeout_ms, cache, session,"
        " reply_shm"
    )
    assert f"(it takes: {takes})" in err.message


def test_several_unknown_params_are_all_named_sorted():
    err = bad_request("status", {"zeta": 1, "alpha": 2})
    assert "takes no parameter 'alpha', 'zeta'" in err.message
    assert "(it takes: model)" in err.message


def test_operation_without_params_says_it_takes_none():
    err = bad_request("health", {"model": "demo"})
    assert "operation 'health' takes no parameter 'model'" in err.message
    assert "(it takes: none)" in err.message


def test_missing_required_param():
    err = bad_request("infer", {"model": "demo"})
    assert err.message == "operation 'infer' needs parameter 'inputs' (a map)"


def test_required_param_given_as_none_is_missing():
    err = bad_request("switch", {"version": None})
    assert "needs parameter 'version' (a string)" in err.message


def test_optional_param_may_be_left_out_or_none():
    assert OPERATIONS["switch"].check_params({"version": "v2.0"}) == {"version": "v2.0"}
    assert OPERATIONS["status"].check_params({"model": None}) == {}  # null: not given
    assert OPERATIONS["logs"].check_params({"after": None, "limit": 5}) == {"limit": 5}


def test_parameter_names_must_be_strings():
    err = bad_request("logs", {1: "x"})
    assert err.message == "operation 'logs': parameter names must be strings"


def test_wrong_type_message():
    err = bad_request("switch", {"model": "demo", "version": 2})
    assert err.message == "operation 'switch': parameter 'version' must be a string, got int 2"


def test_wrong_type_message_for_a_map():
    err = bad_request("infer", {"model": "demo", "inputs": [1, 2]})
    assert "parameter 'inputs' must be a map, got list [1, 2]" in err.message


def test_wrong_type_message_is_capped():
    err = bad_request("infer", {"model": "demo", "inputs": "x" * 1000})
    assert len(err.message) <= 300
    assert err.message.startswith("operation 'infer': parameter 'inputs' must be a map, got str")


@pytest.mark.parametrize("value", [True, False])
def test_bool_rejected_where_int_expected(value):
    err = bad_request("logs", {"after": value})
    assert f"parameter 'after' must be an integer, got bool {value}" in err.message


def test_bool_rejected_where_float_expected():
    err = bad_request("logs", {"since": True})
    assert "parameter 'since' must be a number, got bool True" in err.message


def test_float_rejected_where_int_expected():
    err = bad_request("logs", {"limit": 2.5})
    assert "parameter 'limit' must be an integer, got float 2.5" in err.message


def test_int_accepted_where_float_expected():
    assert OPERATIONS["logs"].check_params({"since": 5, "until": 6.5}) == {"since": 5, "until": 6.5}


def test_bool_accepted_where_bool_is_declared():
    op = Operation("x", "test", (Param("flag", (bool,)), Param("n", (int, bool))))
    assert op.check_params({"flag": True, "n": False}) == {"flag": True, "n": False}


def test_describe_type_of_several_types():
    assert Param("p", (str, int)).describe_type() == "a string or an integer"


def test_lookup_known_operation():
    assert lookup("infer") is OPERATIONS["infer"]
    assert lookup("infer").name == "infer"


def test_lookup_unknown_operation_lists_the_known_ones():
    with pytest.raises(MoltError) as info:
        lookup("reboot")
    assert info.value.code == ErrorCode.UNKNOWN_OPERATION
    assert "unknown operation 'reboot'" in info.value.message
    assert info.value.message.endswith(
        "(known: hello, health, status, models, infer, channel, channel_ended, scale, switch,"
        " rollback, promote, metadata, sessions, end_session, reset_session, budgets, versions,"
        " upload, deploy, convert, reload, metrics, audit, logs)"
    )


def test_operations_that_change_what_serves_are_mutating():
    mutating = [name for name, op in OPERATIONS.items() if op.mutating]
    assert mutating == ["scale", "switch", "rollback", "promote", "deploy", "convert", "reload"]


def test_every_operation_name_matches_its_key():
    assert all(op.name == name for name, op in OPERATIONS.items())


# --- coverage by the daemon and by moltctl --------------------------------------------------


ROLLOUT = types.SimpleNamespace(sup=object())
CALLER = server.Caller("test", no_progress)
CLIENTS = server.Clients(Config().clients)
METRICS = object()
AUDIT = object()
BUDGETS = object()


def handlers() -> dict:
    # make_handlers only closes over its arguments: stand-ins are enough.
    return server.make_handlers(ROLLOUT, Ring(100), Config(), object(), CLIENTS,  # type: ignore[arg-type]
                                METRICS, AUDIT, BUDGETS)  # fmt: skip


def test_every_operation_has_a_server_handler():
    made = handlers()
    assert set(made) == set(OPERATIONS)
    assert all(callable(h) for h in made.values())


def test_hello_handler_answers_and_refuses_another_protocol():
    hello = handlers()["hello"]
    answer = asyncio.run(hello({}, CALLER))
    assert answer["protocol"] == PROTOCOL_VERSION
    assert answer["operations"] == list(OPERATIONS)
    assert answer["max_frame_bytes"] == Config().max_frame_bytes
    with pytest.raises(MoltError) as info:
        asyncio.run(hello({"protocol": PROTOCOL_VERSION + 1}, CALLER))
    assert info.value.code == ErrorCode.UNSUPPORTED_PROTOCOL
    assert info.value.details == {"supported": [PROTOCOL_VERSION]}


def test_logs_handler_rejects_an_unknown_level():
    logs = handlers()["logs"]
    with pytest.raises(MoltError) as info:
        asyncio.run(logs({"min_level": "loud"}, CALLER))
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert "unknown log level 'loud'" in info.value.message


def test_logs_handler_queries_the_ring():
    ring = Ring(100)
    ring.add({"time": 1.0, "level": "info", "event": "one", "component": "t"})
    ring.add({"time": 2.0, "level": "error", "event": "two", "component": "t"})
    logs = server.make_handlers(ROLLOUT, ring, Config(), object(), CLIENTS,  # type: ignore[arg-type]
                                METRICS, AUDIT, BUDGETS)["logs"]  # fmt: skip
    result = asyncio.run(logs({"min_level": "warn"}, CALLER))
    assert [e["event"] for e in result["entries"]] == ["two"]
    assert result["last_seq"] == 2


def test_every_operation_but_hello_has_a_moltctl_command():
    commands = moltctl_cli.COMMANDS
    group = moltctl_cli.cli
    assert isinstance(group, click.Group)
    for name in OPERATIONS:
        if name == "hello":
            continue
        keys = [key for key, ops in commands.items() if name in ops]
        assert keys, f"operation {name!r} has no moltctl command"
        for key in keys:
            assert key in group.commands, f"moltctl has no command {key!r} for {name!r}"
            assert isinstance(group.commands[key], click.Command)


def test_moltctl_commands_map_onto_real_operations():
    used = {op for ops in moltctl_cli.COMMANDS.values() for op in ops}
    assert "hello" not in used
    assert used <= set(OPERATIONS)


# --- sizes (issue 14) -------------------------------------------------------------------


def test_a_name_over_its_bound_is_refused_naming_the_setting_and_echoing_little():
    err = bad_request("switch", {"version": "v" * 10_000_000})
    assert "parameter 'version' may have at most 256 characters (clients.max_name_chars)" in (
        err.message
    )
    assert "got str of 10000000 characters" in err.message
    assert len(err.message) < 400


def test_text_and_items_have_their_own_bounds():
    limits = Config().clients
    text = "c" * (limits.max_text_chars + 1)
    assert "clients.max_text_chars" in bad_request("logs", {"contains": text}).message
    assert OPERATIONS["logs"].check_params({"contains": "c" * 1000}) == {"contains": "c" * 1000}
    many = {f"x{i}": [1.0] for i in range(limits.max_items + 1)}
    err = bad_request("infer", {"model": "demo", "inputs": many})
    assert "may have at most 10000 entries (clients.max_items)" in err.message


def test_limits_passed_in_are_the_ones_checked():
    limits = dataclasses.replace(Config().clients, max_name_chars=16)
    with pytest.raises(MoltError) as info:
        OPERATIONS["status"].check_params({"model": "m" * 17}, limits)
    assert "at most 16 characters" in info.value.message


def test_a_flood_of_unknown_parameters_names_five_and_counts_the_rest():
    err = bad_request("health", {f"p{i:06}": 1 for i in range(100_000)})
    assert "takes no parameter 'p000000', 'p000001', 'p000002', 'p000003', 'p000004'" in (
        err.message
    )
    assert "(and 99995 more)" in err.message


def test_a_deeply_nested_parameter_is_refused_without_recursion():
    deep: object = 1
    for _ in range(1000):
        deep = [deep]
    err = bad_request("status", {"model": deep})
    assert "parameter 'model' must be a string, got list [[[[...]]]]" in err.message
