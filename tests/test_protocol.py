"""The sans-IO wire protocol: frames, request envelopes, tensors and values, errors."""

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moltbotd.wire.operations import OPERATIONS
from moltbotd.wire.protocol import (
    ECHO_CHARS,
    HEADER,
    STRING_DTYPE,
    VIEW_BYTES,
    WIRE_DTYPES,
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    MoltError,
    Packed,
    Request,
    RequestError,
    decode_tensor,
    decode_value,
    describe,
    echo,
    encode_frame,
    encode_tensor,
    encode_value,
    error_response,
    join_tensors,
    ok_frame,
    ok_response,
    parse_request,
    request,
    response_result,
    split_tensor,
)


def raw_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


# --- frames -----------------------------------------------------------------------------


def test_encode_frame_is_length_prefixed_msgpack():
    frame = encode_frame({"id": 1, "op": "health"})
    (size,) = HEADER.unpack_from(frame)
    assert size == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"id": 1, "op": "health"}


def test_frames_split_byte_by_byte():
    messages = [request(1, "health"), request("two", "infer", {"model": "demo", "x": b"\x00\x01"})]
    frames = [encode_frame(m) for m in messages]
    stream = b"".join(frames)
    ends = {len(frames[0]) - 1: 1, len(stream) - 1: 2}  # byte index -> messages decoded by then
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
        # a frame decodes exactly when its last byte arrives, not before
        assert len(got) == max([n for end, n in ends.items() if end <= i], default=0)
    assert got == messages
    assert decoder.buffered == 0


def test_frame_completes_only_on_its_last_byte():
    frame = encode_frame(request(7, "status"))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [request(7, "status")]
    assert decoder.buffered == 0


def test_several_frames_in_one_feed_and_a_partial_tail():
    messages = [request(i, "health") for i in range(5)]
    stream = b"".join(encode_frame(m) for m in messages)
    extra = encode_frame(request(99, "models"))
    decoder = FrameDecoder()
    assert decoder.feed(stream + extra[:3]) == messages
    assert decoder.buffered == 3
    assert decoder.feed(extra[3:]) == [request(99, "models")]
    assert decoder.buffered == 0


def test_empty_feed_returns_nothing():
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_frame_over_limit_raises_as_soon_as_the_header_arrives():
    decoder = FrameDecoder(max_frame_bytes=100)
    header = HEADER.pack(101)
    assert decoder.feed(header[:3]) == []  # an incomplete header says nothing yet
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header[3:])  # the body has not been sent at all
    err = info.value
    assert err.code == ErrorCode.FRAME_TOO_LARGE
    assert err.details == {"size": 101, "limit": 100}
    assert "101" in err.message
    assert "100" in err.message


def test_frame_exactly_at_limit_is_accepted():
    frame = encode_frame({"k": "v" * 20})
    decoder = FrameDecoder(max_frame_bytes=len(frame) - 4)
    assert decoder.feed(frame) == [{"k": "v" * 20}]


def test_frame_too_large_is_a_molt_error():
    err = FrameTooLarge(10, 5)
    assert isinstance(err, MoltError)
    assert err.to_wire()["code"] == "FRAME_TOO_LARGE"


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x01",  # an array cut short
        b"\x81\xa1a\x01\x02",  # a map followed by extra data
        b"\xa2\xff\xfe",  # a str that is not UTF-8
    ],
    ids=["never-used", "truncated", "extra-data", "bad-utf8"],
)
def test_garbage_body_is_bad_frame_and_the_stream_goes_on(body):
    decoder = FrameDecoder()
    after = request(2, "health")
    got = decoder.feed(raw_frame(body) + encode_frame(after))
    assert len(got) == 2
    assert isinstance(got[0], MoltError)
    assert got[0].code == ErrorCode.BAD_FRAME
    assert "not valid msgpack" in got[0].message
    assert got[1] == after
    assert decoder.buffered == 0


def test_garbage_body_then_next_frame_in_a_later_feed():
    decoder = FrameDecoder()
    (bad,) = decoder.feed(raw_frame(b"\xc1\xc1\xc1"))
    assert isinstance(bad, MoltError)
    assert bad.code == ErrorCode.BAD_FRAME
    assert decoder.feed(encode_frame(request(3, "models"))) == [request(3, "models")]


