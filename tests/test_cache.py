"""The result cache, against the real daemon: a request whose inputs came before is
answered from its worker's cache on either path, within its bytes and ttl; a switch
starts afresh; a session's requests pass it by."""

import numpy as np
import pytest

from moltctl.client import Client
from tests.conftest import run_moltctl, wait_until
from tests.test_sessions import add_gru, turns

CACHED = """
models:
  demo:
    cache: {max_bytes: %s, ttl: %s}
"""
X = [[1.0, 2.0, 3.0, 4.0]]


def cache_of(client: Client, model: str = "demo") -> dict:
    return client.status(model)["models"][0]["worker"]["cache"]


def counted(client: Client, hits: int, misses: int) -> dict:
    """The cache's figures once the worker reported `hits` and `misses`."""
    return wait_until(lambda: (c := cache_of(client))["hits"] == hits and c["misses"] == misses
                      and c, what=f"{hits} hits and {misses} misses")  # fmt: skip


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "socket"])
def test_a_repeated_request_is_answered_from_the_cache(daemon_factory, direct):
    daemon = daemon_factory(CACHED % ("1MiB", "1h"))
    with Client(daemon.socket, direct=direct) as client:
        first = client.infer("demo", {"x": X})["y"]
        again = client.infer("demo", {"x": X})["y"]
        other = client.infer("demo", {"x": [[5.0, 6.0, 7.0, 8.0]]})["y"]
        only_y = client.infer("demo", {"x": X}, outputs=["y"])["y"]  # another key: outputs
        client.infer("demo", {"x": X}, cache=False)  # runs: neither a hit nor a miss
        cache = counted(client, hits=1, misses=3)
        metrics = client.metrics()
    assert np.array_equal(first, again) and np.array_equal(first, only_y)
    assert not np.array_equal(first, other)
    assert cache["entries"] == 3 and 0 < cache["bytes"] <= 1 << 20
    assert cache["hit_ratio"] == 0.25
    assert 'moltbot_cache_hits_total{model="demo",version="v2.0"} 1.0' in metrics
    shown = run_moltctl("status", "demo", socket=daemon.socket)
    assert "cache    hit ratio 25.0% (1 hits, 3 misses); 3 answers" in shown.stdout, shown.stdout


def test_the_cache_holds_its_bytes_and_forgets_after_its_ttl(daemon_factory):
    daemon = daemon_factory(CACHED % ("2KiB", "300ms"))
    with Client(daemon.socket) as client:
        for n in range(50):
            client.infer("demo", {"x": [[float(n), 0.0, 0.0, 0.0]]})
        held = counted(client, hits=0, misses=50)
        assert held["bytes"] <= 2048 and 0 < held["entries"] < 50
        client.infer("demo", {"x": X})
        client.infer("demo", {"x": X})  # a hit, until the ttl passes
        counted(client, hits=1, misses=51)
        # the same request again and again: the first one after the ttl misses
        wait_until(lambda: client.infer("demo", {"x": X}) and cache_of(client)["misses"] > 51,
                   what="the ttl to pass")  # fmt: skip


def test_a_switch_starts_with_an_empty_cache(daemon_factory):
    daemon = daemon_factory(CACHED % ("1MiB", "1h"))
    with Client(daemon.socket) as client:
        assert client.infer("demo", {"x": X})["y"][0][0] == 10.0  # v2.0: 10x
        client.switch("v1.0", "demo")
        assert client.infer("demo", {"x": X})["y"][0][0] == 2.0  # v1.0's own answer
        assert cache_of(client)["hits"] == 0


def test_a_sessions_requests_pass_the_cache_by(models_dir, daemon_factory):
    add_gru(models_dir)
    daemon = daemon_factory("models:\n  gru:\n    cache: {max_bytes: 1MiB}\n")
    [x] = turns(1, seed=12)
    with Client(daemon.socket) as client:
        one = client.infer("gru", {"x": x}, session="kim")["y"]
        two = client.infer("gru", {"x": x}, session="kim")["y"]  # the state moved on
        assert not np.array_equal(one, two)
        client.infer("gru", {"x": x})
        client.infer("gru", {"x": x})  # without a session: cached
        cache = wait_until(lambda: (c := cache_of(client, "gru"))["hits"] == 1 and c,
                           what="one hit")  # fmt: skip
    assert cache["misses"] == 1
