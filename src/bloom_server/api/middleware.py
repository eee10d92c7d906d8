"""Pure-ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection): the request id +
access log + HTTP metrics, a request body size guard (413 before the body is read into memory) and JSON as the default
body type (curl -d sends form encoding unless told otherwise; every body here is JSON), as one layer (`Gateway`); and
the API key."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import logging
import os
import re
import time
from typing import Any

from starlette.requests import ClientDisconnect

from bloom_server.api.errors import loc_to_field, render_error, surface_of

# Probes and the metrics scrape: never behind the API key, not counted as in-flight, not logged per request.
PROBES = frozenset({"/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"})
# Pages that hold no data (the playground and the API docs): served without the key; every call they make needs it.
PUBLIC_PAGES = frozenset({"/", "/ui", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"})
CLIENT_CLOSED = 499
_ID_OK = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Labels read as JSON on every POST route: curl -d's form type, and text/plain (a browser's fetch() of a string).
# One rule for all routes; other non-JSON types are refused as not JSON.
_AS_JSON = (b"application/x-www-form-urlencoded", b"text/plain")
_JSON_TYPE = (b"content-type", b"application/json")
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff). Paired, it is one character; alone, json.loads makes a str
# that cannot be encoded, which would fail wherever the text is echoed or tokenized: such bodies are refused here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _new_request_id() -> str:
    """What uuid.uuid4().hex gives (version 4, RFC 4122 variant), without building a UUID object."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


