"""Pure-ASGI middleware: a request body size guard (413 before the body is read into memory), and JSON as the
default body type (curl -d sends form encoding unless told otherwise; every body here is JSON)."""

from __future__ import annotations

import json
from typing import Any

from bloom_server.api.errors import error_body


class BodySizeLimit:
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
                    await self._reject(send, declared)
                    return
        seen = 0
        responded = False

        async def limited_receive() -> dict:
            nonlocal seen, responded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if not responded:
                        responded = True
                        if message.get("more_body"):
                            await self._drain(receive)
                        await self._reject(send, seen)
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
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

    async def _reject(self, send: Any, size: int) -> None:
        body = json.dumps(
            error_body(
                "payload_too_large",
                f"body: {size} bytes or more; the limit is {self.max_bytes} bytes",
                "body",
                self.max_bytes,
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
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
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)
