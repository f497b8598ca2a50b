"""A conversion job seen from the daemon: spawned like a worker, placed in its cgroup
before it is told what to do, followed by its progress, bounded in time, always reaped.

`python -m moltbotd.convert CONTROL` (moltbotd/convert/) is a fresh interpreter (never
a fork of the threaded daemon) that dies with the daemon (PR_SET_PDEATHSIG). The job's
message goes on CONTROL only once the process sits in its group, so loading and
converting the model are limited and accounted as the model's, not the daemon's.
"""

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from moltbotd.config import Limits
from moltbotd.isolation.cgroups import Group
from moltbotd.isolation.limits import memory_limit_text
from moltbotd.logs import get_logger
from moltbotd.wire.protocol import ErrorCode, FrameDecoder, MoltError, encode_frame

log = get_logger("convert")
OnProgress = Callable[[str, str], None]


async def run_job(job: dict[str, Any], group: Group | None, limits: Limits, timeout: float,
                  label: str, progress: OnProgress) -> dict[str, Any]:  # fmt: skip
    """The job's `done` answer; MoltError with the job's own error, or with how it
    ended when it gave none (killed by its memory limit, the timeout, a crash)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moltbotd.convert", str(theirs.fileno()),
            pass_fds=[theirs.fileno()], stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    output = asyncio.ensure_future(_log_output(proc, label))
    oom_kills = group.oom_kills() if group else 0
    writer: asyncio.StreamWriter | None = None
    try:
        if group:
            group.add(proc.pid)
        log.info("{label}: conversion job started", label=label, pid=proc.pid)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        writer.write(encode_frame(job))
        async with asyncio.timeout(timeout):
            answer = await _answer(reader, progress)
    except TimeoutError:
        raise MoltError(ErrorCode.DEADLINE_EXCEEDED, f"{label}: the conversion job ran past"
                        f" conversion.timeout ({timeout:g}s) and was killed") from None  # fmt: skip
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await output
        if writer:
            writer.close()
        else:
            ours.close()
    if answer is None:
        raise _ended(proc.returncode, group, oom_kills, limits, label)
    if "failed" in answer:
        failed = answer["failed"]
        raise MoltError(ErrorCode(failed["code"]), failed["message"], failed["details"])
    return answer["done"]  # type: ignore[no-any-return]


async def _answer(reader: asyncio.StreamReader, progress: OnProgress) -> dict[str, Any] | None:
    """Progress messages passed on; the final `done` or `failed`; None at EOF."""
    decoder = FrameDecoder(2**32 - 1)  # our own child: any frame the header allows
    while data := await reader.read(1 << 16):
        for message in decoder.feed(data):
            if isinstance(message, MoltError) or "progress" not in message:
                return None if isinstance(message, MoltError) else message
            progress(message["progress"]["phase"], message["progress"]["detail"])
    return None


def _ended(code: int | None, group: Group | None, oom_kills: int, limits: Limits,
           label: str) -> MoltError:  # fmt: skip
    if group and group.oom_kills() > oom_kills:
        limit = memory_limit_text(limits)
        return MoltError(ErrorCode.RESOURCE_EXHAUSTED, f"{label}: the conversion job was killed"
                         f" by the model's memory limit ({limit}); raise limits.memory.limit"
                         " for this model, or convert it elsewhere")  # fmt: skip
    how = f"was killed by signal {-code}" if code and code < 0 else f"exited with status {code}"
    return MoltError(ErrorCode.INTERNAL, f"{label}: the conversion job {how} without an"
                     " answer; its output is in moltctl logs")  # fmt: skip


async def _log_output(proc: asyncio.subprocess.Process, label: str) -> None:
    """What onnxruntime and Python write to the job's stdout and stderr: logged, tagged."""
    assert proc.stdout is not None
    async for raw in proc.stdout:
        if line := raw.decode(errors="replace").rstrip():
            log.warning("{label}: {line}", label=label, line=line, pid=proc.pid)
