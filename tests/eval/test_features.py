"""extract_features and the resumable embed job, including the bad inputs a real folder holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dinolab.curate.embed as features_mod
from dinolab.curate.embed import embed, load_embeddings
from dinolab.data.images import list_images_with_ids
from dinolab.data.transforms import make_classification_transform
from dinolab.errors import DinolabError
from dinolab.eval.features import extract_features
from dinolab.models import create_model

TF = make_classification_transform(resize=40, crop=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch8", depth=1)


@pytest.fixture(scope="module")
def reg_model():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch8_reg4", depth=1)


def _good_images(folder, n, start=0):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.jpg")


@pytest.fixture
def messy(tmp_path):
    """A folder with 4 good JPEGs and every kind of trouble."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _good_images(d / "sub", 4)
    (d / "corrupt.jpg").write_bytes(np.random.default_rng(9).integers(0, 255, 3000, dtype=np.uint8).tobytes())
    jpg = (d / "sub" / "img00.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    rgba = np.zeros((36, 44, 4), np.uint8)
    rgba[:, :20] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(np.full((36, 44), 32768, np.uint16)).save(d / "grey16.png")
    Image.new("RGB", (44, 36), (128, 128, 128)).save(d / "grey8.png")
    (d / "fake.png").write_text("this is text, not a png")
    (d / "notes.txt").write_text("not listed: not an image extension")
    return d


def _calls(model):
    """Count forward calls of ``model`` (a list that grows by one per call)."""
    calls = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


def _read(out):
    ids, arrays = load_embeddings(out)
    return ids, {k: np.array(v) for k, v in arrays.items()}, (out / "skipped.txt").read_text()


# ------------------------------------------------------------------------------- extract_features


def test_extract_features_skips_bad_files_and_is_deterministic(model, messy):
    f1 = extract_features(model, messy, transform=TF, batch_size=3, progress=False, device="cpu")
    f2 = extract_features(model, messy, transform=TF, batch_size=3, num_workers=2, progress=False,
                          device="cpu")
    assert f1.ids == ["alpha.png", "grey16.png", "grey8.png", "sub/img00.jpg", "sub/img01.jpg",
                      "sub/img02.jpg", "sub/img03.jpg"]
    assert [i for i, _ in f1.skipped] == ["corrupt.jpg", "fake.png", "truncated.jpg"]
    assert "truncated" in dict(f1.skipped)["truncated.jpg"]
    assert f1.cls.shape == (7, model.embed_dim) and f1.cls.dtype == torch.float32
    assert f1.patch_mean is None and f1.registers is None
    # workers only decode; the forward passes run in this process on the same batches: bit-identical
    assert f2.ids == f1.ids and f2.skipped == f1.skipped and torch.equal(f1.cls, f2.cls)
    # the 16-bit mid-grey image is seen as the 8-bit mid-grey one, not blown out to white
    assert torch.allclose(f1.cls[1], f1.cls[2], atol=1e-5)


def test_pooling_shapes_and_pil_input(reg_model, model):
    imgs = [Image.new("RGB", (40, 48), (i * 50, 20, 90)) for i in range(3)]
    f = extract_features(reg_model, imgs, transform=TF, pooling=("registers", "patch_mean"), progress=False,
                         device="cpu")
    D = reg_model.embed_dim
    assert f.ids == ["0", "1", "2"] and f.skipped == []
    assert f.cls.shape == (3, D) and f.patch_mean.shape == (3, D) and f.registers.shape == (3, 4, D)
    out = reg_model(torch.stack([TF(im) for im in imgs]))
    torch.testing.assert_close(f.patch_mean, out.patch_tokens.mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(DinolabError, match="register"):
        extract_features(model, imgs, transform=TF, pooling="registers", progress=False, device="cpu")
    with pytest.raises(DinolabError, match="pooling"):
        extract_features(model, imgs, transform=TF, pooling=("max",), progress=False, device="cpu")


def test_model_mode_is_restored(model):
    model.train()
    extract_features(model, [Image.new("RGB", (32, 32))], transform=TF, progress=False, device="cpu")
    assert model.training
    model.eval()


# ----------------------------------------------------------------------------------------- embed


def test_embed_bookkeeping_with_bad_inputs(model, messy, tmp_path):
    res = embed(model, messy, tmp_path / "out", model_id="tiny", transform=TF, batch_size=2, shard_size=3,
                num_workers=0, progress=False, device="cpu")
    out = tmp_path / "out"
    ids, arrays, skipped_txt = _read(out)
    skipped = [ln.split("\t")[0] for ln in skipped_txt.splitlines()]
    _, inputs = list_images_with_ids(messy)
    assert sorted(ids + skipped) == sorted(inputs) and not set(ids) & set(skipped)  # nothing lost, no overlap
    assert "notes.txt" not in inputs
    assert skipped == ["corrupt.jpg", "fake.png", "truncated.jpg"] and res.count == len(ids) == 7
    assert arrays["cls"].dtype == np.float32 and arrays["cls"].shape == (7, model.embed_dim)
    assert ids.index("alpha.png") == 0
    np.testing.assert_allclose(arrays["cls"][ids.index("grey16.png")], arrays["cls"][ids.index("grey8.png")],
                               atol=1e-5)
    ref = extract_features(model, messy, transform=TF, progress=False, device="cpu")
    np.testing.assert_allclose(arrays["cls"], ref.cls.numpy(), atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 7 and meta["skipped"] == 3 and meta["dims"]["cls"] == [7, model.embed_dim]
    assert meta["model_id"] == "tiny" and meta["pooling"] == ["cls"]
    tf = meta["transform"]  # structured JSON, not a repr
    assert (tf["resize"], tf["crop"], tf["interpolation"]) == (40, 32, "bicubic")
    assert tf["mean"] == [0.485, 0.456, 0.406] and [s["op"] for s in tf["steps"]][:2] == ["Resize", "CenterCrop"]
    assert not (out / "shards").exists()


def test_embed_all_bad_and_empty_folder(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinolabError, match="no images found"):
        embed(model, tmp_path / "empty", tmp_path / "o1", model_id="m", transform=TF, progress=False,
              device="cpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"nope")
    res = embed(model, bad, tmp_path / "o2", model_id="m", transform=TF, num_workers=0, progress=False,
                device="cpu")
    ids, arrays, _ = _read(tmp_path / "o2")
    assert res.count == 0 and ids == [] and arrays["cls"].shape == (0, model.embed_dim)
    assert [i for i, _ in res.skipped] == ["a.jpg"]


def test_embed_resumes_after_a_kill_without_recomputing(model, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _good_images(imgs, 10)
    kw = {"model_id": "m", "transform": TF, "batch_size": 2, "shard_size": 4, "num_workers": 0,
          "progress": False, "device": "cpu", "pooling": ("cls", "patch_mean")}
    embed(model, imgs, tmp_path / "ref", **kw)

    seen = []

    def die_on_4th_call(module, args):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(die_on_4th_call)
    with pytest.raises(KeyboardInterrupt):  # shard 0 (2 batches) done, shard 1 half done
        embed(model, imgs, tmp_path / "out", **kw)
    hook.remove()
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["00000.json", "00000.npz"]

    calls, hook = _calls(model)
    res = embed(model, imgs, tmp_path / "out", **kw)
    hook.remove()
    assert len(calls) == 3 and (res.shards_reused, res.shards_computed) == (1, 2)  # shards 1 and 2 only
    ref, out = _read(tmp_path / "ref"), _read(tmp_path / "out")
    assert ref[0] == out[0] and all(np.array_equal(ref[1][k], out[1][k]) for k in ("cls", "patch_mean"))

    calls, hook = _calls(model)
    again = embed(model, imgs, tmp_path / "out", **kw)  # finished run: nothing to do
    hook.remove()
    assert calls == [] and again.count == 10


def test_embed_resumes_an_interrupted_merge(model, tmp_path, monkeypatch):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _good_images(imgs, 5)
    kw = {"model_id": "m", "transform": TF, "batch_size": 2, "shard_size": 2, "num_workers": 0,
          "progress": False, "device": "cpu"}
    real_merge = features_mod._merge

    def merge_then_die(*args, **kwargs):
        real_merge(*args, **kwargs)
        raise KeyboardInterrupt  # killed after the final files, before meta.json

    monkeypatch.setattr(features_mod, "_merge", merge_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed(model, imgs, tmp_path / "out", **kw)
    assert not (tmp_path / "out" / "meta.json").exists()
    monkeypatch.setattr(features_mod, "_merge", real_merge)
    calls, hook = _calls(model)
    res = embed(model, imgs, tmp_path / "out", **kw)
    hook.remove()
    assert calls == [] and res.shards_reused == 3 and res.count == 5
    assert _read(tmp_path / "out")[0] == sorted(p.name for p in imgs.iterdir())


def test_embed_refuses_a_changed_image_list_unless_overwrite(model, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _good_images(imgs, 3)
    kw = {"model_id": "m", "transform": TF, "num_workers": 0, "progress": False, "device": "cpu"}
    embed(model, imgs, tmp_path / "out", **kw)
    _good_images(imgs, 1, start=3)
    with pytest.raises(DinolabError, match="--overwrite"):
        embed(model, imgs, tmp_path / "out", **kw)
    with pytest.raises(DinolabError, match="model_id"):
        embed(model, imgs, tmp_path / "out", **{**kw, "model_id": "other", "overwrite": False})
    assert embed(model, imgs, tmp_path / "out", overwrite=True, **kw).count == 4
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("precious")
    with pytest.raises(DinolabError, match="not empty"):
        embed(model, imgs, tmp_path / "foreign", **kw)


def test_embed_safetensors_round_trip(reg_model, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _good_images(imgs, 3)
    kw = {"model_id": "m", "transform": TF, "num_workers": 0, "progress": False, "device": "cpu",
          "pooling": ("cls", "patch_mean", "registers")}
    embed(reg_model, imgs, tmp_path / "npy", **kw)
    res = embed(reg_model, imgs, tmp_path / "st", fmt="safetensors", **kw)
    assert "features.safetensors" in res.files and not (tmp_path / "st" / "cls.npy").exists()
    a, b = _read(tmp_path / "npy"), _read(tmp_path / "st")
    assert a[0] == b[0] and set(b[1]) == {"cls", "patch_mean", "registers"}
    assert b[1]["registers"].shape == (3, 4, reg_model.embed_dim)
    assert all(np.array_equal(a[1][k], b[1][k]) for k in b[1])
