"""How a failed start exits (issue 14): 78 (EX_CONFIG) only for a configuration error,
which systemd must not retry; anything else logs its traceback and exits 1, which
Restart=on-failure retries (a permission fixed, a disk freed)."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from moltbotd.control.daemon import EXIT_FAILURE
from moltbotd.demo import write_demo_repository
from stress.daemon import Daemon

NOBODY = 65534
SETPRIV = shutil.which("setpriv")


class Unprivileged(Daemon):
    """moltbotd as user nobody: a permission it lacks is refused for real (root has all)."""

    def argv(self) -> list[str]:
        assert SETPRIV, "setpriv (util-linux) runs the daemon as nobody"
        ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        return [SETPRIV, *ids, *super().argv()]


@pytest.fixture
def home() -> Iterator[Path]:
    """A folder nobody may enter (pytest's tmp_path lies in root's 0700 folder)."""
    if os.getuid() != 0:
        pytest.skip("needs root, to start the daemon as another user")
    path = Path(tempfile.mkdtemp(prefix="moltbotd-start-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_start_failing_for_a_permission_exits_1_with_its_traceback(home):
    """It exited 78, which the unit's RestartPreventExitStatus never retries, and logged
    only the message."""
    models = home / "models"
    write_demo_repository(models)
    (models / "demo").chmod(0o700)  # root's own: nobody cannot list it
    run = home / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    daemon = Unprivileged(run, models).start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) == EXIT_FAILURE, daemon.log()
    log = daemon.log()
    assert f"cannot start: [Errno 13] Permission denied: '{models / 'demo'}'" in log
    assert "Traceback (most recent call last)" in log and "PermissionError" in log
    assert not daemon.socket.exists()
