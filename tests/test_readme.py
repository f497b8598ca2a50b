"""Every command in README.md's console blocks, run as written, in order, against the demo
that `make run` serves, in a checkout of its own: each must exit 0 and print every line the
README shows under it (times, sizes, dates, pids and hashes may differ; `...` skips lines).

The README's Python example runs too. The Debian block's commands need the package and
systemd: the VM scenarios run each (ON_DEBIAN names where), and this test checks that list
against the README, so neither can change without the other.
"""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHOWN_HOME = "/home/me/moltbot"  # the checkout's path as the README shows it
WAIT_SECONDS = 120  # for a long-running command's shown lines; a failure, not a skip
DEBIAN_SECTION = "Install on Debian 12"
# The Debian block's commands, and the line of tests/e2e/package-checks.sh (run by
# tests/e2e/test_vm.py::test_package_life_cycle) that does each in the VM.
INSTALL = "apt-get install -y --no-install-recommends /host/moltbot_*.deb"
ON_DEBIAN = {
    "make deb": None,  # builds what the VM installs: the harness fails without it
    "sudo apt install ./dist/moltbot_0.1.0_amd64.deb": INSTALL,
    "systemctl status moltbotd": "run systemctl status moltbotd",
    "moltctl switch v2.0": "run moltctl switch v2.0",
}  # fmt: skip
NOT_HERE = {"make test": "the suite this test is part of"}


@dataclass
class Command:
    section: str
    line: str  # as written, comment included: bash reads it
    shown: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.line.split("  #", 1)[0].strip()

    @property
    def until_ctrl_c(self) -> bool:
        return "Ctrl-C" in self.line


def readme_blocks(kind: str) -> Iterator[tuple[str, list[str]]]:
    """(section heading, lines) of every ```kind block."""
    section, block = "", None
    for line in README.read_text().splitlines():
        if block is not None:
            if line.startswith("```"):
                yield section, block
                block = None
            else:
                block.append(line)
        elif line.startswith("## "):
            section = line[3:].strip()
        elif line.strip() == f"```{kind}":
            block = []


def readme_commands() -> list[Command]:
    commands: list[Command] = []
    for section, lines in readme_blocks("console"):
        for line in lines:
            if line.startswith("$ "):
                commands.append(Command(section, line[2:]))
            else:
                assert commands, f"output before any command in {section!r}: {line!r}"
                commands[-1].shown.append(line)
    return commands


_VARIABLE = [
    (re.compile(r"\b[0-9a-f]{12,64}\b"), "<hex>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?"), "<date>"),
    (re.compile(r"(?<![\w.])\d+(\.\d+)?(µs|ms|s|m|h|d)\b"), "<time>"),
    (re.compile(r"(?<![\w.])\d+(\.\d+)?(B|KiB|MiB|GiB|TiB)\b"), "<size>"),
    (re.compile(r"(?<![\w.])\d{3,}\b"), "<n>"),  # pids; request counts stay exact
    (re.compile(r"(?<==)\d+(\.\d+)?\b"), "<n>"),  # a log entry's fields: pid=, load_ms=
]


def normal(line: str) -> str:
    for pattern, token in _VARIABLE:
        line = pattern.sub(token, line)
    return " ".join(line.split())


def missing_lines(shown: list[str], output: str, home: Path) -> list[str]:
    """The shown lines the output lacks, in order; '...' stands for any lines."""
    got = [normal(x) for x in output.replace(str(home), SHOWN_HOME).splitlines()]
    at, missing = 0, []
    for line in shown:
        if line.strip() == "...":
            continue
        want = normal(line)
        found = next((i for i in range(at, len(got)) if got[i] == want), None)
        if found is None:
            missing.append(line)
        else:
            at = found + 1
    return missing