@pytest.mark.parametrize(
    ("value", "type_name"),
    [([1, 2, 3], "list"), ("text", "str"), (5, "int"), (None, "NoneType")],
)
def test_body_that_is_not_a_map_is_bad_frame(value, type_name):
    decoder = FrameDecoder()
    got = decoder.feed(raw_frame(msgpack.packb(value)) + encode_frame({"id": 1}))
    assert isinstance(got[0], MoltError)
    assert got[0].code == ErrorCode.BAD_FRAME
    assert "must be a msgpack map" in got[0].message
    assert type_name in got[0].message
    assert got[1] == {"id": 1}


@pytest.mark.parametrize(
    "body",
    [b"\x81\x91\x01\x02", b"\x81\x81\x01\x02\x03"],
    ids=["array-key", "map-key"],
)
def test_map_with_unhashable_key_is_bad_frame_and_the_stream_goes_on(body):
    # Valid msgpack, but no Python dict can hold it: it must not break the decoder.
    decoder = FrameDecoder()
    got = decoder.feed(raw_frame(body) + encode_frame(request(4, "health")))
    assert len(got) == 2
    assert isinstance(got[0], MoltError)
    assert got[0].code == ErrorCode.BAD_FRAME
    assert got[1] == request(4, "health")


def test_frame_with_empty_body_is_bad_frame():
    decoder = FrameDecoder()
    got = decoder.feed(HEADER.pack(0) + encode_frame({"id": 1}))
    assert isinstance(got[0], MoltError)
    assert got[0].code == ErrorCode.BAD_FRAME
    assert got[1] == {"id": 1}


def test_decoded_bytes_survive_later_feeds():
    decoder = FrameDecoder()
    (message,) = decoder.feed(encode_frame({"data": b"\x01\x02\x03"}))
    decoder.feed(encode_frame({"data": b"\xff" * 3})[:5])
    assert message == {"data": b"\x01\x02\x03"}


# --- requests and responses ----------------------------------------------------------------


def test_parse_request_valid():
    assert parse_request({"id": 1, "op": "infer", "params": {"model": "demo"}}) == Request(
        1, "infer", {"model": "demo"}
    )
    assert parse_request({"id": "abc", "op": "health"}) == Request("abc", "health", {})


@pytest.mark.parametrize(
    ("message", "text"),
    [
        ({"op": "health"}, "got nothing"),
        ({"id": True, "op": "health"}, "got bool True"),
        ({"id": 1.5, "op": "health"}, "got float 1.5"),
        ({"id": [1], "op": "health"}, "got list [1]"),
    ],
    ids=["missing", "bool", "float", "list"],
)
def test_parse_request_bad_id_has_no_req_id(message, text):
    with pytest.raises(RequestError) as info:
        parse_request(message)
    assert info.value.req_id is None
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert "'id' must be an integer or a string" in info.value.message
    assert text in info.value.message


@pytest.mark.parametrize(
    ("message", "text"),
    [
        ({"id": 5, "op": 3}, "'op' must be a string, got int 3"),
        ({"id": 5}, "'op' must be a string, got nothing"),
        ({"id": 5, "op": "infer", "params": [1]}, "'params' must be a map, got list [1]"),
        ({"id": 5, "op": "infer", "params": "x"}, "'params' must be a map, got str 'x'"),
    ],
    ids=["int-op", "missing-op", "list-params", "str-params"],
)
def test_parse_request_errors_after_a_valid_id_carry_it(message, text):
    with pytest.raises(RequestError) as info:
        parse_request(message)
    assert info.value.req_id == 5
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert text in info.value.message


def test_parse_request_error_keeps_a_string_id():
    with pytest.raises(RequestError) as info:
        parse_request({"id": "req-1", "op": None})
    assert info.value.req_id == "req-1"


def test_responses_and_response_result():
    ok = ok_response(3, {"a": 1})
    assert ok == {"id": 3, "ok": True, "result": {"a": 1}}
    assert response_result(ok) == {"a": 1}
    err = error_response(4, MoltError(ErrorCode.CONFLICT, "busy", {"model": "demo"}))
    assert err == {
        "id": 4,
        "ok": False,
        "error": {"code": "CONFLICT", "message": "busy", "details": {"model": "demo"}},
    }
    with pytest.raises(MoltError) as info:
        response_result(err)
    assert info.value.code == ErrorCode.CONFLICT
    assert info.value.message == "busy"
    assert info.value.details == {"model": "demo"}


def test_response_result_without_ok_true_raises():
    with pytest.raises(MoltError) as info:
        response_result({"id": 1, "ok": "yes", "result": 1})
    assert info.value.code == ErrorCode.INTERNAL
    assert "malformed error envelope" in info.value.message


# --- errors -------------------------------------------------------------------------------


