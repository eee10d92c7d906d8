"""Clients that read or write slowly, hold connections, or send what HTTP cannot parse, against a real server process:
reading a request is bounded (header and body deadlines, an idle keep-alive timeout, caps on open connections), the
answers are the server's own JSON, and a normal request is served throughout. Also: a 5xx never quotes the
exception, a stream that fails inside still ends with its closing event, and the SIGTERM drain answers a request
still stalled mid-body with a JSON 503.

Deadlines are short here (1.5 s for headers, 2 s for a body, 2 s idle) so that the test is fast; the defaults are in
the README's settings table.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time

import pytest

from helpers import http
from reliability_support import established, good_request_succeeds, open_fds, start_server, wait_until

pytestmark = pytest.mark.slow

HEADER_S, BODY_S, IDLE_S = 1.5, 2.0, 2.0
PER_CLIENT, MAX_CONN = 60, 150
HEAD = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    s = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("slow") / "server.log",
        "--max-new-tokens",
        "8",
        env={
            "BLOOM_HEADER_TIMEOUT_S": str(HEADER_S),
            "BLOOM_BODY_TIMEOUT_S": str(BODY_S),
            "BLOOM_KEEP_ALIVE_TIMEOUT_S": str(IDLE_S),
            "BLOOM_MAX_CONNECTIONS": str(MAX_CONN),
            "BLOOM_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
            # a template that fails with an error the server does not expect: a 500 that must not quote it
            "BLOOM_CHAT_TEMPLATE": "{{ 1 // (messages | length - messages | length) }}",
        },
    )
    try:
        yield s
    finally:
        s.stop()


def connect(srv, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", srv.port))
    return s


def read_response(s: socket.socket) -> bytes:
    """One whole response (headers, then Content-Length bytes of body), however the bytes were segmented."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = s.recv(65536)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        part = s.recv(65536)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (raises socket.timeout if it does not)."""
    data = b""
    while True:
        try:
            part = s.recv(65536)
        except ConnectionResetError:
            return data
        if not part:
            return data
        data += part


def parse(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), json.loads(body), headers


def in_flight(srv) -> float:
    _, text, _ = http("GET", srv.url + "/metrics")
    m = re.search(r"^bloom_server_in_flight_requests (\S+)$", text, re.M)
    return float(m.group(1)) if m else -1.0


def test_request_deadlines_close_silent_half_sent_and_trickling_clients(srv):
    silent = connect(srv)
    half_head = connect(srv)
    half_head.sendall(HEAD[:30])
    half_body = connect(srv)
    half_body.sendall(HEAD + b'{"text": ["')
    t0 = time.monotonic()
    try:
        assert read_all(silent) == b""  # closed without a word: it never asked anything
        status, err, headers = parse(read_all(half_head))
        assert status == 408 and headers["connection"] == "close" and err["limit"] == HEADER_S, err
        status, err, headers = parse(read_all(half_body))
        assert status == 408 and err["field"] == "body" and err["limit"] == BODY_S, err
        assert headers["connection"] == "close"
        assert time.monotonic() - t0 < BODY_S + 2
    finally:
        for s in (silent, half_head, half_body):
            s.close()
    # a byte every half second does not extend a deadline
    for raw, limit in ((HEAD, HEADER_S), (HEAD + b'{"text": ["' + b"a" * 100, BODY_S)):
        s = connect(srv)
        start = len(HEAD) if limit == BODY_S else 0
        if start:
            s.sendall(raw[:start])
        t0 = time.monotonic()
        try:
            for i in range(start, len(raw)):
                s.sendall(raw[i : i + 1])
                time.sleep(0.5)
                if time.monotonic() - t0 > limit + 1.5:
                    break
        except OSError:
            pass  # closed under the sender: the deadline passed
        status, _, _ = parse(read_all(s))
        s.close()
        assert status == 408 and time.monotonic() - t0 < limit + 2.5, (limit, time.monotonic() - t0)
    assert wait_until(lambda: in_flight(srv) == 0, 5), "half-body requests still counted in flight"
    good_request_succeeds(srv)


def test_idle_keep_alive_connections_are_closed(srv):
    s = connect(srv)
    try:
        body = json.dumps({"text": ["Hello"], "max_new_tokens": 2}).encode()
        s.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        first = read_response(s)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        t0 = time.monotonic()
        s.settimeout(IDLE_S + 2)
        assert read_all(s) == b""  # socket.timeout if it stays open
        assert time.monotonic() - t0 < IDLE_S + 1.5, "an idle kept-alive connection stayed open"
    finally:
        s.close()


