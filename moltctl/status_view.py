"""`moltctl status` for people: one row per model, and limits and usage for one model."""

import time
from typing import Any

from moltbotd.wire.units import format_duration, format_size, plural
from moltctl.render import table

COLUMNS = [("MODEL", "model"), ("VERSION", "version"), ("STATE", "state"), ("PID", "pid"),
           ("INST", "instances"), ("UPTIME", "uptime"), ("REQUESTS", "requests"),
           ("ERRORS", "errors"), ("RESTARTS", "restarts"), ("QUEUE", "queue"),
           ("INFLIGHT", "inflight"), ("CPU", "cpu"), ("MEMORY", "memory"),
           ("DETAIL", "detail")]  # fmt: skip


def status_table(report: dict[str, Any], legend: bool) -> str:
    rows = [row for m in report["models"] for row in _rows(m)]
    body = table(rows, COLUMNS, legend)
    if not legend:
        return body
    lines = [_headline(report), body]
    if len(report["models"]) == 1 and report["models"][0]["worker"]:
        lines += model_detail(report["models"][0]["worker"])
    lines += [_event(m["name"], e) for m in report["models"] for e in m.get("events", [])[-3:]]
    return "\n".join(lines)


def _rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The active version's row, then a canary's and versions loaded on demand."""
    rows = [_row(m)]
    canary = m.get("canary")
    if canary and canary["worker"]:
        role = f"canary {canary['share']:.0%}: {canary['errors']}/{canary['requests']} failed"
        rows.append(_row({**m, "worker": canary["worker"], "active_version": canary["version"],
                          "operation": None}, role))  # fmt: skip
    for version, worker in m.get("on_demand", {}).items():
        rows.append(_row({**m, "worker": worker, "active_version": version,
                          "operation": None}, "loaded on demand"))  # fmt: skip
    return rows


def _event(model: str, event: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    return f"{when} {model}: {event['message']}"


def _headline(report: dict[str, Any]) -> str:
    iso = report["isolation"]
    enforced = "limits enforced" if iso["enforced"] else "no limits enforced"
    return (f"{report['server']} (pid {report['pid']}), up {format_duration(report['uptime'])},"
            f" {plural(report['served'], 'model')} served, socket {report['socket']},"
            f" isolation {iso['mode']}: {enforced}")  # fmt: skip


def _row(m: dict[str, Any], role: str | None = None) -> dict[str, Any]:
    w = m["worker"] or {}
    usage = w.get("usage") or {}
    detail = (role or m["operation"] or trouble(w) or w.get("error") or m["error"]
              or ",".join(w.get("providers", [])))  # fmt: skip
    cpu = usage.get("cpu_percent")
    return {"model": m["name"], "version": m["active_version"],
            "state": w.get("state", "failed"), "pid": w.get("pid"),
            "uptime": w.get("uptime") and format_duration(w["uptime"]),
            "requests": w.get("requests"), "errors": w.get("errors"),
            "restarts": w.get("restarts"), "inflight": w.get("inflight"),
            "instances": w.get("instances") and len(w["instances"]),
            "queue": w.get("queue") and w["queue"]["depth"],
            "cpu": None if cpu is None else f"{cpu:g}%",
            "memory": usage.get("memory_current") and format_size(usage["memory_current"]),
            "detail": detail}  # fmt: skip


def trouble(pool: dict[str, Any]) -> str | None:
    """A circuit not closed, or a failed health check, in a few words for the table."""
    circuit, check = pool.get("circuit"), pool.get("health_check")
    if circuit and circuit["state"] != "closed":
        retry = circuit["retry_in"]
        again = "" if retry is None else f", tried again in {format_duration(retry)}"
        return f"circuit {circuit['state']}{again}: {circuit['why']}"
    if check and check["unhealthy"]:
        return f"unhealthy: {check['unhealthy']}"
    return None


def circuit_detail(pool: dict[str, Any]) -> list[str]:
    """The circuit and the health checks of one version, for `moltctl status MODEL`
    (none from a daemon older than them)."""
    circuit, check = pool.get("circuit"), pool.get("health_check")
    if circuit is None or check is None:
        return []
    most, least = circuit["max_failure_rate"], circuit["min_requests"]
    lines = [f"circuit  {circuit['state']}: {circuit['failures']} of {circuit['requests']}"
             f" failed within {format_duration(circuit['window'])} (opens above {most:.0%}"
             f" once {least} came)"]  # fmt: skip
    if circuit["why"]:
        lines.append(f"         opened: {circuit['why']}")
    outcomes = ", ".join(f"{n} {k}" for k, n in check["outcomes"].items())
    every = f"off ({check['off']})" if check["off"] else (
        f"every {format_duration(check['interval'])} on {check['input']}")  # fmt: skip
    health = f"; unhealthy: {check['unhealthy']}" if check["unhealthy"] else ""
    return [*lines, f"checks   {every}: {outcomes}{health}"]


def model_detail(worker: dict[str, Any]) -> list[str]:
    """Limits in force and the kernel's counters, for `moltctl status MODEL`."""
    lim, use = worker["limits"], worker.get("usage")
    lines = [
        "",
        *scheduling_detail(worker),
        *circuit_detail(worker),
        f"limits   {limits_text(lim)}",
    ]
    if not use:
        return [*lines, "usage    not measured: no cgroup (see isolation above)"]
    cpu = use["cpu_percent"]
    return [*lines,
            f"usage    cpu {'-' if cpu is None else f'{cpu:g}%'}"
            f" (throttled {use['cpu_throttled_count']} times,"
            f" {use['cpu_throttled_seconds']:.2f}s)"
            f" | memory {_measured(use['memory_current'])}"
            f" (peak {_measured(use['memory_peak'])}),"
            f" {use['oom_kills']} OOM kills"
            f" | io read {format_size(use['io_read_bytes'])},"
            f" written {format_size(use['io_write_bytes'])}"
            f" | pids {use['pids_current']}",
            f"cgroup   {worker['cgroup']}"]  # fmt: skip


