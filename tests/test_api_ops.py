"""Operations against real server processes: /info, /metrics, request ids and the access log, CORS, the bounded
queue (429 + Retry-After), disconnects (a queued request leaves the queue; a running one stops and the next starts),
deadlines and max_time, and SIGTERM draining; and the Gateway middleware alone (no server)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time

import pytest

from helpers import ServerProcess, free_port

LONG = 8000  # new tokens of the long requests: seconds of work for the tiny model on two cores


class Stream:
    """A streaming request read event by event; close() is a client that goes away."""

    def __init__(self, url: str, path: str, body: dict, headers: dict | None = None):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()

    def next_event(self):
        data = None
        for _ in range(1000):
            line = self.resp.readline()
            if not line:
                return None
            line = line.decode().strip()
            if line.startswith("data:"):
                data = line[5:].strip()
            elif not line and data is not None:
                return data if data == "[DONE]" else json.loads(data)
        raise AssertionError("no event in 1000 lines")

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


def metric(srv, name: str, labels: str = "") -> float:
    _, text, _ = srv.get("/metrics")
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def in_thread(fn):
    out: dict = {}

    def run():
        out["result"] = fn()
        out["done"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture(scope="module")
def pressure(tiny_model_dir, tmp_path_factory):
    """Two queued requests at most, 1500 queued tokens at most, long generations allowed, JSON logs, CORS for one
    origin."""
    with ServerProcess(
        [
            "--model",
            str(tiny_model_dir),
            "--max-input-length",
            "64",
            "--max-new-tokens",
            str(LONG),
            "--max-total-tokens",
            str(LONG + 100),
            "--max-batch-size",
            "4",
            "--max-queued-requests",
            "2",
            "--batch-wait-ms",
            "1",
        ],
        free_port(),
        env={
            "BLOOM_MAX_QUEUED_TOKENS": "1500",
            "BLOOM_LOG_FORMAT": "json",
            "BLOOM_CORS_ALLOW_ORIGINS": "http://example.test",
        },
        log_path=tmp_path_factory.mktemp("logs") / "pressure.log",
    ) as srv:
        yield srv


def start_long_stream(srv) -> tuple[Stream, float]:
    """A greedy stream of LONG tokens, running: returns it and its decoding rate (tokens/s)."""
    # min_length (the original server's keyword, honoured in TGI's parameters too) keeps EOS away: greedy CPU output
    # is not bit-reproducible across runs, and an early EOS would end the stream by itself.
    s = Stream(
        srv.url,
        "/generate_stream",
        {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": LONG, "min_length": LONG + 50}},
    )
    assert s.resp.status == 200
    for _ in range(10):
        assert s.next_event()["generated_text"] is None
    t0 = time.monotonic()
    for _ in range(40):
        assert s.next_event()["generated_text"] is None
    return s, 40 / (time.monotonic() - t0)


def test_info_lists_model_and_limits(server):
    status, info, _ = server.get("/info")
    assert status == 200
    assert info["model_id"] == "tiny-bloom" and info["backend"] == "hf" and info["state"] == "ready"
    assert info["tensor_parallel"] == 1 and info["model_dtype"] == "float32"
    assert (info["max_input_tokens"], info["max_new_tokens"], info["max_total_tokens"], info["max_batch_size"]) == (
        64,
        64,
        96,
        16,
    )
    assert info["max_queued_requests"] == 256 and info["max_queued_tokens"] == 4 * 16 * 96
    assert info["version"] and info["model_load_seconds"] > 0


def test_metrics_names_and_values(server):
    server.post("/generate", {"text": ["Hello"], "max_new_tokens": 3})
    status, text, headers = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in (
        "bloom_server_queue_depth",
        "bloom_server_running_batch_size",
        "bloom_server_in_flight_requests",
        "bloom_server_model_load_seconds",
        "bloom_server_ready",
        "bloom_server_queue_time_seconds_count",
        "bloom_server_time_to_first_token_seconds_count",
        "bloom_server_time_per_output_token_seconds_count",
        "bloom_server_prompt_tokens_total",
        "bloom_server_generated_tokens_total",
        "bloom_server_request_duration_seconds_count",
    ):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", text, re.M), name
    assert metric(server, "bloom_server_ready") == 1.0
    assert metric(server, "bloom_server_queue_depth") == 0.0
    assert metric(server, "bloom_server_requests_total", '{method="POST",route="/generate",status="200"}') >= 1
    assert metric(server, "bloom_server_generated_tokens_total") >= 3
    assert 'bloom_server_info{backend="hf"' in text


def test_request_id_timing_headers_and_access_log(server):
    status, body, headers = server.post(
        "/generate", {"text": ["Hello"], "max_new_tokens": 4}, headers={"X-Request-Id": "abc-123"}
    )
    assert status == 200 and headers["x-request-id"] == "abc-123"
    for h in ("x-queue-time", "x-inference-time", "x-time-per-token", "x-total-time"):
        assert int(headers[h]) >= 0, h
    assert headers["x-prompt-tokens"] == "1" or int(headers["x-prompt-tokens"]) >= 1
    assert int(headers["x-generated-tokens"]) == body["num_generated_tokens"][0]
    made = server.get("/info")[2]["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert server.get("/info", headers={"X-Request-Id": "bad id\twith spaces"})[2]["x-request-id"] != "bad id"
    wait_until(lambda: "request_id=abc-123" in server.log(), 5, "the access log line")
    line = next(l for l in server.log().splitlines() if "request_id=abc-123" in l)
    assert "status=200" in line and "generated_tokens=4" in line and "duration_ms=" in line and "queue_ms=" in line


def test_cors_is_off_unless_configured(server, pressure):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    _, _, headers = server_request(server, "OPTIONS", "/generate", preflight)
    assert "access-control-allow-origin" not in {k.lower() for k in headers}
    status, _, headers = server_request(pressure, "OPTIONS", "/generate", preflight)
    assert status == 200 and headers.get("access-control-allow-origin") == "http://example.test"
    status, _, headers = server_request(pressure, "OPTIONS", "/generate", {**preflight, "Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in headers


def server_request(srv, method, path, headers):
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_json_log_lines(pressure):
    pressure.post("/generate", {"text": ["Hi"], "max_new_tokens": 2}, headers={"X-Request-Id": "json-log-1"})
    wait_until(lambda: "json-log-1" in pressure.log(), 5, "the access log line")
    line = next(l for l in pressure.log().splitlines() if "json-log-1" in l)
    rec = json.loads(line)
    assert rec["request_id"] == "json-log-1" and rec["status"] == 200 and rec["path"] == "/generate"
    assert rec["generated_tokens"] == 2 and rec["duration_ms"] > 0 and rec["level"] == "info"


def test_queue_bounds_disconnects_and_an_abandoned_request(pressure):
    a, rate = start_long_stream(pressure)  # running
    b_thread, b = in_thread(lambda: pressure.post("/generate", {"text": ["Hello"], "max_new_tokens": 50}))
    wait_until(lambda: metric(pressure, "bloom_server_queue_depth") == 1, 10, "B queued")

    # Past the token bound: 429 at once, with Retry-After.
    start = time.monotonic()
    status, body, headers = pressure.post("/generate", {"text": ["Hello"], "max_new_tokens": 1600})
    assert status == 429 and time.monotonic() - start < 5
    headers = {k.lower(): v for k, v in headers.items()}
    assert int(headers["retry-after"]) >= 1 and "tokens" in body["message"] and "1500" in body["message"]

    # A queued request whose client leaves is removed from the queue.
    d = Stream(pressure.url, "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 20}})
    wait_until(lambda: metric(pressure, "bloom_server_queue_depth") == 2, 10, "D queued")
    status, body, headers = pressure.post("/generate", {"text": ["Hello"], "max_new_tokens": 1})
    assert status == 429 and "requests" in body["message"]  # past the request bound
    assert "retry-after" in {k.lower() for k in headers}
    d.close()
    wait_until(lambda: metric(pressure, "bloom_server_queue_depth") == 1, 10, "D removed from the queue")

    # The running stream's client leaves: its row stops and B starts without waiting for LONG tokens.
    left = time.monotonic()
    a.close()
    b_thread.join(60)
    assert not b_thread.is_alive()
    status, body, _ = b["result"]
    assert status == 200 and 1 <= body["num_generated_tokens"][0] <= 50
    remaining = (LONG - 50) / rate
    assert b["done"] - left < remaining / 2, (b["done"] - left, remaining)
    wait_until(
        lambda: metric(pressure, "bloom_server_generation_requests_total", '{outcome="cancelled"}') >= 2,
        10,
        "both cancellations counted",
    )
    # B's answer can reach its client a moment before its batch's bookkeeping ends on the engine side.
    wait_until(lambda: metric(pressure, "bloom_server_running_batch_size") == 0, 10, "nothing running")
    assert metric(pressure, "bloom_server_rejected_requests_total", '{reason="overloaded"}') == 2


def test_non_streaming_client_that_leaves_stops_its_request_and_is_a_499(pressure):
    """A client that leaves before its answer, or mid-body, is not a server error (bug 8: status 500 in the access
    log and the metrics, a ClientDisconnect traceback, asyncio's "_GatheringFuture exception was never retrieved"):
    499 ("client closed request") in both, nothing else logged; the running request's row stops."""
    log_start = pressure.log_path.stat().st_size
    host, port = pressure.url.removeprefix("http://").split(":")
    gone_before = metric(pressure, "bloom_server_requests_total", '{method="POST",route="/generate",status="499"}')
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "POST",
        "/generate",
        json.dumps({"text": ["Deepspeed is"], "max_new_tokens": LONG, "min_length": LONG + 50}),
        {"Content-Type": "application/json", "X-Request-Id": "left-before-answer"},
    )
    wait_until(lambda: metric(pressure, "bloom_server_running_batch_size") == 1, 10, "the request running")
    before = metric(pressure, "bloom_server_generation_requests_total", '{outcome="cancelled"}')
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: metric(pressure, "bloom_server_running_batch_size") == 0, 15, "the row stopped")
    assert metric(pressure, "bloom_server_generation_requests_total", '{outcome="cancelled"}') == before + 1

    # Clients that leave mid-body: declared 1000 bytes, sent 10, gone (a route that reads its body by hand, and
    # routes whose body FastAPI parses).
    for path in ("/generate", "/tokenize", "/v1/completions"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"X-Request-Id: left-mid-body{path.replace('/', '-')}\r\nContent-Length: 1000\r\n\r\n".encode()
                + b'{"text": ['
            )
            time.sleep(0.2)
    ids = ["left-before-answer", "left-mid-body-generate", "left-mid-body-tokenize", "left-mid-body-v1-completions"]
    wait_until(lambda: all(i in pressure.log()[log_start:] for i in ids), 10, "the access log lines")
    time.sleep(0.5)  # asyncio reports an unretrieved exception when the future is collected
    log = pressure.log_path.read_text()[log_start:]
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    statuses = {r["request_id"]: r["status"] for r in records if r.get("request_id") in ids}
    assert statuses == dict.fromkeys(ids, 499), log[-3000:]
    for noise in ("Traceback", "unexpected error", "never retrieved", "ClientDisconnect", '"status": 500'):
        assert noise not in log, log[-3000:]
    assert (
        metric(pressure, "bloom_server_requests_total", '{method="POST",route="/generate",status="499"}')
        == gone_before + 2
    )
    assert metric(pressure, "bloom_server_requests_total", '{method="POST",route="/tokenize",status="500"}') == 0


