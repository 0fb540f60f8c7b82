"""Connection-level guards for ``dinolab serve``: uvicorn's h11 protocol with a header deadline and a cap.

uvicorn times out idle keep-alive connections, but nothing times out a connection that has sent part of
its request headers (or nothing at all): ~80 such "slowloris" connections used to fill uvicorn's
``limit_concurrency`` (which counts connections) and every later request, ``/healthz`` included, got
503 for as long as they stayed. :func:`guarded_protocol` returns a subclass of uvicorn's
``H11Protocol`` that

- closes a connection that has not delivered complete request headers within ``header_timeout``
  seconds of connecting, or of the previous response on a keep-alive connection (408 when it had
  sent part of a request, silently when it had sent nothing);
- refuses connections beyond ``max_connections`` at once with a 503 and closes them.

The in-progress request cap and the request-body deadline are ASGI middleware
(:class:`dinolab.serve.guards.RequestLimitMiddleware`, :class:`dinolab.serve.guards.BodyLimitMiddleware`),
so they work under any server; uvicorn's own ``limit_concurrency`` is not used.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def _raw_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with a request-header deadline and a connection cap (see the module docstring)."""

    header_timeout: float = 10.0
    max_connections: int = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            log.warning("refusing a connection: %d open (the limit is %d)", len(self.connections) - 1,
                        self.max_connections)
            transport.write(_raw_response(503, "Service Unavailable", f"too many open connections (the limit "
                                          f"is {self.max_connections}); retry in a moment"))
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _header_deadline(self) -> None:
        """Close the connection unless a request is being handled (the ASGI guards bound that one)."""
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        pending = bool(self.conn.trailing_data[0]) or self.conn.their_state is not h11.IDLE
        if pending:  # part of a request arrived: say why before closing
            log.info("closing a connection that sent no complete request within %g s", self.header_timeout)
            self.transport.write(_raw_response(408, "Request Timeout", "the request headers did not arrive "
                                               f"within {self.header_timeout:g} s"))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these limits, for ``uvicorn.Config(http=...)``."""
    attrs: dict[str, Any] = {"header_timeout": float(header_timeout), "max_connections": int(max_connections)}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)
