"""The queue of one model version (moltbotd/scheduler.py), driven with plain numbers: batch
keys, priorities, the bound, deadlines, batch forming; and the config keys that set it up.

No processes and no event loop: times are plain monotonic seconds passed in.
"""

from pathlib import Path

import pytest

from moltbotd.config import (
    Batching,
    Config,
    ConfigError,
    Instances,
    Overrides,
    Scheduling,
    load,
    parse_model_yaml,
    parse_overrides,
)
from moltbotd.scheduler import Pending, Queue, batch_key, overloaded
from moltbotd.wire.protocol import ErrorCode, MoltError

T0 = 1000.0  # a monotonic clock value: every request arrives at or after it


def tensor(*shape: int, dtype: str = "float32") -> dict:
    """What the daemon hands the queue after check_inputs: dtype, shape and the bytes."""
    return {"dtype": dtype, "shape": list(shape), "data": b""}


def request(rows: int = 1, width: int = 4, priority: str = "normal", arrived: float = T0,
            deadline: float | None = None, outputs: list[str] | None = None,
            replies: list | None = None) -> Pending:  # fmt: skip
    """A request with one input x of shape [rows, width]."""
    sink = replies if replies is not None else []
    return Pending({"x": tensor(rows, width)}, outputs, priority, deadline, arrived, sink.append)


def batching(size: int = 8, timeout_ms: float = 10.0, preferred: tuple[int, ...] = ()) -> Batching:
    return Batching(max_batch_size=size, timeout_ms=timeout_ms, preferred_sizes=preferred)


def queue_of(*items: Pending, limit: int = 100) -> Queue:
    queue = Queue(limit)
    for item in items:
        queue.push(item, "model m v1")
    return queue


# --- batch keys ----------------------------------------------------------------------------


def test_batch_key_ignores_the_first_dimension_and_counts_it_as_rows():
    key_one, rows_one = batch_key({"x": tensor(1, 4)}, None)
    key_five, rows_five = batch_key({"x": tensor(5, 4)}, None)
    assert (rows_one, rows_five) == (1, 5)
    assert key_one == key_five is not None


def test_batch_key_differs_for_other_dims_dtypes_names_and_outputs():
    base = batch_key({"x": tensor(2, 4)}, None)[0]
    others = [
        batch_key({"x": tensor(2, 5)}, None)[0],  # second dimension
        batch_key({"x": tensor(2, 4, 1)}, None)[0],  # rank
        batch_key({"x": tensor(2, 4, dtype="float64")}, None)[0],  # dtype
        batch_key({"z": tensor(2, 4)}, None)[0],  # input name
        batch_key({"x": tensor(2, 4)}, ["y"])[0],  # outputs asked for
    ]
    assert all(key is not None for key in others)
    assert len({base, *others}) == 6, "two different requests got the same batch key"


def test_batch_key_is_independent_of_input_order():
    a = batch_key({"a": tensor(1, 2), "b": tensor(1, 3, dtype="int64")}, None)
    b = batch_key({"b": tensor(1, 3, dtype="int64"), "a": tensor(1, 2)}, None)
    assert a == b and a[1] == 1


@pytest.mark.parametrize(
    "inputs",
    [
        {"a": tensor(2, 4), "b": tensor(3, 4)},  # inputs disagree on the first dimension
        {"n": tensor()},  # a scalar has no first dimension
        {"s": tensor(2, dtype="string")},  # strings are never concatenated
    ],
    ids=["first-dims-disagree", "scalar", "string"],
)
def test_requests_that_cannot_be_concatenated_run_alone(inputs):
    assert batch_key(inputs, None) == (None, 1)


# --- the bound -----------------------------------------------------------------------------


