"""Event names are stable: every log call in moltbotd names its event with a fixed
template, the variable parts in fields (the journal's MESSAGE_ID is made from it)."""

import ast

from moltbotd.wire.loglines import fill, render_message
from tests.conftest import ROOT

LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def log_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LEVELS
        and (
            (isinstance(node.func.value, ast.Name) and node.func.value.id == "log")
            or (isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "log")
        )
    ]


def test_every_event_is_a_fixed_template():
    unstable, checked = [], 0
    for file in sorted((ROOT / "moltbotd").rglob("*.py")):
        for call in log_calls(ast.parse(file.read_text())):
            checked += 1
            first = call.args[0] if call.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                unstable.append(f"{file.relative_to(ROOT)}:{call.lineno}")
    assert checked > 60
    assert unstable == [], "log events made at run time (use a template and fields)"


def test_a_template_is_filled_from_its_fields_and_the_rest_follow():
    fields = {"model": "demo", "version": "v2.0", "share": 0.25, "pid": 7}
    assert render_message("model {model}: canary {version} takes {share:.0%}", fields) == (
        "model demo: canary v2.0 takes 25% pid=7"
    )
    assert fill("{missing} and {model:d}", fields) == ("{missing} and {model:d}", set())
    assert fill("a lone { brace", fields) == ("a lone { brace", set())
    assert render_message("failed", {"exception": "Traceback ..."}) == "failed\nTraceback ..."
