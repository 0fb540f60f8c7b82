"""Segmentation: metrics by hand and against scikit-learn, head shapes, test-time augmentation and
sliding windows against direct computations, the official head layout, overlays, and
`dinolab seg train / eval / predict` end to end on a synthetic dataset."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score
from torch import nn

from dinolab.cli import main
from dinolab.data.segmentation import SegmentationError, load_segmentation_folder
from dinolab.eval.metrics import segmentation_confusion, segmentation_scores
from dinolab.eval.segmentation import (
    MS_SCALES,
    OFFICIAL_HEADS,
    Inference,
    LinearSegHead,
    RawPixelBackbone,
    Segmenter,
    center_pad,
    read_seg_head,
    save_seg_head,
    segment,
    slide_logits,
)
from dinolab.eval.segmentation_jobs import (
    Resize,
    cache_features,
    cached_scores,
    class_weights_from,
    evaluate,
    poly_lr,
)
from dinolab.models import create_model, save_official
from dinolab.models.checkpoints import UnsafeFileError
from dinolab.viz.overlay import colorize, overlay, overlay_figure


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# -------------------------------------------------------------------------------------- metrics


def test_confusion_and_scores_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])  # the ignored pixels' predictions must not count
    cm = segmentation_confusion(preds, labels, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 1, 1, 2, 1, 1
    assert torch.equal(cm, expected)
    s = segmentation_scores(cm)
    # IoU: class 0 tp 1 / (tp 1 + fn 1 + fp 1) = 1/3; class 1: 2 / (2 + 0 + 1) = 2/3; class 2: 1 / (1 + 1 + 0) = 1/2
    assert s["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 50.0]) and math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)  # class 3 (absent everywhere) not averaged
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert s["acc"][:3] == pytest.approx([50.0, 100.0, 50.0]) and s["macc"] == pytest.approx(200 / 3)


def test_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 20, 30))
    labels[rng.random(labels.shape) < 0.1] = 255
    preds = rng.integers(0, 5, labels.shape)
    cm = segmentation_confusion(torch.from_numpy(preds), torch.from_numpy(labels), 5)
    keep = labels != 255
    assert np.array_equal(cm.numpy(), sk_confusion(labels[keep], preds[keep], labels=range(5)))
    iou = jaccard_score(labels[keep], preds[keep], labels=range(5), average=None)
    assert segmentation_scores(cm)["iou"] == pytest.approx(100 * iou)


def test_metric_inputs_checked():
    with pytest.raises(SegmentationError, match=r"\[7\].*ignore index 255"):
        segmentation_confusion(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [255, 1]]), 3)
    with pytest.raises(SegmentationError, match="differ in shape"):
        segmentation_confusion(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 3)


# ---------------------------------------------------------------------------------- head shapes


def _vit(depth=2, patch=14):
    torch.manual_seed(0)
    return create_model(f"vit_tiny_patch{patch}", depth=depth, img_size=4 * patch).eval()


@pytest.mark.parametrize("n_layers", [1, 4])
def test_head_output_shape_non_square(n_layers):
    vit = _vit(depth=4)
    seg = Segmenter(vit, LinearSegHead(n_layers * vit.embed_dim, 5, n_layers=n_layers)).eval()
    x = torch.randn(2, 3, 70, 98)
    feats = seg.features(x)
    assert len(feats) == n_layers and all(f.shape == (2, vit.embed_dim, 5, 7) for f in feats)
    assert seg(x).shape == (2, 5, 70, 98)


def test_linear4_needs_four_blocks():
    with pytest.raises(SegmentationError, match="last 4 blocks but the backbone has 2"):
        Segmenter(_vit(depth=2), LinearSegHead(4 * 192, 3, n_layers=4))


def test_sizes_not_multiple_of_patch_are_centre_padded():
    vit = _vit()
    seen = []
    original = vit.get_intermediate_layers
    vit.get_intermediate_layers = lambda x, **kw: seen.append(tuple(x.shape[-2:])) or original(x, **kw)
    seg = Segmenter(vit, LinearSegHead(vit.embed_dim, 3)).eval()
    assert seg(torch.randn(1, 3, 75, 100)).shape == (1, 3, 75, 100)
    assert seen == [(84, 112)]  # 75 -> 84 (4 above, 5 below), 100 -> 112 (6 left, 6 right)
    padded = center_pad(torch.ones(1, 1, 75, 100), 14)
    assert padded[0, 0, :, 0].sum() == 0 and padded[0, 0, 4:79, 6:106].all() and padded.sum() == 75 * 100


def test_raw_pixel_backbone_is_the_patch_pixels():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    (maps,) = RawPixelBackbone(4).get_intermediate_layers(x, n=1, reshape=True)
    assert maps.shape == (2, 48, 2, 3)
    assert torch.equal(maps[1, :, 1, 2], x[1, :, 4:8, 8:12].reshape(-1))  # channel-major, then rows


# ----------------------------------------------------------------------------------------- TTA


class PatchMean(nn.Module):
    """Mean colour of each patch: a backbone whose features commute with horizontal flips."""

    patch_size, embed_dim = 4, 3

    def get_intermediate_layers(self, x, n=1, reshape=True, **kw):
        return (F.avg_pool2d(x, self.patch_size),) * (n if isinstance(n, int) else len(n))


def _head(dim, k=4, n_layers=1, seed=0):
    torch.manual_seed(seed)
    head = LinearSegHead(dim * n_layers, k, n_layers=n_layers)
    with torch.no_grad():
        head.conv_seg.weight.normal_()
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
    return head.eval()


def test_flip_tta_is_identity_for_a_flip_equivariant_model():
    seg = Segmenter(PatchMean(), _head(3)).eval()
    x = torch.randn(2, 3, 16, 24)
    single = segment(seg, x)
    assert torch.allclose(segment(seg, x, Inference(scales=(1.0,), flip=True)), single, atol=1e-6)
    raw = Segmenter(RawPixelBackbone(4), _head(48)).eval()  # patch pixels change order under a flip
    assert not torch.allclose(segment(raw, x, Inference(flip=True)), segment(raw, x), atol=1e-3)


def test_flip_and_scale_averaging_equal_manual_computation():
    seg = Segmenter(RawPixelBackbone(4), _head(48)).eval()
    x = torch.randn(1, 3, 16, 24)
    p = segment(seg, x, Inference(flip=True))
    manual = 0.5 * (seg(x).softmax(1) + seg(x.flip(-1)).flip(-1).softmax(1))
    assert torch.allclose(p, manual, atol=1e-6)
    p = segment(seg, x, Inference(scales=(1.0, 1.5)), out_size=(20, 30))
    x15 = F.interpolate(x, size=(24, 36), mode="bilinear", align_corners=False)
    up = [F.interpolate(seg(v), size=(20, 30), mode="bilinear", align_corners=False).softmax(1) for v in (x, x15)]
    assert torch.allclose(p, 0.5 * (up[0] + up[1]), atol=1e-6)
    assert MS_SCALES == (1.0, 1.32, 1.73, 2.28, 3.0)


# ------------------------------------------------------------------------------ sliding window


def test_slide_equals_whole_when_one_window_covers_the_image():
    seg = Segmenter(_vit(), _head(_vit().embed_dim, k=3)).eval()
    x = torch.randn(1, 3, 56, 70)
    assert torch.equal(slide_logits(seg, x, crop=70, stride=50), seg(x))


def test_slide_equals_whole_for_a_local_model():
    """Raw pixels + 1x1 head: each patch's logits depend on that patch only, so every window sees the
    whole image's patch logits; bilinear upsampling differs only within half a patch of a window edge
    that is not an image edge. Everywhere else the window average equals the whole-image logits."""
    p, crop, stride, H, W = 4, 16, 8, 24, 40
    seg = Segmenter(RawPixelBackbone(p), _head(48, k=5)).eval()
    x = torch.randn(2, 3, H, W)
    slide, whole = slide_logits(seg, x, crop, stride), seg(x)
    unsafe = torch.zeros(H, W, dtype=torch.bool)
    for y0 in range(0, H - crop + 1, stride):
        for x0 in range(0, W - crop + 1, stride):
            win = torch.zeros(H, W, dtype=torch.bool)
            win[y0: y0 + crop, x0: x0 + crop] = True
            inner = torch.zeros(H, W, dtype=torch.bool)
            inner[y0 + (p // 2 if y0 > 0 else 0): y0 + crop - (p // 2 if y0 + crop < H else 0),
                  x0 + (p // 2 if x0 > 0 else 0): x0 + crop - (p // 2 if x0 + crop < W else 0)] = True
            unsafe |= win & ~inner
    assert (~unsafe).sum() > H * W // 3
    assert torch.allclose(slide[..., ~unsafe], whole[..., ~unsafe], atol=1e-5)
    assert not torch.allclose(slide, whole, atol=1e-3)  # the edge effect is real, so the mask matters


def test_inference_options_checked():
    with pytest.raises(SegmentationError, match="crop"):
        Inference(mode="slide")
    with pytest.raises(SegmentationError, match="stride"):
        Inference(mode="slide", crop=10, stride=20)
    with pytest.raises(SegmentationError, match="positive"):
        Inference(scales=(0.0,))


# ------------------------------------------------------------------------------ official heads


def _official_file(path, in_ch, k, meta=True):
    """A head file in the exact layout of the release's *_head.pth (mmseg checkpoint)."""
    g = torch.Generator().manual_seed(1)
    sd = {"decode_head.conv_seg.weight": torch.randn(k, in_ch, 1, 1, generator=g),
          "decode_head.conv_seg.bias": torch.randn(k, generator=g),
          "decode_head.bn.weight": torch.rand(in_ch, generator=g) + 0.5,
          "decode_head.bn.bias": torch.randn(in_ch, generator=g),
          "decode_head.bn.running_mean": torch.randn(in_ch, generator=g),
          "decode_head.bn.running_var": torch.rand(in_ch, generator=g) + 0.5,
          "decode_head.bn.num_batches_tracked": torch.tensor(40000)}
    ckpt = {"state_dict": sd}
    if meta:
        ckpt["meta"] = {"mmseg_version": "0.27.0", "config": "norm_cfg = dict(type='SyncBN')", "seed": 0,
                        "iter": 40000, "CLASSES": tuple(f"c{i}" for i in range(k)),
                        "PALETTE": [[i, 2 * i, 3 * i] for i in range(k)]}
    torch.save(ckpt, path)
    return sd


