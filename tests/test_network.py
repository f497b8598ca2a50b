"""The Open Inference Protocol listeners against a live daemon, spoken by the clients
users have: NVIDIA's tritonclient (HTTP and gRPC) and curl. Every datatype, metadata,
errors, the binary data extension, TLS (and mTLS) and JWT tokens, accepted and refused."""

import contextlib
import datetime
import ipaddress
import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jwt
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from moltbotd.demo import save
from moltctl.client import Client
from stress.daemon import Daemon, tracebacks
from stress.hostile_http import hostile, pieces
from tests.conftest import run_moltctl
from tests.models import OIP_TYPES, every_dtype_model
from tests.test_metrics import ACTIVATE
from tests.test_oip import public_pem

LOOPBACK = "network: {http: '127.0.0.1:0', grpc: '127.0.0.1:0'}\n"
VALUES = {
    "BOOL": np.array([[True, False], [False, True]]),
    "UINT8": np.array([[0, 255], [1, 2]], np.uint8),
    "UINT16": np.array([[0, 65535], [1, 2]], np.uint16),
    "UINT32": np.array([[0, 2**32 - 1], [1, 2]], np.uint32),
    "UINT64": np.array([[0, 2**64 - 1], [1, 2]], np.uint64),
    "INT8": np.array([[-128, 127], [1, 2]], np.int8),
    "INT16": np.array([[-(2**15), 2**15 - 1], [1, 2]], np.int16),
    "INT32": np.array([[-(2**31), 2**31 - 1], [1, 2]], np.int32),
    "INT64": np.array([[-(2**63), 2**63 - 1], [1, 2]], np.int64),
    "FP16": np.array([[0.5, -2.0], [65504.0, 1e-3]], np.float16),
    "FP32": np.array([[0.5, -2.0], [3.4e38, 1e-30]], np.float32),
    "FP64": np.array([[0.5, -2.0], [1.7e308, 1e-300]], np.float64),
    "BYTES": np.array([["héllo", ""], ["a b", "\u2603"]], dtype=object),
}


@pytest.fixture
def typed_models(models_dir: Path) -> Path:
    save(every_dtype_model(), models_dir, "types", "v1")
    return models_dir


def addresses_http(daemon: Daemon) -> str:
    found = re.search(r"Open Inference Protocol at https?://(\S+)/v2", daemon.log())
    assert found, daemon.log()
    return found.group(1)


def addresses(daemon: Daemon) -> tuple[str, str]:
    """The HTTP listener's host:port and the gRPC one's, as the daemon logged them."""
    rpc = re.search(r"Open Inference Protocol over gRPC at (\S+)", daemon.log())
    assert rpc, daemon.log()
    return addresses_http(daemon), rpc.group(1)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True,
                          text=True, check=False)  # fmt: skip


def status_and_body(*args: str) -> tuple[int, str]:
    result = curl("-w", "\n%{http_code}", *args)
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def inputs_for(module, names: list[str], binary: bool = True) -> list:
    feeds = []
    for name in names:
        value = VALUES[name]
        tensor = module.InferInput(f"in_{name}", list(value.shape), name)
        if module is triton_http:
            tensor.set_data_from_numpy(value, binary_data=binary)
        else:
            tensor.set_data_from_numpy(value)
        feeds.append(tensor)
    return feeds


def assert_same(name: str, got: np.ndarray) -> None:
    want = VALUES[name]
    if name == "BYTES":
        assert [v.decode() if isinstance(v, bytes) else v for v in got.ravel()] == list(
            want.ravel()
        )
    else:
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want)


# --- HTTP --------------------------------------------------------------------------------


