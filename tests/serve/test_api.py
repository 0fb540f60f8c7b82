"""HTTP API over a tiny random backbone: every endpoint, checked against independent computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.curate.index import ExactIndex
from dinolab.data.transforms import make_classification_transform, make_dense_transform
from dinolab.serve.app import create_app
from dinolab.serve.gallery import PHOTOS, load_photo
from dinolab.serve.settings import ServeSettings
from dinolab.viz.pca import patch_features

from .conftest import SHORT, decode_b64_png, local_client, photo, png_bytes, tiny_backbone, tiny_served

ENDPOINTS = ["/v1/embed", "/v1/pca", "/v1/segment", "/v1/depth", "/v1/search", "/v1/match"]


def test_health_models_and_gallery(client):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/models").json()
    assert info["default"] == "tiny"
    (m,) = info["models"]
    assert (m["patch_size"], m["embed_dim"], m["depth"], m["short_side"]) == (4, 192, 2, SHORT)
    assert m["segmentation_head"] is None and m["depth_head"] is None and info["index"] is None
    items = client.get("/v1/gallery").json()
    assert [g["id"] for g in items] == list(PHOTOS)
    r = client.get(items[1]["url"], params={"size": 100})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == 100


def test_openapi_schema_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for ep in ENDPOINTS:
        op = paths[ep]["post"]
        form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        props = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]["properties"]
        assert {"image", "gallery"} <= set(props), ep
        assert {"400", "413", "415", "422", "503", "504"} <= set(op["responses"]), ep
    for ep in ("/v1/pca", "/v1/segment", "/v1/depth", "/v1/match"):
        assert "image/png" in paths[ep]["post"]["responses"]["200"]["content"]
    assert {"/v1/models", "/healthz", "/v1/gallery"} <= set(paths)
    assert "swagger" in client.get("/docs").text.lower()


def test_embed_equals_a_direct_forward_pass(client):
    r = client.post("/v1/embed", data={"gallery": "chelsea"})
    assert r.status_code == 200, r.text
    body = r.json()
    img = load_photo("chelsea")  # 451 x 300 -> short side 32 -> 32 x 48 (patch multiples)
    assert body["input_size"] == [32, 48] and body["grid"] == [8, 12] and body["dim"] == 192
    x = make_dense_transform(4, short_side=None)(img.resize((48, 32), Image.Resampling.BICUBIC))
    with torch.no_grad():
        out = tiny_backbone()(x[None])
    np.testing.assert_allclose(body["cls"], out.cls_token[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(body["patch_mean"], out.patch_tokens[0].mean(0).numpy(), atol=1e-4)
    # the same picture uploaded as a PNG (lossless, any file name) gives the same numbers
    up = client.post("/v1/embed", files={"image": ("cat.txt", png_bytes(img), "text/plain")}).json()
    np.testing.assert_allclose(up["cls"], body["cls"], atol=1e-6)


def test_pca_pictures_and_png_format(client):
    body = client.post("/v1/pca", data={"gallery": "coffee"}).json()
    colors, mask = decode_b64_png(body["png"]), decode_b64_png(body["mask_png"])
    assert colors.shape == (body["height"], body["width"], 3) == (400, 600, 3)
    assert set(np.unique(mask)) <= {0, 255}
    # foreground share: the first principal component of the patch features, computed independently
    feats = patch_features(tiny_backbone(), [load_photo("coffee")], short_side=SHORT)[0].reshape(-1, 192)
    xc = (feats - feats.mean(0)).double()
    pc1 = torch.linalg.svd(xc, full_matrices=False).Vh[0]
    score = xc @ pc1
    grid = score.reshape(body["grid"])
    border = torch.cat([grid[0], grid[-1], grid[1:-1, 0], grid[1:-1, -1]])
    fg = (score > 0) if border.mean() < 0 else (score < 0)  # orient: borders are background
    assert body["foreground_fraction"] == pytest.approx(fg.double().mean().item(), abs=1e-4)
    r = client.post("/v1/pca", params={"format": "png"}, data={"gallery": "coffee"})
    assert r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), colors)


def test_unsupervised_segments_legend_matches_the_label_picture(client):
    body = client.post("/v1/segment", params={"segments": 3}, data={"gallery": "astronaut"}).json()
    assert body["mode"] == "unsupervised" and body["head"] is None
    legend = body["legend"]
    assert 2 <= len(legend) <= 3 and sum(e["fraction"] for e in legend) == pytest.approx(1, abs=1e-3)
    mask = decode_b64_png(body["mask_png"]).reshape(-1, 3)
    for e in legend:  # each legend colour covers the share of the label picture it claims
        rgb = np.array([int(e["color"][i:i + 2], 16) for i in (1, 3, 5)])
        assert (mask == rgb).all(1).mean() == pytest.approx(e["fraction"], abs=1e-3)


def test_segment_and_depth_without_heads_say_which_flag_provides_one(client):
    r = client.post("/v1/depth", data={"gallery": "chelsea"})
    assert r.status_code == 409
    assert "--depth-head" in r.json()["detail"] and "depth_head:" in r.json()["detail"]
    r = client.post("/v1/segment", params={"mode": "head"}, data={"gallery": "chelsea"})
    assert r.status_code == 409 and "--seg-head" in r.json()["detail"]


def test_search_without_index_says_how_to_build_one(client):
    r = client.post("/v1/search", data={"gallery": "chelsea"})
    assert r.status_code == 409 and "dinolab index build" in r.json()["detail"]


def _mnn_count(f1: torch.Tensor, f2: torch.Tensor) -> int:
    """Mutual nearest neighbours by brute force in numpy (an independent restatement)."""
    a = f1.numpy() / np.linalg.norm(f1.numpy(), axis=1, keepdims=True)
    b = f2.numpy() / np.linalg.norm(f2.numpy(), axis=1, keepdims=True)
    s = a @ b.T
    return sum(int(np.argmax(s[:, j]) == i) for i, j in enumerate(np.argmax(s, axis=1)))


def test_match_counts_mutual_nearest_neighbours(client):
    r = client.post("/v1/match", params={"max_matches": 5},
                    data={"gallery": "motorcycle_left", "gallery2": "motorcycle_right"})
    assert r.status_code == 200, r.text
    body = r.json()
    fa, fb = patch_features(tiny_backbone(), [load_photo("motorcycle_left"), load_photo("motorcycle_right")],
                            short_side=SHORT)
    assert body["n_matches"] == _mnn_count(fa.reshape(-1, 192), fb.reshape(-1, 192))
    assert len(body["matches"]) == min(5, body["n_matches"])
    sims = [m["similarity"] for m in body["matches"]]
    assert sims == sorted(sims, reverse=True)
    assert decode_b64_png(body["png"]).shape[2] == 3
    r = client.post("/v1/match", data={"gallery": "motorcycle_left"})
    assert r.status_code == 400 and "image2" in r.json()["detail"]


# ---------------------------------------------------------------------------------------- index


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """An index whose row 1 is coffee's CLS (dinolab embed's transform) and whose other rows are random
    (a random backbone gives all photos nearly the same CLS), the photo files, and a client."""
    root = tmp_path_factory.mktemp("photos")
    names = ["chelsea", "coffee", "rocket", "astronaut"]
    tf = make_classification_transform(256, 224)
    with torch.no_grad():
        coffee = tiny_backbone()(tf(load_photo("coffee"))[None]).cls_token[0]
    feats = torch.randn(5, 192, generator=torch.Generator().manual_seed(0))
    feats[1] = coffee
    for n in names:
        load_photo(n).save(root / f"{n}.png")
    ids = [f"{n}.png" for n in names] + ["../outside.png"]  # the last row points outside the root
    (root.parent / "outside.png").write_bytes(png_bytes(photo()))
    index = ExactIndex(feats, ids, model_id="tiny", info={"resize": 256, "crop": 224})
    app = create_app(ServeSettings(images_root=str(root)), models=[tiny_served()], index=index)
    with local_client(app) as c:
        yield c, feats.numpy(), ids


def test_search_ranks_like_brute_force_cosine(indexed):
    client, db, ids = indexed
    body = client.post("/v1/search", params={"k": 3}, data={"gallery": "coffee"}).json()
    q = db[1]
    cos = db @ q / np.linalg.norm(db, axis=1) / np.linalg.norm(q)
    order = np.argsort(-cos, kind="stable")[:3]
    assert [n["id"] for n in body["neighbours"]] == [ids[i] for i in order]
    np.testing.assert_allclose([n["score"] for n in body["neighbours"]], cos[order], atol=1e-4)
    top = body["neighbours"][0]
    assert top["id"] == "coffee.png" and top["score"] == pytest.approx(1, abs=1e-4)
    assert body["warning"] is None and body["index_size"] == 5
    assert client.get("/v1/models").json()["models"][0]["tasks"]["search"]["available"] is True
    thumb = client.get(body["neighbours"][0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_index_thumbnails_never_leave_the_image_folder(indexed):
    client, _, ids = indexed
    assert client.get(f"/v1/index/items/{len(ids) - 1}").status_code == 404  # ../outside.png
    for row in (len(ids), -1, 10**9):
        assert client.get(f"/v1/index/items/{row}").status_code == 404
    assert client.get("/v1/index/items/abc").status_code == 422


def test_search_refuses_an_index_of_another_width():
    index = ExactIndex(torch.randn(3, 64), ["a", "b", "c"], model_id="other")
    with local_client(create_app(ServeSettings(), models=[tiny_served()], index=index)) as c:
        r = c.post("/v1/search", data={"gallery": "chelsea"})
        search = c.get("/v1/models").json()["models"][0]["tasks"]["search"]
    assert search["available"] is False and "64-dim" in search["reason"]
    assert r.status_code == 409 and "64-dim" in r.json()["detail"] and "192-dim" in r.json()["detail"]


def test_unknown_model_and_several_models(client):
    r = client.post("/v1/embed", params={"model": "nope"}, data={"gallery": "chelsea"})
    assert r.status_code == 404 and "tiny" in r.json()["detail"]
    app = create_app(ServeSettings(), models=[tiny_served("a", seed=0), tiny_served("b", seed=1)])
    with local_client(app) as c:
        ea = c.post("/v1/embed", params={"model": "a"}, data={"gallery": "coffee"}).json()["cls"]
        eb = c.post("/v1/embed", params={"model": "b"}, data={"gallery": "coffee"}).json()["cls"]
        assert c.get("/v1/models").json()["default"] == "a"
    assert not np.allclose(ea, eb)


def test_kmeans_segments_recover_planted_regions():
    """Two planted feature regions (left third / right two thirds) are found exactly, larger first."""
    from dinolab.serve.tasks import Features, kmeans_segments

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    patches = b.expand(6, 9, 16).clone()
    patches[:, :3] = a
    patches += 0.01 * torch.randn(6, 9, 16, generator=gen)
    seg = kmeans_segments(Features(torch.zeros(16), patches, (24, 36)), (90, 60), 2)
    expected = np.ones((60, 90), int)
    expected[:, 30:] = 0  # the larger region is segment 0
    assert seg.labels.shape == (60, 90)
    # the border is interpolated between patch centres: check away from it
    np.testing.assert_array_equal(seg.labels[:, :25], expected[:, :25])
    np.testing.assert_array_equal(seg.labels[:, 35:], expected[:, 35:])
    assert seg.fractions[0] > seg.fractions[1]