def test_molt_error_wire_round_trip():
    err = MoltError(ErrorCode.VERSION_NOT_FOUND, "no version v9", {"known": ["v1", "v2"]})
    wire = err.to_wire()
    assert wire == {
        "code": "VERSION_NOT_FOUND",
        "message": "no version v9",
        "details": {"known": ["v1", "v2"]},
    }
    # and through msgpack, as it travels
    back = MoltError.from_wire(msgpack.unpackb(msgpack.packb(wire)))
    assert back.code == ErrorCode.VERSION_NOT_FOUND
    assert back.message == "no version v9"
    assert back.details == {"known": ["v1", "v2"]}
    assert str(back) == "no version v9"


def test_molt_error_without_details_has_an_empty_map():
    assert MoltError(ErrorCode.INTERNAL, "x").to_wire()["details"] == {}


@pytest.mark.parametrize(
    "obj",
    [None, "boom", [1, 2], {"code": "BAD_REQUEST"}, {"code": "BAD_REQUEST", "message": 5}],
    ids=["none", "str", "list", "no-message", "int-message"],
)
def test_from_wire_malformed_envelope(obj):
    err = MoltError.from_wire(obj)
    assert err.code == ErrorCode.INTERNAL
    assert err.message.startswith("malformed error envelope: ")
    assert repr(obj) in err.message
    assert err.details == {}


def test_from_wire_unknown_code_becomes_internal_keeping_the_message():
    err = MoltError.from_wire({"code": "NEW_CODE", "message": "from the future"})
    assert err.code == ErrorCode.INTERNAL
    assert err.message == "from the future"


def test_from_wire_details_not_a_map_are_dropped():
    err = MoltError.from_wire({"code": "CONFLICT", "message": "m", "details": [1]})
    assert err.code == ErrorCode.CONFLICT
    assert err.details == {}


# --- tensors and values ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_tensor_round_trip_every_wire_dtype(dtype):
    array = (np.arange(6) % 2 == 1) if dtype == "bool" else np.arange(6).astype(dtype)
    array = array.reshape(2, 3)
    wire = encode_tensor(array)
    assert wire["dtype"] == dtype
    assert wire["shape"] == [2, 3]
    assert isinstance(wire["data"], bytes)
    assert len(wire["data"]) == 6 * np.dtype(dtype).itemsize
    back = decode_tensor(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True)))
    assert back.dtype == np.dtype(dtype)
    assert back.shape == (2, 3)
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_tensor_zero_size_and_zero_d_every_dtype(dtype):
    empty = np.zeros((0, 3), dtype=dtype)
    back = decode_tensor(encode_tensor(empty))
    assert back.shape == (0, 3)
    assert back.dtype == np.dtype(dtype)
    scalar = np.array(1, dtype=dtype)
    wire = encode_tensor(scalar)
    assert wire["shape"] == []
    back = decode_tensor(wire)
    assert back.shape == ()
    assert back.dtype == np.dtype(dtype)
    assert back == scalar


def test_tensor_wire_bytes_are_little_endian():
    big = np.array([1, 2], dtype=">i4")
    wire = encode_tensor(big)
    assert wire["dtype"] == "int32"
    assert wire["data"] == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    np.testing.assert_array_equal(decode_tensor(wire), [1, 2])


def test_non_contiguous_tensor_round_trips():
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    back = decode_tensor(encode_tensor(array))
    np.testing.assert_array_equal(back, array)


def test_tensor_of_unsupported_dtype_is_refused():
    with pytest.raises(MoltError) as info:
        encode_tensor(np.array([1 + 2j]))
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert "complex128" in info.value.message


@pytest.mark.parametrize(
    "array",
    [
        np.array([["a", "bc"], ["déf", ""]]),  # numpy unicode
        np.array(["x", "yz", "w"], dtype=object),  # onnxruntime's string outputs
        np.array("solo", dtype=object),  # 0-d
        np.zeros((0, 2), dtype=object),  # zero-size
    ],
    ids=["unicode", "object", "0-d", "zero-size"],
)
def test_string_tensor_round_trip(array):
    wire = encode_tensor(array)
    assert wire["dtype"] == STRING_DTYPE
    assert wire["shape"] == list(array.shape)
    assert all(isinstance(s, str) for s in wire["data"])
    back = decode_tensor(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True)))
    assert back.dtype == object
    assert back.shape == array.shape
    assert back.tolist() == array.astype(object).tolist()