def test_tritonclient_http_round_trips_every_datatype(daemon_factory, typed_models):
    daemon = daemon_factory(LOOPBACK)
    http, _ = addresses(daemon)
    client = triton_http.InferenceServerClient(http)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("types")
    metadata = client.get_model_metadata("types")
    assert metadata["platform"] == "onnxruntime_onnx"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {
        f"in_{name}": (name, [-1, 2]) for name in OIP_TYPES
    }
    names = list(OIP_TYPES)
    for binary in (True, False):
        outputs = [triton_http.InferRequestedOutput(f"out_{n}", binary_data=binary) for n in names]
        result = client.infer("types", inputs_for(triton_http, names, binary), outputs=outputs,
                              request_id=f"r-{binary}")  # fmt: skip
        for name in names:
            assert_same(name, result.as_numpy(f"out_{name}"))
        assert result.get_response()["id"] == f"r-{binary}"
        assert result.get_response()["model_version"] == "v1"


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("module", "invalid", "not_found"),
    [(triton_http, "400", "404"),
     (triton_grpc, "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")],
)  # fmt: skip
def test_tritonclient_errors_name_what_was_expected(daemon_factory, module, invalid, not_found):
    daemon = daemon_factory(LOOPBACK)
    client = module.InferenceServerClient(addresses(daemon)[module is triton_grpc])
    wrong = module.InferInput("x", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), np.float32))
    error = refusal(lambda: client.infer("demo", [wrong]))
    assert error.status() == invalid
    assert "expected float32 with shape [N, 4], got shape [1, 3]" in error.message()
    error = refusal(lambda: client.infer("nope", [wrong]))
    assert error.status() == not_found
    assert "no model 'nope' is served" in error.message()
    error = refusal(lambda: client.get_model_metadata("demo", model_version="v9"))
    assert error.status() == not_found
    assert "version 'v9' of demo is not loaded" in error.message()
    bf16 = module.InferInput("x", [1, 4], "BF16")
    bf16.set_data_from_numpy(np.zeros((1, 4), np.float32))
    error = refusal(lambda: client.infer("demo", [bf16]))
    assert error.status() == invalid
    assert "datatype 'BF16' is not one moltbotd serves" in error.message()
    assert client.is_server_live()  # still serving


def test_a_version_in_the_path_pins_it(daemon_factory):
    daemon = daemon_factory(LOOPBACK + "models: {demo: {on_demand: true}}\n")
    client = triton_http.InferenceServerClient(addresses(daemon)[0])
    x = triton_http.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert client.infer("demo", [x]).as_numpy("y").tolist() == [[10.0] * 4]  # v2.0 active
    pinned = client.infer("demo", [x], model_version="v1.0")
    assert pinned.as_numpy("y").tolist() == [[2.0] * 4]
    assert pinned.get_response()["model_version"] == "v1.0"


def test_curl_speaks_json_and_binary_data(daemon_factory):
    daemon = daemon_factory(LOOPBACK)
    url = f"http://{addresses(daemon)[0]}"
    assert status_and_body(f"{url}/v2/health/live") == (200, '{"live":true}')
    status, body = status_and_body(f"{url}/v2/health/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    assert json.loads(status_and_body(f"{url}/v2")[1])["extensions"] == ["binary_tensor_data"]
    request = {"id": "c1", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "data": [[1, 2, 3, 4]]}]}  # fmt: skip
    status, body = status_and_body("-X", "POST", f"{url}/v2/models/demo/infer",
                                   "-d", json.dumps(request))  # fmt: skip
    assert status == 200, body
    answer = json.loads(body)
    assert answer["id"] == "c1"
    assert answer["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [10.0, 20.0, 30.0, 40.0]}
    ]
    # The binary extension: the JSON, then the raw little-endian floats.
    binary = {"binary_data_size": 16}
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": binary}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]})  # fmt: skip
    payload = head.encode() + np.array([1, 2, 3, 4], "<f4").tobytes()
    result = subprocess.run(
        ["curl", "-sS", "-D", "-", "-X", "POST", f"{url}/v2/models/demo/infer",
         "-H", f"Inference-Header-Content-Length: {len(head)}",
         "-H", "Content-Type: application/octet-stream", "--data-binary", "@-"],
        input=payload, capture_output=True, check=True,
    )  # fmt: skip
    headers, _, body_bytes = result.stdout.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)inference-header-content-length: (\d+)", headers).group(1))
    assert json.loads(body_bytes[:length])["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert np.frombuffer(body_bytes[length:], "<f4").tolist() == [10.0, 20.0, 30.0, 40.0]


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("-X", "POST", "/v2/models/demo/infer", "-d", "{nope"), 400, "the request is not JSON"),
        (("-X", "POST", "/v2/models/demo/infer", "-d", '{"inputs": []}'), 400,
         "'inputs' must be a non-empty list"),
        (("-X", "POST", "/v2/models/demo/infer", "-d",
          '{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}'),
         400, "input 'x': shape [1, 4] holds 4 values, the data has 2"),
        (("-X", "POST", "/v2/models/demo/infer", "-d",
          '{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT8", "data": [300]}]}'),
         400, "a value is out of INT8's range"),
        (("-X", "POST", "/v2/models/demo/infer", "-d",
          '{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT32", "data": [1.5]}]}'),
         400, "INT32 data cannot hold [1.5]"),
        (("-X", "POST", "/v2/models/demo/infer", "-H", "Inference-Header-Content-Length: 999",
          "-d", "{}"), 400, "Inference-Header-Content-Length is 999, but the body has only 2"),
        (("/v2/models/demo/infer",), 405, "GET is not allowed on /v2/models/demo/infer; use POST"),
        (("/v2/nothing",), 404, "no such endpoint: /v2/nothing"),
        (("-X", "POST", "/v2/models/iris/infer", "-d",
          '{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",'
          ' "data": [1, 2, 3, 4]}]}'),
         500, "output 'probabilities' of iris is not a tensor the Open Inference Protocol can"),
    ],
)  # fmt: skip
def test_bad_requests_get_the_protocols_error_json(daemon_factory, args, status, message):
    daemon = daemon_factory(LOOPBACK)
    url = f"http://{addresses(daemon)[0]}"
    path = next(a for a in args if a.startswith("/"))
    rest = [a if a != path else f"{url}{path}" for a in args]
    got, body = status_and_body(*rest)
    assert got == status, body
    assert message in json.loads(body)["error"]
    assert status_and_body(f"{url}/v2/health/live")[0] == 200