def test_a_declared_body_over_the_limit_gets_413_at_once(srv):
    """Content-Length over the limit: answered before a byte of the body is sent (nothing to drain first)."""
    s = connect(srv)
    try:
        s.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        )
        t0 = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            data += part
        assert time.monotonic() - t0 < 1.0
        status, err, headers = parse(data)
        assert status == 413 and err["field"] == "body" and err["limit"] == 1 << 20, err
    finally:
        s.close()
    good_request_succeeds(srv)


@pytest.mark.parametrize(
    "head",
    [
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
        b"GARBAGE\r\n\r\n",
    ],
    ids=["negative", "conflicting", "request-line"],
)
def test_unparseable_http_gets_a_json_400(srv, head):
    s = connect(srv)
    try:
        s.sendall(head)
        status, err, headers = parse(read_all(s))
    finally:
        s.close()
    assert status == 400 and headers["content-type"] == "application/json" and err["message"], err


def test_hundreds_of_slow_clients_cannot_exhaust_the_server(srv):
    """300 connections from one address that send nothing, half their headers or half their body: past the
    per-client cap they are refused at once (JSON 503); the rest are closed by the deadlines. Meanwhile a client
    from another address is served promptly, and afterwards everything is back where it was."""
    fds_before = open_fds(srv.proc.pid)
    socks: list[socket.socket] = []
    refused = 0
    try:
        for i in range(300):
            s = connect(srv)
            socks.append(s)
            kind = i % 3
            try:
                s.sendall(b"" if kind == 0 else HEAD[:25] if kind == 1 else HEAD + b'{"text"')
            except OSError:
                pass
        time.sleep(0.3)
        for s in socks:
            s.setblocking(False)
            try:
                first = s.recv(65536)
            except (BlockingIOError, ConnectionResetError):
                continue
            if first.startswith(b"HTTP/1.1 503"):
                refused += 1
                assert b"retry-after: 1" in first.lower(), first
        assert refused >= 300 - PER_CLIENT, refused
        assert established(srv.port) <= PER_CLIENT + 5, established(srv.port)
        # another client is served while the slow ones hold their connections
        t0 = time.monotonic()
        body = json.dumps({"text": ["Hello"], "max_new_tokens": 2}).encode()
        other = connect(srv, source="127.0.0.2")
        other.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        assert read_all(other).startswith(b"HTTP/1.1 200")
        other.close()
        assert time.monotonic() - t0 < 5
        # the deadlines close the slow ones; the server is back to its own connections and descriptors
        assert wait_until(lambda: established(srv.port) == 0, BODY_S + 5), established(srv.port)
    finally:
        for s in socks:
            s.close()
    good_request_succeeds(srv)
    assert wait_until(lambda: open_fds(srv.proc.pid) <= fds_before + 2, 5), (fds_before, open_fds(srv.proc.pid))
    assert wait_until(lambda: in_flight(srv) == 0, 5)


def test_a_server_error_does_not_quote_the_exception(srv, tiny_model_dir):
    for stream in (False, True):
        status, body, _ = http(
            "POST",
            srv.url + "/v1/chat/completions",
            {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        )
        assert status == 500, body
        text = json.dumps(body)
        assert "ZeroDivision" not in text and "division" not in text and "request id" in text, body
    good_request_succeeds(srv)


def test_a_stream_that_fails_inside_still_ends_with_its_closing_event():
    from bloom_server.api.common import events_then_close, openai_stream_error, tgi_stream_error

    async def failing():
        yield b"data: {}\n\n"
        raise RuntimeError("a secret of the server")

    async def collect(closing):
        return [c async for c in events_then_close(failing(), [], closing)]

    out = asyncio.run(collect(openai_stream_error))
    assert out[0] == b"data: {}\n\n" and out[-1] == b"data: [DONE]\n\n", out
    assert json.loads(out[1][len(b"data: ") :])["error"]["message"] and b"secret" not in b"".join(out)
    out = asyncio.run(collect(tgi_stream_error))
    event = json.loads(out[-1][len(b"data: ") :])
    assert event["error"] and event["error_type"] and b"secret" not in b"".join(out), out


def test_the_drain_answers_a_request_stalled_mid_body_with_json_503(tiny_model_dir, tmp_path):
    """SIGTERM with a client stalled mid-body (its body deadline far away): when the drain timeout has passed, it gets
    the server's JSON 503, and the log has no traceback."""
    srv = start_server(
        tiny_model_dir, tmp_path / "server.log", "--drain-timeout-s", "1", env={"BLOOM_BODY_TIMEOUT_S": "60"}
    )
    try:
        s = connect(srv, timeout=20)
        s.sendall(HEAD + b'{"text": ["')
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        status, err, headers = parse(read_all(s))
        s.close()
        assert status == 503 and err["error"] == "not_ready" and headers["content-type"] == "application/json", err
        assert srv.proc.wait(20) == 0
        log = srv.log()
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    finally:
        srv.stop()