def test_refusals_are_counted_by_reason(tiny_model_dir, tmp_path):
    """bloom_server_rejected_requests_total (docs/metrics.md) counts every 429 by reason on every surface (bug 11):
    queue 1, batch 1; one request running, one queued, then each surface's generate route is refused."""
    srv = ServerProcess(
        [
            "--model",
            str(tiny_model_dir),
            "--max-input-length",
            "64",
            "--max-new-tokens",
            str(LONG),
            "--max-total-tokens",
            str(LONG + 100),
            "--max-batch-size",
            "1",
            "--max-queued-requests",
            "1",
            "--batch-wait-ms",
            "1",
        ],
        free_port(),
        log_path=tmp_path / "refusals.log",
    )
    try:
        srv.wait_ready()
        a, _ = start_long_stream(srv)  # running
        b = Stream(srv.url, "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 5}})  # queued
        wait_until(lambda: metric(srv, "bloom_server_queue_depth") == 1, 10, "B queued")
        refused = [
            ("/generate", {"text": ["Hello"], "max_new_tokens": 2}),
            ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
            ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
            ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
            (
                "/v2/models/tiny-bloom/infer",
                {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}]},
            ),
            ("/v1/models/tiny-bloom:predict", {"instances": ["Hello"]}),
        ]
        threads = [in_thread(lambda p=p, body=body: srv.post(p, body)) for p, body in refused]
        for t, _ in threads:
            t.join(30)
        statuses = [out["result"][0] for _, out in threads]
        assert statuses == [429] * len(refused), statuses
        assert metric(srv, "bloom_server_rejected_requests_total", '{reason="overloaded"}') == len(refused)
        a.close()
        b.close()
    finally:
        srv.stop()


