"""Trained heads behind the API: hand-set segmentation and depth heads give hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinolab.errors import DinolabError
from dinolab.eval.depth_heads import build_head, make_head_config, save_depth_head
from dinolab.eval.segmentation import LinearSegHead, save_seg_head
from dinolab.serve.app import create_app
from dinolab.serve.heads import load_depth_head, load_seg_head
from dinolab.serve.settings import ServeSettings

from .conftest import SHORT, decode_b64_png, local_client, tiny_served

CLASSES = ["sky", "cat", "dog"]
PALETTE = [[1, 2, 3], [200, 10, 10], [0, 0, 255]]


def _seg_head(path, dim: int = 192):
    """A head whose logits are its bias (zero weights): class 1 ("cat") everywhere."""
    head = LinearSegHead(dim, 3).eval()
    with torch.no_grad():
        head.conv_seg.weight.zero_()
        head.conv_seg.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    return save_seg_head(path, head, classes=CLASSES, palette=PALETTE,
                         settings={"model": "tiny", "short_side": SHORT, "round_to_patch": True})


def _depth_head(path, dim: int = 192):
    """A linear head with zero weights: uniform bin probabilities, so depth = mean of the bins."""
    cfg = make_head_config("lin1", dim, 2, max_depth=10.0)
    head = build_head(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return save_depth_head(head, cfg, path, model="tiny")


@pytest.fixture(scope="module")
def headed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heads")
    served = tiny_served()
    served.seg_head = load_seg_head(str(_seg_head(tmp / "seg.pth")), served.backbone)
    served.depth_head = load_depth_head(str(_depth_head(tmp / "depth.pth")), served.backbone)
    with local_client(create_app(ServeSettings(), models=[served])) as c:
        yield c


def test_models_lists_the_heads(headed):
    m = headed.get("/v1/models").json()["models"][0]
    assert m["segmentation_head"]["classes"] == 3 and m["depth_head"]["kind"] == "linear"


def test_segmentation_head_labels_and_legend(headed):
    for mode in ("auto", "head"):
        body = headed.post("/v1/segment", params={"mode": mode}, data={"gallery": "chelsea"}).json()
        assert body["mode"] == "head" and body["head"].endswith("seg.pth")
        assert body["legend"] == [{"id": 1, "name": "cat", "color": "#c80a0a", "fraction": 1.0}]
        mask = decode_b64_png(body["mask_png"])
        assert mask.shape == (300, 451, 3) and (mask == [200, 10, 10]).all()
    body = headed.post("/v1/segment", params={"mode": "unsupervised", "segments": 2},
                       data={"gallery": "chelsea"}).json()
    assert body["mode"] == "unsupervised"
    assert [e["name"] for e in body["legend"]] == ["segment 1", "segment 2"]


def test_depth_head_gives_the_mean_of_its_bins(headed):
    body = headed.post("/v1/depth", data={"gallery": "coffee"}).json()
    expected = (1e-3 + 10.0) / 2  # uniform probabilities over linspace(1e-3, 10, 256)
    for key in ("min_depth", "max_depth", "mean_depth"):
        assert body[key] == pytest.approx(expected, rel=1e-5)
    pic = decode_b64_png(body["png"])
    assert pic.shape == (400, 600, 3) and len(np.unique(pic.reshape(-1, 3), axis=0)) == 1


def test_heads_for_another_backbone_are_refused(tmp_path):
    served = tiny_served()
    with pytest.raises(DinolabError, match="backbone"):
        load_seg_head(str(_seg_head(tmp_path / "seg384.pth", dim=384)), served.backbone)
    with pytest.raises(DinolabError):
        load_depth_head(str(_depth_head(tmp_path / "depth384.pth", dim=384)), served.backbone)
    with pytest.raises(DinolabError, match="does not exist"):
        load_depth_head(str(tmp_path / "missing.pth"), served.backbone)