def test_official_head_layout_reproduces_the_bnhead_computation(tmp_path):
    vit = _vit(depth=4)
    D = vit.embed_dim
    sd = _official_file(tmp_path / "h.pth", 4 * D, 6)
    ckpt = read_seg_head(tmp_path / "h.pth")
    assert ckpt.classes[5] == "c5" and ckpt.palette[2] == (2, 4, 6) and ckpt.n_layers is None
    seg = Segmenter(vit, ckpt.build(D)).eval()
    x = torch.randn(1, 3, 56, 84)
    # the official model by hand: normed patch tokens of blocks 0-3 (out_indices [0..3] of a depth-4 ViT),
    # concatenated, BatchNorm (eps 1e-5) with the running statistics, 1x1 conv, bilinear resize to the image
    maps = vit.get_intermediate_layers(x, n=[0, 1, 2, 3], reshape=True)
    f = torch.cat(maps, 1)
    f = (f - sd["decode_head.bn.running_mean"][:, None, None]) / torch.sqrt(
        sd["decode_head.bn.running_var"][:, None, None] + 1e-5)
    f = f * sd["decode_head.bn.weight"][:, None, None] + sd["decode_head.bn.bias"][:, None, None]
    logits = torch.einsum("bchw,kc->bkhw", f, sd["decode_head.conv_seg.weight"][:, :, 0, 0])
    logits = logits + sd["decode_head.conv_seg.bias"][:, None, None]
    manual = F.interpolate(logits, size=(56, 84), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        assert torch.allclose(seg(x), manual, atol=1e-4)
    with pytest.raises(SegmentationError, match="not.*backbone width"):
        ckpt.build(D + 1)


def test_official_head_by_name_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    head = OFFICIAL_HEADS["dinov2_vits14_voc2012_ms"]
    assert head.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_voc2012_ms_head.pth"
    assert len(OFFICIAL_HEADS) == 16 and OFFICIAL_HEADS["dinov2_vitg14_ade20k_linear"].n_layers == 1
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_voc2012_ms_head.pth"):
        read_seg_head("dinov2_vits14_voc2012_ms")
    (tmp_path / "weights").mkdir()
    _official_file(tmp_path / "weights" / head.filename, 4 * 384, 21, meta=False)
    ckpt = read_seg_head("dinov2_vits14_voc2012_ms")
    assert ckpt.n_layers == 4 and ckpt.classes[15] == "person" and ckpt.settings["model"] == "dinov2_vits14"
    assert ckpt.inference.scales == MS_SCALES and ckpt.inference.flip and ckpt.settings["short_side"] == 640
    assert ckpt.build(384).n_layers == 4
    with pytest.raises(SegmentationError, match="4 x the backbone width 192"):
        ckpt.build(192)


class Pickled:
    """Stands for any class a pickle would have to import (and could run code from)."""


def test_numpy_metadata_is_read_and_code_is_refused(tmp_path):
    _official_file(tmp_path / "h.pth", 8, 2)
    ckpt = torch.load(tmp_path / "h.pth", weights_only=True)
    ckpt["meta"].update(PALETTE=np.array([[1, 2, 3], [4, 5, 6]]), seed=np.int64(3))  # mmcv metadata may be numpy
    torch.save(ckpt, tmp_path / "np.pth")
    assert read_seg_head(tmp_path / "np.pth").palette == [(1, 2, 3), (4, 5, 6)]
    ckpt["meta"]["hook_msgs"] = Pickled()  # any other pickled class: refused, named
    torch.save(ckpt, tmp_path / "code.pth")
    with pytest.raises(UnsafeFileError, match="Pickled"):
        read_seg_head(tmp_path / "code.pth")


def test_not_a_head_is_refused(tmp_path):
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(2, 3, 1, 1)}}, tmp_path / "x.pth")
    with pytest.raises(SegmentationError, match="missing.*decode_head.bn.weight"):
        read_seg_head(tmp_path / "x.pth")
    with pytest.raises(SegmentationError, match="official head name"):
        read_seg_head(tmp_path / "nothing.pth")


