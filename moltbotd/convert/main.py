"""The job process: one conversion, asked for on CONTROL, reported on it as it goes.

The daemon spawns `python -m moltbotd.convert CONTROL` as a fresh interpreter, places it
in the model's cgroup, and only then sends the job: the conversion's memory and CPU are
the model's, limited and accounted, never the daemon's. Messages back: `progress` per
phase (loading, calibrating, quantizing or converting or optimizing, evaluating), then
`done` with the gate's report and the `made:` record, or `failed` with an error the
client can read.
"""

import os
import signal
import socket
from pathlib import Path
from typing import Any

from moltbotd.convert import data, gate, methods
from moltbotd.lifeline import die_with_parent
from moltbotd.wire.files import MODEL_FILE
from moltbotd.wire.protocol import RECV_BYTES, ErrorCode, FrameDecoder, MoltError, encode_frame
from moltbotd.wire.signature import Signature, spec_from_ort

_WORK = {"int8-dynamic": "quantizing", "int8-static": "quantizing", "fp16": "converting",
         "optimize": "optimizing"}  # fmt: skip


class Link:
    """Blocking frames over the control socket: one job in, messages out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self) -> dict[str, Any] | None:
        decoder = FrameDecoder(2**32 - 1)  # the daemon is trusted: any frame the header allows
        while data := self.sock.recv(RECV_BYTES):
            for message in decoder.feed(data):
                if isinstance(message, MoltError):
                    raise message  # the daemon wrote a bad frame: a bug, so die loudly
                return message
        return None

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(message))

    def progress(self, phase: str, detail: str) -> None:
        self.send({"progress": {"phase": phase, "detail": detail}})


def main(argv: list[str]) -> int:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    link = Link(socket.socket(fileno=int(argv[1])))
    job = link.receive()
    if job is None:
        return 0
    try:
        link.send({"done": run(job, link)})
    except MoltError as exc:
        link.send({"failed": {"code": exc.code.value, "message": exc.message,
                              "details": exc.details}})  # fmt: skip
        return 1
    except Exception as exc:  # onnxruntime's and the converters' own errors
        message = f"{job['method']} of {job['label']} failed: {type(exc).__name__}: {exc}"[:2000]
        link.send({"failed": {"code": ErrorCode.VALIDATION_FAILED.value, "message": message,
                              "details": {}}})  # fmt: skip
        return 1
    return 0


def run(job: dict[str, Any], link: Link) -> dict[str, Any]:
    source, target = Path(job["source"]), Path(job["target"]) / MODEL_FILE
    link.progress("loading", f"{job['label']} and the evaluation inputs")
    threads = job["threads"]
    original = gate.session(source, threads)
    signature = Signature(tuple(map(spec_from_ort, original.get_inputs())),
                          tuple(map(spec_from_ort, original.get_outputs())))  # fmt: skip
    calibration, evaluation, used = _inputs(job, signature)
    if job["method"] == "int8-static":
        link.progress("calibrating", f"on {len(calibration)} inputs, then quantizing")
    else:
        link.progress(_WORK[job["method"]], job["method"])
    options = job["options"]
    made = methods.convert(methods.Job(job["method"], source, target,
                                       options.get("per_channel", False),
                                       tuple(options.get("exclude", ())),
                                       options.get("level", "extended"), calibration))  # fmt: skip
    link.progress("evaluating", f"source and result on {len(evaluation)} inputs")
    candidate = gate.session(target, threads)
    bounds = gate.Bounds(job["gate"]["min_top1"], job["gate"]["max_relative_error"])
    report = gate.compare(original, candidate, evaluation, gate.classifier_outputs(source), bounds)
    report["inputs"] = {"evaluation": len(evaluation), "from": used}
    report["size"] = {"source": os.path.getsize(source), "candidate": os.path.getsize(target)}
    report["size_ratio"] = report["size"]["candidate"] / report["size"]["source"]
    report["latency_ms"] = gate.latency(original, candidate, evaluation[0], job["batch"])
    return {"report": report, "made": made}


def _inputs(
    job: dict[str, Any], signature: Signature
) -> tuple[list[data.Feed], list[data.Feed], str]:
    """The calibration and evaluation inputs, checked before any work, and where the
    evaluation inputs came from."""
    calibration = _feeds(job, "calibration", signature)
    if job["method"] == "int8-static" and not calibration:
        raise MoltError(ErrorCode.BAD_REQUEST, "static quantization needs calibration"
                        f" inputs: give --calibration DIR, or samples in {job['label']}'s"
                        " model.yaml")  # fmt: skip
    evaluation, used = _feeds(job, "eval", signature), "--eval files"
    if not evaluation:
        evaluation = calibration
        used = "--calibration files" if job["calibration"] else "model.yaml samples"
    if not evaluation:
        raise MoltError(ErrorCode.BAD_REQUEST, f"{job['label']} has nothing to evaluate the"
                        " result on: give --eval DIR (.npy or .npz files), --calibration DIR,"
                        " or model.yaml samples")  # fmt: skip
    return calibration, evaluation, used


def _feeds(job: dict[str, Any], what: str, signature: Signature) -> list[data.Feed]:
    """The inputs of one kind: the files sent for it, else (calibration) the samples."""
    if job[what]:
        return data.from_files(job[what], signature, what)
    if what == "calibration" and job["samples"]:
        return data.from_samples(job["samples"], signature)
    return []