def test_the_listener_bounds_what_a_client_sends(daemon_factory):
    daemon = daemon_factory(LOOPBACK + "max_frame_bytes: 4096\nnetwork: {http: '127.0.0.1:0',"
                            " grpc: '127.0.0.1:0', max_connections: 2}\n")  # fmt: skip
    host, port = addresses(daemon)[0].rsplit(":", 1)
    url = f"http://{host}:{port}"
    status, body = status_and_body("-X", "POST", f"{url}/v2/models/demo/infer",
                                   "-d", "x" * 5000)  # fmt: skip
    assert status == 413 and "over the limit of 4096 bytes (max_frame_bytes)" in body
    status, body = status_and_body("-H", f"X-Big: {'a' * 20000}", f"{url}/v2/health/live")
    assert status == 431
    smuggling = (b"POST /v2/models/demo/infer HTTP/1.1\r\nContent-Length: 3\r\n"
                 b"Content-Length: 40\r\n\r\n")  # fmt: skip
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", smuggling):
        with socket.create_connection((host, int(port))) as raw:
            raw.settimeout(30)
            raw.sendall(garbage)
            answer = raw.makefile("rb").read()  # the connection ends after the refusal
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"Connection: close" in answer and b"bad HTTP request" in answer
    held = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        with socket.create_connection((host, int(port))) as third:
            third.settimeout(30)
            assert third.recv(100).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    assert status_and_body(f"{url}/v2/health/live")[0] == 200


def test_hostile_http_is_refused_and_never_answered_500(daemon_factory):
    """300 mutated requests (stress/hostile_http.py), each on a connection of its own,
    written in pieces, then half-closed: every connection ends, no answer is a 500, the
    log has no traceback, and the listener still serves."""
    daemon = daemon_factory(LOOPBACK)
    host, port = addresses(daemon)[0].rsplit(":", 1)
    statuses: Counter[bytes] = Counter()
    for index in range(300):
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(30)  # a connection kept open fails the test (TimeoutError)
            with contextlib.suppress(OSError):  # it closed on a refusal before all was sent
                for piece in pieces(7, index, hostile(7, index)):
                    sock.sendall(piece)
                sock.shutdown(socket.SHUT_WR)
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while data := sock.recv(65536):
                    answer += data
        statuses.update(re.findall(rb"HTTP/1\.1 (\d{3}) ", answer))
    assert b"500" not in statuses and statuses[b"200"] and statuses[b"400"], statuses
    assert not tracebacks(daemon.log())
    assert status_and_body(f"http://{host}:{port}/v2/health/live")[0] == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_socket_systemd_passes_serves_http_on_loopback_only(tmp_path, models_dir, host):
    """moltbotd-http.socket's socket, as systemd hands it over; off loopback without TLS
    the daemon refuses to start, as it refuses network.http there."""
    with socket.socket() as listening:
        listening.bind((host, 0))
        listening.listen()
        port = listening.getsockname()[1]
        hand_over = (sys.executable, "-c", ACTIVATE, str(listening.fileno()), "http")
        daemon = Daemon(tmp_path, models_dir, None, wrapper=hand_over,
                        pass_fds=(listening.fileno(),))  # fmt: skip
        try:
            if host == "0.0.0.0":
                daemon.start(wait=False)
                assert daemon.proc.wait(60) != 0
                assert f"the socket systemd passed for http listens on 0.0.0.0:{port}" in (
                    daemon.log()
                )
                return
            daemon.start()
            assert addresses_http(daemon) == f"127.0.0.1:{port}"
            assert status_and_body(f"http://127.0.0.1:{port}/v2/health/live")[0] == 200
        finally:
            daemon.stop()


