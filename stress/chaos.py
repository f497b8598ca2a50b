"""The chaos driver of the soak: it kills, freezes, switches, scales and reloads.

Every few hundred milliseconds it picks one action (from its own seeded random
generator) and counts how it went: "ok", "error CODE", "unanswered" for control calls;
"done" for signals. Worker pids come from /proc (the daemon's children); each one seen
is kept, so the soak can check none outlives the daemon.
"""

import contextlib
import os
import random
import signal
import threading
from collections.abc import Callable

from moltbotd.isolation.cgroups import GROUP_PREFIX, CgroupError, own_group
from moltbotd.wire.protocol import MoltError
from moltctl.client import Client, ConnectError, ProtocolError
from stress.daemon import SMALL_LOG_RING, Daemon
from stress.load import Tally
from stress.models import FACTORS

FROZEN_SECONDS = (0.2, 3.0)  # how long a SIGSTOPped worker stays stopped
CONTROL_TIMEOUT = 120.0  # seconds for one control call (a switch loads a worker)


# With --cgroups: every worker under a memory limit it stays far below, so that only
# the chaos (memory.max lowered for a moment) OOM-kills one.
LIMITED = "isolation: strict\nlimits:\n  memory: {limit: 512MiB}\n"


def config(max_queue: int, cgroups: bool = False) -> str:
    """The soak's config file; a reload changes max_queue (applied at once)."""
    return (
        SMALL_LOG_RING + (LIMITED if cgroups else "") + "scheduling:\n"
        f"  max_queue: {max_queue}\n"
        "  instances: {min: 1, max: 3, scale_down_after: 2s}\n"
    )


class Chaos(threading.Thread):
    def __init__(self, daemon: Daemon, seed: int, tally: Tally, stop: threading.Event,
                 period: float, cgroups: bool = False) -> None:  # fmt: skip
        super().__init__(name="chaos", daemon=True)
        self.daemon, self.tally, self.stop, self.period = daemon, tally, stop, period
        self.cgroups = cgroups
        self.rng = random.Random(seed)
        self.control = Client(daemon.socket, CONTROL_TIMEOUT)
        self.seen: set[int] = set()  # every worker pid met
        self.frozen: dict[int, threading.Timer] = {}
        self.lock = threading.Lock()
        self.actions: dict[str, Callable[[], str]] = {
            "SIGKILL a worker": self.kill,
            "SIGSTOP a worker": self.freeze,
            "switch": self.switch,
            "canary": lambda: self.switch(canary=0.3),
            "promote": lambda: self.call(self.control.promote, self.model()),
            "rollback": lambda: self.call(self.control.rollback, self.model()),
            "scale": self.scale,
            "reload (SIGHUP)": self.reload,
        }
        if cgroups:
            self.actions["OOM-kill a worker's cgroup"] = self.oom_kill

    def run(self) -> None:
        with self.control:
            while not self.stop.wait(self.rng.uniform(0, 2 * self.period)):
                name = self.rng.choice(list(self.actions))
                self.tally.add(f"{name}: {self.actions[name]()}")
        self.thaw()

    def model(self) -> str:
        return self.rng.choice(list(FACTORS))

    def switch(self, canary: float | None = None) -> str:
        model = self.model()
        version = self.rng.choice(list(FACTORS[model]))
        return self.call(self.control.switch, version, model, canary=canary)

    def scale(self) -> str:
        instances = self.rng.choice([1, 2, 3, None])  # None: back to autoscaling
        return self.call(self.control.scale, self.model(), instances)

    def call(self, method: Callable[..., object], *args: object, **kwargs: object) -> str:
        try:
            method(*args, **kwargs)
        except MoltError as exc:
            return f"error {exc.code}"
        except (ProtocolError, ConnectError, OSError):
            return "unanswered"
        return "ok"

    def workers(self) -> list[int]:
        found = sorted(self.daemon.workers())
        self.seen.update(found)
        return found

    def pick_worker(self) -> int | None:
        """A live worker that is not frozen now."""
        with self.lock:
            workers = [pid for pid in self.workers() if pid not in self.frozen]
        return self.rng.choice(workers) if workers else None

    def kill(self) -> str:
        pid = self.pick_worker()
        if pid is None:
            return "no worker"
        os.kill(pid, signal.SIGKILL)
        return "done"

    def freeze(self) -> str:
        """SIGSTOP a worker, and SIGCONT it a little later."""
        pid = self.pick_worker()
        if pid is None:
            return "no worker"
        timer = threading.Timer(self.rng.uniform(*FROZEN_SECONDS), self.wake, [pid])
        with self.lock:
            self.frozen[pid] = timer
        os.kill(pid, signal.SIGSTOP)
        timer.start()
        return "done"

    def wake(self, pid: int) -> None:
        with self.lock:
            self.frozen.pop(pid, None)
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile
            os.kill(pid, signal.SIGCONT)

    def thaw(self) -> None:
        with self.lock:
            frozen = list(self.frozen.items())
        for pid, timer in frozen:
            timer.cancel()
            self.wake(pid)

    def reload(self) -> str:
        assert self.daemon.config_path is not None
        self.daemon.config_path.write_text(config(self.rng.choice([500, 1000, 2000]), self.cgroups))
        os.kill(self.daemon.pid, signal.SIGHUP)
        return "done"

    def oom_kill(self) -> str:
        """Lower a worker's memory.max to 0 for a moment: the kernel OOM-kills what its
        group holds (the write returns once it has), then the daemon's limit is back."""
        pid = self.pick_worker()
        if pid is None:
            return "no worker"
        try:
            group = own_group(pid=pid)
            if not group.name.startswith(GROUP_PREFIX):  # never the daemon's own group
                return "no model group"
            limit = (group / "memory.max").read_text()
            (group / "memory.max").write_text("0")
        except (OSError, CgroupError):  # it died meanwhile, or has no group
            return "no worker"
        with contextlib.suppress(OSError):  # the daemon removed the group meanwhile
            (group / "memory.max").write_text(limit)
        return "done"