def test_push_beyond_the_limit_is_overloaded_with_the_depth():
    queue = queue_of(request(), request(), limit=2)
    with pytest.raises(MoltError) as err:
        queue.push(request(), "model m v1")
    assert err.value.code is ErrorCode.OVERLOADED
    assert err.value.details == {"queue_depth": 2, "max_queue": 2}
    assert "model m v1 is overloaded: 2 requests are waiting (max_queue 2)" in err.value.message
    assert len(queue) == 2  # the refused one was not kept


def test_overloaded_error_names_the_depth_and_the_limit():
    error = overloaded("model a v3", 7, 5)
    assert error.code is ErrorCode.OVERLOADED
    assert error.details == {"queue_depth": 7, "max_queue": 5}
    assert "max_queue" in error.message and "instances.max" in error.message


def test_depths_count_per_priority():
    queue = queue_of(request(priority="low"), request(priority="low"), request(priority="high"))
    assert queue.depths() == {"high": 1, "normal": 0, "low": 2}
    assert len(queue) == 3


# --- order: priorities, then arrival -------------------------------------------------------


def test_higher_priority_goes_first_then_oldest_first():
    low = request(priority="low", arrived=T0)
    normal_1 = request(priority="normal", arrived=T0 + 1)
    high = request(priority="high", arrived=T0 + 2)
    normal_2 = request(priority="normal", arrived=T0 + 3)
    queue = queue_of(low, normal_1, high, normal_2)
    order = [queue.take(batching(size=1), T0 + 4)[0] for _ in range(4)]
    assert order == [[high], [normal_1], [normal_2], [low]]
    assert queue.take(batching(size=1), T0 + 4) == ([], None)


def test_unbatched_take_gives_one_request_without_waiting():
    first, second = request(arrived=T0), request(arrived=T0)
    queue = queue_of(first, second)
    assert queue.take(batching(size=1, timeout_ms=1000), T0) == ([first], None)
    assert len(queue) == 1


def test_a_low_request_with_the_same_key_joins_a_high_requests_batch():
    low, high = request(priority="low"), request(priority="high", arrived=T0 + 0.001)
    queue = queue_of(low, high)
    batch, wake = queue.take(batching(size=2), T0 + 0.001)
    assert batch == [high, low] and wake is None  # the head first
    assert len(queue) == 0


def test_without_batching_the_live_head_goes_alone_in_priority_order():
    expired = request(priority="high", deadline=T0 + 0.001)
    normal = [request(arrived=T0 + i) for i in range(2)]
    high = request(priority="high", arrived=T0 + 5)
    low = request(priority="low")
    queue = queue_of(expired, *normal, high, low)
    taken = [queue.take(batching(size=1), T0 + 10) for _ in range(5)]
    assert taken == [([high], None), ([normal[0]], None), ([normal[1]], None),
                     ([low], None), ([], None)]  # fmt: skip
    assert queue.drain() == [expired]  # an expired one is never taken: its timer answers


def test_queue_length_is_kept_through_every_change():
    items = [request(width=4 if i % 2 else 6, priority=("high", "low")[i % 2]) for i in range(8)]
    queue = queue_of(*items)
    assert len(queue) == 8
    queue.take(batching(size=8, timeout_ms=0), T0 + 1)  # the four high ones (width 6)
    assert len(queue) == 4 == sum(queue.depths().values())
    assert queue.remove(items[1]) and not queue.remove(items[1])
    assert len(queue) == 3
    queue.take(batching(size=1), T0 + 1)
    queue.take(batching(size=1), T0 + 1)
    assert len(queue) == 1 == sum(queue.depths().values())
    queue.drain()
    assert len(queue) == 0
    queue.push(request(), "model m v1")
    assert len(queue) == 1


# --- batch forming -------------------------------------------------------------------------