# --- gRPC --------------------------------------------------------------------------------


def test_tritonclient_grpc_round_trips_every_datatype(daemon_factory, typed_models):
    daemon = daemon_factory(LOOPBACK)
    client = triton_grpc.InferenceServerClient(addresses(daemon)[1])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("types") and not client.is_model_ready("types", "v9")
    metadata = client.get_model_metadata("types", as_json=True)
    assert metadata["inputs"][0] == {"name": "in_BOOL", "datatype": "BOOL", "shape": ["-1", "2"]}
    names = list(OIP_TYPES)
    result = client.infer("types", inputs_for(triton_grpc, names), request_id="g1")
    for name in names:
        assert_same(name, result.as_numpy(f"out_{name}"))
    assert result.get_response().id == "g1"


def test_grpc_calls_outside_the_protocol_subset_are_unimplemented(daemon_factory):
    daemon = daemon_factory(LOOPBACK)
    client = triton_grpc.InferenceServerClient(addresses(daemon)[1])
    error = refusal(client.get_model_repository_index)
    assert error.status() == "StatusCode.UNIMPLEMENTED"


# --- TLS ---------------------------------------------------------------------------------


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, *items) -> Path:
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())  # fmt: skip
    path = folder / name
    path.write_bytes(data)
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("moltbot test CA", ca_key, "moltbot test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "ca": _write(tmp_path, "ca.pem", ca),
        "cert": _write(tmp_path, "server.pem",
                       _certificate("localhost", server_key, "moltbot test CA", ca_key)),
        "key": _write(tmp_path, "server.key", server_key),
        "client_cert": _write(tmp_path, "client.pem",
                              _certificate("client", client_key, "moltbot test CA", ca_key)),
        "client_key": _write(tmp_path, "client.key", client_key),
    }  # fmt: skip


def test_tls_serves_both_protocols_and_mtls_refuses_a_stranger(daemon_factory, pki):
    tls = (f"network: {{http: '127.0.0.1:0', grpc: '127.0.0.1:0', tls_cert: '{pki['cert']}',"
           f" tls_key: '{pki['key']}', tls_client_ca: '{pki['ca']}'}}\n")  # fmt: skip
    daemon = daemon_factory(tls)
    http, rpc = addresses(daemon)
    assert f"at https://{http}/v2" in daemon.log()
    url = f"https://{http}/v2/health/live"
    mine = ("--cacert", str(pki["ca"]), "--cert", str(pki["client_cert"]),
            "--key", str(pki["client_key"]))  # fmt: skip
    assert status_and_body(*mine, url) == (200, '{"live":true}')
    stranger = curl("--cacert", str(pki["ca"]), url)  # no client certificate
    assert stranger.returncode != 0
    old = curl(*mine, "--tls-max", "1.1", url)  # TLS 1.1 and older are refused
    assert old.returncode != 0
    plain = curl(f"http://{http}/v2/health/live")
    assert plain.returncode != 0 or not plain.stdout.startswith('{"live"')
    options = {"ca_certs": str(pki["ca"]), "certfile": str(pki["client_cert"]),
               "keyfile": str(pki["client_key"])}  # fmt: skip
    client = triton_http.InferenceServerClient(http, ssl=True, ssl_options=options)
    assert client.is_model_ready("demo")
    secure = triton_grpc.InferenceServerClient(
        rpc, ssl=True, root_certificates=str(pki["ca"]), private_key=str(pki["client_key"]),
        certificate_chain=str(pki["client_cert"]))  # fmt: skip
    x = triton_grpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert secure.infer("demo", [x]).as_numpy("y").tolist() == [[10.0] * 4]
    no_cert = triton_grpc.InferenceServerClient(rpc, ssl=True, root_certificates=str(pki["ca"]))
    with pytest.raises(InferenceServerException):
        no_cert.is_server_live()