def test_own_head_round_trip(tmp_path):
    head = _head(48, k=3, n_layers=4)
    save_seg_head(tmp_path / "h.pth", head, classes=["a", "b", "c"], palette=[(1, 1, 1), (2, 2, 2), (3, 3, 3)],
                  settings={"model": "m.pth", "short_side": 56, "inference": Inference(flip=True).as_dict()})
    ckpt = read_seg_head(tmp_path / "h.pth")
    assert ckpt.classes == ["a", "b", "c"] and ckpt.inference == Inference(flip=True) and ckpt.n_layers == 4
    again = ckpt.build(48)
    f = [torch.randn(1, 48, 3, 5) for _ in range(4)]
    assert torch.equal(again(f), head(f))


# ------------------------------------------------------------------------------ jobs and schedule


def test_poly_schedule_and_median_frequency_weights():
    lrs = [poly_lr(i, 10, 1.0, warmup=2) for i in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(0.9) and lrs[5] == pytest.approx(0.5)
    labels = [torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]])]  # counts 3, 2, 1, 0 -> freq 1/2, 1/3, 1/6
    w = class_weights_from("median-freq", labels, 4, 255)
    assert w.tolist() == pytest.approx([2 / 3, 1.0, 2.0, 0.0])  # median freq 1/3 over the present classes
    assert class_weights_from("1,2,3,4", labels, 4, 255).tolist() == [1, 2, 3, 4]
    with pytest.raises(SegmentationError, match="4 non-negative"):
        class_weights_from("1,2", labels, 4, 255)