def test_a_batch_that_is_not_full_waits_until_its_oldest_request_waited_timeout_ms():
    first = request(arrived=T0)
    second = request(arrived=T0 + 0.003)
    queue = queue_of(first, second)
    settings = batching(size=8, timeout_ms=10)
    batch, wake = queue.take(settings, T0 + 0.004)
    assert batch == []
    assert wake == pytest.approx(T0 + 0.010)  # the oldest's arrival + 10ms, not the newest's
    assert len(queue) == 2
    batch, wake = queue.take(settings, T0 + 0.010)
    assert batch == [first, second] and wake is None
    assert len(queue) == 0


def test_an_idle_instance_takes_a_partial_batch_at_once():
    first = request(arrived=T0)
    second = request(arrived=T0 + 0.001)
    queue = queue_of(first, second)
    settings = batching(size=8, timeout_ms=1000)
    assert queue.take(settings, T0 + 0.002, idle=False) == ([], pytest.approx(T0 + 1.0))
    assert queue.take(settings, T0 + 0.002, idle=True) == ([first, second], None)


def test_a_full_batch_goes_at_once():
    items = [request(rows=2, arrived=T0 + i * 1e-4) for i in range(4)]
    queue = queue_of(*items)
    batch, wake = queue.take(batching(size=8, timeout_ms=1000), T0 + 0.001)
    assert batch == items and wake is None


def test_a_batch_holds_at_most_max_batch_size_rows():
    sizes = [3, 4, 2, 1, 5]
    items = [request(rows=r, arrived=T0 + i * 1e-4) for i, r in enumerate(sizes)]
    queue = queue_of(*items)
    settings = batching(size=6, timeout_ms=0)
    batches = []
    while queue:
        batch, _ = queue.take(settings, T0 + 1)
        assert sum(item.rows for item in batch) <= 6
        batches.append([item.rows for item in batch])
    # 3 + 2 + 1 fill the first batch (4 did not fit after 3); 4 and 5 go alone
    assert batches == [[3, 2, 1], [4], [5]]


def test_a_request_larger_than_max_batch_size_still_runs_alone():
    big, small = request(rows=20), request(rows=1)
    queue = queue_of(big, small)
    batch, wake = queue.take(batching(size=8, timeout_ms=1000), T0)
    assert batch == [big] and wake is None
    assert list(queue.drain()) == [small]


def test_requests_with_other_dimensions_are_never_mixed():
    narrow = [request(width=3, arrived=T0 + i * 1e-4) for i in range(3)]
    wide = [request(width=5, arrived=T0 + 5e-5 + i * 1e-4) for i in range(3)]
    queue = queue_of(*sorted(narrow + wide, key=lambda p: p.arrived))
    settings = batching(size=8, timeout_ms=0)
    first, _ = queue.take(settings, T0 + 1)
    second, _ = queue.take(settings, T0 + 1)
    assert first == narrow and second == wide
    assert len(queue) == 0


def test_unbatchable_requests_are_taken_alone_even_with_batching_on():
    scalar = [Pending({"n": tensor()}, None, "normal", None, T0, print) for _ in range(2)]
    queue = queue_of(*scalar)
    assert queue.take(batching(size=8, timeout_ms=1000), T0) == ([scalar[0]], None)
    assert queue.take(batching(size=8, timeout_ms=1000), T0) == ([scalar[1]], None)


def test_preferred_size_goes_without_waiting_for_the_timeout():
    items = [request(arrived=T0 + i * 1e-4) for i in range(4)]
    queue = queue_of(*items)
    batch, wake = queue.take(batching(size=16, timeout_ms=1000, preferred=(2, 4)), T0 + 0.001)
    assert batch == items and wake is None


def test_preferred_size_takes_the_largest_preferred_prefix_and_leaves_the_rest():
    items = [request(arrived=T0 + i * 1e-4) for i in range(3)]
    queue = queue_of(*items)
    settings = batching(size=16, timeout_ms=1000, preferred=(2, 4))
    batch, wake = queue.take(settings, T0 + 0.001)
    assert batch == items[:2] and wake is None
    # the third alone has reached no preferred size: it waits for the timeout
    assert queue.take(settings, T0 + 0.002) == ([], pytest.approx(T0 + 1.0002))


