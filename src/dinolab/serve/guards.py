"""What keeps the server up under load and abuse: one model queue, a body limit, a request deadline.

- :class:`ModelWorker`: all model work runs on one thread, in arrival order, so two requests never
  hold activations at the same time (memory stays that of one request) and the backbone is never
  entered concurrently. At most ``max_queue`` jobs wait; the next one gets 503 at once. A waiting
  request that passes its deadline gets 504 and its job is dropped if it has not started.
- :class:`BodyLimitMiddleware`: refuses a request body larger than ``max_bytes`` with 413 — from the
  ``Content-Length`` header before reading, or while streaming (chunked uploads), so an oversized
  upload is never buffered whole.
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


async def send_json(send: Send, status: int, detail: str) -> None:
    """Send a complete ``{"detail": ...}`` JSON response from ASGI middleware."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
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
    """413 for request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (f"request body of {size} bytes is over the limit of {self.max_bytes:,} bytes; send smaller "
                "images (or start the server with a larger --max-upload-mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, self._message(f"{int(declared):,}"))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # an HTTPException passes FastAPI's body parsing unchanged and becomes this response
                    raise HTTPException(413, self._message(f"more than {self.max_bytes:,}"))
            return message

        tracker = _ResponseTracker(send)
        try:
            await self.app(scope, limited, tracker)
        except HTTPException as e:  # read outside a route (no handler turned it into a response)
            if e.status_code != 413 or tracker.started:
                raise
            await send_json(send, 413, str(e.detail))


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
                            "busy model); retry, or start the server with a larger --timeout")
