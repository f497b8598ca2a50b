"""Checking a request's inputs against a model version's signature, before a worker sees it."""

import numpy as np
import pytest

from moltbotd.wire.protocol import ErrorCode, MoltError, decode_tensor, encode_tensor
from moltbotd.wire.signature import (
    Signature,
    TensorSpec,
    check_inputs,
    check_output_names,
    compare,
    format_shape,
    spec_from_ort,
)

LABEL = "model demo v1.0"
X = TensorSpec("x", "tensor(float)", ("N", 3))  # named dynamic dim, then fixed
IDS = TensorSpec("ids", "tensor(int64)", (2,))
WORDS = TensorSpec("words", "tensor(string)", (None,))  # unnamed dynamic dim
SIG = Signature(
    (X, IDS, WORDS),
    (
        TensorSpec("y", "tensor(float)", ("N", 3)),
        TensorSpec("probabilities", "seq(map(int64,tensor(float)))", None),
    ),
)


def tensor(array: np.ndarray) -> dict:
    return encode_tensor(array)


def valid_inputs(**replace: object) -> dict:
    inputs = {
        "x": tensor(np.zeros((2, 3), dtype=np.float32)),
        "ids": tensor(np.array([1, 2], dtype=np.int64)),
        "words": ["a", "b", "c"],
    }
    inputs.update(replace)
    return inputs


def invalid(inputs: dict, signature: Signature = SIG) -> MoltError:
    with pytest.raises(MoltError) as info:
        check_inputs(LABEL, signature, inputs)
    err = info.value
    assert err.code == ErrorCode.INVALID_INPUT
    assert LABEL in err.message
    return err


def test_valid_inputs_pass_as_tensor_maps():
    checked = check_inputs(LABEL, SIG, valid_inputs())
    assert set(checked) == {"x", "ids", "words"}
    assert checked["x"] == tensor(np.zeros((2, 3), dtype=np.float32))
    assert checked["words"] == {"dtype": "string", "shape": [3], "data": ["a", "b", "c"]}


def test_unknown_input_lists_the_models_inputs():
    err = invalid(valid_inputs(z=[1.0]))
    assert err.message == (
        f"{LABEL} has no input 'z'; its inputs are 'x' (float32, shape [N, 3]),"
        " 'ids' (int64, shape [2]), 'words' (string, shape [?])"
    )
    assert err.details["input"] == "z"
    assert [spec["name"] for spec in err.details["expected"]] == ["x", "ids", "words"]


def test_missing_input():
    inputs = valid_inputs()
    del inputs["ids"]
    err = invalid(inputs)
    assert err.message == f"{LABEL}: missing input 'ids' (int64, shape [2])"
    assert err.details == {"input": "ids", "expected": IDS.to_wire()}


def test_wrong_dtype():
    err = invalid(valid_inputs(x=tensor(np.zeros((2, 3), dtype=np.int64))))
    assert err.message == f"{LABEL}: input 'x': expected float32 with shape [N, 3], got dtype int64"
    assert err.details == {"input": "x", "expected": X.to_wire()}


def test_wrong_rank():
    err = invalid(valid_inputs(x=tensor(np.zeros(3, dtype=np.float32))))
    assert err.message == f"{LABEL}: input 'x': expected float32 with shape [N, 3], got shape [3]"


def test_wrong_fixed_dim():
    err = invalid(valid_inputs(x=tensor(np.zeros((2, 4), dtype=np.float32))))
    assert (
        err.message == f"{LABEL}: input 'x': expected float32 with shape [N, 3], got shape [2, 4]"
    )
    err = invalid(valid_inputs(ids=tensor(np.array([1, 2, 3], dtype=np.int64))))
    assert err.message == f"{LABEL}: input 'ids': expected int64 with shape [2], got shape [3]"


@pytest.mark.parametrize("rows", [0, 1, 7])
def test_dynamic_dims_accepted(rows):
    checked = check_inputs(
        LABEL,
        SIG,
        valid_inputs(x=tensor(np.ones((rows, 3), dtype=np.float32)), words=["w"] * (rows + 1)),
    )
    assert checked["x"]["shape"] == [rows, 3]
    assert checked["words"]["shape"] == [rows + 1]


def test_data_byte_length_mismatch():
    x = {"dtype": "float32", "shape": [2, 3], "data": bytes(20)}
    err = invalid(valid_inputs(x=x))
    assert err.message == (
        f"{LABEL}: input 'x': 'data' must be 24 bytes for float32 [2, 3], got 20 bytes"
    )