def test_plain_tcp_off_loopback_refuses_to_start_naming_the_setting(daemon_factory):
    daemon = daemon_factory("network: {http: '0.0.0.0:0'}\n", wait=False)
    assert daemon.proc.wait(60) != 0
    assert "network.http: plain TCP on 0.0.0.0 would send requests and tokens in the clear" in (
        daemon.log()
    )
    assert "set network.tls_cert and network.tls_key" in daemon.log()


def test_a_certificate_that_cannot_serve_refuses_to_start(daemon_factory, tmp_path, pki):
    daemon = daemon_factory(f"network: {{http: '127.0.0.1:0', tls_cert: '{pki['ca']}',"
                            f" tls_key: '{pki['key']}'}}\n", wait=False)  # fmt: skip
    assert daemon.proc.wait(60) != 0
    assert f"network.tls_cert {pki['ca']} with network.tls_key {pki['key']}" in daemon.log()


# --- tokens ------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, object]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    secret = b"s" * 40
    for name, key in (("rsa.pem", rsa_key), ("ec.pem", ec_key)):
        (tmp_path / name).write_bytes(public_pem(key))
    (tmp_path / "hs.key").write_bytes(secret + b"\n")
    return {"RS256": rsa_key, "ES256": ec_key, "HS256": secret, "dir": tmp_path}


def token(keys, algorithm: str = "RS256", scope: str = "infer:demo*", **claims) -> str:
    now = int(time.time())
    body = {"sub": "alice", "iss": "https://id.example", "aud": "moltbot", "exp": now + 600,
            "scope": scope, **claims}  # fmt: skip
    return jwt.encode({k: v for k, v in body.items() if v is not None}, keys[algorithm],
                      algorithm=algorithm)  # fmt: skip


def tokens_config(keys) -> str:
    folder = keys["dir"]
    return (f"network: {{http: '127.0.0.1:0', grpc: '127.0.0.1:0', tokens: {{keys:"
            f" ['{folder}/rsa.pem', '{folder}/ec.pem', '{folder}/hs.key'],"
            f" issuer: 'https://id.example', audience: moltbot}}}}\n")  # fmt: skip


def infer_with(url: str, bearer: str | None) -> tuple[int, str]:
    request = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                      "data": [1, 2, 3, 4]}]})  # fmt: skip
    auth = ("-H", f"Authorization: Bearer {bearer}") if bearer else ()
    return status_and_body(*auth, "-X", "POST", f"{url}/v2/models/demo/infer", "-d", request)


def test_tokens_are_checked_and_refusals_say_why(daemon_factory, keys):
    daemon = daemon_factory(tokens_config(keys))
    url = f"http://{addresses(daemon)[0]}"
    for algorithm in ("RS256", "ES256", "HS256"):
        assert infer_with(url, token(keys, algorithm))[0] == 200, algorithm
    now = int(time.time())
    refused = {
        None: (401, "no token: send the header Authorization: Bearer <JWT>"),
        token(keys, exp=now - 3600): (401, "the token expired at"),
        token(keys, nbf=now + 3600): (401, "the token is not valid before"),
        token(keys, aud="other"): (
            401, "wrong audience: the token is for 'other', this server is 'moltbot'"),
        token(keys, iss="https://evil.example"): (401, "wrong issuer"),
        token(keys, exp=None): (401, "the token has no 'exp' claim"),
        jwt.encode({"exp": now + 60}, "s" * 40 + "x", algorithm="HS256"): (
            401, "the token's signature does not verify with any key of this server"),
        jwt.encode({"exp": now + 60}, "k" * 40, algorithm="HS512"): (
            401, "the token is signed with 'HS512'; this server's keys verify ES256, HS256, RS256"),
        "not-a-jwt": (401, "malformed token"),
        token(keys, scope="read"): (
            403, "the token of 'alice' lacks the scope infer:<a glob matching 'demo'> for model"
                 " 'demo'"),
        token(keys, scope="infer:chat-*"): (403, "(its scopes: infer:chat-*)"),
    }  # fmt: skip
    for bearer, (status, message) in refused.items():
        got, body = infer_with(url, bearer)
        assert (got, message in json.loads(body)["error"]) == (status, True), (bearer, body)
    # The scope `read` is enough for metadata; health needs no token at all.
    read = ("-H", f"Authorization: Bearer {token(keys, scope='read')}")
    assert status_and_body(*read, f"{url}/v2/models/demo")[0] == 200
    assert status_and_body(f"{url}/v2/models/demo")[0] == 401
    assert status_and_body(f"{url}/v2/health/ready")[0] == 200
    assert infer_with(url, token(keys, scope="admin"))[0] == 200


