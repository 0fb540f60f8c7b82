"""Slow and many clients against a real uvicorn server on a loopback port: /healthz keeps answering.

Bounded: every socket has a timeout, the deadlines are set to about a second for the test, and each
test opens at most ~100 connections.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from dinolab.serve.app import ServerThread, create_app
from dinolab.serve.settings import Limits, ServeSettings

from .conftest import photo, png_bytes, tiny_served

N = 100  # more than the old limit of 2 x max_queue + 16 = 80 connections


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


def _open(port: int, n: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if payload:
            s.sendall(payload)
        socks.append(s)
    return socks


def _reply(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, socket.timeout):
        pass
    except ConnectionResetError:
        pass
    finally:
        s.close()
    return data


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def _detail(reply: bytes) -> str:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["detail"]


def test_unfinished_headers_do_not_lock_out_healthz():
    app = create_app(ServeSettings(limits=Limits(header_timeout_s=1.5)), models=[tiny_served()])
    with ServerThread(app) as url:
        t0 = time.monotonic()
        partial = _open(_port(url), N, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        silent = _open(_port(url), 5, b"")
        r = httpx.get(url + "healthz", timeout=5)  # while all of them are still open
        assert r.status_code == 200 and r.json()["status"] == "ok"
        replies = [_reply(s) for s in partial]
        closed_after = time.monotonic() - t0
        assert all(_status(x) == 408 for x in replies), {_status(x) for x in replies}
        assert "headers did not arrive within 1.5 s" in _detail(replies[0])
        assert all(_reply(s) == b"" for s in silent)  # nothing sent: closed without an answer
        assert 1.4 < closed_after < 9, closed_after
        assert httpx.get(url + "healthz", timeout=5).status_code == 200


def test_slow_upload_bodies_do_not_lock_out_healthz():
    app = create_app(ServeSettings(limits=Limits(body_timeout_s=1.0)), models=[tiny_served()])
    head = (b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
            b"filename=\"x.png\"\r\n\r\n\x89PNG")  # ... and the rest never comes
    with ServerThread(app) as url:
        socks = _open(_port(url), N, head)
        time.sleep(0.3)  # let the server read their headers
        r = httpx.get(url + "healthz", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        replies = [_reply(s) for s in socks]
        codes = [_status(x) for x in replies]
        # 80 requests in progress wait for their bodies and get 408; the others get 503 at once
        assert set(codes) <= {408, 503} and codes.count(408) == 80, sorted(set(codes))
        slow = next(x for x in replies if _status(x) == 408)
        assert "body did not arrive within 1 s" in _detail(slow) and "--body-timeout" in _detail(slow)
        busy = next(x for x in replies if _status(x) == 503)
        assert "requests in progress" in _detail(busy)
        ok = httpx.post(url + "v1/embed", data={"gallery": "coffee"}, timeout=30)  # and it still works
        assert ok.status_code == 200, ok.text


def test_connections_beyond_the_cap_are_refused_and_healthz_returns():
    limits = Limits(max_connections=8, header_timeout_s=1.0)
    app = create_app(ServeSettings(limits=limits), models=[tiny_served()])
    with ServerThread(app) as url:
        idle = _open(_port(url), 8, b"")
        extra = _open(_port(url), 1, b"")[0]
        reply = _reply(extra, 5)
        assert _status(reply) == 503 and "too many open connections" in _detail(reply)
        for s in idle:
            _reply(s)  # closed by the header deadline
        assert httpx.get(url + "healthz", timeout=5).status_code == 200


def test_64_concurrent_clients_all_get_answers():
    app = create_app(ServeSettings(limits=Limits(max_queue=64)), models=[tiny_served()])
    codes: list[int] = []
    small = png_bytes(photo(size=(40, 32)))
    with ServerThread(app) as url, httpx.Client(limits=httpx.Limits(max_connections=70), verify=False,
                                                timeout=60) as client:  # one client: no TLS set-up per thread
        def call() -> None:
            codes.append(client.post(url + "v1/embed", files={"image": ("x.png", small)}).status_code)
        threads = [threading.Thread(target=call) for _ in range(64)]
        for t in threads:
            t.start()
        health = client.get(url + "healthz", timeout=10)
        for t in threads:
            t.join(timeout=90)
        assert health.status_code == 200
        assert not any(t.is_alive() for t in threads)
    assert codes == [200] * 64
