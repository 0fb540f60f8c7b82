"""/v1/search embeds the query as the index was embedded: HTTP rankings equal `dinolab index search`'s."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dinolab.cli import main
from dinolab.curate.index import ExactIndex, load_index
from dinolab.serve.app import create_app
from dinolab.serve.settings import ModelSpec, ServeSettings

from .conftest import local_client, photo, png_bytes, tiny_served


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_vit_checkpoint):
    """Six photos embedded by the CLI at resize 64 / crop 64 (not the 256 / 224 default), an index over
    them, and the CLI's own search results for every photo."""
    tmp = tmp_path_factory.mktemp("search")
    imgs = tmp / "imgs"
    imgs.mkdir()
    for i in range(6):
        photo(seed=i, size=(96 + 16 * i, 80)).save(imgs / f"p{i}.png")
    ckpt = tiny_vit_checkpoint(tmp / "m.pth")
    assert main(["embed", str(imgs), "--out", str(tmp / "emb"), "--resize", "64", "--crop", "64",
                 "--no-progress", "--model", str(ckpt), "--device", "cpu"]) == 0
    assert main(["index", "build", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "idx")]) == 0
    out = tmp / "cli.json"
    assert main(["index", "search", "--index", str(tmp / "idx"), "--images", str(imgs), "-k", "6",
                 "--out", str(out), "--device", "cpu"]) == 0
    cli = {r["query"].rsplit("/", 1)[-1]: r["neighbours"] for r in json.loads(out.read_text())}
    return tmp, imgs, ckpt, cli


def test_http_rankings_equal_cli_rankings_and_self_scores_one(built):
    tmp, imgs, ckpt, cli = built
    settings = ServeSettings(device="cpu", models=[ModelSpec(model=str(ckpt))], index=str(tmp / "idx"))
    with local_client(create_app(settings, progress=False)) as c:
        info = c.get("/v1/models").json()["index"]
        assert info["query_transform"] == {"resize": 64, "crop": 64, "recorded": True}
        for name, expected in cli.items():
            r = c.post("/v1/search", params={"k": 6}, files={"image": (name, (imgs / name).read_bytes())})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["query_transform"] == {"resize": 64, "crop": 64} and body["warning"] is None
            got = body["neighbours"]
            assert [n["id"] for n in got] == [n["id"] for n in expected], name
            # the CLI writes full floats, the API rounds to 5 decimals
            assert [n["score"] for n in got] == pytest.approx([n["score"] for n in expected], abs=1e-5)
            assert got[0]["id"] == name and got[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_explicit_query_transform_overrides_and_warns(built, caplog):
    tmp, imgs, ckpt, _ = built
    settings = ServeSettings(device="cpu", models=[ModelSpec(model=str(ckpt))], index=str(tmp / "idx"),
                             index_resize=256, index_crop=224)
    with caplog.at_level(logging.WARNING):
        app = create_app(settings, progress=False)
    assert "embedded at resize 64 / crop 64 but queries use 256 / 224" in caplog.text
    with local_client(app) as c:
        body = c.post("/v1/search", files={"image": ("p0.png", (imgs / "p0.png").read_bytes())}).json()
    assert body["query_transform"] == {"resize": 256, "crop": 224}
    assert body["neighbours"][0]["score"] < 0.999  # the mismatch the default must avoid


def test_an_index_without_a_recorded_transform_says_so():
    index = ExactIndex(torch.randn(3, 192), ["a", "b", "c"], model_id="tiny")
    with local_client(create_app(ServeSettings(), models=[tiny_served()], index=index)) as c:
        assert c.get("/v1/models").json()["index"]["query_transform"]["recorded"] is False
        body = c.post("/v1/search", files={"image": ("q.png", png_bytes(photo()))}).json()
    assert "records no query transform" in body["warning"]
    assert body["query_transform"] == {"resize": 256, "crop": 224}


def test_cli_search_uses_the_index_transform(built):
    """The CLI path alone (no server): an indexed image is its own first neighbour at score 1."""
    tmp, _, _, cli = built
    assert load_index(tmp / "idx").info["resize"] == 64
    for name, neighbours in cli.items():
        assert neighbours[0]["id"] == name and neighbours[0]["score"] == pytest.approx(1.0, abs=1e-4)