def test_deadlines_and_max_time(pressure):
    start = time.monotonic()
    status, body, _ = pressure.post(
        "/generate",
        {"text": ["Deepspeed is"], "max_new_tokens": LONG, "min_length": LONG + 50},
        headers={"X-Request-Timeout": "0.5"},
    )
    assert status == 200 and body["num_generated_tokens"][0] < LONG  # answered at its deadline with what it had
    assert time.monotonic() - start < 10
    start = time.monotonic()
    status, body, _ = pressure.post(
        "/generate",
        {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": LONG, "details": True, "min_length": LONG + 50}},
        headers={"X-Request-Timeout": "0.5"},
    )
    assert status == 200 and body["details"]["finish_reason"] == "max_time"
    status, body, _ = pressure.post(
        "/generate", {"text": ["Deepspeed is"], "max_new_tokens": LONG, "max_time": 0.5, "min_length": LONG + 50}
    )
    assert status == 200 and body["num_generated_tokens"][0] < LONG
    assert time.monotonic() - start < 20

    a, _ = start_long_stream(pressure)
    try:
        status, body, _ = pressure.post(
            "/generate", {"text": ["Hi"], "max_new_tokens": 5}, headers={"X-Request-Timeout": "0.3"}
        )
        assert status == 504 and body["error"] == "deadline_exceeded"
    finally:
        a.close()
    status, body, _ = pressure.post(
        "/generate", {"text": ["Hi"], "max_new_tokens": 5}, headers={"X-Request-Timeout": "soon"}
    )
    assert status == 422 and body["field"] == "x-request-timeout"


A_TOKENS = 4000


def test_sigterm_drains_then_exits_zero(tiny_model_dir, tmp_path):
    srv = ServerProcess(
        [
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            str(LONG),
            "--max-total-tokens",
            str(LONG + 100),
            "--drain-timeout-s",
            "300",
        ],
        free_port(),
        log_path=tmp_path / "drain.log",
    )
    try:
        srv.wait_ready()
        # A long enough that B, sent next, is still queued behind it on a loaded two-core box, and a drain timeout that
        # A's tokens fit in there. min_new_tokens holds the end of sequence back, as min_length does for the long
        # requests above: another CPU's arithmetic can take the tiny model's greedy text to EOS early, and B then runs
        # at once, never seen queued.
        params = {"max_new_tokens": A_TOKENS, "min_new_tokens": A_TOKENS}
        a = Stream(srv.url, "/generate_stream", {"inputs": "Deepspeed is", "parameters": params})
        assert a.next_event()["generated_text"] is None
        b_thread, b = in_thread(lambda: srv.post("/generate", {"text": ["Hello"], "max_new_tokens": 30}, timeout=300))
        try:
            wait_until(lambda: metric(srv, "bloom_server_queue_depth") == 1, 30, "B queued")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; B: {b}; server log:\n{srv.log()[-3000:]}") from None
        os.kill(srv.proc.pid, signal.SIGTERM)
        wait_until(lambda: srv.get("/ready")[0] == 503, 10, "readiness false")
        assert srv.get("/ready")[1]["status"] == "draining"
        status, body, _ = srv.post("/generate", {"text": ["Hi"], "max_new_tokens": 2})
        assert status == 503 and body["error"] == "not_ready"
        assert metric(srv, "bloom_server_rejected_requests_total", '{reason="not_ready"}') == 1
        status, body, _ = srv.get(f"/v1/models/{tiny_model_dir.name}")  # KServe v1 readiness, OpenAI's model object
        assert status == 503 and body["ready"] is False and body["id"] == tiny_model_dir.name
        events = []
        for _ in range(A_TOKENS + 100):
            ev = a.next_event()
            if ev is None:
                break
            events.append(ev)
        # The stream in flight finished normally: every token, then the final event.
        details = events[-1]["details"]
        assert details["finish_reason"] == "length", events[-1]
        assert details["generated_tokens"] == len(events) + 1 == A_TOKENS
        b_thread.join(300)
        assert b["result"][0] == 200  # and so did the request that was queued
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def test_openapi_docs_list_every_route_with_its_schema(server):
    status, spec, _ = server.get("/openapi.json")
    assert status == 200
    paths = spec["paths"]
    expected = {
        "/": {"get", "post"},
        "/generate": {"post"},
        "/generate_stream": {"post"},
        "/tokenize": {"post"},
        "/forward": {"post"},
        "/query_id": {"get"},
        "/health": {"get"},
        "/ready": {"get"},
        "/info": {"get"},
        "/metrics": {"get"},
        "/v1/models": {"get"},
        "/v1/completions": {"post"},
        "/v1/chat/completions": {"post"},
        "/v1/models/{name}": {"get"},
        "/v1/models/{name}:predict": {"post"},
        "/v2": {"get"},
        "/v2/health/live": {"get"},
        "/v2/health/ready": {"get"},
        "/v2/models/{name}": {"get"},
        "/v2/models/{name}/ready": {"get"},
        "/v2/models/{name}/infer": {"post"},
    }
    for path, methods in expected.items():
        assert path in paths and methods <= set(paths[path]), path
    for path, ops in paths.items():
        if "post" in ops:
            assert "requestBody" in ops["post"], path
            assert "application/json" in ops["post"]["requestBody"]["content"], path
    schemas = spec["components"]["schemas"]
    for name in (
        "GenerateRequest",
        "TGIRequest",
        "TGIResponse",
        "TGIStreamEvent",
        "CompletionRequest",
        "ChatRequest",
        "V2InferRequest",
        "Info",
        "OpenAIError",
        "ErrorResponse",
    ):
        assert name in schemas, name
    assert "max_new_tokens" in schemas["TGIParameters"]["properties"]
    assert "limit" in spec["info"]["description"].lower()
    status, html, _ = server.get("/docs")
    assert status == 200 and "swagger" in html.lower()


@pytest.mark.slow
def test_sigterm_with_two_ranks_finishes_the_stream_then_every_rank_exits_zero(tiny_model_dir, tmp_path):
    """What a pod's processes get from the kubelet: SIGTERM on every rank while a stream is in flight."""
    from test_lockstep import _cleanup, _manual_ranks

    procs, url = _manual_ranks(tiny_model_dir, tmp_path)
    try:
        from helpers import http

        def not_ready() -> bool:
            try:
                return http("GET", url + "/ready", timeout=10)[0] == 503
            except OSError:  # the stream already ended and the server is gone: also not ready
                return True

        a = Stream(url, "/generate_stream", {"inputs": "Deepspeed is", "parameters": {"max_new_tokens": 100}})
        assert a.next_event()["generated_text"] is None
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
        wait_until(not_ready, 10, "readiness false")
        events = [e for e in iter(a.next_event, None)]
        assert events[-1]["details"]["generated_tokens"] == len(events) + 1  # the stream in flight finished
        codes = [p.wait(60) for p in procs]
        assert codes == [0, 0], [(tmp_path / f"rank{r}.log").read_text()[-1500:] for r in range(2)]
    finally:
        _cleanup(procs)


# ---- the Gateway middleware (request context, body guard, JSON by default) as one ASGI layer, without a server ----


def _gateway_call(chunks, headers=(), method="POST", max_bytes=16, app=None, metrics=None):
    """Run one request through Gateway around `app` (default: reads the whole body and answers 200 with it).
    Returns (sent messages, what the app saw: scope headers and body, messages left unread)."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from bloom_server.api.middleware import Gateway

    seen: dict = {}

    async def echo(scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientDisconnect()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        seen["headers"], seen["body"] = list(scope["headers"]), body
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"app's own")]})
        await send({"type": "http.response.body", "body": body})

    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list = []

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/generate", "headers": list(headers), "client": ("c", 1)}
    asyncio.run(Gateway(app or echo, metrics=metrics, max_bytes=max_bytes)(scope, receive, send))
    return sent, seen, queue


def _start(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


def test_gateway_request_id_json_default_and_utf8_split_across_chunks():
    text = "héllo €".encode()  # multibyte characters, cut across chunks
    sent, seen, _ = _gateway_call([text[:2], text[2:8], text[8:]], headers=[(b"x-request-id", b"abc-1")])
    status, headers = _start(sent)
    assert status == 200 and seen["body"] == text and headers[b"x-request-id"] == b"abc-1"
    assert (b"content-type", b"application/json") in seen["headers"]  # no content type: JSON
    _, seen, _ = _gateway_call([b"{}"], headers=[(b"content-type", b"application/x-www-form-urlencoded")])
    assert [v for k, v in seen["headers"] if k == b"content-type"] == [b"application/json"]
    _, seen, _ = _gateway_call([b"{}"], headers=[(b"content-type", b"application/xml")])
    assert [v for k, v in seen["headers"] if k == b"content-type"] == [b"application/xml"]  # another type is kept
    _, seen, _ = _gateway_call([b"{}"], headers=[(b"content-type", b"text/plain")])
    assert [v for k, v in seen["headers"] if k == b"content-type"] == [b"application/json"]  # text/plain is JSON
    sent, _, _ = _gateway_call([b"{}"], headers=[(b"x-request-id", b"bad id")])
    assert re.fullmatch(rb"[0-9a-f]{32}", _start(sent)[1][b"x-request-id"])  # made: uuid4 hex
    assert _start(sent)[1][b"x-request-id"][12:13] == b"4"


def test_gateway_refuses_bad_utf8_and_oversized_bodies_once_after_draining():
    sent, seen, left = _gateway_call([b"abc", b"\xff\xfe", b"rest"])
    status, headers = _start(sent)
    body = json.loads(sent[1]["body"])
    assert status == 422 and body["field"] == "body" and "UTF-8" in body["message"] and "at byte 3" in body["message"]
    # the answer went out first, then the rest was drained and the response ended; the app's own answer never went
    # out, and the connection closes (the body was not read to its end by anyone who wanted it)
    assert not seen and not left and len(sent) == 3 and sent[1]["more_body"] and sent[2]["body"] == b""
    assert headers[b"connection"] == b"close"
    sent, seen, left = _gateway_call([b"0123456789", b"0123456789", b"more"])  # chunked past 16 bytes
    assert _start(sent)[0] == 413 and not seen and not left and len(sent) == 3
    assert json.loads(sent[1]["body"])["limit"] == 16
    sent, seen, left = _gateway_call([b"x" * 10, b"y"], headers=[(b"content-length", b"99")])  # declared too big
    assert _start(sent)[0] == 413 and not seen and not left
    assert b"x-request-id" in _start(sent)[1]


def test_gateway_counts_a_client_that_leaves_as_499():
    from bloom_server.api.metrics import Metrics

    metrics = Metrics()

    async def leaves(scope, receive, send):
        from starlette.requests import ClientDisconnect

        raise ClientDisconnect()

    _gateway_call([b"{}"], app=leaves, metrics=metrics)
    _gateway_call([b"{}"], metrics=metrics)
    text = metrics.render()[0].decode()
    assert 'bloom_server_requests_total{method="POST",route="unmatched",status="499"} 1.0' in text
    assert 'bloom_server_requests_total{method="POST",route="unmatched",status="200"} 1.0' in text
    assert "bloom_server_in_flight_requests 0.0" in text


def test_the_engines_decode_graph_counters_are_exported():
    from bloom_server.api.metrics import Metrics

    metrics = Metrics()
    zero = lambda: 0.0  # noqa: E731
    stats = {"decode_graphs": {"graphs": 12, "capture_seconds": 1.5, "eager_steps": 40},
             "prefix_cache": {"hits": 3}}  # fmt: skip
    metrics.bind(queue_depth=zero, queue_tokens=zero, running=zero, ready=zero, load_seconds=zero,
                 engine_stats=lambda: stats)  # fmt: skip
    text = metrics.render()[0].decode()
    assert "bloom_server_decode_graphs 12.0" in text
    assert "bloom_server_decode_graph_capture_seconds_total 1.5" in text
    assert "bloom_server_decode_eager_steps_total 40.0" in text
    assert "bloom_server_prefix_cache_hits_total 3.0" in text
    stats.clear()  # a CPU engine reports no graphs: no series
    assert "decode_graphs" not in metrics.render()[0].decode()