def test_zipmap_like_value_survives_a_frame_round_trip():
    # onnxruntime's ZipMap output: a sequence of {class id: probability}
    value = [
        {0: np.float32(0.25), 1: 0.5, 2: 0.25},
        {np.int64(0): 0.1, 1: 0.2, 2: 0.7},
    ]
    outputs = {"label": np.array([1, 2], dtype=np.int64), "probabilities": value}
    message = ok_response(9, {name: encode_value(v) for name, v in outputs.items()})
    (decoded,) = FrameDecoder().feed(encode_frame(message))
    result = {name: decode_value(v) for name, v in response_result(decoded).items()}
    np.testing.assert_array_equal(result["label"], [1, 2])
    assert result["label"].dtype == np.int64
    probabilities = result["probabilities"]
    assert probabilities == [{0: 0.25, 1: 0.5, 2: 0.25}, {0: 0.1, 1: 0.2, 2: 0.7}]
    for entry in probabilities:
        assert all(type(k) is int for k in entry)  # int keys stay ints, not strings


def test_encode_value_tags_sequences_and_maps():
    wire = encode_value([{"a": np.int64(3)}, (np.float64(1.5), "s", None)])
    assert wire == {"sequence": [{"map": {"a": 3}}, {"sequence": [1.5, "s", None]}]}
    assert type(wire["sequence"][0]["map"]["a"]) is int
    assert decode_value(wire) == [{"a": 3}, [1.5, "s", None]]


def test_value_of_string_keyed_maps_and_nested_tensors_round_trips():
    value = {"setosa": np.array([0.5], dtype=np.float32), "virginica": [np.array([1, 2])]}
    (decoded,) = FrameDecoder().feed(encode_frame({"v": encode_value(value)}))
    back = decode_value(decoded["v"])
    assert set(back) == {"setosa", "virginica"}
    np.testing.assert_array_equal(back["setosa"], [0.5])
    assert back["setosa"].dtype == np.float32
    np.testing.assert_array_equal(back["virginica"][0], [1, 2])


def test_plain_scalars_pass_through_values():
    assert encode_value(np.float32(2.5)) == 2.5
    assert decode_value(7) == 7
    assert decode_value("x") == "x"


def test_byte_string_arrays_travel_as_text():
    assert encode_tensor(np.array([b"ab", b"c"]))["data"] == ["ab", "c"]


def test_freed_memory_is_kept_for_reuse_on_glibc():
    from moltbotd.malloc import keep_freed_memory

    assert keep_freed_memory() is True  # glibc accepts both thresholds (32 MiB is its cap)


def test_join_and_split_tensors_round_trip_mixed_row_counts() -> None:
    parts = [np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + rows for rows in (1, 4, 2)]
    joined = join_tensors([encode_tensor(p) for p in parts])
    assert joined.tolist() == np.concatenate(parts).tolist()
    split = split_tensor(joined * 2, [1, 4, 2])
    assert [decode_tensor(t).tolist() for t in split] == [(p * 2).tolist() for p in parts]
    assert [t["shape"] for t in split] == [[1, 3], [4, 3], [2, 3]]
    assert split_tensor(np.zeros((0, 3), np.int64), [0])[0] == \
        {"dtype": "int64", "shape": [0, 3], "data": b""}  # fmt: skip


def test_encode_tensor_names_big_endian_arrays_by_their_dtype() -> None:
    big = np.arange(3, dtype=">f4")
    encoded = encode_tensor(big)
    assert encoded["dtype"] == "float32"
    assert decode_tensor(encoded).tolist() == [0.0, 1.0, 2.0]


def test_ok_frame_is_the_encoded_ok_response() -> None:
    packed = Packed(msgpack.packb({"y": 1}))
    assert ok_frame(7, packed) == encode_frame(ok_response(7, packed))


def test_encode_tensor_gives_a_view_of_a_large_array_that_packs_as_bytes() -> None:
    large = np.arange(VIEW_BYTES // 4, dtype=np.float32)
    encoded = encode_tensor(large, view=True)
    assert isinstance(encoded["data"], memoryview)  # no copy before packing
    wire = msgpack.unpackb(msgpack.packb(encoded))
    assert wire["data"] == large.tobytes()
    assert isinstance(encode_tensor(large[:10], view=True)["data"], bytes)
    assert isinstance(encode_tensor(large)["data"], bytes)  # a copy unless asked


# --- bounds: what a hostile peer can make the decoder hold or a message echo (issue 14) --


def nested(depth: int, leaf: object = 1) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_frames_before_an_oversized_header_are_returned_then_it_raises():
    decoder = FrameDecoder(max_frame_bytes=100)
    good = encode_frame({"id": 1, "op": "health"})
    assert decoder.feed(good + HEADER.pack(101)) == [{"id": 1, "op": "health"}]
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"")  # the bad header stays: the stream cannot go on