def _write_dataset(root, n, seed, size=56):
    """Red left / blue right at a random split column; 4x4 ignore corner; some green noise."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        m[:, rng.integers(16, 40):] = 1
        m[:4, :4] = 255
        img = np.where(m[..., None] == 1, [30, 40, 220], [220, 30, 30]).astype(np.float64)
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:02d}.png")
        Image.fromarray(m).save(root / "masks" / f"{i:02d}.png")
    return root


def test_cached_scores_equal_live_evaluation(tmp_path):
    ds = load_segmentation_folder(_write_dataset(tmp_path / "d", 3, 0, size=50), classes=["red", "blue"])
    vit = _vit(patch=4)
    seg = Segmenter(vit, _head(vit.embed_dim, k=2)).eval()
    resize = Resize(44, 4, round_to_patch=True)  # 50 -> 44 px: two upsamplings, as the live path
    cache = cache_features(seg, ds, resize, device=torch.device("cpu"), original_labels=True, progress=False)
    cached, cm1 = cached_scores(seg.head, cache, resize, 2, 255, torch.device("cpu"))
    live, cm2 = evaluate(seg, ds, resize, Inference(), device=torch.device("cpu"), progress=False)
    assert torch.equal(cm1, cm2) and cached == live


# --------------------------------------------------------------------------------------- overlay


def test_overlay_colours_and_legend():
    labels = np.array([[0, 1], [255, 1]])
    pal = [(255, 0, 0), (0, 0, 255)]
    assert colorize(labels, pal).tolist() == [[[255, 0, 0], [0, 0, 255]], [[0, 0, 0], [0, 0, 255]]]
    img = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(img, labels, pal, alpha=0.25)
    assert out[0, 0].tolist() == [139, 75, 75] and out[1, 0].tolist() == [100, 100, 100]  # ignore: image only
    fig = overlay_figure(Image.fromarray(img), labels, ["road", "car"], pal)
    assert fig.width > 4 and fig.height >= 2
    with pytest.raises(ValueError, match=r"\[2\]"):
        colorize(np.array([[2]]), pal)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    backbone = create_model("vit_tiny_patch4", depth=4, img_size=56)
    save_official(backbone, base / "backbone.pth")
    return base, _write_dataset(base / "train", 6, 0), _write_dataset(base / "val", 3, 1)


def test_cli_train_eval_predict(synthetic, tmp_path, capsys):
    base, train, val = synthetic
    model = ["--model", str(base / "backbone.pth"), "--device", "cpu", "--no-progress"]
    run = tmp_path / "run"
    rc = main(["seg", "train", "--train", str(train), "--val", str(val), "--classes", "red,blue", "--head", "linear",
               "--short-side", "56", "--epochs", "3", "--batch-size", "2", "--lr", "0.01", "--out", str(run), *model])
    assert rc == 0 and "mIoU" in capsys.readouterr().out
    res = json.loads((run / "results.json").read_text())
    assert set(res["per_class_iou"]) == {"red", "blue"} and 0 <= res["miou"] <= 100 and res["pixel_acc"] > 50
    assert res["train"]["n"] == 6 and res["eval"]["n"] == 3 and res["eval"]["split"] == "val"
    assert (res["eval"]["n_listed"], res["eval"]["n_scored"], res["eval"]["n_skipped"]) == (3, 3, 0)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines[-1]["val_miou"] == pytest.approx(res["miou"])
    assert json.loads((run / "options.json").read_text())["epochs"] == 3
    assert (run / "confusion_matrix.png").stat().st_size > 0

    rc = main(["seg", "eval", "--head", str(run), "--data", str(val), "--classes", "red,blue",
               "--out", str(tmp_path / "ev"), *model])
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert rc == 0 and ev["miou"] == pytest.approx(res["miou"]) and ev["pixel_acc"] == pytest.approx(res["pixel_acc"])
    rc = main(["seg", "eval", "--head", str(run / "head.pth"), "--data", str(val), "--classes", "red,blue", "--flip",
               "--scales", "1.0", "1.5", "--out", str(tmp_path / "ev2"), *model])
    ev2 = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert rc == 0 and ev2["inference"]["scales"] == [1.0, 1.5] and ev2["inference"]["flip"]

    rc = main(["seg", "eval", "--head", str(run), "--data", str(val), "--classes", "red,blue", "--limit", "2",
               "--out", str(tmp_path / "ev3"), *model])
    ev3 = json.loads((tmp_path / "ev3" / "results.json").read_text())
    assert rc == 0 and (ev3["data"]["n_listed"], ev3["data"]["n_scored"], ev3["data"]["n_skipped"]) == (2, 2, 0)
    assert main(["seg", "eval", "--head", str(run), "--data", str(val), "--classes", "red,blue",
                 "--out", str(tmp_path / "ev3"), *model]) == 2  # a finished run folder needs --overwrite

    rc = main(["seg", "predict", str(val / "images"), "--head", str(run), "--out", str(tmp_path / "pred"), *model])
    assert rc == 0
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [r["id"] for r in pred["images"]] == ["00.png", "01.png", "02.png"] and pred["classes"] == ["red", "blue"]
    fig = Image.open(tmp_path / "pred" / "00.png.png")
    assert fig.height == 56 and fig.width > 2 * 56  # image | overlay | legend
    mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / "00.png.png"))
    assert mask.shape == (56, 56) and set(np.unique(mask).tolist()) <= {0, 1}


def test_cli_predict_keeps_one_output_per_image_and_counts_skips(synthetic, tmp_path):
    """ok.bmp / ok.tiff / ok.webp once all became ok.png (the last one won); a bad file is skipped and counted."""
    base, train, _ = synthetic
    run = tmp_path / "run"
    model = ["--model", str(base / "backbone.pth"), "--device", "cpu", "--no-progress"]
    assert main(["seg", "train", "--train", str(train), "--classes", "red,blue", "--short-side", "32", "--epochs",
                 "1", "--out", str(run), *model]) == 0
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    src = Image.open(train / "images" / "00.png")
    for ext in ("bmp", "tiff", "webp"):
        src.save(imgs / f"ok.{ext}")
    src.save(imgs / "sub" / "ok.bmp")
    (imgs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    assert main(["seg", "predict", str(imgs), "--head", str(run), "--out", str(out), *model]) == 0
    pred = json.loads((out / "predictions.json").read_text())
    written = [r["overlay"] for r in pred["images"] if "overlay" in r]
    assert sorted(written) == ["ok.bmp.png", "ok.tiff.png", "ok.webp.png", "sub/ok.bmp.png"]
    assert all((out / w).exists() and (out / "masks" / w).exists() for w in written)
    assert (pred["n_listed"], pred["n_written"], pred["n_skipped"]) == (5, 4, 1)
    assert [r["id"] for r in pred["images"] if "skipped" in r] == ["broken.png"]
    assert main(["seg", "predict", str(imgs), "--head", str(run), "--out", str(out), *model]) == 2  # --overwrite


@pytest.mark.parametrize("round_to_patch", [True, False])
def test_resize_caps_the_long_side_of_a_strip(round_to_patch):
    """A 1 x 5000 px image once became 448 x 2,240,000 px (seg predict ran for minutes)."""
    r = Resize(448, 14, round_to_patch=round_to_patch)
    h, w = r.size(1, 5000)
    assert max(h, w) <= 2 * 448 and h >= 1
    x = r.image(Image.new("RGB", (5000, 1), (9, 9, 9)))
    assert x.shape[0] == 3 and x.shape[1] * x.shape[2] <= 14 * 896
    assert r.size(480, 640) == ((448, 602) if round_to_patch else (448, 597))  # ordinary photos: unchanged


def test_cli_augmented_linear4_training(synthetic, tmp_path):
    base, train, _ = synthetic
    rc = main(["seg", "train", "--train", str(train), "--classes", "red,blue", "--head", "linear4", "--augment",
               "--short-side", "32", "--epochs", "1", "--batch-size", "3", "--class-weights", "median-freq",
               "--out", str(tmp_path / "run"), "--model", str(base / "backbone.pth"), "--device", "cpu",
               "--no-progress"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rc == 0 and res["eval"]["split"] == "train" and math.isfinite(res["epochs"][0]["train_loss"])
    assert read_seg_head(tmp_path / "run").n_layers == 4 and len(res["class_weights"]) == 2


def test_cli_bad_input_is_one_line_error(synthetic, tmp_path, capsys):
    base, train, _ = synthetic
    bad = tmp_path / "bad"
    _write_dataset(bad, 2, 3)
    (bad / "masks" / "01.png").unlink()
    rc = main(["seg", "train", "--train", str(bad), "--classes", "red,blue", "--model", str(base / "backbone.pth"),
               "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "01.png has no mask" in err and "Traceback" not in err
    rc = main(["seg", "eval", "--head", "nope", "--data", str(train), "--model", str(base / "backbone.pth")])
    assert rc == 2 and "official head name" in capsys.readouterr().err
