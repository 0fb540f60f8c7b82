"""What keeps the server up under load and abuse: one model queue, a body limit, a request deadline.

- :class:`ModelWorker`: all model work runs on one thread, in arrival order, so two requests never
  hold activations at the same time (memory stays that of one request) and the backbone is never
  entered concurrently. At most ``max_queue`` jobs wait; the next one gets 503 at once. A waiting
  request that passes its deadline gets 504 and its job is dropped if it has not started.
- :class:`BodyLimitMiddleware`: refuses a request body larger than ``max_bytes`` with 413 — from the
  ``Content-Length`` header before reading, or while streaming (chunked uploads), so an oversized
  upload is never buffered whole — and a body that has not fully arrived ``timeout_s`` after the
  headers with 408 (slow uploads cannot hold a request slot for the whole request deadline).
- :class:`RequestLimitMiddleware`: at most ``max_requests`` requests in progress (uploads being read
  included); the next gets 503 at once. ``/healthz`` is never refused, so liveness stays visible
  under load (uvicorn's ``limit_concurrency`` counted connections, and answered 503 to everything).
- :class:`OriginCheckMiddleware`: a POST (any unsafe method) sent by a page of another site gets 403:
  its ``Origin`` header must name this server (the ``Host`` it was sent to) or one of
  ``allowed_origins``; without ``Origin``, ``Sec-Fetch-Site: cross-site`` is refused too. Host names
  themselves are checked by starlette's ``TrustedHostMiddleware`` (DNS rebinding).
- :class:`DeadlineMiddleware`: a request (upload included: slow clients too) that has not started
  its response within ``timeout_s`` gets 504.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dinolab.serve.inputs import ServeError

T = TypeVar("T")


class ModelWorker:
    """A single worker thread with a bounded queue (see the module docstring)."""

    def __init__(self, max_queue: int = 32) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinolab-model")
        self._lock = threading.Lock()
        self._pending = 0
        self.completed = 0

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def _done(self, _future: Any) -> None:
        with self._lock:
            self._pending -= 1
            self.completed += 1

    async def run(self, fn: Callable[[], T], timeout: float) -> T:
        """Run ``fn()`` on the worker thread: ``ServeError`` 503 when full, 504 after ``timeout`` s."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise ServeError(503, f"the server is busy ({self._pending} requests queued); retry in a "
                                 "moment")
            self._pending += 1
        future = self._pool.submit(fn)
        future.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            raise ServeError(504, f"the model did not answer within {timeout:g} s ({self._pending} requests "
                             "queued); send a smaller image, retry later, or start the server with a larger "
                             "--timeout") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def send_json(send: Send, status: int, detail: str, *, close: bool = False) -> None:
    """Send a complete ``{"detail": ...}`` JSON response from ASGI middleware (``close``: and end the
    connection, for a request whose body was not read)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _ResponseTracker:
    """Wraps ``send`` and remembers whether the response has started."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (declared or streamed); 408 for a body not received
    within ``timeout_s`` seconds of the headers (None: no deadline)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_slow(self) -> HTTPException:
        return HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s; send it "
                             "faster (or start the server with a larger --body-timeout)",
                             headers={"connection": "close"})

    def _message(self, size: str) -> str:
        return (f"request body of {size} bytes is over the limit of {self.max_bytes:,} bytes; send smaller "
                "images (or start the server with a larger --max-upload-mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, self._message(f"{int(declared):,}"), close=True)
            return
        seen, complete = 0, False
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s

        async def next_message() -> Message:
            if deadline is None or complete:  # after the body: e.g. waiting for a disconnect
                return await receive()
            try:
                return await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise self._too_slow() from None

        async def limited() -> Message:
            nonlocal seen, complete
            message = await next_message()
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # an HTTPException passes FastAPI's body parsing unchanged and becomes this response
                    raise HTTPException(413, self._message(f"more than {self.max_bytes:,}"),
                                        headers={"connection": "close"})
            return message

        tracker = _ResponseTracker(send)
        try:
            await self.app(scope, limited, tracker)
        except HTTPException as e:  # read outside a route (no handler turned it into a response)
            if e.status_code not in (408, 413) or tracker.started:
                raise
            await send_json(send, e.status_code, str(e.detail), close=True)


class RequestLimitMiddleware:
    """503 when ``max_requests`` requests are already in progress; paths in ``exempt`` always pass."""

    def __init__(self, app: ASGIApp, max_requests: int, exempt: tuple[str, ...] = ("/healthz",)) -> None:
        self.app = app
        self.max_requests = max_requests
        self.exempt = exempt
        self.active = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_requests:
            await send_json(send, 503, f"the server is busy ({self.active} requests in progress); retry in a "
                            "moment", close=True)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class OriginCheckMiddleware:
    """403 for a state-changing request from a page of another site (see the module docstring)."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, allowed_origins: list[str] | tuple[str, ...] = ()) -> None:
        self.app = app
        self.allow_any = "*" in allowed_origins
        self.allowed = {o.strip().rstrip("/").lower() for o in allowed_origins}

    def allows(self, origin: str | None, host: str | None, fetch_site: str | None = None) -> bool:
        """Whether a request with these ``Origin`` / ``Host`` / ``Sec-Fetch-Site`` headers may change
        state."""
        if self.allow_any:
            return True
        if origin is None:
            return fetch_site != "cross-site"  # not a browser (or an old one): same-site unless it says so
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return bool(netloc) and netloc == (host or "").lower()  # "null" (sandboxed pages, file://) never is

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") not in self.SAFE:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if not self.allows(origin, headers.get("host"), headers.get("sec-fetch-site")):
                shown = (origin or "another site")[:80]
                await send_json(send, 403, f"cross-origin request from {shown} refused: only this server's "
                                "own page may send requests (start the server with --allowed-origins ORIGIN "
                                "to allow another site)", close=True)
                return
        await self.app(scope, receive, send)


class DeadlineMiddleware:
    """504 when a request has not started its response within ``timeout_s`` seconds."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracker = _ResponseTracker(send)
        try:
            await asyncio.wait_for(self.app(scope, receive, tracker), self.timeout_s)
        except asyncio.TimeoutError:
            if tracker.started:  # too late to change the status: the client sees a cut response
                return
            await send_json(send, 504, f"the request took longer than {self.timeout_s:g} s (slow upload or a "
                            "busy model); retry, or start the server with a larger --timeout", close=True)