def scheduling_detail(pool: dict[str, Any]) -> list[str]:
    """Queue, batching and instances of one version, for `moltctl status MODEL`."""
    queue, batching, scaling = pool["queue"], pool["batching"], pool["scaling"]
    waits = batching["queue_ms"]
    by = ", ".join(f"{p} {n}" for p, n in queue["by_priority"].items())
    times = "-" if waits["p50"] is None else f"p50 {waits['p50']:.2f}ms, p99 {waits['p99']:.2f}ms"
    lines = [f"queue    {queue['depth']} waiting ({by}), max {queue['max']}; queue time {times};"
             f" priority {pool['priority']}; fallback {pool['fallback'] or 'none'}"]  # fmt: skip
    if batching["max_batch_size"] > 1:
        sizes = " ".join(f"{k}x{n}" for k, n in batching["batch_sizes"].items()) or "none yet"
        mean, batches = batching["mean_batch"], plural(batching["batches"], "batch", "batches")
        lines.append(f"batching up to {batching['max_batch_size']} within"
                     f" {batching['timeout_ms']:g}ms: {batches}"
                     f"{'' if mean is None else f', {mean:.1f} requests on average'};"
                     f" sizes {sizes}")  # fmt: skip
    how = (f"{scaling['manual']} set by hand" if scaling["manual"]
           else f"autoscaling {scaling['min']}-{scaling['max']}")  # fmt: skip
    each = ", ".join(f"{i['pid']} {i['state']} ({i['inflight']} in flight, {i['requests']} run)"
                     for i in pool["instances"])  # fmt: skip
    lines.append(f"instances {len(pool['instances'])} ({how}): {each}")
    if (cache := pool.get("cache")) and cache["max_bytes"]:
        ratio = "-" if cache["hit_ratio"] is None else f"{cache['hit_ratio']:.1%}"
        lines.append(f"cache    hit ratio {ratio} ({cache['hits']} hits, {cache['misses']}"
                     f" misses); {cache['entries']} answers, {format_size(cache['bytes'])} of"
                     f" {format_size(cache['max_bytes'])}; ttl"
                     f" {format_duration(cache['ttl'])}")  # fmt: skip
    if sessions := pool.get("sessions"):
        counts = sessions["counts"]
        lines.append(f"sessions {sessions['hot']} hot ({format_size(sessions['hot_bytes'])}),"
                     f" {sessions['spilled']} spilled ({format_size(sessions['disk_bytes'])}),"
                     f" {sessions['lost']} lost; since start {counts['spilled']} spills,"
                     f" {counts['restored']} restores, {counts['expired']} expired,"
                     f" {counts['dropped']} dropped (moltctl sessions MODEL)")  # fmt: skip
    return lines


def limits_text(lim: dict[str, Any]) -> str:
    """One line: cpu | memory | io | pids, each 'unlimited' where nothing is set."""
    quota = lim["cpu_quota_percent"]
    cpu = "unlimited" if quota is None else f"{quota:g}% per {lim['cpu_period_ms']:g}ms"
    sizes = (lim["memory_max"], lim["memory_high"], lim["memory_swap_max"])
    memory = "unlimited" if sizes == (None, None, None) else (
        f"{_size(sizes[0])}, high {_size(sizes[1])}, swap {_size(sizes[2])}")  # fmt: skip
    if lim.get("memory_auto"):
        memory += f" ({lim['memory_auto']})"
    read = _io(lim["io_read_bps"], lim["io_read_iops"])
    write = _io(lim["io_write_bps"], lim["io_write_iops"])
    io = "unlimited" if read == write == "unlimited" else f"read {read}, write {write}"
    return (f"cpu {cpu}, weight {lim['cpu_weight'] or 100} | memory {memory} | io {io}"
            f" | pids {lim['pids_max'] or 'unlimited'}")  # fmt: skip


def _size(value: int | None) -> str:
    return "unlimited" if value is None else format_size(value)


def _measured(value: int | None) -> str:
    return "-" if value is None else format_size(value)  # None: the kernel has no such file


def _io(bps: int | None, iops: int | None) -> str:
    if bps is None and iops is None:
        return "unlimited"
    rate = [f"{format_size(bps)}/s"] if bps is not None else []
    return " and ".join(rate + ([f"{iops} IO/s"] if iops is not None else []))
