"""Depth: metrics, losses, bins, heads (incl. parity with HF's DPT), official layout, jobs, CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dinolab
from dinolab.cli import main
from dinolab.data.depth import DepthDataError, load_depth_folder
from dinolab.eval import depth_heads as dh
from dinolab.eval.depth import (
    Geometry,
    evaluate_depth,
    lr_at,
    predict_depth,
    prepare_image,
    to_depth_map,
    train_depth_head,
)
from dinolab.eval.metrics import depth_crop_mask, depth_metrics, mean_depth_metrics
from dinolab.losses.depth import GradientLoss, SigLoss
from dinolab.models import save_official

# ------------------------------------------------------------------------------------ metrics


def test_metrics_hand_computed_with_invalid_pixels():
    gt = np.array([[1.0, 2.0, 0.0], [4.0, np.nan, 20.0]])  # 0, NaN and 20 m (> 10 m) are invalid
    pred = np.array([[1.2, 1.0, 5.0], [2.1, 3.0, 1.0]])
    m = depth_metrics(pred, gt, min_depth=1e-3, max_depth=10.0)
    assert m["rmse"] == pytest.approx(math.sqrt((0.2**2 + 1.0**2 + 1.9**2) / 3))  # = sqrt(1.55)
    assert m["abs_rel"] == pytest.approx((0.2 / 1 + 1.0 / 2 + 1.9 / 4) / 3)
    assert m["log10"] == pytest.approx((math.log10(1.2) + math.log10(2) + math.log10(4 / 2.1)) / 3)
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))  # ratios 1.2, 2, 1.905
    d = np.log([1.2, 1.0, 2.1]) - np.log([1.0, 2.0, 4.0])
    assert m["silog"] == pytest.approx(100 * math.sqrt(np.mean(d**2) - np.mean(d) ** 2))


def test_metrics_clip_prediction_and_crop():
    gt = np.full((480, 640), 5.0)
    pred = np.full((480, 640), 50.0)  # clipped to max_depth 10 -> abs_rel 1
    assert depth_metrics(pred, gt, max_depth=10.0)["abs_rel"] == pytest.approx(1.0)
    pred = gt.copy()
    pred[0, 0] = 9.0  # outside the Eigen crop: ignored with it, counted without
    assert depth_metrics(pred, gt, crop="eigen")["rmse"] == 0.0
    assert depth_metrics(pred, gt)["rmse"] > 0.0


def test_crop_masks_official_indices():
    eigen = depth_crop_mask(480, 640, "eigen")
    expected = np.zeros((480, 640), bool)
    expected[45:471, 41:601] = True
    np.testing.assert_array_equal(eigen, expected)
    garg = depth_crop_mask(375, 1242, "garg")  # int(0.40810811*375)=153 ... int(0.96405229*1242)=1197
    expected = np.zeros((375, 1242), bool)
    expected[153:371, 44:1197] = True
    np.testing.assert_array_equal(garg, expected)
    assert depth_crop_mask(240, 320, "eigen").sum() == (235 - 22) * (300 - 20)  # halved NYU frames
    assert depth_crop_mask(3, 4, None).all()


def test_metric_errors_and_mean():
    with pytest.raises(DepthDataError, match="no valid"):
        depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="resize the prediction"):
        depth_metrics(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        depth_metrics(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    assert mean_depth_metrics([{"rmse": 1.0}, {"rmse": 3.0}]) == {"rmse": 2.0}


# ------------------------------------------------------------------------------------- losses


def test_sigloss_direct_formula():
    torch.manual_seed(0)
    pred = torch.rand(2, 1, 5, 6) * 5 + 0.1
    gt = torch.rand(2, 1, 5, 6) * 8
    gt[0, 0, 0, :3] = 0  # invalid
    gt[1, 0, 2, 2] = 12.0  # above max_depth
    p, g = pred.double().numpy().ravel(), gt.double().numpy().ravel()
    keep = (g > 0) & (g <= 10.0)
    d = np.log(p[keep] + 1e-3) - np.log(g[keep] + 1e-3)
    loss = SigLoss(max_depth=10.0)
    assert float(loss(pred, gt)) == pytest.approx(math.sqrt(np.var(d, ddof=1) + 0.15 * np.mean(d) ** 2), rel=1e-5)
    assert float(loss(pred, gt, warmup=True)) == pytest.approx(math.sqrt(0.15 * np.mean(d) ** 2), rel=1e-5)
    assert float(SigLoss(weight=10.0)(pred, gt.clamp(max=9))) == pytest.approx(
        10 * float(SigLoss()(pred, gt.clamp(max=9))), rel=1e-6)
    empty = SigLoss()(pred.requires_grad_(), torch.zeros_like(gt))
    empty.backward()
    assert float(empty.detach()) == 0.0 and pred.grad.abs().sum() == 0


def test_gradient_loss_brute_force():
    torch.manual_seed(1)
    pred = torch.rand(2, 1, 7, 9) + 0.5
    gt = torch.rand(2, 1, 7, 9) + 0.5
    gt[0, 0, 3, 3] = 0
    expected = 0.0
    for s in (1, 2, 4, 6):
        p, t = pred[..., ::s, ::s].double(), gt[..., ::s, ::s].double()
        m = t > 0
        d = (torch.log(p + 1e-3) - torch.log(t + 1e-3)) * m
        total = 0.0
        for b in range(2):
            H, W = d.shape[-2:]
            for y in range(H):
                for x in range(W):
                    if y + 2 < H and m[b, 0, y, x] and m[b, 0, y + 2, x]:
                        total += abs(float(d[b, 0, y, x] - d[b, 0, y + 2, x]))
                    if x + 2 < W and m[b, 0, y, x] and m[b, 0, y, x + 2]:
                        total += abs(float(d[b, 0, y, x] - d[b, 0, y, x + 2]))
        expected += total / int(m.sum())
    assert float(GradientLoss(weight=1.0)(pred, gt)) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------- bins


def test_bins_uniform_log_and_combination():
    u = dh.depth_bins(1e-3, 10.0, 256, "uniform")
    assert u[0] == pytest.approx(1e-3) and u[-1] == pytest.approx(10.0)
    assert torch.allclose(u[1:] - u[:-1], torch.full((255,), (10 - 1e-3) / 255), atol=1e-5)
    lg = dh.depth_bins(0.1, 10.0, 5, "log")
    np.testing.assert_allclose(lg.numpy(), [0.1, 0.1 * 10**0.5, 1.0, 10**0.5, 10.0], rtol=1e-5)
    with pytest.raises(ValueError, match="0 < min_depth"):
        dh.depth_bins(0.0, 10.0, 4, "log")
    bins = torch.tensor([1.0, 2.0, 4.0])
    logits = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    w = np.array([0.5 + 0.1, 0.0 + 0.1, 2.0 + 0.1])  # relu + 0.1, then normalised: the official "linear"
    assert float(dh.bins_to_depth(logits, bins, "linear")) == pytest.approx((w / w.sum()) @ [1, 2, 4])
    sm = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
    assert float(dh.bins_to_depth(logits, bins, "softmax")) == pytest.approx(sm @ [1, 2, 4], rel=1e-6)
    sg = 1 / (1 + np.exp(-np.array([0.5, -1.0, 2.0])))
    assert float(dh.bins_to_depth(logits, bins, "sigmoid")) == pytest.approx((sg / sg.sum()) @ [1, 2, 4], rel=1e-6)


# -------------------------------------------------------------------------------------- heads


def _feats(n, dim=16, h=3, w=5, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, dim, h, w, generator=g), torch.randn(b, dim, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("n_layers", [1, 4])
def test_linear_head_matches_official_order(n_layers):
    """Official BNHead: concat [patch, CLS] per block, upsample x4 bilinear, 1x1 conv, normalise, mix bins."""
    head = dh.LinearDepthHead(16, n_layers, min_depth=0.5, max_depth=8.0)
    feats = _feats(n_layers)
    with torch.no_grad():
        out = head(feats)
    assert out.shape == (2, 1, 12, 20)  # non-square 3x5 grid, x4
    x = torch.cat([torch.cat([p, c[:, :, None, None].expand_as(p)], 1) for p, c in feats], 1)
    assert x.shape[1] == head.channels == 16 * n_layers * 2
    up = F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False)
    logits = F.conv2d(up, head.conv_depth.weight.detach(), head.conv_depth.bias.detach())
    w = torch.relu(logits) + 0.1
    w = w / w.sum(1, keepdim=True)
    expected = torch.einsum("bkhw,k->bhw", w, torch.linspace(0.5, 8.0, 256))[:, None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert float(out.min()) >= 0.5 and float(out.max()) <= 8.0


def test_head_layers_and_config():
    assert dh.head_layers("lin1", 12) == (11,)
    assert dh.head_layers("lin4", 12) == (2, 5, 8, 11)  # the paper's {3, 6, 9, 12}, not the last four
    assert dh.head_layers("dpt", 24) == (4, 11, 17, 23)
    assert dh.head_layers("lin4", 40) == (9, 19, 29, 39)
    assert dh.head_layers("lin4", 8) == (1, 3, 5, 7)
    with pytest.raises(ValueError, match="reads 4 blocks"):
        dh.head_layers("dpt", 2)
    cfg = dh.make_head_config("lin4", 16, 4, bins="log")
    assert dh.DepthHeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("grid, out", [((5, 7), (96, 128)), ((4, 4), (64, 64)), ((2, 3), (32, 64))])
def test_dpt_head_shapes(grid, out):
    head = dh.DPTDepthHead(16, channels=8)
    with torch.no_grad():
        y = head(_feats(4, h=grid[0], w=grid[1]))
    assert y.shape == (2, 1, *out)  # 16 x 2 ceil(h / 2): the x0.5 branch rounds up
    assert float(y.min()) >= 1e-3


def test_dpt_head_equals_transformers_dpt(one_thread):
    """Same weights in HF transformers' DPTNeck + DPTDepthEstimationHead (an independent
    implementation, converted from the same official head) give the same depth."""
    from transformers import Dinov2Config, DPTConfig
    from transformers.models.dpt.modeling_dpt import DPTDepthEstimationHead, DPTNeck

    dim = 64
    torch.manual_seed(0)
    ours = dh.DPTDepthHead(dim, channels=256).eval()  # HF hard-codes 256 for the head projection
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    bc = Dinov2Config(hidden_size=dim, num_hidden_layers=4, num_attention_heads=1, out_indices=[1, 2, 3, 4],
                      apply_layernorm=False, reshape_hidden_states=False)
    cfg = DPTConfig(backbone_config=bc, neck_hidden_sizes=[8, 16, 32, 64], use_bias_in_fusion_residual=False,
                    add_projection=True, readout_type="project")
    neck, head = DPTNeck(cfg).eval(), DPTDepthEstimationHead(cfg).eval()
    # the rename list of transformers' convert_dinov2_depth_to_hf.py, written out
    rename = {}
    for i in range(4):
        rename[f"reassemble_blocks.projects.{i}.conv"] = f"reassemble_stage.layers.{i}.projection"
        rename[f"reassemble_blocks.readout_projects.{i}.0"] = f"reassemble_stage.readout_projects.{i}.0"
        if i != 2:
            rename[f"reassemble_blocks.resize_layers.{i}"] = f"reassemble_stage.layers.{i}.resize"
        rename[f"fusion_blocks.{i}.project.conv"] = f"fusion_stage.layers.{i}.projection"
        for u in (1, 2):
            for c in (1, 2):
                rename[f"fusion_blocks.{i}.res_conv_unit{u}.conv{c}.conv"] = \
                    f"fusion_stage.layers.{i}.residual_layer{u}.convolution{c}"
        rename[f"convs.{i}.conv"] = f"convs.{i}"
    neck_sd, head_sd = neck.state_dict(), head.state_dict()
    for k, v in ours.state_dict().items():
        module, leaf = k.rsplit(".", 1)
        if module == "project.conv":
            head_sd[f"projection.{leaf}"] = v
        elif module.startswith("conv_depth.head."):
            head_sd[module[len("conv_depth."):] + "." + leaf] = v
        else:
            neck_sd[f"{rename[module]}.{leaf}"] = v
    neck.load_state_dict(neck_sd)
    head.load_state_dict(head_sd)
    feats = _feats(4, dim=dim, h=3, w=2, b=1, seed=3)  # odd, non-square grid
    hidden = [torch.cat([c[:, None], p.flatten(2).transpose(1, 2)], 1) for p, c in feats]  # (B, 1 + hw, D)
    with torch.no_grad():
        theirs = head(neck(hidden, 3, 2))  # (B, H, W), ReLU'd
        mine = ours(feats)[:, 0] - 1e-3  # ours adds min_depth
    assert mine.shape == theirs.shape == (1, 64, 32)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert theirs.abs().max() > 1e-3  # not a trivial all-zero comparison


# ------------------------------------------------------------------------ official layout


def _official_linear(path, dim, n_layers, extra=None):
    sd = {"decode_head.conv_depth.weight": torch.randn(256, dim * 2 * n_layers, 1, 1),
          "decode_head.conv_depth.bias": torch.randn(256)}
    sd.update(extra or {})
    torch.save({"meta": {"mmcv_version": "1.5.0", "hook_msgs": {"best_score": np.float64(0.3)},
                         "config": "model = dict(...)"}, "state_dict": sd}, path)
    return sd


def test_load_official_linear_heads_by_file_name(tmp_path):
    sd = _official_linear(tmp_path / "dinov2_vits14_nyu_linear4_head.pth", 384, 4,
                          {"backbone.blocks.0.norm1.weight": torch.ones(384)})  # a full-model file: ignored
    loaded = dh.load_depth_head(tmp_path / "dinov2_vits14_nyu_linear4_head.pth")
    cfg = loaded.config
    assert (cfg.kind, cfg.embed_dim, cfg.layers) == ("linear", 384, (2, 5, 8, 11))
    assert (cfg.max_depth, cfg.n_bins) == (10.0, 256)
    assert (cfg.norm_strategy, cfg.bins, cfg.upsample, cfg.final_norm) == ("linear", "uniform", 4, False)
    assert loaded.backbone == "dinov2_vits14"
    torch.testing.assert_close(loaded.head.conv_depth.weight, sd["decode_head.conv_depth.weight"])
    _official_linear(tmp_path / "dinov2_vitb14_kitti_linear_head.pth", 768, 1)
    kitti = dh.load_depth_head(tmp_path / "dinov2_vitb14_kitti_linear_head.pth")
    assert (kitti.config.layers, kitti.config.max_depth, kitti.backbone) == ((11,), 80.0, "dinov2_vitb14")


def test_load_official_dpt_layout_and_errors(tmp_path):
    ref = dh.DPTDepthHead(64, channels=32)
    sd = {f"decode_head.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "tiny_dpt.pth")
    with pytest.raises(ValueError, match="pass the backbone"):
        dh.load_depth_head(tmp_path / "tiny_dpt.pth")
    loaded = dh.load_depth_head(tmp_path / "tiny_dpt.pth", embed_dim=64, depth=4, max_depth=80.0)
    cfg = loaded.config
    assert (cfg.kind, cfg.channels, cfg.post_process_channels) == ("dpt", 32, (8, 16, 32, 64))
    feats = _feats(4, dim=64)
    torch.testing.assert_close(loaded.head(feats), ref.eval()(feats))
    with pytest.raises(ValueError, match="wrong --model"):
        dh.load_depth_head(tmp_path / "tiny_dpt.pth", embed_dim=32, depth=4)
    del sd["decode_head.convs.1.conv.weight"]
    torch.save({"state_dict": sd}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing \['convs.1.conv.weight'\]"):
        dh.load_depth_head(tmp_path / "broken.pth", embed_dim=64, depth=4)
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}}, tmp_path / "nohead.pth")
    with pytest.raises(ValueError, match="no decode_head"):
        dh.load_depth_head(tmp_path / "nohead.pth", embed_dim=64, depth=4)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        dh.load_depth_head(tmp_path / "junk.pth", embed_dim=64, depth=4)


def test_official_names_urls_and_offline(tmp_path, monkeypatch):
    n = dh.parse_official_name("dinov2_vitb14_kitti_dpt")
    assert n.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_kitti_dpt_head.pth"
    assert dh.parse_official_name("dinov2_vits14_nyu_linear4_head.pth").kind == "linear4"
    assert dh.parse_official_name("dinov2_vits14_ade20k_linear") is None
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="download https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/"
                       "dinov2_vitl14_nyu_linear_head.pth to .*weights"):
        dh.load_depth_head("dinov2_vitl14_nyu_linear")


def test_save_load_round_trip(tmp_path):
    cfg = dh.make_head_config("lin1", 16, 4, max_depth=5.0, bins="log", norm_strategy="softmax")
    head = dh.build_head(cfg)
    dh.save_depth_head(head, cfg, tmp_path / "h.pth", model="my_backbone.pth")
    raw = torch.load(tmp_path / "h.pth", weights_only=True)
    assert set(raw["state_dict"]) == {"decode_head.conv_depth.weight", "decode_head.conv_depth.bias"}
    loaded = dh.load_depth_head(tmp_path / "h.pth")
    assert loaded.config == cfg and loaded.backbone == "my_backbone.pth"
    feats = _feats(1)
    torch.testing.assert_close(loaded.head(feats), head(feats))


# ---------------------------------------------------------------------------------- pipeline


def test_geometry_centre_padding_and_unpad():
    img = Image.new("RGB", (30, 20))
    x, geom = prepare_image(img, 14)
    assert x.shape == (3, 28, 42) and geom == Geometry((20, 30), (20, 30), (4, 4, 6, 6))
    cols = torch.arange(42.0).expand(1, 1, 28, 42)  # a prediction at input resolution = its column index
    torch.testing.assert_close(to_depth_map(cols, geom, "crop")[0, 0, 0], torch.arange(6.0, 36.0))
    stretched = to_depth_map(cols, geom, "stretch")[0, 0, 0]
    assert stretched.shape == (30,) and float(stretched[0]) < 6  # the official resize keeps the padding
    _, half = prepare_image(img, 14, scale=0.5)
    assert half.scaled == (10, 15) and to_depth_map(torch.ones(1, 1, 2, 2), half).shape == (1, 1, 20, 30)


def test_lr_schedule_warmup_and_cosine():
    assert lr_at(0, 30, 1.0) == pytest.approx(1e-3)  # warm-up ratio
    cosine = 0.5 * (1 + math.cos(math.pi * 5 / 30))
    assert lr_at(5, 30, 1.0) == pytest.approx(cosine * (1 - 0.5 * (1 - 1e-3)), rel=1e-6)  # half-way up the warm-up
    assert lr_at(10, 30, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)), rel=1e-6)
    assert lr_at(30, 30, 1.0) == pytest.approx(1e-8, abs=1e-12)


def _write_set(root, n, seed, h=28, w=40):
    rng = np.random.default_rng(seed)
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "rgb" / f"{i:02d}.png")
        mm = (1000 + 150 * np.arange(h)[:, None] + np.zeros((1, w))).astype(np.uint16)
        mm[:2, :2] = 0
        Image.fromarray(mm).save(root / "depth" / f"{i:02d}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    _write_set(root / "train", 4, 0)
    _write_set(root / "val", 2, 1)
    torch.manual_seed(0)
    model = dinolab.create_model("vit_tiny_patch4", depth=4, img_size=32)
    save_official(model, root / "bb.pth")
    return root, model


def test_official_demo_pipeline(setup, one_thread):
    """``unpad="stretch"`` = the hub's depther: CenterPadding, head, clamp, resize to the image size."""
    _, model = setup
    cfg = dh.make_head_config("lin4", 192, 4)
    head = dh.build_head(cfg).eval()
    img = Image.fromarray((np.random.default_rng(0).random((22, 30, 3)) * 255).astype(np.uint8))
    out = predict_depth(model, head, cfg, img, unpad="stretch", device="cpu")
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()  # the notebook: 255 * ToTensor, Normalize
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    t = (t - mean[:, None, None]) / std[:, None, None]
    t = F.pad(t, (1, 1, 1, 1))[None]  # CenterPadding(4): 22 -> 24, 30 -> 32
    with torch.no_grad():
        feats = model.get_intermediate_layers(t, n=[0, 1, 2, 3], reshape=True, return_class_token=True, norm=False)
        ref = F.interpolate(head(feats).clamp(1e-3, 10.0), size=(22, 30), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out, ref[0, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_train_cached_equals_eval_path_and_backbone_frozen(setup, tmp_path, one_thread):
    root, model = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = load_depth_folder(root / "train"), load_depth_folder(root / "val")
    res, loaded = train_depth_head(model, train, val, head="lin4", epochs=2, batch_size=2, lr=1e-2,
                                   out_dir=tmp_path / "run", progress=False)
    assert [h["epoch"] for h in res["history"]] == [1, 2] and res["history"][1]["loss"] < res["history"][0]["loss"]
    ev = evaluate_depth(model, loaded, val, progress=False)
    assert ev["metrics"]["rmse"] == pytest.approx(res["val_metrics"]["rmse"], rel=1e-5)  # cached == image path
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "head.pth", "metrics.jsonl", "options.json", "results.json", "samples"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "rmse" in json.loads(lines[-1])["val"]
    reloaded = dh.load_depth_head(tmp_path / "run" / "head.pth")
    assert reloaded.config == loaded.config and reloaded.meta["epoch"] == 2


def test_augmented_and_dpt_training_run(setup, one_thread):
    root, model = setup
    train = load_depth_folder(root / "train")
    res, _ = train_depth_head(model, train, None, head="lin1", epochs=1, batch_size=2, augment=True,
                              crop_fraction=0.75, progress=False)
    assert res["val"] is None and math.isfinite(res["history"][0]["loss"])
    res, loaded = train_depth_head(model, train, None, head="dpt", epochs=1, batch_size=4, channels=16,
                                   grad_loss=0.5, progress=False)
    assert loaded.config.kind == "dpt" and math.isfinite(res["history"][0]["loss"])


def test_cli_depth_train_eval_predict(setup, tmp_path, capsys, one_thread):
    root, _ = setup
    bb = str(root / "bb.pth")
    assert main(["depth", "train", "--train", str(root / "train"), "--val", str(root / "val"), "--model", bb,
                 "--head", "lin1", "--epochs", "2", "--batch-size", "2", "--out", str(tmp_path / "run"),
                 "--save-png", "1", "--no-progress"]) == 0
    assert "rmse" in capsys.readouterr().out
    assert (tmp_path / "run" / "samples" / "00.png").is_file()
    # eval: --model comes from the head's meta; a crop and range of our choosing
    assert main(["depth", "eval", "--head", str(tmp_path / "run"), "--data", str(root / "val"), "--max-depth", "5",
                 "--crop", "eigen", "--out", str(tmp_path / "ev"), "--flip-tta", "--no-progress"]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["dataset"]["crop"] == "eigen" and res["dataset"]["max_depth"] == 5.0 and len(res["per_image"]) == 2
    assert main(["depth", "predict", str(root / "val" / "rgb" / "01.png"), "--head",
                 str(tmp_path / "run" / "head.pth"), "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    pred = np.load(tmp_path / "pred" / "01.png_depth.npy")
    assert pred.shape == (28, 40) and pred.dtype == np.float32 and 1e-3 <= pred.min() <= pred.max() <= 10.0
    assert Image.open(tmp_path / "pred" / "01.png_depth.png").format == "PNG"
    # a/x.png and b/x.png once both became x_depth.*; a bad image once stopped the folder
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.open(root / "val" / "rgb" / "01.png").save(tmp_path / "in" / sub / "x.png")
    (tmp_path / "in" / "a" / "0bad.png").write_bytes(b"not a png")
    assert main(["depth", "predict", str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b"), "--head",
                 str(tmp_path / "run"), "--out", str(tmp_path / "pred2"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "pred2" / "predictions.json").read_text())
    assert (rows["n_listed"], rows["n_written"], rows["n_skipped"]) == (3, 2, 1)
    assert sorted(r["npy"] for r in rows["images"] if "npy" in r) == ["a/x.png_depth.npy", "b/x.png_depth.npy"]
    assert (tmp_path / "pred2" / "a" / "x.png_depth.png").is_file()
    assert (tmp_path / "pred2" / "b" / "x.png_depth.npy").is_file()
    # a head does not fit another backbone: one clear line, exit code 2
    other = tmp_path / "other.pth"
    save_official(dinolab.create_model("vit_tiny_patch4", depth=2, img_size=32), other)
    assert main(["depth", "eval", "--head", str(tmp_path / "run"), "--model", str(other), "--data",
                 str(root / "val"), "--no-progress"]) == 2
    assert "pass the --model the head was trained on" in capsys.readouterr().err
