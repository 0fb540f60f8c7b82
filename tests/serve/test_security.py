"""Host names, cross-site requests and what replies reveal: DNS rebinding, CSRF, server paths, /redoc."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from dinolab.cli import main
from dinolab.curate.index import ExactIndex
from dinolab.errors import DinolabError
from dinolab.models.checkpoints import save_official
from dinolab.serve.app import allowed_hosts, create_app
from dinolab.serve.heads import load_depth_head, load_seg_head
from dinolab.serve.public import public_text
from dinolab.serve.settings import ModelSpec, ServeSettings, load_settings

from .conftest import SHORT, local_client, photo, png_bytes, tiny_backbone, tiny_served
from .test_heads import _depth_head, _seg_head


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1", 200), ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("[::1]:8000", 200),
    ("LOCALHOST", 200), ("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400),
    ("testserver", 400), ("", 400),
])
def test_only_the_bound_host_names_are_answered(client, host, status):
    r = client.get("/v1/models", headers={"host": host})
    assert r.status_code == status, (host, r.text)


def test_host_value_and_allowed_hosts_extend_the_names():
    settings = ServeSettings(host="box.lan", allowed_hosts=["*.example.org", "10.0.0.7"])
    with TestClient(create_app(settings, models=[tiny_served()])) as c:
        for host, status in (("box.lan:8000", 200), ("a.b.example.org", 200), ("10.0.0.7", 200),
                             ("localhost", 200), ("other.lan", 400)):
            assert c.get("/healthz", headers={"host": host}).status_code == status, host
    with TestClient(create_app(ServeSettings(allowed_hosts=["*"]), models=[tiny_served()])) as c:
        assert c.get("/healthz", headers={"host": "anything.example"}).status_code == 200
    names = allowed_hosts(ServeSettings(host="0.0.0.0"))
    assert socket.gethostname().lower() in names and "127.0.0.1" in names and "0.0.0.0" not in names
    assert "[::1]" in allowed_hosts(ServeSettings(host="::1"))
    with pytest.raises(DinolabError, match="wildcard host"):
        load_settings(allowed_hosts=["evil*"])


def test_cross_origin_posts_are_refused(client):
    form = {"gallery": "coffee"}
    assert client.post("/v1/embed", data=form).status_code == 200  # curl, scripts: no Origin
    assert client.post("/v1/embed", data=form, headers={"origin": "http://127.0.0.1"}).status_code == 200
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "http://localhost"):
        r = client.post("/v1/embed", data=form, headers={"origin": origin})
        assert r.status_code == 403, origin
        assert "cross-origin" in r.json()["detail"] and "--allowed-origins" in r.json()["detail"]
    assert client.post("/v1/embed", data=form, headers={"sec-fetch-site": "cross-site"}).status_code == 403
    reads = client.get("/v1/models", headers={"origin": "http://evil.example"})
    assert reads.status_code == 200  # reads pass (no CORS headers: another site's script cannot see them)
    settings = ServeSettings(allowed_origins=["https://app.example.com/"])
    with local_client(create_app(settings, models=[tiny_served()])) as c:
        ok = c.post("/v1/embed", data=form, headers={"origin": "https://app.example.com"})
        assert ok.status_code == 200
        assert c.post("/v1/embed", data=form, headers={"origin": "https://b.example.com"}).status_code == 403


def test_redoc_is_off_and_docs_stays(client):
    assert client.get("/redoc").status_code == 404
    assert client.get("/docs").status_code == 200


def test_public_text_cuts_absolute_paths():
    home = str(Path.home())
    assert public_text(f"self-pretrained fallback ({home}/.cache/dinolab/fallback/ab/teacher.pth)") == \
        "self-pretrained fallback (~/.cache/dinolab/fallback/ab/teacher.pth)"
    assert public_text("/srv/secret/runs/m.pth with weights /opt/w.pth.") == "m.pth with weights w.pth."
    assert public_text(str(Path.cwd() / "runs" / "x.pth")) == "runs/x.pth"
    for kept in ("https://dl.fbaipublicfiles.com/dinov2/a/b.pth", "GET /v1/gallery lists them",
                 "/v1/index/items/3", "runs/pretrain/x.pth", "and/or 1/2", "~/.cache/x"):
        assert public_text(kept) == kept


def test_replies_contain_no_absolute_server_paths(tmp_path):
    """Every endpoint, with models, heads, an index and images all at absolute paths: grep the replies."""
    ckpt = save_official(tiny_backbone(), tmp_path / "weights" / "mine.pth")
    settings = ServeSettings(device="cpu", models=[ModelSpec(model=str(ckpt), short_side=SHORT)],
                             images_root=str(tmp_path / "photos"))
    (tmp_path / "photos").mkdir()
    photo().save(tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ids = ["a.png", "broken.png", str(tmp_path / "photos" / "a.png")]
    index = ExactIndex(torch.randn(3, 192), ids, model_id=str(ckpt), info={"resize": 32, "crop": 32})
    app = create_app(settings, index=index, progress=False)
    served = app.state.server.registry.default
    served.seg_head = load_seg_head(str(_seg_head(tmp_path / "heads" / "seg.pth")), served.backbone)
    served.depth_head = load_depth_head(str(_depth_head(tmp_path / "heads" / "depth.pth")), served.backbone)
    other = ExactIndex(torch.randn(2, 64), ["x", "y"], model_id=str(tmp_path / "other" / "m.pth"))
    up = {"image": ("q.png", png_bytes(photo()))}
    replies = []
    with local_client(app) as c:
        for path in ("/healthz", "/v1/models", "/v1/gallery", "/v1/index/items/0", "/v1/index/items/1",
                     "/openapi.json", "/docs"):
            replies.append(c.get(path))
        for ep in ("/v1/embed", "/v1/pca", "/v1/segment", "/v1/depth", "/v1/search"):
            replies.append(c.post(ep, files=up))
        replies.append(c.post("/v1/match", files={**up, "image2": ("r.png", png_bytes(photo(1)))}))
        replies.append(c.post("/v1/embed", files={"image": ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)}))
        replies.append(c.post("/v1/search", params={"model": "nope"}, files=up))
    app.state.server.index = other
    with local_client(app) as c:
        replies.append(c.post("/v1/search", files=up))  # 409 naming the index's model
    codes = [r.status_code for r in replies]
    assert codes[:4] == [200] * 4 and codes[4] == 422 and codes[7:13] == [200] * 6, codes
    assert codes[13:] == [422, 404, 409], codes
    text = "\n".join(r.text for r in replies if not r.headers["content-type"].startswith("image/"))
    for secret in (str(tmp_path), str(Path.home()) + "/", "/tmp/"):
        assert secret not in text, (secret, [r.text[:300] for r in replies if secret in r.text])
    info = replies[1].json()
    assert info["models"][0]["source"] == "mine.pth" and info["index"]["model_id"] == "mine.pth"
    search = replies[11].json()
    assert search["index_model"] == "mine.pth"
    assert {n["id"] for n in search["neighbours"]} == {"a.png", "broken.png"}
    assert json.loads(replies[-1].text)["detail"].count("m.pth") == 1


def test_cli_host_and_origin_flags(monkeypatch):
    got = {}
    monkeypatch.setattr("dinolab.serve.app.serve", lambda settings, **kw: got.setdefault("s", settings))
    assert main(["serve", "--allowed-hosts", "a.lan,b.lan", "--allowed-hosts", "*.example.org",
                 "--allowed-origins", "https://x.example", "--header-timeout", "3",
                 "--body-timeout", "7"]) == 0
    s = got["s"]
    assert s.allowed_hosts == ["a.lan", "b.lan", "*.example.org"]
    assert s.allowed_origins == ["https://x.example"]
    assert (s.limits.header_timeout_s, s.limits.body_timeout_s) == (3, 7)