class Gateway:
    """What every HTTP request goes through, as one pure-ASGI layer (each layer costs CPU on every request: its own
    closures and an await per message). Each part can be switched off; app.py puts the API key and CORS between
    the parts where they are configured (see `install`).

    - context (outermost): a request id (X-Request-Id honoured when sane, else made), echoed on the response; one
      log line per request with its timing and tokens; the HTTP metrics; 499 for a client that left. Routes leave
      what they know in scope["state"]: `gen` (the engine's requests) for tokens and timing.
    - max_bytes: 413 past it (before the body is read into memory; the rest of the body is drained so the client
      reads the answer), and 422 for a body that is not strict UTF-8 (Python's json.loads(bytes) would accept
      CESU-8 surrogates), or whose JSON holds a lone surrogate escape (`"\\ud800"`), naming the field. Either is
      answered here, once, for every route; the app's own answer to the aborted read is dropped.
    - json_default: a POST body without a content type, with curl's default form type or with text/plain is JSON,
      on every route (curl -d sends form encoding unless told otherwise, fetch() text/plain; every body here is JSON).
    """

    def __init__(
        self,
        app: Any,
        *,
        context: bool = True,
        metrics: Any = None,
        access_log: logging.Logger | None = None,
        max_bytes: int | None = None,
        body_timeout_s: float | None = None,
        json_default: bool = True,
    ):
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.context = context
        self.metrics = metrics if context else None
        self.log = access_log or logging.getLogger("bloom_server.access")
        self.max_bytes = max_bytes
        self.json_default = json_default

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.max_bytes
        headers = scope.get("headers", [])
        # One pass over the headers (the last of a repeated header wins, as dict(headers) had it).
        given = b""
        ctype: bytes | None = None
        declared_over: int | None = None
        text_bytes: int | None = None  # the body's leading bytes that must be UTF-8 (None: all of them)
        for name, value in headers:
            if name == b"content-type":
                ctype = value
            elif name == b"inference-header-content-length":
                # KServe's binary tensor data: JSON for that many bytes, then raw tensor bytes (routes_kserve).
                text_bytes = int(value) if value.isdigit() else None
            elif name == b"x-request-id":
                given = value
            elif name == b"content-length" and max_bytes is not None and declared_over is None:
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > max_bytes:
                    declared_over = declared

        context = self.context
        metrics = self.metrics
        app_scope = scope
        if context and scope.get("method") == "HEAD":
            # HEAD is GET without the body (uvicorn drops it, reading its own scope): routed as GET, so that every
            # GET route answers it. A copy: uvicorn must still see HEAD.
            app_scope = dict(scope, method="GET")
        request_id = ""
        rid = b""
        probe = False
        state: dict = {}
        start = 0.0
        if context:
            text = given.decode("latin-1").strip()
            request_id = text if _ID_OK.match(text) else _new_request_id()
            rid = request_id.encode()
            state = scope.setdefault("state", {})
            state["request_id"] = request_id
            start = time.perf_counter()
            probe = scope.get("path") in PROBES
            if metrics is not None and not probe:
                metrics.in_flight.inc()
        status = 500
        refused = False  # answered here (408, 413, 422): what the app answers to the aborted read is dropped
        started = False  # the response has begun (its status is out)

        async def send_out(message: dict) -> None:
            nonlocal status, started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            if context and message["type"] == "http.response.start":
                status = message["status"]
                out = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                out.append((b"x-request-id", rid))
                message = dict(message, headers=out)
            await send(message)

        async def refuse(
            code: int,
            kind: str,
            message: str,
            limit: Any,
            field: str = "body",
            *,
            close: bool = False,
            then: Any = None,
        ) -> None:
            """Answer here. `close`: the connection closes after it (a body left unread); `then`: awaited after the
            answer's bytes went out and before the response completes (draining a body the client may still send,
            so that it reads the answer instead of a reset connection)."""
            nonlocal refused
            code, content = render_error(surface_of(scope), code, kind, message, field, limit)
            body = json.dumps(content).encode()
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if close:
                hdrs.append((b"connection", b"close"))
            await send_out({"type": "http.response.start", "status": code, "headers": hdrs})
            await send_out({"type": "http.response.body", "body": body, "more_body": then is not None})
            if then is not None:
                try:
                    await then
                finally:
                    await send_out({"type": "http.response.body", "body": b""})
            refused = True

        app_receive = receive
        body_timeout = self.body_timeout_s
        deadline = asyncio.get_running_loop().time() + body_timeout if body_timeout is not None else None
        body_done = False

        async def drain() -> None:
            """Discard what is left of the body (bounded in bytes and by the body deadline)."""
            with contextlib.suppress(asyncio.TimeoutError):
                await _before(deadline, _drain(receive))

        if max_bytes is not None:
            seen = 0
            utf8: Any = None  # made at the first chunk that is not ASCII (ASCII leaves no partial character)
            chunks: list[bytes] = []
            escapes = False  # a surrogate escape seen somewhere in the body: parse it and look closer at the end

            async def limited_receive() -> dict:
                nonlocal seen, utf8, escapes, body_done
                if body_done or deadline is None or started:
                    message = await receive()
                else:
                    # Only reading the body is bounded; once it is in (or the answer has begun), receive() waits for
                    # the client to leave, unbounded.
                    try:
                        message = await _before(deadline, receive())
                    except asyncio.TimeoutError:
                        if not refused:
                            await refuse(408, "request_timeout", f"body: {seen} bytes received in {body_timeout:g} s, "
                                         "not all of it (the body deadline)", body_timeout, close=True)  # fmt: skip
                        raise _BodyRefused() from None
                if message["type"] == "http.request":
                    body_done = not message.get("more_body")
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    problem: Any = None
                    if not escapes and b"\\" in chunk:
                        edge = chunks[-1][-5:] if chunks else b""  # an escape may straddle two chunks
                        escapes = _SURROGATE_ESCAPE.search(edge + chunk) is not None
                    chunks.append(chunk)
                    if seen > max_bytes:
                        problem = (413, "payload_too_large", f"body: {seen} bytes or more; the limit is {max_bytes} bytes",
                                   max_bytes)  # fmt: skip
                    elif text_bytes is not None and seen - len(chunk) >= text_bytes:
                        pass  # past the JSON header: tensor bytes
                    elif utf8 is not None or not chunk.isascii():
                        if utf8 is None:
                            utf8 = codecs.getincrementaldecoder("utf-8")()
                        part, final = chunk, not message.get("more_body")
                        if text_bytes is not None and seen >= text_bytes:
                            part, final = chunk[: text_bytes - (seen - len(chunk))], True
                        try:
                            utf8.decode(part, final=final)
                        except UnicodeDecodeError as exc:
                            problem = (422, "validation_error", f"body: not valid UTF-8 ({exc.reason} at byte "
                                       f"{seen - len(chunk) + exc.start})", None)  # fmt: skip
                    if problem is None and escapes and not message.get("more_body"):
                        problem = _lone_surrogate_problem(b"".join(chunks))
                    if problem is not None:
                        if not refused:
                            more = bool(message.get("more_body"))
                            await refuse(*problem, close=more, then=drain() if more else None)
                        raise _BodyRefused()
                return message

            app_receive = limited_receive

        if self.json_default and scope.get("method") == "POST" and (not ctype or ctype.lower().startswith(_AS_JSON)):
            # In place: the router records the matched route in this same scope (the access log reads it).
            scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [_JSON_TYPE]

        try:
            if declared_over is not None:
                # Answered before reading a byte of it. A client that waits for "100 Continue" never sends it; one
                # that sends it anyway reads this answer while the rest is discarded.
                waits = any(k == b"expect" and v.lower() == b"100-continue" for k, v in headers)
                await refuse(413, "payload_too_large", f"body: {declared_over} bytes or more; the limit is "
                             f"{max_bytes} bytes", max_bytes, close=True, then=None if waits else drain())  # fmt: skip
                return
            await self.app(app_scope, app_receive, send_out)
        except _BodyRefused:
            pass
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the drain timeout has passed (a client stalled mid-body,
            # typically): it gets the server's own 503 instead of uvicorn's plain-text 500 and a traceback.
            if max_bytes is None or started:
                status = 500
                raise
            status = 503
            await refuse(503, "not_ready", "the server is shutting down (its drain timeout has passed); retry "
                         "elsewhere", None, close=True)  # fmt: skip
        except ClientDisconnect:
            # The client left before its answer (mid-body, or while its request ran; the engine's work for it is
            # cancelled by then): nobody is left to answer. Not a server error: 499, nginx's "client closed request".
            if not context:
                raise
            status = CLIENT_CLOSED
        except BaseException:
            status = 500
            raise
        finally:
            if context:
                elapsed = time.perf_counter() - start
                if metrics is not None:
                    if not probe:
                        metrics.in_flight.dec()
                    route = getattr(app_scope.get("route"), "path", None) or "unmatched"
                    metrics.observe_http(route, scope.get("method", ""), status, elapsed)
                if not probe and self.log.isEnabledFor(logging.INFO):
                    self._log(scope, state, request_id, status, elapsed)

    def _log(self, scope: dict, state: dict, request_id: str, status: int, elapsed: float) -> None:
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
        }
        gens = state.get("gen") or []
        if gens:
            fields["queue_ms"] = round(max(g.queue_time for g in gens) * 1000, 2)
            fields["inference_ms"] = round(max(g.inference_time for g in gens) * 1000, 2)
            fields["prompt_tokens"] = sum(g.prompt_tokens for g in gens)
            fields["generated_tokens"] = sum(g.generated_tokens for g in gens)
            steps = [g.ttft_steps for g in gens if g.ttft_steps is not None]
            if steps:  # continuous batching: steps waited for a slot + steps from admission to the first token
                wait, prefill = max(steps, key=sum)
                fields["ttft_steps"] = f"{wait}+{prefill}"
        client = scope.get("client")
        if client:
            fields["client"] = f"{client[0]}:{client[1]}"
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        self.log.info("request %s", text, extra={"request": fields})


