"""A converted version's accuracy gate report, for people: the lines `moltctl quantize`
and `optimize` print, and the one-line summary in `moltctl versions`."""

from typing import Any

from moltbotd.wire.units import format_duration, format_size


def report_lines(report: dict[str, Any]) -> list[str]:
    """The verdict, each output's errors, the size and the latency, one line each."""
    bounds, inputs = report["bounds"], report["inputs"]
    verdict = "passed" if report["passed"] else "FAILED"
    if report.get("forced"):
        verdict += " (published with --force)"
    lines = [f"gate {verdict}: top-1 >= {bounds['min_top1']:.1%} for classifier outputs,"
             f" relative error <= {bounds['max_relative_error']:.2%} for the others;"
             f" {inputs['evaluation']} inputs from {inputs['from']}"]  # fmt: skip
    for name, out in report["outputs"].items():
        top1 = (f", top-1 agreement {out['top1_agreement']:.1%} of {out['rows']} rows"
                if "top1_agreement" in out else "")  # fmt: skip
        lines.append(f"output {name}: max abs error {out['max_abs_error']:.3g}, mean"
                     f" {out['mean_abs_error']:.3g}, relative {out['relative_error']:.2%}"
                     + top1)  # fmt: skip
    size = report["size"]
    lines.append(f"size {format_size(size['source'])} -> {format_size(size['candidate'])}"
                 f" ({report['size_ratio']:.2f}x)")  # fmt: skip
    latency = [f"batch {batch} {format_duration(ms['source'] / 1000)} ->"
               f" {format_duration(ms['candidate'] / 1000)}"
               for batch, ms in report["latency_ms"].items()]  # fmt: skip
    lines.append("latency (median) " + "; ".join(latency))
    lines.extend(f"refused: {why}" for why in report["failures"])
    return lines


def summary(report: dict[str, Any] | None) -> str | None:
    """`int8-dynamic of v1, gate passed, 0.30x size`; None for a version not converted."""
    if report is None:
        return None
    if "problem" in report:
        return str(report["problem"])
    verdict = "passed" if report["passed"] else "failed, forced"
    return (f"{report['method']} of {report['source']}, gate {verdict},"
            f" {report['size_ratio']:.2f}x size")  # fmt: skip