def test_below_every_preferred_size_the_batch_waits():
    queue = queue_of(request(arrived=T0))
    assert queue.take(batching(size=16, timeout_ms=5, preferred=(4,)), T0) == (
        [],
        pytest.approx(T0 + 0.005),
    )


# --- deadlines -----------------------------------------------------------------------------


def test_an_expired_head_is_skipped_and_left_for_its_timer():
    expired = request(priority="high", deadline=T0 + 0.001)
    live = request(priority="normal")
    queue = queue_of(expired, live)
    assert queue.take(batching(size=1), T0 + 0.002) == ([live], None)
    assert queue.depths()["high"] == 1  # still queued: its timer answers it
    assert queue.remove(expired) is True


def test_expired_requests_are_not_gathered_into_a_batch():
    head = request(arrived=T0)
    expired = request(arrived=T0, deadline=T0 + 0.001)
    other = request(arrived=T0)
    queue = queue_of(head, expired, other)
    batch, _ = queue.take(batching(size=8, timeout_ms=0), T0 + 0.002)
    assert batch == [head, other]
    assert queue.drain() == [expired]


def test_only_expired_requests_give_nothing_and_no_wake_time():
    queue = queue_of(request(deadline=T0 + 0.001), request(deadline=T0 + 0.002))
    assert queue.take(batching(size=8), T0 + 0.003) == ([], None)
    assert len(queue) == 2


def test_a_request_is_live_until_its_deadline():
    item = request(deadline=T0 + 0.005)
    queue = queue_of(item)
    assert queue.take(batching(size=1), T0 + 0.004) == ([item], None)


# --- remove, drain, answer -----------------------------------------------------------------


def test_remove_takes_a_request_out_once():
    a, b, c = request(), request(), request()
    queue = queue_of(a, b, c)
    assert queue.remove(b) is True
    assert queue.remove(b) is False
    assert queue.drain() == [a, c]


def test_drain_empties_the_queue_by_priority_then_arrival():
    low = request(priority="low", arrived=T0)
    normal = request(priority="normal", arrived=T0 + 1)
    high_1 = request(priority="high", arrived=T0 + 2)
    high_2 = request(priority="high", arrived=T0 + 3)
    queue = queue_of(low, normal, high_1, high_2)
    assert queue.drain() == [high_1, high_2, normal, low]
    assert len(queue) == 0 and queue.drain() == []
    queue.push(request(), "model m v1")  # still usable afterwards
    assert len(queue) == 1


def test_taking_from_the_middle_keeps_the_others_in_order():
    items = [request(width=4 if i % 2 == 0 else 6, arrived=T0 + i * 1e-4) for i in range(6)]
    queue = queue_of(*items)
    queue.take(batching(size=8, timeout_ms=0), T0 + 1)  # items 0, 2, 4
    assert queue.drain() == [items[1], items[3], items[5]]


def test_answer_replies_once_and_cancels_the_timer():
    class Timer:
        cancelled = 0

        def cancel(self):
            self.cancelled += 1

    replies: list = []
    item = request(replies=replies)
    item.timer = Timer()
    item.answer(b"result")
    item.answer(MoltError(ErrorCode.DEADLINE_EXCEEDED, "late"))
    assert replies == [b"result"]
    assert item.answered and item.timer.cancelled == 1


# --- config: the scheduling keys -----------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "moltbotd.yaml"
    file.write_text(text)
    return file


def load_error(tmp_path: Path, text: str) -> str:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(file)
    return str(info.value)


def test_scheduling_defaults():
    s = Config().scheduling
    assert s == Scheduling()
    assert (s.priority, s.max_queue, s.fallback) == ("normal", 1000, None)
    assert s.batching == Batching(max_batch_size=1, timeout_ms=2.0, preferred_sizes=())
    assert s.instances == Instances(min=1, max=1, scale_up_queue=4, scale_up_after=1.0,
                                    scale_down_after=60.0)  # fmt: skip