def test_next_frame_takes_frames_one_at_a_time_up_to_a_bad_header():
    decoder = FrameDecoder(max_frame_bytes=100)
    decoder.receive(encode_frame({"a": 1}) + encode_frame({"b": 2}) + HEADER.pack(101) + b"x")
    assert decoder.next_frame() == {"a": 1}
    assert decoder.buffered > 0  # the rest waits until it is asked for
    assert decoder.next_frame() == {"b": 2}
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert decoder.buffered == 0  # a failed decoder holds nothing...
    decoder.receive(b"more bytes")
    assert decoder.buffered == 0  # ...and keeps nothing that comes later
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_a_header_announcing_a_large_frame_holds_only_what_arrived():
    decoder = FrameDecoder()
    assert decoder.feed(HEADER.pack(60 * 2**20) + b"0123456789") == []
    assert decoder.buffered == HEADER.size + 10


def test_nesting_deeper_than_msgpack_allows_is_bad_frame():
    body = b"\x81\xa2id" + b"\x91" * 3000 + b"\x01"
    [err] = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, MoltError)
    assert err.code == ErrorCode.BAD_FRAME
    assert "1024 levels" in err.message


def test_a_deeply_nested_id_is_refused_without_recursion():
    message = msgpack.unpackb(msgpack.packb({"id": nested(1000), "op": "health"}))
    with pytest.raises(RequestError) as info:
        parse_request(message)
    assert info.value.req_id is None
    assert "got list [[[[...]]]]" in info.value.message


def test_a_long_string_id_is_refused_and_not_echoed_whole():
    with pytest.raises(RequestError) as info:
        parse_request({"id": "i" * 10_000_000, "op": "health"})
    assert info.value.req_id is None  # the answer does not carry it back either
    assert "a string of at most 256 characters" in info.value.message
    assert "str of 10000000 characters" in info.value.message
    assert len(info.value.message) < 300


def test_a_long_operation_name_is_refused_with_the_id():
    with pytest.raises(RequestError) as info:
        parse_request({"id": 3, "op": "o" * 300}, max_name_chars=100)
    assert info.value.req_id == 3
    assert "'op' must be a string of at most 100 characters, got str of 300" in info.value.message


@pytest.mark.parametrize(
    "value",
    [
        nested(1000),
        "x" * 10_000_000,
        b"\x00" * 10_000_000,
        {str(i): nested(50) for i in range(100_000)},
        [{"a": [b"b" * 1000] * 1000}] * 1000,
        msgpack.ExtType(5, b"x" * 1000),
        2**64 - 1,
    ],
    ids=["deep", "long-str", "long-bytes", "big-map", "wide", "ext", "big-int"],
)
def test_echo_and_describe_are_short_whatever_the_value(value):
    assert len(echo(value)) <= ECHO_CHARS
    assert len(describe(value)) < 3 * ECHO_CHARS


def test_from_wire_of_a_deep_envelope_does_not_recurse():
    err = MoltError.from_wire(nested(1000))
    assert err.code == ErrorCode.INTERNAL
    assert len(err.message) < 200


# --- properties (hypothesis) -------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
messages = st.dictionaries(st.text(max_size=8), values, max_size=5)


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_any_split_of_valid_frames_decodes_the_same(batch, data):
    stream = b"".join(encode_frame(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder, got = FrameDecoder(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += decoder.feed(stream[start:end])
    assert got == batch
    assert decoder.buffered == 0


@given(messages)
def test_encode_then_decode_round_trips(message):
    decoder = FrameDecoder()
    decoder.receive(encode_frame(message))
    assert decoder.next_frame() == message
    assert decoder.next_frame() is None


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_raise_only_the_protocols_errors(chunks):
    decoder = FrameDecoder(max_frame_bytes=48)
    try:
        for chunk in chunks:
            for item in decoder.feed(chunk):
                assert isinstance(item, dict | MoltError)
    except FrameTooLarge:
        assert decoder.buffered == 0


@given(values, values, values)
def test_any_envelope_and_params_raise_only_molt_errors(req_id, op, params):
    message = {"id": req_id, "op": op, "params": params}
    try:
        request = parse_request(message)
    except RequestError:
        return
    for operation in OPERATIONS.values():
        with contextlib.suppress(MoltError):
            operation.check_params(request.params)