def test_grpc_refuses_with_unauthenticated_and_permission_denied(daemon_factory, keys):
    daemon = daemon_factory(tokens_config(keys))
    rpc = addresses(daemon)[1]
    x = triton_grpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    client = triton_grpc.InferenceServerClient(rpc)
    good = {"authorization": f"Bearer {token(keys, 'ES256')}"}
    assert client.infer("demo", [x], headers=good).as_numpy("y").tolist() == [[10.0] * 4]
    with pytest.raises(InferenceServerException) as caught:
        client.infer("demo", [x])
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "no token" in caught.value.message()
    read_only = {"authorization": f"Bearer {token(keys, scope='read')}"}
    with pytest.raises(InferenceServerException) as caught:
        client.infer("demo", [x], headers=read_only)
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "lacks the scope infer:<a glob matching 'demo'>" in caught.value.message()
    assert client.is_server_ready()  # no token needed


def test_refusals_are_audited_and_requests_counted(daemon_factory, keys):
    daemon = daemon_factory(tokens_config(keys))
    url = f"http://{addresses(daemon)[0]}"
    assert infer_with(url, token(keys))[0] == 200
    assert infer_with(url, token(keys, scope="read"))[0] == 403
    metrics = run_moltctl("metrics", socket=daemon.socket).stdout
    assert re.search(r'moltbot_socket_requests_total\{code="OK",op="infer"\} 1\.0', metrics)
    assert re.search(
        r'moltbot_socket_requests_total\{code="PERMISSION_DENIED",op="infer"\} 1\.0', metrics
    )
    audit = run_moltctl("audit", "-o", "json", socket=daemon.socket)
    assert audit.returncode == 0, audit.stderr
    records = json.loads(audit.stdout)["records"]
    refused = [r for r in records if r["op"] == "infer"]
    assert refused and refused[0]["who"]["transport"] == "http"


def test_grpc_and_http_answer_while_a_key_file_is_missing_refuses_start(daemon_factory, keys):
    daemon = daemon_factory(f"network: {{http: '127.0.0.1:0', tokens: {{keys:"
                            f" ['{keys['dir']}/missing.pem']}}}}\n", wait=False)  # fmt: skip
    assert daemon.proc.wait(60) != 0
    assert f"network.tokens.keys: cannot read {keys['dir']}/missing.pem" in daemon.log()


def test_moltctl_metadata_shows_the_signature(daemon):
    result = run_moltctl("metadata", "demo", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    assert "demo v2.0 (ready)" in result.stdout
    assert re.search(r"input\s+x\s+float32\s+N, 4", result.stdout), result.stdout
    missing = run_moltctl("metadata", "demo", "--version", "v9", socket=daemon.socket)
    assert missing.returncode != 0 and "version 'v9' of demo is not loaded" in missing.stderr


def test_a_budget_counts_each_token_subject_as_a_caller(daemon_factory, keys):
    """On the network listener the caller is the token's subject: alice's spending does
    not touch bob's cost_limit, and past it the refusal is 429 naming her."""
    budget = "models:\n  demo:\n    budget: {cost_limit: 2}\n"
    daemon = daemon_factory(tokens_config(keys) + budget)
    url = f"http://{addresses(daemon)[0]}"
    alice, bob = token(keys), token(keys, sub="bob")
    assert [infer_with(url, alice)[0] for _ in range(2)] == [200, 200]
    status, body = infer_with(url, alice)
    assert status == 429
    assert "the token of 'alice' spent 2 of model demo's cost_limit 2 this month" in body
    assert infer_with(url, bob)[0] == 200
    with Client(daemon.socket) as client:
        usage = {row["caller"]: row["spent"] for row in client.budgets("demo")["usage"]}
    assert usage == {"the token of 'alice'": 2.0, "the token of 'bob'": 1.0}
