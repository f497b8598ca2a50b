"""Roles: the config's `access:` lists, the rights they give a peer, and a real daemon
refusing real moltctl commands run under other uids (setpriv), refusals audited."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from moltbotd import config
from moltbotd.config import AccessSettings, ConfigError, Grant
from moltbotd.control.access import Access, Peer
from moltbotd.logs import configure
from moltbotd.wire.operations import OPERATIONS, Role
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltctl.cli import EXIT_DENIED
from tests.conftest import ROOT, run_moltctl, wait_until
from tests.test_cli import ok

READER, OPERATOR, STRANGER = 4242, 4243, 4244  # uids no account on the host has
ADMINS = 4343  # a gid


def access(**lists: list) -> Access:
    settings = {role: config.grants(role == "infer")(value) for role, value in lists.items()}
    return Access(AccessSettings(**settings), own_uid=1000)


def refusal(rights, op: str, **params) -> MoltError:
    with pytest.raises(MoltError) as caught:
        rights.check(OPERATIONS[op], params)
    assert caught.value.code == ErrorCode.PERMISSION_DENIED
    return caught.value


# --- the table and the settings -------------------------------------------------------------


def test_every_operation_that_changes_something_needs_operate_or_deploy():
    for op in OPERATIONS.values():
        if op.mutating:
            assert op.role in (Role.OPERATE, Role.DEPLOY), op.name
    assert OPERATIONS["upload"].role == Role.DEPLOY
    assert OPERATIONS["hello"].role is None  # so any client learns what it speaks
    assert {OPERATIONS[n].role for n in ("infer", "channel", "channel_ended")} == {Role.INFER}


def test_the_default_is_the_packages_groups():
    settings = config.Config().access
    assert settings.read == settings.infer == (Grant("group:moltbot"), Grant("group:moltbot-admin"))
    assert settings.operate == settings.deploy == (Grant("group:moltbot-admin"),)


def test_grants_load_from_the_file(tmp_path):
    file = tmp_path / "moltbotd.yaml"
    entry = "{who: 'group:1234', models: ['chat-*', demo]}"
    file.write_text(f"access:\n  read: [everyone]\n  infer: [user:alice, {entry}]\n  operate: []\n")
    loaded = config.load(file).access
    assert loaded.read == (Grant("everyone"),)
    assert loaded.infer == (Grant("user:alice"), Grant("group:1234", ("chat-*", "demo")))
    assert loaded.operate == () and loaded.deploy == config.ADMINS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("access:\n  read: group:moltbot\n", "access.read: expected a list of user:NAME"),
        ("access:\n  read: [moltbot]\n", "got 'moltbot'"),
        (
            "access:\n  operate: [{who: 'user:bob', models: [demo]}]\n",
            "access.operate: expected user:NAME, group:NAME or everyone, got {'who'",
        ),
        (
            "access:\n  infer: [{who: 'user:bob', models: []}]\n",
            "access.infer: models of 'user:bob': expected a list of model names or globs",
        ),
        ("access:\n  infer: [{who: 'user:bob', models: ['a b']}]\n", "got ['a b']"),
        ("access:\n  infer: [{who: 'user:bob', model: [x]}]\n", "got {'who': 'user:bob'"),
        ("access:\n  deploy: ['user:bo b']\n", "got 'user:bo b'"),
    ],
)
def test_a_bad_grant_is_refused_naming_the_key(tmp_path, text, expected):
    file = tmp_path / "moltbotd.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(file)
    assert expected in str(caught.value)


# --- rights ---------------------------------------------------------------------------------


def test_root_and_moltbotds_own_user_may_do_everything():
    nobody = access(read=[], infer=[], operate=[], deploy=[])
    for uid in (0, 1000):
        rights = nobody.rights(Peer(1, uid, uid))
        assert rights.roles == set(Role) and rights.models is None
        for op in OPERATIONS.values():
            rights.check(op, {"model": "anything"})


def test_roles_come_from_the_uid_the_primary_group_or_a_supplementary_group():
    table = access(read=[f"user:{READER}", f"group:{ADMINS}"], infer=[f"user:{READER}"],
                   operate=[f"group:{ADMINS}"], deploy=[])  # fmt: skip
    assert table.rights(Peer(1, READER, READER)).roles == {Role.READ, Role.INFER}
    assert table.rights(Peer(1, OPERATOR, ADMINS)).roles == {Role.READ, Role.OPERATE}
    supplementary = table.rights(Peer(1, OPERATOR, OPERATOR, (7, ADMINS)))
    assert supplementary.roles == {Role.READ, Role.OPERATE}
    assert table.rights(Peer(1, STRANGER, STRANGER, (7,))).roles == set()


def test_everyone_means_any_peer():
    rights = access(read=["everyone"], infer=[], operate=[], deploy=[]).rights(Peer(1, 5, 5))
    assert rights.roles == {Role.READ}


def test_a_refusal_names_the_role_and_the_group_that_has_it():
    table = access(read=["group:root"], infer=[], operate=["group:root", "group:4343"], deploy=[])
    rights = table.rights(Peer(1, STRANGER, STRANGER))
    error = refusal(rights, "switch", version="v2")
    assert error.message == (
        f"uid {STRANGER} may not use 'switch': it needs the role 'operate', which access.operate"
        " gives to group root or 4343 (add the user with: sudo adduser USER root, then log"
        " in again)"
    )
    assert error.details == {"role": "operate", "roles": []}
    assert "which access.deploy gives to no one but root" in refusal(rights, "upload").message
    OPERATIONS["hello"].check_params({})
    rights.check(OPERATIONS["hello"], {})  # needs no role


def test_infer_limited_to_models_by_glob():
    table = access(read=[], operate=[], deploy=[],
                   infer=[{"who": "user:7", "models": ["chat-*"]},
                          {"who": "group:8", "models": ["demo"]}])  # fmt: skip
    one = table.rights(Peer(1, 7, 7))
    one.check(OPERATIONS["infer"], {"model": "chat-small"})
    one.check(OPERATIONS["channel"], {"model": "chat-large"})
    error = refusal(one, "infer", model="demo")
    assert (
        error.message == "uid 7 may infer only on models matching chat-* (access.infer), not 'demo'"
    )
    both = table.rights(Peer(1, 7, 8))
    both.check(OPERATIONS["infer"], {"model": "demo"})
    both.check(OPERATIONS["infer"], {"model": 5})  # the parameter check names the type
    unlimited = access(read=[], operate=[], deploy=[],
                       infer=[{"who": "user:7", "models": ["chat-*"]}, "user:7"])  # fmt: skip
    assert unlimited.rights(Peer(1, 7, 7)).models is None


def test_a_name_this_host_does_not_know_grants_nothing_and_is_logged():
    saved = structlog.get_config()
    try:
        ring = configure("text", "debug", 100, io.StringIO())
        table = access(read=["group:no-such-group-here", "user:no-such-user-here"],
                       infer=["group:no-such-group-here"], operate=[], deploy=[])  # fmt: skip
    finally:
        structlog.configure(**saved)
    assert table.rights(Peer(1, STRANGER, STRANGER)).roles == set()
    logged = [entry.to_wire()["message"] for entry in ring.snapshot()]
    assert (
        "access: there is no group no-such-group-here here; access.read, access.infer grant it"
        " nothing" in logged
    )
    assert "access: there is no user no-such-user-here here; access.read grant it nothing" in logged


# --- a real daemon, real moltctl under other uids ------------------------------------------

ACCESS = f"""
socket_mode: "0666"
access:
  read: [user:{READER}, group:{ADMINS}]
  infer: [{{who: "user:{READER}", models: ["demo*"]}}, group:{ADMINS}]
  operate: [group:{ADMINS}]
  deploy: [group:{ADMINS}]
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder other uids may reach (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="moltbot-access-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_user(uid: int, *groups: int) -> list[str]:
    if os.geteuid() != 0:
        pytest.fail("these tests run moltctl as other users (setpriv): run them as root")
    extra = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={groups[0] if groups else uid}", *extra]


def moltctl_as(socket: Path, who: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*who, sys.executable, "-m", "moltctl", "--socket", str(socket), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          cwd=ROOT, env={"PATH": os.environ["PATH"], "HOME": "/"})  # fmt: skip


@pytest.fixture
def roles_daemon(daemon_factory, public_dir):
    daemon = daemon_factory(ACCESS, start=False)
    daemon.socket = public_dir / "moltbotd.sock"
    return daemon.start()


def test_each_role_is_enforced_for_real_clients_and_refusals_are_audited(roles_daemon):
    socket = roles_daemon.socket
    reader, operator, stranger = as_user(READER), as_user(OPERATOR, ADMINS), as_user(STRANGER)
    assert moltctl_as(socket, reader, "status").returncode == 0
    assert moltctl_as(socket, reader, "infer", "demo", "-i", "x=[[1,2,3,4]]").returncode == 0
    denied = moltctl_as(socket, reader, "infer", "iris", "-i", "x=[[5.1,3.5,1.4,0.2]]")
    assert denied.returncode == EXIT_DENIED, denied.stderr
    assert f"uid {READER} may infer only on models matching demo* (access.infer), not 'iris'" in (
        denied.stderr)  # fmt: skip
    denied = moltctl_as(socket, reader, "switch", "demo", "v1.0")
    assert denied.returncode == EXIT_DENIED and "Traceback" not in denied.stderr
    assert denied.stderr.strip() == (
        f"moltctl: uid {READER} may not use 'switch': it needs the role 'operate', which"
        f" access.operate gives to group {ADMINS} [PERMISSION_DENIED]"
    )
    for args in (("status",), ("logs",), ("infer", "demo", "-i", "x=[[1,2,3,4]]")):
        assert moltctl_as(socket, stranger, *args).returncode == EXIT_DENIED, args
    switched = moltctl_as(socket, operator, "switch", "demo", "v1.0")
    assert switched.returncode == 0, switched.stderr
    records = json.loads(ok(run_moltctl("audit", "-o", "json", socket=socket)))["records"]
    by_uid = {(r["who"]["uid"], r["op"], r["outcome"]) for r in records}
    assert (READER, "switch", "PERMISSION_DENIED") in by_uid
    assert (READER, "infer", "PERMISSION_DENIED") in by_uid  # the first refused infer
    assert (STRANGER, "status", "PERMISSION_DENIED") in by_uid
    assert (OPERATOR, "switch", "ok") in by_uid
    ok_switch = next(r for r in records if r["who"]["uid"] == OPERATOR)
    assert ADMINS in [ok_switch["who"]["gid"], *ok_switch["who"]["groups"]]
    assert not any(r["outcome"] == "ok" and r["who"]["uid"] == READER for r in records)


SESSION = """
import sys
from moltctl.client import Client, MoltError
client = Client(sys.argv[1])
def switch():
    try:
        client.switch("v1.0", model="demo")
        return "ok"
    except MoltError as exc:
        return exc.code
print(switch(), flush=True)
sys.stdin.readline()
print(switch(), flush=True)
"""


def test_a_reload_changes_the_rights_of_open_connections(roles_daemon):
    socket = roles_daemon.socket
    session = subprocess.Popen([*as_user(READER), sys.executable, "-c", SESSION, str(socket)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               cwd=ROOT)  # fmt: skip
    try:
        assert session.stdout.readline().strip() == ErrorCode.PERMISSION_DENIED
        assert roles_daemon.config_path is not None
        widened = ACCESS.replace(f"operate: [group:{ADMINS}]", f"operate: [user:{READER}]")
        roles_daemon.config_path.write_text(widened)
        ok(run_moltctl("reload", socket=socket))
        session.stdin.write("\n")
        session.stdin.flush()
        assert session.stdout.readline().strip() == "ok"
    finally:
        session.kill()
        session.wait()
    wait_until(lambda: session.poll() is not None)
