"""The connection layer under the app: uvicorn's h11 protocol with deadlines for reading a request and caps on open
connections, which uvicorn does not have (its keep-alive timer runs only between requests, and a byte resets it).

- A request's headers must arrive within the header deadline (from the connection's opening, or from the first byte
  of a later request on a kept-alive connection): otherwise a JSON 408 (nothing if the client sent nothing) and the
  connection is closed.
- Its body must arrive within the body deadline from the end of its headers. The app's gateway answers a JSON 408
  at the deadline while the route reads (middleware.Gateway); here, a moment later, a connection still sending a
  body is closed whatever the app did with it.
- Open connections are capped per server and per client address: one over a cap gets a JSON 503 with Retry-After
  and is closed at once, so slow or idle clients cannot hold every socket and file descriptor.
- A request h11 cannot parse (`Content-Length: -5`, a broken request line) gets a JSON 400 instead of uvicorn's
  plain text.

Generations and streamed answers are never cut: only reading the request is bounded.
"""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bloom_server.api.errors import render_error

_PHRASES = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}
# After the body deadline the gateway answers the route's read; this protocol closes what is left a moment later.
_BODY_GRACE_S = 1.0


class ConnectionLimits:
    """Deadlines and caps shared by every connection of one server, and the count of open connections."""

    def __init__(self, *, max_connections: int, max_per_client: int, header_timeout_s: float, body_timeout_s: float):
        self.max_connections = max_connections
        self.max_per_client = max_per_client  # 0: no per-client cap
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.refused = 0

    def admit(self, host: str) -> str | None:
        """Count a new connection in; None if admitted, else what it is over."""
        if self.open >= self.max_connections:
            return f"the server has {self.open} open connections, its limit"
        held = self.by_client.get(host, 0)
        if self.max_per_client and held >= self.max_per_client:
            return f"this client address has {held} open connections, the limit per client"
        self.open += 1
        self.by_client[host] = held + 1
        return None

    def release(self, host: str) -> None:
        self.open -= 1
        left = self.by_client.get(host, 1) - 1
        if left > 0:
            self.by_client[host] = left
        else:
            self.by_client.pop(host, None)


def connection_limits(settings: Any) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=settings.max_connections,
        max_per_client=settings.max_connections_per_client,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )


def raw_error(status: int, kind: str, message: str, limit: Any = None, headers: tuple = ()) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for the moments before any request exists."""
    body = json.dumps(render_error("bloom", status, kind, message, None, limit)[1]).encode()
    head = [b"HTTP/1.1 %d %s" % (status, _PHRASES[status]), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close", *headers]  # fmt: skip
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def guarded_protocol(limits: ConnectionLimits) -> type:
    """An H11Protocol class bound to `limits` (uvicorn.Config(http=...) takes a class)."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._host: str | None = None  # set while counted in `limits`
            self._timer: Any = None
            self._phase: str | None = None  # "headers" or "body": which deadline runs

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            host = self.client[0] if self.client else ""
            over = limits.admit(host)
            if over is not None:
                limits.refused += 1
                transport.write(raw_error(503, "too_many_connections", f"connection refused: {over}; retry later",
                                          headers=(b"retry-after: 1",)))  # fmt: skip
                transport.close()
                return
            self._host = host
            self._arm("headers", limits.header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._host is not None:
                limits.release(self._host)
                self._host = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
                # The answer went out before its request's body was read (a refusal): the connection cannot carry
                # another request until that body is over, and nobody waits for it.
                self.transport.close()
                return
            self._watch(idle_is_keep_alive=True)

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(raw_error(400, "bad_request", f"body: not a valid HTTP/1.1 request ({msg})"))
                self.transport.close()

        def _watch(self, idle_is_keep_alive: bool = False) -> None:
            if self.transport.is_closing():
                self._disarm()
                return
            state = self.conn.their_state
            if state is h11.IDLE:
                if self.conn.trailing_data[0]:  # part of a request's head: its header deadline runs
                    if self._phase != "headers":
                        self._arm("headers", limits.header_timeout_s)
                elif idle_is_keep_alive:  # between requests: uvicorn's keep-alive timeout governs
                    self._disarm()
            elif state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", limits.body_timeout_s + _BODY_GRACE_S)
            else:
                self._disarm()

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._expired, phase)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _expired(self, phase: str) -> None:
            self._timer, self._phase = None, None
            if self.transport.is_closing():
                return
            if phase == "headers" and self.conn.their_state is h11.IDLE:
                if self.conn.trailing_data[0]:
                    limit = limits.header_timeout_s
                    self.transport.write(raw_error(408, "request_timeout", f"headers: not received within {limit:g} "
                                                   "s (the header deadline)", limit))  # fmt: skip
                self.transport.close()
            elif phase == "body" and self.conn.their_state is h11.SEND_BODY:
                self.transport.close()

    return GuardedH11Protocol