def test_full_scheduling_config_is_converted(tmp_path):
    cfg = load(write(tmp_path, """\
scheduling:
  max_queue: 50
  batching:
    timeout_ms: 4
models:
  m:
    priority: HIGH
    fallback: other
    batching:
      max_batch_size: 32
      preferred_sizes: [16, 8, 16]
    instances:
      min: 2
      max: 4
      scale_up_queue: 10
      scale_up_after: 500ms
      scale_down_after: 2m
"""))  # fmt: skip
    s = cfg.scheduling_for("m", Overrides())
    assert (s.priority, s.max_queue, s.fallback) == ("high", 50, "other")
    assert s.batching == Batching(max_batch_size=32, timeout_ms=4.0, preferred_sizes=(8, 16))
    assert s.instances == Instances(min=2, max=4, scale_up_queue=10, scale_up_after=0.5,
                                    scale_down_after=120.0)  # fmt: skip
    # a model without an entry gets the top-level scheduling
    assert cfg.scheduling_for("n", Overrides()) == cfg.scheduling


def test_scheduling_merges_defaults_model_yaml_and_config_key_by_key(tmp_path):
    cfg = load(write(tmp_path, """\
scheduling:
  max_queue: 7
  batching: {max_batch_size: 4, timeout_ms: 3}
models:
  m:
    batching: {timeout_ms: 9}
"""))  # fmt: skip
    model_yaml = parse_overrides(
        {"priority": "low", "batching": {"max_batch_size": 16, "timeout_ms": 1}}, "model.yaml"
    )
    s = cfg.scheduling_for("m", model_yaml)
    assert s.max_queue == 7  # the daemon-wide default
    assert s.priority == "low"  # model.yaml
    assert s.batching.max_batch_size == 16  # model.yaml over the default
    assert s.batching.timeout_ms == 9.0  # models.m over model.yaml


def test_model_yaml_carries_scheduling_keys(tmp_path):
    file = tmp_path / "model.yaml"
    file.write_text("intra_op_threads: 2\nmax_queue: 3\nbatching:\n  max_batch_size: 8\n")
    overrides = parse_model_yaml(file)
    assert overrides.scheduling == {"max_queue": 3, "batching": {"max_batch_size": 8}}
    assert overrides.session == {"intra_op_threads": 2}


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("priority: urgent", "models.m.priority", "expected one of high, normal, low"),
        ("max_queue: 0", "models.m.max_queue", "expected an integer from 1"),
        ("max_queue: many", "models.m.max_queue", "expected an integer from 1"),
        ("fallback: 'bad name'", "models.m.fallback", "expected a name of"),
        ("batching: {max_batch_size: 0}", "models.m.batching.max_batch_size",
         "expected an integer from 1 to 4096, got 0"),
        ("batching: {max_batch_size: true}", "models.m.batching.max_batch_size",
         "expected an integer from 1 to 4096, got True"),
        ("batching: {timeout_ms: -1}", "models.m.batching.timeout_ms",
         "expected a number of milliseconds from 0 to 60000, got -1"),
        ("batching: {timeout_ms: 2ms}", "models.m.batching.timeout_ms",
         "expected a number of milliseconds"),
        ("batching: {preferred_sizes: 4}", "models.m.batching.preferred_sizes",
         "expected a list of batch sizes from 1 to 4096, got 4"),
        ("batching: {preferred_sizes: [0, 2]}", "models.m.batching.preferred_sizes",
         "expected a list of batch sizes"),
        ("batching: {bogus: 1}", "models.m.batching.bogus", "unknown setting"),
        ("instances: {min: 0}", "models.m.instances.min", "expected an integer from 1 to 64"),
        ("instances: {max: 65}", "models.m.instances.max", "expected an integer from 1 to 64"),
        ("instances: {scale_up_queue: 0}", "models.m.instances.scale_up_queue",
         "expected an integer from 1"),
        ("instances: {scale_up_after: soon}", "models.m.instances.scale_up_after", "soon"),
        ("instances: {scale_down_after: -1s}", "models.m.instances.scale_down_after", "-1s"),
        ("instances: 3", "models.m.instances", "expected a mapping of settings, got 3"),
    ],
)  # fmt: skip
def test_bad_scheduling_values_name_the_key(tmp_path, text, key, expected):
    message = load_error(tmp_path, f"models:\n  m:\n    {text}\n")
    assert f": {key}: " in message, message
    assert expected in message, message


