"""INT8 dynamic, INT8 static and FP16 variants of bench.py's MLP and CNN, beside FP32,
served through moltbotd: size ratio, latency and throughput.

    .venv/bin/python bench/variants.py            # about 2 min
    .venv/bin/python bench/variants.py --quick --json /tmp/variants.json

Each variant is made by moltbotd itself: `Client.convert` (what `moltctl quantize` sends)
runs the conversion job and the accuracy gate, publishes the version and switches to it,
as an operator would. The static variant is calibrated, and every variant evaluated, on
CALIBRATION inputs drawn like the measured one. Measured per version, as bench.py
measures the library client with default settings: p50/p99 latency at concurrency 1
(`Client()`, a direct channel) and throughput with 16 requests outstanding (16 asyncio
tasks on one `AsyncClient()`), every request batch 1, one intra-op thread per model; and
each version's own file run in this process by onnxruntime at c=1, the served p50 over
that one the ratio to read.
docs/performance.md has the figures.
"""

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import (  # bench/bench.py: run as a script, bench/ is first on sys.path
    FULL,
    MODELS,
    QUICK,
    VERSION,
    Background,
    Case,
    Limits,
    format_background,
    format_machine,
    library_throughput,
    machine,
    measure_latency,
    open_session,
    running_daemon,
)
from moltbotd.demo import save
from moltctl.client import Client
from moltctl.deploying import send_files

NAMES = ("mlp", "cnn")
VARIANTS = {"int8-dynamic": "int8 dynamic", "int8-static": "int8 static", "fp16": "fp16"}
CALIBRATION = 8  # .npy files of one row each
SETTINGS = {"intra_op_threads": 1}


def build(workdir: Path) -> tuple[list[Case], dict[str, Path]]:
    """NAME/v1 for the MLP and the CNN, and a folder of calibration inputs for each."""
    rng = np.random.default_rng(1)
    cases, calibration = [], {}
    for name in NAMES:
        make, description, shape = MODELS[name]
        path = save(make(), workdir / "models", name, VERSION)
        cases.append(Case(name, description, path, {"x": rng.standard_normal(shape).astype(
            np.float32)}))  # fmt: skip
        folder = workdir / "calibration" / name / "calibration"
        folder.mkdir(parents=True)
        for number in range(CALIBRATION):
            np.save(folder / f"{number}.npy", rng.standard_normal(shape).astype(np.float32))
        calibration[name] = folder
    return cases, calibration


def measure(daemon: Any, case: Case, limits: Limits, version: str) -> dict[str, Any]:
    """The active version of case.name: c=1 latency, c=16 throughput (direct channels),
    and the same file's c=1 latency in this process (onnxruntime, one thread)."""
    with Client(daemon.socket) as client:
        call = functools.partial(client.infer, case.name, case.inputs)
        latency = measure_latency(call, limits, daemon.roles(case.name))
    asyncio.run(library_throughput(daemon, case.name, case, limits, limits.warmup_seconds, True))
    run = asyncio.run(library_throughput(daemon, case.name, case, limits, limits.seconds, True))
    session = open_session(case.path.parent.parent / version / "model.onnx")
    local = measure_latency(functools.partial(session.run, None, case.inputs), limits,
                            {"client": [os.getpid()]})  # fmt: skip
    return {"p50_us": latency.p50_us, "p99_us": latency.p99_us, "rps": run.rps,
            "in_process_p50_us": local.p50_us}  # fmt: skip


def convert(daemon: Any, case: Case, method: str, calibration: Path) -> dict[str, Any]:
    """The variant made, gated, published and switched to by moltbotd; its report."""
    with Client(daemon.socket, timeout=600) as client:
        max_frame = client.hello()["max_frame_bytes"]
        files = {f"calibration/{p.name}": p for p in sorted(calibration.iterdir())}
        data, _ = send_files(client, files, max_frame, lambda *_: None)
        result = client.convert(case.name, method, version=VERSION, data=data, activate=True)
    return result["report"]  # type: ignore[no-any-return]


def run(limits: Limits, workdir: Path) -> list[dict[str, Any]]:
    cases, calibration = build(workdir)
    rows = []
    settings = {"models": {case.name: SETTINGS for case in cases}}
    with running_daemon(workdir / "models", workdir, settings) as daemon:
        for case in cases:
            print(f"moltbotd: {case.name} fp32 ...", flush=True)
            base = measure(daemon, case, limits, VERSION)
            rows.append({"model": case.name, "variant": "fp32", "size_ratio": 1.0, **base,
                         "gate": "-"})  # fmt: skip
            for method, label in VARIANTS.items():
                print(f"moltbotd: {case.name} {label} ...", flush=True)
                report = convert(daemon, case, method, calibration[case.name])
                figures = measure(daemon, case, limits, report["version"])
                rows.append({"model": case.name, "variant": label,
                             "size_ratio": report["size_ratio"], **figures,
                             "gate": _gate(report), "report": report})  # fmt: skip
    return rows


def _gate(report: dict[str, Any]) -> str:
    out = report["outputs"]["y"]
    if "top1_agreement" in out:
        return f"top-1 {out['top1_agreement']:.1%}, rel. error {out['relative_error']:.2%}"
    return f"rel. error {out['relative_error']:.2%}"


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ("model", "variant", "size", "p50 us", "p99 us", "in-process p50", "served/in-proc",
              "req/s c=16", "vs fp32", "gate")  # fmt: skip
    base = {row["model"]: row["rps"] for row in rows if row["variant"] == "fp32"}
    lines = [header] + [
        (row["model"], row["variant"], f"{row['size_ratio']:.2f}x", f"{row['p50_us']:.0f}",
         f"{row['p99_us']:.0f}", f"{row['in_process_p50_us']:.0f}",
         f"{row['p50_us'] / row['in_process_p50_us']:.2f}x", f"{row['rps']:.0f}",
         f"{row['rps'] / base[row['model']]:.2f}x", row["gate"])
        for row in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 0.5 s per measurement")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save the numbers here")
    args = parser.parse_args(argv)
    limits = QUICK if args.quick else FULL
    info = machine()
    with Background() as background, tempfile.TemporaryDirectory(prefix="moltvariants-") as tmp:
        rows = run(limits, Path(tmp))
    print("\n" + "\n\n".join([format_machine(info), format_rows(rows),
                               format_background(background)]))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