def test_data_not_bytes():
    x = {"dtype": "float32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}
    err = invalid(valid_inputs(x=x))
    assert (
        err.message == f"{LABEL}: input 'x': 'data' must be 12 bytes for float32 [1, 3], got list"
    )


def test_string_tensor_map_data_must_match_its_shape():
    words = {"dtype": "string", "shape": [3], "data": ["a", "b"]}
    err = invalid(valid_inputs(words=words))
    assert err.message == f"{LABEL}: input 'words': 'data' must be a list of 3 strings"
    words = {"dtype": "string", "shape": [2], "data": ["a", 2]}
    err = invalid(valid_inputs(words=words))
    assert err.message == f"{LABEL}: input 'words': 'data' must be a list of 2 strings"


@pytest.mark.parametrize(
    ("x", "keys"),
    [
        ({"dtype": "float32", "shape": [1, 3]}, "['dtype', 'shape']"),
        ({"dtype": "float32", "shape": [1, 3], "data": bytes(12), "order": "C"}, None),
        ({}, "[]"),
    ],
    ids=["missing-key", "extra-key", "empty"],
)
def test_tensor_map_with_missing_or_extra_keys(x, keys):
    err = invalid(valid_inputs(x=x))
    assert err.message.startswith(
        f"{LABEL}: input 'x': expected a tensor map {{dtype, shape, data}} or nested lists,"
        " got a map with keys "
    )
    assert err.message.endswith(keys or str(sorted(x)))


@pytest.mark.parametrize(
    "shape",
    [[-1, 3], [True, 3], [1.0, 3], "1,3", None, (1, 3), [None, 3]],
    ids=["negative", "bool", "float", "str", "none", "tuple", "none-dim"],
)
def test_bad_shape_values(shape):
    x = {"dtype": "float32", "shape": shape, "data": bytes(12)}
    err = invalid(valid_inputs(x=x))
    assert err.message == (
        f"{LABEL}: input 'x': 'shape' must be a list of non-negative integers, got {shape!r}"
    )


@pytest.mark.parametrize("dtype", ["complex64", "float", "", None, 5])
def test_unknown_dtype(dtype):
    x = {"dtype": dtype, "shape": [1, 3], "data": bytes(12)}
    err = invalid(valid_inputs(x=x))
    assert err.message.startswith(f"{LABEL}: input 'x': unknown dtype {dtype!r} (known: bool, ")
    assert "float32" in err.message
    assert err.message.endswith("float64, string)")


@pytest.mark.parametrize("dtype", [["float32"], {"name": "float32"}], ids=["list", "map"])
def test_unhashable_dtype_is_invalid_input(dtype):
    # a client can send any msgpack value as dtype: it must get INVALID_INPUT, not a crash
    x = {"dtype": dtype, "shape": [1, 3], "data": bytes(12)}
    err = invalid(valid_inputs(x=x))
    assert "input 'x': unknown dtype" in err.message


def test_nested_list_converted_to_the_expected_dtype():
    checked = check_inputs(LABEL, SIG, valid_inputs(x=[[1, 2, 3], [4.5, 5, 6]], ids=[7, 8]))
    x = checked["x"]
    assert x["dtype"] == "float32"
    assert x["shape"] == [2, 3]
    assert x["data"] == np.array([[1, 2, 3], [4.5, 5, 6]], dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_tensor(x), [[1, 2, 3], [4.5, 5, 6]])
    ids = checked["ids"]
    assert ids["dtype"] == "int64"
    assert ids["data"] == np.array([7, 8], dtype="<i8").tobytes()


def test_plain_scalar_for_a_0d_input():
    sig = Signature((TensorSpec("n", "tensor(int64)", ()),), ())
    checked = check_inputs(LABEL, sig, {"n": 5})
    assert checked["n"] == {"dtype": "int64", "shape": [], "data": np.int64(5).tobytes()}


def test_nested_list_of_the_wrong_shape_is_refused_after_conversion():
    err = invalid(valid_inputs(x=[[1.0, 2.0]]))
    assert (
        err.message == f"{LABEL}: input 'x': expected float32 with shape [N, 3], got shape [1, 2]"
    )


@pytest.mark.parametrize(
    "value",
    [[[1.0, 2.0, 3.0], [4.0, 5.0]], [["a", "b", "c"]], [[1, 2, {"k": 1}]]],
    ids=["ragged", "text", "map-inside"],
)
def test_unreadable_nested_list(value):
    err = invalid(valid_inputs(x=value))
    assert err.message.startswith(
        f"{LABEL}: input 'x': cannot read the value as a float32 tensor: "
    )
    assert "\n" not in err.message
    assert err.details == {"input": "x", "expected": X.to_wire()}


def test_out_of_range_integer_is_refused():
    err = invalid(valid_inputs(ids=[1, 2**70]))
    assert err.message.startswith(f"{LABEL}: input 'ids': cannot read the value as a int64 tensor")


def test_string_input_from_a_plain_list():
    sig = Signature((TensorSpec("s", "tensor(string)", (2, 2)),), ())
    checked = check_inputs(LABEL, sig, {"s": [["a", "b"], ["c", "d"]]})
    assert checked["s"] == {"dtype": "string", "shape": [2, 2], "data": ["a", "b", "c", "d"]}


@pytest.mark.parametrize("value", [["a", 1], [None], [b"bytes"]], ids=["int", "none", "bytes"])
def test_string_input_with_non_strings(value):
    err = invalid(valid_inputs(words=value))
    assert err.message.startswith(f"{LABEL}: input 'words': expected strings, got ")


def test_string_tensor_given_for_a_float_input():
    err = invalid(valid_inputs(x={"dtype": "string", "shape": [1, 3], "data": ["a", "b", "c"]}))
    assert (
        err.message == f"{LABEL}: input 'x': expected float32 with shape [N, 3], got dtype string"
    )


def test_non_tensor_input_type_is_refused():
    sig = Signature((TensorSpec("m", "map(int64,tensor(float))", None),), ())
    err = invalid({"m": {"dtype": "float32", "shape": [1], "data": bytes(4)}}, sig)
    assert err.message == (
        f"{LABEL}: input 'm' has type map(int64,tensor(float)), which moltbot cannot send yet"
    )


def test_check_output_names():
    assert check_output_names(LABEL, SIG, ["y"]) == ["y"]
    assert check_output_names(LABEL, SIG, []) == []
    with pytest.raises(MoltError) as info:
        check_output_names(LABEL, SIG, ["y", "logits"])
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert info.value.message == (
        f"{LABEL} has no output 'logits'; its outputs are y, probabilities"
    )


# --- the signature itself ------------------------------------------------------------------


def test_signature_wire_round_trip():
    wire = SIG.to_wire()
    assert wire["inputs"][0] == {
        "name": "x",
        "type": "tensor(float)",
        "dtype": "float32",
        "shape": ["N", 3],
    }
    assert wire["outputs"][1]["dtype"] is None
    assert wire["outputs"][1]["shape"] is None
    assert Signature.from_wire(wire) == SIG


def test_describe_and_format_shape():
    assert format_shape(("N", None, 3)) == "[N, ?, 3]"
    assert format_shape([]) == "[]"
    assert SIG.outputs[1].describe() == "'probabilities' (seq(map(int64,tensor(float))))"


def test_spec_from_ort_node():
    class Node:
        def __init__(self, name, type_, shape):
            self.name, self.type, self.shape = name, type_, shape

    assert spec_from_ort(Node("x", "tensor(float)", ["N", 4, None])) == TensorSpec(
        "x", "tensor(float)", ("N", 4, None)
    )
    assert spec_from_ort(Node("p", "seq(map(int64,tensor(float)))", [])) == TensorSpec(
        "p", "seq(map(int64,tensor(float)))", None
    )


def test_fractional_value_for_an_integer_input_is_refused_not_truncated():
    err = invalid(valid_inputs(ids=[1, 2.5]))
    assert "input 'ids': cannot read the value as a int64 tensor: 2.5 is not a whole number" in (
        err.message
    )
    checked = check_inputs(LABEL, SIG, valid_inputs(ids=[1.0, 2.0]))  # whole floats are fine
    assert decode_tensor(checked["ids"]).tolist() == [1, 2]


# --- comparing two signatures --------------------------------------------------------------

Y = SIG.outputs[0]


def with_input(spec: TensorSpec) -> Signature:
    """SIG with the input of spec's name replaced by spec."""
    return Signature(tuple(spec if s.name == spec.name else s for s in SIG.inputs), SIG.outputs)


def with_outputs(*outputs: TensorSpec) -> Signature:
    return Signature(SIG.inputs, outputs)


def test_compare_identical_signatures():
    assert compare(SIG, SIG) == []
    assert compare(SIG, Signature.from_wire(SIG.to_wire())) == []


def test_compare_ignores_names_of_dynamic_dims():
    assert compare(SIG, with_input(TensorSpec("x", "tensor(float)", ("batch", 3)))) == []
    assert compare(SIG, with_input(TensorSpec("x", "tensor(float)", (None, 3)))) == []
    assert (
        compare(SIG, with_outputs(TensorSpec("y", "tensor(float)", (None, 3)), SIG.outputs[1]))
        == []
    )


def test_compare_input_widened_to_dynamic_is_compatible():
    assert compare(SIG, with_input(TensorSpec("x", "tensor(float)", ("N", "C")))) == []
    assert compare(SIG, with_input(TensorSpec("ids", "tensor(int64)", (None,)))) == []


def test_compare_input_narrowed():
    new = with_input(TensorSpec("x", "tensor(float)", (8, 3)))
    assert compare(SIG, new) == ["input 'x': shape [N, 3] -> [8, 3]"]
    new = with_input(TensorSpec("x", "tensor(float)", ("N", 4)))
    assert compare(SIG, new) == ["input 'x': shape [N, 3] -> [N, 4]"]


def test_compare_output_widened_is_a_change():
    new = with_outputs(TensorSpec("y", "tensor(float)", ("N", None)), SIG.outputs[1])
    assert compare(SIG, new) == ["output 'y': shape [N, 3] -> [N, ?]"]


def test_compare_output_narrowed_is_compatible():
    new = with_outputs(TensorSpec("y", "tensor(float)", (5, 3)), SIG.outputs[1])
    assert compare(SIG, new) == []


def test_compare_dtype_change():
    new = with_input(TensorSpec("x", "tensor(double)", ("N", 3)))
    assert compare(SIG, new) == ["input 'x': dtype float32 -> float64"]
    seq = "seq(map(string,tensor(float)))"
    new = with_outputs(Y, TensorSpec("probabilities", seq, None))
    assert compare(SIG, new) == [
        f"output 'probabilities': dtype seq(map(int64,tensor(float))) -> {seq}"
    ]


def test_compare_rank_change():
    new = with_input(TensorSpec("x", "tensor(float)", ("N", 3, None)))
    assert compare(SIG, new) == ["input 'x': shape [N, 3] -> [N, 3, ?]"]
    new = with_outputs(TensorSpec("y", "tensor(float)", ("N",)), SIG.outputs[1])
    assert compare(SIG, new) == ["output 'y': shape [N, 3] -> [N]"]


def test_compare_input_added():
    new = Signature((*SIG.inputs, TensorSpec("z", "tensor(int64)", (2,))), SIG.outputs)
    assert compare(SIG, new) == ["input 'z' (int64, shape [2]) is new"]


def test_compare_input_removed():
    new = Signature((IDS, WORDS), SIG.outputs)
    assert compare(SIG, new) == ["input 'x' (float32, shape [N, 3]) is removed"]


def test_compare_output_added_is_compatible():
    new = with_outputs(*SIG.outputs, TensorSpec("logits", "tensor(float)", ("N", 10)))
    assert compare(SIG, new) == []


def test_compare_output_removed():
    assert compare(SIG, with_outputs(Y)) == [
        "output 'probabilities' (seq(map(int64,tensor(float)))) is removed"
    ]


def test_compare_non_tensor_outputs_of_the_same_type():
    probabilities = TensorSpec("probabilities", "seq(map(int64,tensor(float)))", None)
    assert compare(SIG, with_outputs(Y, probabilities)) == []


def test_compare_lists_changes_inputs_first_in_old_order_then_outputs():
    new = Signature(
        (
            TensorSpec("extra", "tensor(bool)", ()),
            TensorSpec("words", "tensor(string)", (4,)),
            TensorSpec("x", "tensor(int32)", ("N", 2)),
        ),
        (
            TensorSpec("logits", "tensor(float)", ("N", 10)),
            TensorSpec("y", "tensor(float)", ("N", "C")),
        ),
    )
    assert compare(SIG, new) == [
        "input 'x': dtype float32 -> int32",
        "input 'x': shape [N, 3] -> [N, 2]",
        "input 'ids' (int64, shape [2]) is removed",
        "input 'words': shape [?] -> [4]",
        "input 'extra' (bool, shape []) is new",
        "output 'y': shape [N, 3] -> [N, C]",
        "output 'probabilities' (seq(map(int64,tensor(float)))) is removed",
    ]
