"""network/http1.py without sockets: requests out of bytes however they are cut, the bounds,
the refusals in order, and answers as bytes."""

from moltbotd.network.http1 import CONTINUE, Refused, ServerConnection, response
from stress.hostile_http import BODY, HEADER, INFER, LIVE, hostile, pieces


def fed(*chunks: bytes, max_head: int = 16384, max_body: int = 1024) -> ServerConnection:
    http = ServerConnection(max_head, max_body)
    for chunk in chunks:
        http.feed(chunk)
    return http


def test_a_request_cut_anywhere_arrives_whole():
    http = fed(*(INFER[i : i + 1] for i in range(len(INFER))))
    request = http.next_request()
    assert request is not None and request.complete and http.refusal is None
    assert (request.method, request.target) == ("POST", "/v2/models/demo/infer")
    assert request.headers["inference-header-content-length"] == str(len(HEADER))
    assert request.body == BODY and request.keep_alive
    assert not http.partial and http.ended() is None


def test_a_request_left_half_sent_is_owed_a_refusal():
    for cut in (10, len(INFER) - 3):  # in the head, in the body
        http = fed(INFER[:cut])
        assert http.partial and http.ended() == Refused(
            400, "bad HTTP request: the client closed it before it was all in"
        )


def test_pipelined_requests_come_in_order():
    http = fed(INFER + LIVE)
    assert http.next_request().method == "POST"  # type: ignore[union-attr]
    http.done()
    assert http.next_request().target == "/v2/health/live"  # type: ignore[union-attr]
    http.done()
    assert http.next_request() is None


def test_a_chunked_body_and_repeated_fields():
    http = fed(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")  # fmt: skip
    request = http.next_request()
    assert request is not None and request.body == b"abcde" and request.headers["x-a"] == "1, 2"


def test_a_body_over_the_limit_is_refused_from_its_length_before_it_comes():
    http = fed(b"POST /x HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", max_body=4096)
    assert http.refusal == Refused(413, "a request body of 5000 bytes is over the limit of"
                                   " 4096 bytes (max_frame_bytes)")  # fmt: skip
    assert http.next_request() is None


def test_a_chunked_body_over_the_limit_is_refused_as_it_grows():
    chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
    http = fed(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", chunk, chunk,
               max_body=1500)  # fmt: skip
    assert http.refusal is not None and http.refusal.status == 413
    assert "longer than that is over the limit of 1500 bytes" in http.refusal.message


def test_a_head_over_the_limit_is_refused_while_it_arrives_and_once_it_is_in():
    arriving = fed(b"GET / HTTP/1.1\r\nX-Big: ", b"a" * 3000, max_head=2048)
    assert arriving.refusal == Refused(431, "the request head is over 2048 bytes")
    whole = fed(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n", max_head=2048)
    assert whole.refusal == Refused(431, "the request head is over 2048 bytes")


def test_malformed_and_smuggling_requests_are_refused_after_those_before_them():
    http = fed(LIVE + b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")
    assert http.next_request() is not None and http.next_request().complete  # type: ignore[union-attr]
    assert http.refusal is not None and http.refusal.status == 400
    assert "bad HTTP request" in http.refusal.message and "Content-Length" in http.refusal.message
    http.done()
    http.feed(LIVE)  # nothing after a refusal is parsed
    assert http.next_request() is None
    assert fed(b"NOT HTTP\r\n\r\n").refusal.status == 400  # type: ignore[union-attr]


def test_keep_alive_follows_the_version_and_connection_field():
    def keep(head: bytes) -> bool:
        return fed(head).next_request().keep_alive  # type: ignore[union-attr]

    assert keep(b"GET / HTTP/1.1\r\n\r\n")
    assert not keep(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert not keep(b"GET / HTTP/1.0\r\n\r\n")
    assert keep(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")


def test_100_continue_is_told_once_and_only_while_the_body_is_awaited():
    head = b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    http = fed(head)
    assert http.partial and http.interim() == CONTINUE and http.interim() == b""
    http.feed(b"abc")
    assert http.next_request().body == b"abc" and not http.partial  # type: ignore[union-attr]
    assert fed(head + b"abc").interim() == b""


def test_an_answer_is_one_piece_with_its_length_and_no_injected_fields():
    wire = response(404, [("X-Why", "a\r\nSet-Cookie: x")], b"{}", close=True)
    assert wire == (b"HTTP/1.1 404 Not Found\r\nX-Why: a  Set-Cookie: x\r\nContent-Length: 2"
                    b"\r\nConnection: close\r\n\r\n{}")  # fmt: skip
    assert response(200, [], b"{}", close=False, head=True).endswith(b"Content-Length: 2\r\n\r\n")


def test_hostile_bytes_never_raise_nor_pass_a_bound():
    """Good requests mutated (bytes flipped, inserted, cut) and fed in random pieces: the
    parser refuses or serves, never raises, and serves no body or head past its bound."""
    for index in range(3000):
        http = ServerConnection(max_head=256, max_body=64)
        for piece in pieces(18, index, hostile(18, index)):
            http.feed(piece)
        for request in http.requests:
            assert len(request.body) <= 64 and len(request.target) <= 256
        assert http.refusal is None or http.refusal.status in (400, 413, 431)


def test_an_upgrade_is_answered_as_plain_http_and_ends_the_connection():
    http = fed(b"GET /v2 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05")
    request = http.next_request()
    assert request is not None and request.complete and not request.keep_alive
    assert http.refusal is None and not http.partial
    http.feed(LIVE)  # the other protocol's bytes, or anything else: not parsed
    assert len(http.requests) == 1


def test_a_refused_upgrade_leaves_the_request_before_it_as_it_was():
    http = fed(LIVE + b"GET /v2 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Big: "
               + b"a" * 300 + b"\r\n\r\n", max_head=256)  # fmt: skip
    assert http.refusal == Refused(431, "the request head is over 256 bytes")
    assert len(http.requests) == 1 and http.requests[0].keep_alive
