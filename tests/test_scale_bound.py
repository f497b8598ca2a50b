"""`moltctl scale` within instances.max (issue 14): it took up to 64 from anyone."""

import json

from moltctl.cli import EXIT_ERROR
from tests.conftest import run_moltctl
from tests.test_cli import fails, ok
from tests.test_rollout import model_status


def test_scale_above_instances_max_is_refused_naming_the_max(daemon_factory):
    daemon = daemon_factory("models:\n  demo:\n    instances:\n      max: 2\n")
    err = fails(run_moltctl("scale", "demo", "3", socket=daemon.socket), EXIT_ERROR)
    assert err == (
        "moltctl: model demo may run at most 2 instances (instances.max); to allow more, raise"
        " models.demo.instances.max in moltbotd.yaml and run moltctl reload [BAD_REQUEST]\n"
    )
    err = fails(run_moltctl("scale", "iris", "2", socket=daemon.socket), EXIT_ERROR)
    assert "model iris may run at most 1 instance (" in err
    saved = json.loads((daemon.state_dir / "state.json").read_text())["models"]
    assert saved["demo"]["instances"] is None and saved["iris"]["instances"] is None
    assert "demo v2.0: 2 instances (set by hand)" in ok(
        run_moltctl("scale", "demo", "2", socket=daemon.socket)
    )


def test_a_saved_count_above_instances_max_is_cut_down_at_start(daemon_factory):
    """A count saved before the bound existed must not bring 64 workers back."""
    daemon = daemon_factory(start=False)
    daemon.state_dir.mkdir()
    (daemon.state_dir / "state.json").write_text(json.dumps({
        "schema": 1, "models": {"demo": {"active": "v2.0", "instances": 64}},
    }))  # fmt: skip
    daemon.start()
    with daemon.client() as client:
        pool = model_status(client)["worker"]
    assert len(pool["instances"]) == 1 and pool["scaling"]["manual"] == 1
    assert "model demo: 64 instances set by hand, above instances.max; running 1" in daemon.log()


def test_a_reload_lowering_instances_max_cuts_a_count_set_by_hand(daemon_factory):
    daemon = daemon_factory("models:\n  demo:\n    instances:\n      max: 2\n")
    ok(run_moltctl("scale", "demo", "2", socket=daemon.socket))
    daemon.config_path.write_text("models:\n  demo:\n    instances:\n      max: 1\n")
    ok(run_moltctl("reload", socket=daemon.socket))
    with daemon.client() as client:
        pool = model_status(client)["worker"]
    assert pool["scaling"]["manual"] == 1
    assert [i["state"] for i in pool["instances"]].count("ready") == 1
