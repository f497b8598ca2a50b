"""What a chatbot's requests cost: a conversation's turn with server-side state against
the client re-sending the state, for a state of 1 MiB, beside in-process onnxruntime
passing the state by hand; and a request the result cache answers.

    .venv/bin/python bench/chat.py [--quick]      (make bench runs it; about 30 s)

The model, `carry`: x float32 [N, 16] and the state s float32 [N, 262144] (1 MiB a row);
s_next = s / 2 + mean(x), y = mean(s_next). It is in the repository twice: `carry`, whose
model.yaml declares the state pair (s_next feeds s), and `carry_resend`, the same file
without it. Each turn is one row, sequential (c=1), through the library's Client() with
default settings (a direct channel):

  in-process    session.run with the state passed by hand (the floor)
  server-side   client.infer("carry", {"x": x}, session=...): 64 bytes go each way
  re-sent       client.infer("carry_resend", {"x": x, "s": state}): the state goes to
                the worker and s_next comes back, 1 MiB each way
  restored      server-side, cycling through 8 sessions with hot_bytes 4 MiB: every turn
                restores its session from disk and spills another (a diagnostic)

And `tiny` (y = 2x, x float32 [1, 4]) with and without `cache: {max_bytes: 1MiB}`, the
same input every time: in process, run by moltbotd, answered from the cache.

The target: a server-side turn's p50 below a re-sent one's. docs/performance.md has the
figures.
"""

import argparse
import itertools
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench import (
    FULL,
    QUICK,
    Latency,
    Limits,
    Target,
    format_machine,
    format_targets,
    machine,
    measure_latency,
    running_daemon,
)
from moltbotd.demo import finish, save, scale_model
from moltctl.client import Client

STATE = 262_144  # floats: 1 MiB a row
SESSIONS_CYCLED = 8  # each 1 MiB, through a 4 MiB hot budget: every turn misses


def carry_model() -> Any:
    """s_next = s / 2 + mean(x), y = mean(s_next): cheap to run, 1 MiB of state."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["s", "half"], ["halved"]),
        helper.make_node("Add", ["halved", "m"], ["s_next"]),
        helper.make_node("ReduceMean", ["s_next"], ["y"], axes=[1], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "carry",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", STATE]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("s_next", TensorProto.FLOAT, ["N", STATE]),
        ],
        [numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    return finish(graph)


def build(models_dir: Path) -> tuple[Path, Path]:
    path = save(carry_model(), models_dir, "carry", "v1")
    (path.parent / "model.yaml").write_text("state: [{input: s, output: s_next}]\n")
    save(carry_model(), models_dir, "carry_resend", "v1")
    tiny = save(scale_model(2.0), models_dir, "tiny", "v1")
    save(scale_model(2.0), models_dir, "tiny_cached", "v1")
    return path, tiny


def in_process(path: Path, tiny: Path, limits: Limits, x: np.ndarray) -> dict[str, Latency]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    small = ort.InferenceSession(str(tiny), options, providers=["CPUExecutionProvider"])
    state = [np.zeros((1, STATE), np.float32)]

    def turn() -> None:
        _, state[0] = session.run(["y", "s_next"], {"x": x, "s": state[0]})

    def tiny_run() -> None:
        small.run(None, {"x": x[:, :4]})

    return {
        "turn": measure_latency(turn, limits, {}),
        "tiny": measure_latency(tiny_run, limits, {}),
    }


def served(client: Client, limits: Limits, x: np.ndarray) -> dict[str, Latency]:
    state = [np.zeros((1, STATE), np.float32)]

    def resend() -> None:
        state[0] = client.infer("carry_resend", {"x": x, "s": state[0]})["s_next"]

    names = itertools.cycle([f"cycled-{n}" for n in range(SESSIONS_CYCLED)])
    turns: dict[str, Callable[[], Any]] = {
        "server-side": lambda: client.infer("carry", {"x": x}, session="one"),
        "re-sent": resend,
        "restored": lambda: client.infer("carry", {"x": x}, session=next(names)),
        "tiny run": lambda: client.infer("tiny", {"x": x[:, :4]}),
        "tiny from the cache": lambda: client.infer("tiny_cached", {"x": x[:, :4]}),
    }
    results = {}
    for name, turn in turns.items():
        print(f"moltbotd: {name} ...", flush=True)
        results[name] = measure_latency(turn, limits, {})
    return results


def table(local: dict[str, Latency], results: dict[str, Latency]) -> str:
    lines = [f"{'c=1, Client()':<30} {'p50 us':>9} {'p99 us':>9} {'x in-proc':>10}"]
    for name, got in [("in-process turn (state by hand)", local["turn"]), *results.items(),
                      ("in-process tiny", local["tiny"])]:  # fmt: skip
        base = local["tiny" if name.startswith(("tiny", "in-process tiny")) else "turn"]
        label = name if name.startswith("in-process") else f"moltbotd {name}"
        lines.append(f"{label:<30} {got.p50_us:>9.0f} {got.p99_us:>9.0f}"
                     f" {got.p50_us / base.p50_us:>10.2f}")  # fmt: skip
    return "\n".join(lines)


def targets(results: dict[str, Latency]) -> list[Target]:
    ours, resent = results["server-side"].p50_us, results["re-sent"].p50_us
    return [Target("a turn with server-side state: p50 below the client re-sending it",
                   f"{ours:.0f} us against {resent:.0f} us ({ours / resent:.2f}x)",
                   ours < resent, ours / resent, 1.0)]  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 0.5 s per measurement")
    limits = QUICK if parser.parse_args(argv).quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="moltbench-sessions-") as tmp:
        workdir = Path(tmp)
        path, tiny = build(workdir / "models")
        print("in-process onnxruntime ...", flush=True)
        local = in_process(path, tiny, limits, x)
        one = {"intra_op_threads": 1}  # as in process
        settings = {"models": {"carry": {**one, "sessions": {"hot_bytes": "4MiB"}},
                               "carry_resend": one, "tiny": one,
                               "tiny_cached": {**one, "cache": {"max_bytes": "1MiB"}}}}  # fmt: skip
        with (
            running_daemon(workdir / "models", workdir, settings) as daemon,
            Client(daemon.socket) as client,
        ):
            results = served(client, limits, x)
    print("\n" + "\n\n".join([
        format_machine(machine()),
        f"moltctl.client.Client() with default settings; {limits.seconds:g} s per measurement",
        table(local, results),
        format_targets(targets(results)),
    ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