def _lone_surrogate_problem(body: bytes) -> tuple | None:
    """(status, kind, message, limit, field) when a string of the JSON body holds a lone surrogate; None when none
    does or the body is not JSON (the route's parser says so)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    found = _surrogate_loc(data, ())
    if found is None:
        return None
    loc, in_name = found
    field = loc_to_field(loc)
    what = "a field name in it" if in_name else "it"
    return (
        422,
        "validation_error",
        f"{field}: {what} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without "
        "its pair), which is not a Unicode character",
        None,
        field,
    )


def _surrogate_loc(value: Any, loc: tuple) -> tuple[tuple, bool] | None:
    stack = [(value, loc)]
    while stack:  # iterative: the nesting depth is the client's
        v, here = stack.pop()
        if isinstance(v, str):
            if not _encodable(v):
                return here, False
        elif isinstance(v, dict):
            if not all(_encodable(k) for k in v):
                return here, True
            stack.extend((item, (*here, k)) for k, item in reversed(list(v.items())))
        elif isinstance(v, list):
            stack.extend((item, (*here, i)) for i, item in reversed(list(enumerate(v))))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _before(deadline: float | None, awaitable: Any) -> Any:
    """`awaitable`'s result, or asyncio.TimeoutError at `deadline` (the loop's clock; None: no deadline)."""
    if deadline is None:
        return await awaitable
    timeout_at = getattr(asyncio, "timeout_at", None)  # Python 3.11+: no task per call
    if timeout_at is not None:
        async with timeout_at(deadline):
            return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))


async def _drain(receive: Any, cap: int = 64 << 20) -> None:
    """Read and discard the rest of the body (bounded), so the client reads the 413 instead of a broken pipe."""
    dropped = 0
    while dropped < cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body"):
            return


class _BodyRefused(Exception):
    pass


class ApiKeyAuth:
    """`Authorization: Bearer <key>` on every route but the probes, the metrics and the data-free pages."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        auth = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        message = "a valid API key is required: send `Authorization: Bearer <key>`"
        code, body = render_error(surface_of(scope), 401, "unauthorized", message, "authorization")
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    @staticmethod
    def _exempt(scope: dict) -> bool:
        path = scope.get("path", "")
        if path in PROBES:
            return True
        return scope.get("method") in ("GET", "HEAD") and (path in PUBLIC_PAGES or path.startswith("/static/"))