def test_bad_top_level_scheduling_names_its_key(tmp_path):
    message = load_error(tmp_path, "scheduling:\n  batching:\n    max_batch_size: 5000\n")
    assert ": scheduling.batching.max_batch_size: expected an integer from 1 to 4096" in message


def test_bad_scheduling_in_model_yaml_names_the_file_and_key(tmp_path):
    file = tmp_path / "model.yaml"
    file.write_text("instances:\n  max: 0\n")
    with pytest.raises(ConfigError) as info:
        parse_model_yaml(file)
    assert str(info.value).startswith(f"{file}: instances.max: expected an integer from 1 to 64")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("instances: {min: 3, max: 2}", "models.m.instances: min 3 is above max 2"),
        ("batching: {max_batch_size: 8, preferred_sizes: [4, 16, 32]}",
         "models.m.batching: preferred_sizes [16, 32] exceed max_batch_size 8"),
        ("fallback: m", "models.m.fallback: a model cannot fall back on itself"),
    ],
)  # fmt: skip
def test_contradictions_are_refused_at_load_naming_the_key(tmp_path, entry, expected):
    message = load_error(tmp_path, f"models:\n  other: {{}}\n  m:\n    {entry}\n")
    assert message.startswith(f"{tmp_path / 'moltbotd.yaml'}: {expected}"), message
    assert "other" not in message  # only m is named


def test_contradiction_in_the_top_level_defaults_names_scheduling(tmp_path):
    message = load_error(tmp_path, "scheduling:\n  instances: {min: 2}\n")
    assert ": scheduling.instances: min 2 is above max 1" in message, message


def test_contradiction_made_by_a_model_entry_over_the_defaults(tmp_path):
    """Each setting is fine alone; together (defaults + models.m) they contradict."""
    message = load_error(
        tmp_path, "scheduling:\n  batching: {preferred_sizes: [8]}\n"
        "models:\n  m:\n    batching: {max_batch_size: 4}\n"
    )  # fmt: skip
    assert "models.m.batching: preferred_sizes [8] exceed max_batch_size 4" in message


def test_contradiction_between_model_yaml_and_config_is_refused(tmp_path):
    cfg = load(write(tmp_path, "models:\n  m:\n    instances: {max: 2}\n"))
    model_yaml = parse_overrides({"instances": {"min": 4}}, "model.yaml")
    with pytest.raises(ConfigError, match=r"^models\.m\.instances: min 4 is above max 2\b"):
        cfg.scheduling_for("m", model_yaml)
    assert cfg.scheduling_for("m", Overrides()).instances.max == 2  # fine without it


def test_every_contradiction_is_reported_at_once(tmp_path):
    message = load_error(tmp_path, """\
models:
  m:
    fallback: m
    instances: {min: 5, max: 1}
    batching: {preferred_sizes: [2]}
""")  # fmt: skip
    parts = message.split("; ")
    assert len(parts) == 3, message
    assert parts[0].endswith("models.m.instances: min 5 is above max 1 (set both)")
    assert parts[1] == "models.m.batching: preferred_sizes [2] exceed max_batch_size 1"
    assert parts[2] == "models.m.fallback: a model cannot fall back on itself"
