"""Bad requests get precise 4xx answers, load gets 503/504, and the server stays up after all of them."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from dinolab.serve.app import ServerThread, create_app
from dinolab.serve.settings import Limits, ServeSettings

from .conftest import local_client, photo, png_bytes, tiny_served


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _post(client, data: bytes, name: str = "x.png", ctype: str = "application/octet-stream"):
    return client.post("/v1/embed", files={"image": (name, data, ctype)})


def _variants() -> dict[str, bytes]:
    img = photo()
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    frames = [photo(i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return {
        "png": png_bytes(img), "jpeg": png_bytes(img, "JPEG"), "rgba": png_bytes(rgba),
        "grey16": png_bytes(Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)),
        "cmyk": png_bytes(img.convert("CMYK"), "JPEG"), "bmp": png_bytes(img.convert("L"), "BMP"),
        "tiff": png_bytes(img, "TIFF"), "webp": png_bytes(img, "WEBP"), "gif": gif.getvalue(),
    }


@pytest.mark.parametrize("kind", list(_variants()))
def test_every_accepted_format_decodes(client, kind):
    r = _post(client, _variants()[kind], name="upload.bin")
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (96, 64)


def test_exif_orientation_is_applied(client):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    r = _post(client, png_bytes(photo(), "JPEG", exif=exif.tobytes()), name="rot.jpg")
    assert (r.json()["width"], r.json()["height"]) == (64, 96)


BAD = {
    "text": (b"hello, I am not an image\n" * 20, 415, "not an image"),
    "text named .png": (b"PK\x03\x04 a zip file", 415, "not an image"),
    "empty": (b"", 400, "empty"),
    "truncated png": (png_bytes(photo())[:600], 422, "truncated"),
    "truncated jpeg": (png_bytes(photo(), "JPEG")[:500], 422, "truncated"),
    "bad header": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "not a readable PNG"),
    "bomb": (_png_header_only(60000, 60000), 413, "decompression bomb"),
    "too many pixels": (_png_header_only(8000, 6000), 413, "48,000,000 pixels"),
    "tiny": (png_bytes(photo(size=(8, 8))), 422, "too small"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_get_precise_errors(client, case):
    data, status, words = BAD[case]
    r = _post(client, data, name="photo.png", ctype="image/png")
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_bad_form_and_parameters(client):
    r = client.post("/v1/pca", files={"image": ("a.png", png_bytes(photo()))}, data={"gallery": "chelsea"})
    assert r.status_code == 400 and "not both" in r.json()["detail"]
    r = client.post("/v1/pca", data={"gallery": "../../etc/passwd"})
    assert r.status_code == 404 and "/v1/gallery" in r.json()["detail"]
    assert client.get("/v1/gallery/..%2F..%2Fetc%2Fpasswd").status_code == 404
    r = client.post("/v1/segment", params={"segments": 100}, data={"gallery": "chelsea"})
    assert r.status_code == 422
    assert client.post("/v1/pca", params={"format": "gif"}, data={"gallery": "chelsea"}).status_code == 422
    r = client.post("/v1/pca", content=b"raw bytes", headers={"content-type": "image/png"})
    assert r.status_code == 400 and "no input" in r.json()["detail"]


def test_upload_byte_limits():
    app = create_app(ServeSettings(limits=Limits(max_upload_mb=0.01)), models=[tiny_served()])
    noise = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
    with local_client(app) as c:
        r = _post(c, png_bytes(noise))  # ~43 kB > 10 kB: refused by the upload check
        assert r.status_code == 413 and "upload limit" in r.json()["detail"]
        big = b"\x00" * (3 * 2**20)  # over the body limit (2 x 10 kB + 1 MiB): refused before reading
        r = c.post("/v1/embed", content=big, headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "request body" in r.json()["detail"]

        def stream():  # chunked, no Content-Length: counted while streaming
            for _ in range(48):
                yield b"\x00" * 65536
        r = c.post("/v1/embed", content=stream(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        assert _post(c, png_bytes(photo(size=(40, 30)))).status_code == 200  # small enough, and still up


def test_internal_errors_are_500_json_and_the_server_stays_up():
    served = tiny_served()
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
    served.backbone.register_forward_pre_hook(explode)
    with local_client(create_app(ServeSettings(), models=[served]), raise_server_exceptions=False) as c:
        r = c.post("/v1/embed", data={"gallery": "chelsea"})
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error (RuntimeError); see the server log"}
        assert c.post("/v1/embed", data={"gallery": "chelsea"}).status_code == 200


def _slow(seconds: float):
    served = tiny_served()
    served.backbone.register_forward_pre_hook(lambda m, a: time.sleep(seconds))
    return served


def test_full_queue_gets_503_and_a_slow_model_504():
    app = create_app(ServeSettings(limits=Limits(max_queue=1, timeout_s=20)), models=[_slow(0.8)])
    with ServerThread(app) as url:
        codes: list[int] = []

        def call() -> None:
            codes.append(httpx.post(url + "v1/embed", data={"gallery": "coffee"}, timeout=30).status_code)
        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert sorted(codes) == [200, 503, 503]
        assert httpx.get(url + "healthz").json()["status"] == "ok"
    app = create_app(ServeSettings(limits=Limits(timeout_s=0.3)), models=[_slow(1.0)])
    with local_client(app) as c:
        r = c.post("/v1/embed", data={"gallery": "coffee"})
        assert r.status_code == 504 and "--timeout" in r.json()["detail"]


def test_concurrent_requests_are_queued_not_mixed():
    """Eight clients at once on different images: each answer equals the one-at-a-time answer."""
    app = create_app(ServeSettings(), models=[tiny_served()])
    names = ["chelsea", "coffee", "rocket", "astronaut"] * 2
    with ServerThread(app) as url:
        alone = {n: httpx.post(url + "v1/embed", data={"gallery": n}).json()["cls"] for n in set(names)}
        got: dict[int, list[float]] = {}

        def call(i: int) -> None:
            got[i] = httpx.post(url + "v1/embed", data={"gallery": names[i]}, timeout=30).json()["cls"]
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, n in enumerate(names):
        np.testing.assert_allclose(got[i], alone[n], atol=1e-6)


def _read_reply(s: socket.socket) -> str:
    """The whole reply: headers and body may arrive in separate segments (one recv() got only the
    headers on a loaded machine), so read until the connection closes or Content-Length is in."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = [int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_a_stalled_upload_gets_504():
    app = create_app(ServeSettings(limits=Limits(timeout_s=0.5)), models=[tiny_served()])
    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 1000\r\n\r\n--b\r\n")  # ... and nothing more
            reply = _read_reply(s)
        assert reply.startswith("HTTP/1.1 504") and "took longer" in reply
        assert httpx.get(url + "healthz").status_code == 200