class Shell:
    """Commands run by bash in the checkout, one after another; exports carry over."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.exports = home / ".exports"
        self.exports.write_text("")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MOLTBOT_")}
        self.env.update(PWD=str(home), PYTHONUNBUFFERED="1")  # a terminal's line order

    def script(self, command: str) -> str:
        return f'. "{self.exports}"\n{command}\nrc=$?\nexport -p > "{self.exports}"\nexit $rc\n'

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", self.script(command)], check=False, cwd=self.home,
                              env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=WAIT_SECONDS)  # fmt: skip

    def start(self, command: str) -> "Running":
        # SIGINT as a terminal leaves it, whatever this pytest inherited (conftest.start_moltctl)
        argv = ["env", "--default-signal=INT", "bash", "-c", f'. "{self.exports}"\n{command}']
        proc = subprocess.Popen(argv, cwd=self.home, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        return Running(proc)


class Running:
    """A command a person stops with Ctrl-C: SIGINT to its process group, as a terminal's."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.output = proc, ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output += line

    def wait_for(self, shown: list[str], home: Path) -> list[str]:
        deadline = time.monotonic() + WAIT_SECONDS
        while missing_lines(shown, self.output, home) and self.proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return missing_lines(shown, self.output, home)

    def ctrl_c(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(WAIT_SECONDS)
        self._reader.join(WAIT_SECONDS)
        return code


def checkout(tmp_path: Path) -> Path:
    """What `make run` reads, copied with its times (make must find the venv up to date),
    and the venv itself linked: a checkout whose run/ and build/ are the test's own."""
    home = tmp_path / "moltbot"
    home.mkdir()
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy2(ROOT / name, home / name)
    shutil.copytree(ROOT / "etc", home / "etc")
    (home / ".venv").symlink_to(ROOT / ".venv")
    fresh = subprocess.run(["make", "--question", "venv"], cwd=home, check=False)
    assert fresh.returncode == 0, "the venv is older than setup.cfg: run `make venv` first"
    return home


def test_the_debian_block_is_what_the_vm_runs():
    commands = [c for c in readme_commands() if c.section == DEBIAN_SECTION]
    assert [c.text for c in commands] == list(ON_DEBIAN)
    checks = (ROOT / "tests/e2e/package-checks.sh").read_text()
    for command, line in ON_DEBIAN.items():
        assert line is None or line in checks, f"the VM no longer runs {command!r}"
    assert "def test_package_life_cycle(" in (ROOT / "tests/e2e/test_vm.py").read_text()


def test_every_moltctl_command_shows_output():
    silent = [c.line for c in readme_commands() if c.text.startswith("moltctl") and not c.shown]
    assert not silent, "the README shows no output for these: show a line of each"


def test_every_readme_command_works_as_written(tmp_path):
    home = checkout(tmp_path)
    shell = Shell(home)
    commands = [c for c in readme_commands() if c.section != DEBIAN_SECTION]
    assert [c.text for c in commands if c.text in NOT_HERE] == list(NOT_HERE)
    server = None
    try:
        for command in commands:
            if command.text in NOT_HERE:
                continue
            if command.text == "make run":
                server = shell.start(command.line)
                missing = server.wait_for(command.shown, home)
                assert not missing, f"$ {command.line}\n{server.output}\nlacks: {missing}"
                second_make_run(shell)
                continue
            run_one(shell, command)
        python_example(shell)
    finally:
        stopped = server.ctrl_c() if server else None
    assert server is not None, "the README no longer starts the demo with `make run`"
    assert server.output.rstrip().endswith("[INFO] [daemon] stopped"), server.output[-2000:]
    # make, interrupted, waits for moltbotd's clean stop, then ends by the same signal
    assert stopped == -signal.SIGINT, f"make run ended with {stopped}, not by Ctrl-C"


def second_make_run(shell: Shell) -> None:
    """As the README says: the live demo's files are left alone, the socket is taken."""
    models = shell.home / "run" / "models"
    before = {p: p.stat().st_mtime_ns for p in models.rglob("*")}
    result = shell.run("make run")
    assert result.returncode == 2, result.stdout  # make's code for a failed recipe
    assert "3 already there (kept as they are)" in result.stdout, result.stdout
    assert "another moltbotd is already serving at" in result.stdout, result.stdout
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*")} == before


def run_one(shell: Shell, command: Command) -> None:
    if command.until_ctrl_c:
        running = shell.start(command.line)
        missing = running.wait_for(command.shown, shell.home)
        code, output = running.ctrl_c(), running.output
    else:
        result = shell.run(command.line)
        code, output = result.returncode, result.stdout
        missing = missing_lines(command.shown, output, shell.home)
    assert code == 0, f"$ {command.line}\nexit {code}\n{output}"
    assert not missing, f"$ {command.line}\n{output}\nlacks the README's lines: {missing}"
    assert "Traceback" not in output, output


def python_example(shell: Shell) -> None:
    ((_, lines),) = list(readme_blocks("python"))
    result = shell.run("python - <<'EOF'\n" + "\n".join(lines) + "\nEOF")
    assert result.returncode == 0, result.stdout
    version, invalid = result.stdout.splitlines()[0], result.stdout.splitlines()[-1]
    assert re.match(r"v\d\.\d \[\[", version), result.stdout
    assert invalid.startswith("INVALID_INPUT model demo"), result.stdout


@pytest.mark.parametrize(
    ("shown", "output"),
    [
        ("demo   v2.0  ready  4244  12.2s", "demo v2.0 ready 81234 1.5m"),
        ("in 135ms (loading 110ms)", "in 2.1s (loading 980µs)"),
        ("412B  4fc9c8301b47  2026-12-06 00:10", "1.2KiB 0123456789ab 2027-01-31 23:59"),
    ],
)
def test_normal_forgets_what_varies(shown, output):
    assert normal(shown) == normal(output)


@pytest.mark.parametrize(
    ("shown", "output"),
    [
        ("demo v2.0", "demo v1.0"),  # versions are not numbers to forget
        ("[[10. 20. 30. 40.]]", "[[2. 4. 6. 8.]]"),  # nor are answers
        ("REQUESTS 0", "REQUESTS 1"),
    ],
)
def test_normal_keeps_what_matters(shown, output):
    assert normal(shown) != normal(output)


def test_missing_lines_in_order_with_ellipsis(tmp_path):
    output = f"a\nb 12ms\n{tmp_path}/run.sock\nc\n"
    assert missing_lines(["a", "...", f"{SHOWN_HOME}/run.sock", "c"], output, tmp_path) == []
    assert missing_lines(["c", "a"], output, tmp_path) == ["a"]
