"""The Open Inference Protocol's pure parts: the codec (wire/oip.py), the HTTP routes,
token keys and the network settings' checks; and that oip_pb2.py is what oip.proto
compiles to."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from moltbotd.config import ConfigError, load
from moltbotd.network.rest import infer, model_metadata, route
from moltbotd.network.tokens import KeyFileError, load_key
from moltbotd.wire import oip
from moltbotd.wire.protocol import ErrorCode, MoltError

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_messages_are_what_the_proto_compiles_to(tmp_path):
    folder = ROOT / "moltbotd" / "network"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}",
                    f"--python_out={tmp_path}", "oip.proto"], check=True)  # fmt: skip
    assert (tmp_path / "oip_pb2.py").read_text() == (folder / "oip_pb2.py").read_text(), (
        "moltbotd/network/oip_pb2.py is stale: run make proto"
    )


def test_every_error_code_has_an_http_and_a_grpc_status():
    assert set(oip.STATUS) == set(ErrorCode)


def test_routes_and_their_refusals():
    assert route("POST", "/v2/models/demo/versions/v1/infer") == (
        infer,
        {"model": "demo", "version": "v1"},
    )
    assert route("HEAD", "/v2/models/demo") == (model_metadata, {"model": "demo"})
    status, _, headers = route("PUT", "/v2/models/demo/infer")  # type: ignore[misc]
    assert (status, headers) == (405, [("Allow", "POST")])
    assert route("GET", "/v2/models//infer")[0] == 404


def test_bytes_round_trip_in_binary_form():
    tensor = {"dtype": "string", "shape": [3], "data": ["a", "", "\u2603"]}
    raw = oip.raw_of(tensor)
    assert raw[:5] == b"\x01\x00\x00\x00a"
    assert oip.from_raw("input 's'", "string", [3], raw) == tensor


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x05\x00", "BYTES data ends inside an element's 4-byte length"),
        (b"\x05\x00\x00\x00ab", "a BYTES element of 5 bytes runs past the data"),
        (b"\x01\x00\x00\x00\xff", "BYTES element 0 is not UTF-8 text"),
    ],
)
def test_broken_bytes_are_refused_naming_the_input(raw, message):
    with pytest.raises(MoltError) as caught:
        oip.from_raw("input 's'", "string", [1], raw)
    assert caught.value.message == f"input 's': {message}"


def test_binary_inputs_must_account_for_every_byte():
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                   "parameters": {"binary_data_size": 4}}]}).encode()  # fmt: skip
    body = head + np.float32(1).tobytes() + b"extra"
    with pytest.raises(MoltError) as caught:
        oip.parse_infer(body, len(head), "m", None)
    assert "9 bytes of binary data follow the JSON" in caught.value.message
    params, wanted = oip.parse_infer(body[:-5], len(head), "m", "v1")
    one = {"dtype": "float32", "shape": [1], "data": b"\x00\x00\x80?"}
    assert params == {"model": "m", "version": "v1", "inputs": {"x": one}}
    assert not wanted("y")


def test_outputs_come_back_binary_as_asked():
    doc = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [7]}],
           "outputs": [{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}],
           "parameters": {"binary_data_output": False}}  # fmt: skip
    params, wanted = oip.parse_infer(json.dumps(doc).encode(), None, "m", None)
    assert params["outputs"] == ["a", "b"] and wanted("a") and not wanted("b")
    result = {"model": "m", "version": "v1", "outputs": {
        "a": {"dtype": "int64", "shape": [1], "data": np.int64(7).tobytes()},
        "b": {"dtype": "bool", "shape": [2], "data": b"\x01\x00"}}}  # fmt: skip
    body, length = oip.infer_answer(result, wanted, "id-1")
    answer = json.loads(body[:length])
    assert answer["id"] == "id-1"
    assert answer["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert answer["outputs"][1]["data"] == [True, False]
    assert body[length:] == np.int64(7).tobytes()


def test_json_values_must_fit_the_datatype_exactly():
    assert oip.from_json("x", "uint64", [1], [2**64 - 1])["data"] == b"\xff" * 8
    assert (
        oip.from_json("x", "float16", [2], [[1], [2.5]])["data"]
        == np.array([1, 2.5], np.float16).tobytes()
    )
    for dtype, data, message in (
        ("bool", [1], "BOOL data cannot hold [1]"),
        ("int32", [True], "INT32 data cannot hold [True]"),
        ("uint8", [-1], "a value is out of UINT8's range"),
        ("float32", ["1"], "FP32 data cannot hold ['1']"),
    ):
        with pytest.raises(MoltError) as caught:
            oip.from_json("x", dtype, [1], data)
        assert message in caught.value.message, dtype


def test_metadata_writes_a_dynamic_dimension_as_minus_one():
    x = {"name": "x", "type": "tensor(float)", "dtype": "float32", "shape": ["N", 4]}
    y = {"name": "y", "type": "seq(tensor(float))", "dtype": None, "shape": None}
    found = {"model": "m", "loaded": ["v1"], "signature": {"inputs": [x], "outputs": [y]}}
    assert oip.model_metadata(found)["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    ]
    assert oip.model_metadata(found)["outputs"][0]["datatype"] == "seq(tensor(float))"


def public_pem(key) -> bytes:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.PEM, spki)


def test_key_files_pick_their_algorithm_and_refuse_what_cannot_serve(tmp_path):
    files = {
        "ec.pem": public_pem(ec.generate_private_key(ec.SECP256R1())),
        "p384.pem": public_pem(ec.generate_private_key(ec.SECP384R1())),
        "ed.pem": public_pem(ed25519.Ed25519PrivateKey.generate()),
        "short.key": b"too short\n",
        "broken.pem": b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert load_key(tmp_path / "ec.pem").algorithm == "ES256"
    for name, message in (
        ("p384.pem", "EC P-256 (ES256) public keys are supported"),
        ("ed.pem", "EC P-256 (ES256) public keys are supported"),
        ("short.key", "holds an HS256 secret of 9 bytes; use 32 or more"),
        ("broken.pem", "is not a PEM public key"),
        ("missing.key", "cannot read"),
    ):
        with pytest.raises(KeyFileError) as caught:
            load_key(tmp_path / name)
        assert message in str(caught.value), name


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ("{http: '10.0.0.1:8080'}", "network.http: plain TCP on 10.0.0.1"),
        ("{grpc: '0.0.0.0:8001'}", "network.grpc: plain TCP on 0.0.0.0"),
        ("{tls_cert: /x.pem}", "network.tls_cert and network.tls_key go together"),
        ("{tls_client_ca: /ca.pem}", "network.tls_client_ca needs network.tls_cert"),
    ],
)
def test_network_settings_that_contradict_each_other_are_refused(tmp_path, network, message):
    config = tmp_path / "moltbotd.yaml"
    config.write_text(f"network: {network}\n")
    with pytest.raises(ConfigError) as caught:
        load(config)
    assert message in str(caught.value)


def test_loopback_may_listen_in_plain_tcp(tmp_path):
    config = tmp_path / "moltbotd.yaml"
    config.write_text(
        "network: {http: 'localhost:8080', grpc: '[::1]:8001', tokens: {keys: [k]}}\n"
    )
    loaded = load(config).network
    assert loaded.http == ("localhost", 8080) and loaded.grpc == ("::1", 8001)
    assert loaded.tokens.keys == (tmp_path / "k",)  # relative to the config's folder
