"""Pure-ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection): a request body
size guard (413 before the body is read into memory), JSON as the default body type (curl -d sends form encoding
unless told otherwise; every body here is JSON), the request id + access log + HTTP metrics, and the API key."""

from __future__ import annotations

import codecs
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect

from bloom_server.api.errors import render_error, surface_of


class BodySizeLimit:
    """413 past `max_bytes` (before the body is read into memory), and 422 for a body that is not strict UTF-8
    (Python's json.loads(bytes) would accept CESU-8 surrogates). Either is answered here, once; the app's own answer
    to the aborted read is dropped."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._drain(receive)
                    await self._reject(scope, send, declared)
                    return
        seen = 0
        responded = False
        utf8 = codecs.getincrementaldecoder("utf-8")()

        async def limited_receive() -> dict:
            nonlocal seen, responded
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen += len(chunk)
                problem = None
                if seen > self.max_bytes:
                    problem = (413, "payload_too_large", f"body: {seen} bytes or more; the limit is {self.max_bytes} bytes",
                               self.max_bytes)
                else:
                    try:
                        utf8.decode(chunk, final=not message.get("more_body"))
                    except UnicodeDecodeError as exc:
                        problem = (422, "validation_error", f"body: not valid UTF-8 ({exc.reason} at byte "
                                   f"{seen - len(chunk) + exc.start})", None)
                if problem is not None:
                    if not responded:
                        responded = True
                        if message.get("more_body"):
                            await self._drain(receive)
                        await self._send_error(scope, send, *problem)
                    raise _BodyRefused()
            return message

        async def guarded_send(message: dict) -> None:
            # Once the 413 is out, whatever the app answers to the aborted read (FastAPI turns it into a 400) is
            # dropped: a second response on the same request is a protocol error.
            if not responded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused:
            pass

    async def _drain(self, receive: Any, cap: int = 64 << 20) -> None:
        """Read and discard the rest of the body (bounded), so the client reads the 413 instead of a broken pipe."""
        dropped = 0
        while dropped < cap:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _reject(self, scope: dict, send: Any, size: int) -> None:
        message = f"body: {size} bytes or more; the limit is {self.max_bytes} bytes"
        await self._send_error(scope, send, 413, "payload_too_large", message, self.max_bytes)

    async def _send_error(self, scope: dict, send: Any, status: int, kind: str, message: str, limit: Any) -> None:
        status, content = render_error(surface_of(scope), status, kind, message, "body", limit)
        body = json.dumps(content).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyRefused(Exception):
    pass


class JSONByDefault:
    """Treat a POST body without a content type, or with curl's default form type, as JSON."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            ctype = dict(scope.get("headers", [])).get(b"content-type", b"")
            if not ctype or ctype.startswith(b"application/x-www-form-urlencoded"):
                # In place: the router records the matched route in this same scope (the access log reads it).
                scope["headers"] = headers + [(b"content-type", b"application/json")]
        await self.app(scope, receive, send)


# Probes and the metrics scrape: never behind the API key, not counted as in-flight, not logged per request.
PROBES = frozenset({"/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"})
# Pages that hold no data (the playground and the API docs): served without the key; every call they make needs it.
PUBLIC_PAGES = frozenset({"/", "/ui", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"})
CLIENT_CLOSED = 499
_ID_OK = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class RequestContext:
    """Outermost: a request id (X-Request-Id honoured when sane, else made), echoed on the response; one log line per
    request with its timing and tokens; the HTTP metrics. Routes leave what they know in scope["state"]: `gen`
    (the engine's requests) for tokens and timing."""

    def __init__(self, app: Any, metrics: Any = None, access_log: logging.Logger | None = None):
        self.app = app
        self.metrics = metrics
        self.log = access_log or logging.getLogger("bloom_server.access")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1").strip()
        request_id = given if _ID_OK.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start = time.perf_counter()
        status = {"code": 500}
        probe = scope.get("path") in PROBES
        if self.metrics is not None and not probe:
            self.metrics.in_flight.inc()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client left before its answer (mid-body, or while its request ran; the engine's work for it is
            # cancelled by then): nobody is left to answer. Not a server error: 499, nginx's "client closed request".
            status["code"] = CLIENT_CLOSED
        except BaseException:
            status["code"] = 500
            raise
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            if self.metrics is not None:
                if not probe:
                    self.metrics.in_flight.dec()
                self.metrics.observe_http(route, scope.get("method", ""), status["code"], elapsed)
            if not probe:
                self._log(scope, state, request_id, status["code"], elapsed)

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
        client = scope.get("client")
        if client:
            fields["client"] = f"{client[0]}:{client[1]}"
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        self.log.info("request %s", text, extra={"request": fields})


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
