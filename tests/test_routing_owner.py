"""Only the supervisor writes which pool serves a model: rollouts propose, it applies."""

import ast
from pathlib import Path

import moltbotd

PACKAGE = Path(moltbotd.__file__).parent
OWNER = PACKAGE / "control" / "supervisor.py"
# The state file's record has fields of the same names; the supervisor writes it through
# Supervisor.save, and a restart routes from it.
RECORD = PACKAGE / "control" / "state.py"
ROUTING = {"active", "canary", "canary_pool", "on_demand"}  # Model's routing fields


def routing_writes(path: Path) -> list[str]:
    """Every assignment to (or deletion of) a routing field in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Attribute) and leaf.attr in ROUTING:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{leaf.lineno} .{leaf.attr}")
    return found


def test_only_the_supervisor_writes_routing_state():
    writes = [
        w
        for p in sorted(PACKAGE.rglob("*.py"))
        if p not in (OWNER, RECORD)
        for w in routing_writes(p)
    ]
    assert writes == []


def test_the_check_sees_the_supervisors_own_writes():
    # The scan is not blind: the owner's writes are found by the same code.
    owner = routing_writes(OWNER)
    assert any(w.endswith(".active") for w in owner)
    assert any(w.endswith(".canary_pool") for w in owner)
