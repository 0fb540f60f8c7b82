"""The bad-input matrix: every entry point that reads images, on the same generated files.

Inputs (``tests/bad_inputs.py``, all made in temporary folders): convertible files (RGBA, 16-bit,
greyscale, CMYK, palette, animated GIF, 1x1 px, EXIF-rotated JPEG, WebP, TIFF, names with spaces and
unicode) must be decoded and used; bad ones (corrupt, truncated, 0-byte, text named .png, a
20000 x 20000 PNG bomb of ~50 KB, a dangling symlink, a named pipe, a chmod-000 file) must be
skipped with a reason and counted, so that every input ends up in exactly one of "used" and
"skipped"; an empty folder or a folder of only bad files gives one clear error (CLI: one line, exit 2).

Entry points: ``load_rgb``, ``extract_features``, ``embed`` / ``dinolab embed`` (and kill -9 +
resume), ``dinolab pca``, eval datasets (ImageFolder, list file, tar) and ``dinolab eval knn``,
training data (``train --data``: folders and tar shards), ``dinolab index search --images``,
``dinolab seg predict``, ``dinolab depth predict``, ``dinolab match`` and the HTTP ``/v1/embed``.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dinolab.cli import main
from dinolab.data.images import BadImageError, list_images_with_ids, load_rgb
from dinolab.data.transforms import make_classification_transform
from dinolab.errors import DinolabError
from dinolab.models import create_model, save_official

from . import bad_inputs as B

TF = make_classification_transform(resize=32, crop=32)
GOOD_IDS, BAD_IDS = B.rel_ids()
N_GOOD, N_BAD = len(GOOD_IDS), len(BAD_IDS)
ROOT_REASON = "running as root: chmod 000 does not stop root from reading a file, so there is nothing to test"


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """One folder with every good and bad file (half of them in ``sub/``)."""
    return B.make_folder(tmp_path_factory.mktemp("matrix") / "imgs")


@pytest.fixture(scope="module")
def bad_only(tmp_path_factory) -> Path:
    return B.make_folder(tmp_path_factory.mktemp("bad") / "imgs", good=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch4", img_size=32, depth=2).eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    return save_official(model, tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def _cli(capsys, caplog, *argv) -> tuple[int, str]:
    """Run ``dinolab argv`` in-process; (exit code, stdout + stderr + log)."""
    caplog.clear()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err + caplog.text


def _one_line_error(text: str) -> bool:
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in text


def _with_timeout(fn, seconds: float = 10.0):
    """``fn()`` in a thread; fail (instead of hanging the suite) when it does not return in time."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"did not return within {seconds} s (blocked)")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", sorted(B.GOOD))
def test_convertible_files_decode_to_upright_rgb(tmp_path, name):
    make, size = B.GOOD[name]
    path = make(tmp_path / name)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == size
    with Image.open(path) as raw:  # the same pixels as Pillow's own upright RGB conversion
        raw.load()
        ref = ImageOps.exif_transpose(raw)
        if ref.mode in ("RGB", "L", "CMYK", "YCbCr"):
            assert np.array_equal(np.asarray(img), np.asarray(ref.convert("RGB")))


def test_exif_orientation_is_honoured(tmp_path):
    path = B.exif_rotated_jpeg(tmp_path / "r.jpg")
    with Image.open(path) as raw:
        assert raw.size == (B.W, B.H)  # stored landscape
        upright = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(path)), upright)


def test_rgba_is_composited_on_white_and_16bit_is_scaled(tmp_path):
    img = np.asarray(load_rgb(B.rgba_png(tmp_path / "a.png")))
    assert (img[:, : B.W // 2] == 255).all()  # the transparent half
    g16 = np.asarray(load_rgb(B.gray16_png(tmp_path / "g16.png")))[..., 0]
    assert np.array_equal(g16, B._rgb_array(3)[..., 0])  # v * 257 / 257, not clipped at 255


@pytest.mark.parametrize("name", sorted(B.BAD))
def test_bad_files_are_refused_with_a_one_line_reason(tmp_path, name):
    path = B.BAD[name](tmp_path / name)
    with pytest.raises(BadImageError) as e:
        _with_timeout(lambda: load_rgb(path))
    assert e.value.path == str(path) and e.value.reason and "\n" not in e.value.reason


def test_png_bomb_is_refused_from_its_header(tmp_path):
    path = B.png_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 200_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(BadImageError, match="DecompressionBomb"):
        load_rgb(path)
    assert time.perf_counter() - t0 < 2.0  # decoding 400 M px would take far longer
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB: the bomb was decoded"


def test_unreadable_file_is_skipped(tmp_path):
    if os.geteuid() == 0:
        pytest.skip(ROOT_REASON)
    path = B.rgb_jpeg(tmp_path / "locked.jpg")
    path.chmod(0)
    try:
        with pytest.raises(BadImageError, match="Permission"):
            load_rgb(path)
    finally:
        path.chmod(0o644)


def test_names_with_a_newline_decode_but_cannot_be_an_embed_id(tmp_path, model):
    from dinolab.curate.embed import embed

    folder = tmp_path / "nl"
    folder.mkdir()
    B.rgb_jpeg(folder / "ok.jpg")
    odd = B.rgb_jpeg(folder / "two\nlines.jpg")
    assert load_rgb(odd).size == (B.W, B.H)
    with pytest.raises(DinolabError, match="line break") as e:  # ids.txt has one id per line
        embed(model, folder, tmp_path / "out", model_id="m", transform=TF, num_workers=0, progress=False,
              device="cpu")
    assert "two\\nlines.jpg" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["empty", "only_other_files"])
def test_empty_folders_are_one_clear_error(tmp_path, kind, capsys, caplog, ckpt):
    folder = tmp_path / "f"
    folder.mkdir()
    if kind == "only_other_files":
        (folder / "notes.txt").write_text("hi")
        (folder / ".hidden.jpg").write_bytes(b"")
    with pytest.raises(DinolabError, match="no images found"):
        list_images_with_ids(folder)
    code, text = _cli(capsys, caplog, "embed", folder, "--out", tmp_path / "o", "--model", ckpt,
                      "--resize", 32, "--crop", 32, "--device", "cpu", "--num-workers", 0, "--no-progress")
    assert code == 2 and _one_line_error(text) and str(folder) in text


# ------------------------------------------------------------------------- features and embed


def _partition(used: list[str], skipped: list[str]) -> None:
    """Every input id in exactly one of the two lists; the good ones used, the bad ones skipped."""
    assert sorted(used) == sorted(GOOD_IDS)
    assert sorted(skipped) == sorted(BAD_IDS)
    assert not set(used) & set(skipped)


def test_extract_features_uses_the_convertible_and_skips_the_bad(matrix, model):
    from dinolab.eval.features import extract_features

    feats = _with_timeout(lambda: extract_features(model, matrix, transform=TF, batch_size=4, num_workers=0,
                                                   progress=False, device="cpu"), 60)
    _partition(feats.ids, [i for i, _ in feats.skipped])
    assert all(reason and "\n" not in reason for _, reason in feats.skipped)
    assert feats.cls.shape == (N_GOOD, model.embed_dim) and torch.isfinite(feats.cls).all()
    # the EXIF-rotated file is embedded upright: as its transposed pixels are
    with Image.open(matrix / "exif_rotated.jpg") as raw:
        upright = ImageOps.exif_transpose(raw).convert("RGB")
    ref = extract_features(model, [upright], transform=TF, progress=False, device="cpu")
    torch.testing.assert_close(feats.cls[feats.ids.index("exif_rotated.jpg")], ref.cls[0], rtol=1e-4, atol=1e-5)


def test_dinolab_embed_lists_every_id_once(matrix, tmp_path, ckpt, capsys, caplog):
    out = tmp_path / "emb"
    code, text = _cli(capsys, caplog, "embed", matrix, "--out", out, "--model", ckpt, "--resize", 32, "--crop", 32,
                      "--device", "cpu", "--num-workers", 0, "--batch-size", 4, "--shard-size", 5, "--no-progress")
    assert code == 0, text
    ids = (out / "ids.txt").read_text(encoding="utf-8").splitlines()
    skipped = [ln.split("\t") for ln in (out / "skipped.txt").read_text(encoding="utf-8").splitlines()]
    assert all(len(s) == 2 and s[1] for s in skipped)  # id TAB reason, one line each
    _partition(ids, [s[0] for s in skipped])
    assert np.load(out / "cls.npy").shape[0] == N_GOOD
    assert f"{N_BAD} skipped" in text


def test_dinolab_embed_of_only_bad_files_is_one_clear_error(bad_only, tmp_path, ckpt, capsys, caplog):
    code, text = _cli(capsys, caplog, "embed", bad_only, "--out", tmp_path / "o", "--model", ckpt, "--resize", 32,
                      "--crop", 32, "--device", "cpu", "--num-workers", 0, "--no-progress")
    assert code == 2 and _one_line_error(text), text
    assert "skipped.txt" in text  # says where the reasons are


def _embed_cmd(folder: Path, out: Path, ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "dinolab", "embed", str(folder), "--out", str(out), "--model", str(ckpt),
            "--device", "cpu", "--num-workers", "0", "--batch-size", "4", "--shard-size", "8", "--no-progress"]


@pytest.mark.slow  # three interpreter starts: ~15 s on 2 idle cores
def test_embed_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        B.rgb_jpeg(folder / f"{i:03d}.jpg", seed=i)
    (folder / "999_bad.jpg").write_bytes(b"junk")
    torch.manual_seed(0)
    ckpt = save_official(create_model("vit_tiny_patch8", depth=2), tmp_path / "t.pth")  # 224 px: ~0.2 s a shard
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(_embed_cmd(folder, tmp_path / "ref", ckpt), env=env, check=True, capture_output=True)

    out = tmp_path / "out"
    proc = subprocess.Popen(_embed_cmd(folder, out, ckpt), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "shards" / "00000.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "meta.json").exists(), "the run finished before it could be killed"
    assert (out / "shards" / "00000.json").exists()  # the marker of a finished shard
    again = subprocess.run(_embed_cmd(folder, out, ckpt), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    for name in ("ids.txt", "skipped.txt"):
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text()
    # same batches (they never cross a shard), same thread count, same machine: bit-identical rows
    np.testing.assert_array_equal(np.load(out / "cls.npy"), np.load(tmp_path / "ref" / "cls.npy"))
    assert not list(out.glob("**/*.tmp"))


# ---------------------------------------------------------------------------------------- pca


def test_dinolab_pca_skips_bad_files_and_counts_them(matrix, tmp_path, ckpt, capsys, caplog):
    files = [matrix / "rgb.jpg", matrix / "sub" / "rgba.png", matrix / "cmyk.jpg", matrix / "exif_rotated.jpg",
             matrix / "truncated.jpg", matrix / "sub" / "bomb.png", matrix / "text.png"]
    code, text = _cli(capsys, caplog, "pca", *files, "--out", tmp_path / "pca.png", "--model", ckpt,
                      "--short-side", 32, "--device", "cpu")
    assert code == 0, text
    assert (tmp_path / "pca.png").exists()
    for bad in ("truncated.jpg", "bomb.png", "text.png"):
        assert bad in text  # each skipped file is named
    assert "3" in text and "skipped" in text


def test_dinolab_pca_of_only_bad_files_is_one_clear_error(bad_only, tmp_path, ckpt, capsys, caplog):
    files = [bad_only / "corrupt.jpg", bad_only / "sub" / "truncated.jpg"]
    code, text = _cli(capsys, caplog, "pca", *files, "--out", tmp_path / "pca.png", "--model", ckpt,
                      "--short-side", 32, "--device", "cpu")
    assert code == 2 and _one_line_error(text), text
    assert not (tmp_path / "pca.png").exists()


# ------------------------------------------------------------------------------ eval datasets


def _regular_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> dict[str, Path]:
    """The matrix as a two-class ImageFolder, as a list file over it, and as a .tar.gz of it."""
    root = tmp_path_factory.mktemp("labeled")
    folder = root / "folder"
    for c in ("cats", "dogs"):
        B.make_folder(folder / c)
    entries = sorted(p for p in folder.rglob("*") if not p.is_dir())  # files, the pipe, the dangling link
    lines = [f"{p.relative_to(folder).as_posix()}\t{p.relative_to(folder).parts[0]}" for p in entries]
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    with tarfile.open(root / "data.tar.gz", "w:gz") as tar:  # regular files only: links are h4's matrix
        for p in _regular_files(folder):
            if p.name != "list.txt":
                tar.add(p, arcname=f"data/{p.relative_to(folder).as_posix()}")
    return {"folder": folder, "list": folder / "list.txt", "tar": root / "data.tar.gz"}


@pytest.mark.parametrize("kind", ["folder", "list", "tar"])
def test_eval_datasets_list_bad_files_and_features_skip_them(labeled, kind, model, tmp_path):
    from dinolab.data.datasets import load_labeled
    from dinolab.eval.features import extract_features

    ds = load_labeled(labeled[kind], cache_dir=tmp_path / "cache")
    assert ds.classes == ["cats", "dogs"]
    feats = _with_timeout(lambda: extract_features(model, ds, transform=TF, num_workers=0, progress=False,
                                                   device="cpu"), 60)
    bad = {i for i, _ in feats.skipped}
    assert set(feats.ids) | bad == set(ds.ids) and not set(feats.ids) & bad
    assert {i.split("/", 1)[1] for i in feats.ids} == set(GOOD_IDS)
    assert all(i.split("/")[-1] in B.BAD for i in bad)


def test_dinolab_eval_knn_counts_listed_and_scored_images(labeled, tmp_path, ckpt, capsys, caplog):
    out = tmp_path / "knn"
    code, text = _cli(capsys, caplog, "eval", "knn", "--train", labeled["folder"], "--test", labeled["folder"],
                      "--model", ckpt, "--resize", 32, "--crop", 32, "--device", "cpu", "--out", out)
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["n"] == 2 * (N_GOOD + N_BAD)  # listed
    scored = {k: v for k, v in res["test"].items() if "scor" in k or "skip" in k}
    assert 2 * N_GOOD in scored.values(), f"results.json records no scored count: {res['test']}"


# ------------------------------------------------------------------------------ training data


def _augment():
    from dinolab.data.augment import MultiCropAugmentation

    return MultiCropAugmentation(global_size=16, local_size=8, n_local=1, patch_size=4)


def test_train_data_folder_skips_and_counts_bad_images(matrix):
    from dinolab.train.data import MultiCropDataset, collate_stream, training_items

    items = training_items(str(matrix))
    ds = MultiCropDataset(items, _augment())
    samples = [_with_timeout(lambda i=i: ds[(i, i)]) for i in range(len(items))]
    ok = [Path(items[i]).name for i, _, crops in samples if crops is not None]
    assert sorted(ok) == sorted(i.split("/")[-1] for i in GOOD_IDS)
    batch = collate_stream(samples, grid=(4, 4), mask_probability=0.5, mask_ratio=(0.1, 0.5))
    assert batch["n_skipped"] == N_BAD


def test_train_data_tar_shards_skip_bad_members_and_honour_exif(matrix, tmp_path):
    from dinolab.train.data import MultiCropDataset, _decode, training_items

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for p in _regular_files(matrix):
            tar.add(p, arcname=p.relative_to(matrix).as_posix())
    items = training_items(str(shard))
    by_name = {m.name: m for m in items}
    assert _decode(by_name["exif_rotated.jpg"]).size == (B.H, B.W)  # upright, as a folder gives it
    ds = MultiCropDataset(items, _augment())
    bad = sorted(m.name for m, (_, _, crops) in zip(items, (ds[(i, i)] for i in range(len(items))))
                 if crops is None)
    assert bad == sorted(i for i in BAD_IDS if i.split("/")[-1] not in ("dangling.png", "pipe.png"))


# --------------------------------------------------------------------------- retrieval, dense


@pytest.fixture(scope="module")
def index_dir(matrix, ckpt, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("index")
    assert main(["embed", str(matrix), "--out", str(root / "emb"), "--model", str(ckpt), "--resize", "32",
                 "--crop", "32", "--device", "cpu", "--num-workers", "0", "--no-progress"]) == 0
    assert main(["index", "build", "--embeddings", str(root / "emb"), "--out", str(root / "idx")]) == 0
    return root / "idx"


def test_index_search_images_skips_and_counts_bad_queries(matrix, index_dir, ckpt, tmp_path, capsys, caplog):
    out = tmp_path / "hits.json"
    code, text = _cli(capsys, caplog, "index", "search", "--index", index_dir, "--images", matrix, "-k", 3,
                      "--model", ckpt, "--device", "cpu", "--out", out)
    assert code == 0, text
    results = json.loads(out.read_text())
    answered = [r["query"] for r in results if r.get("neighbours")]
    assert sorted(Path(q).name for q in answered) == sorted(i.split("/")[-1] for i in GOOD_IDS)
    report = text + out.read_text()
    assert all(i.split("/")[-1] in report for i in BAD_IDS)  # each bad query named


def _seg_head(tmp_path: Path, dim: int) -> Path:
    from dinolab.eval.segmentation import LinearSegHead, save_seg_head

    torch.manual_seed(0)
    head = LinearSegHead(dim, 3, n_layers=1)
    return save_seg_head(tmp_path / "seg.pth", head, classes=["a", "b", "c"],
                         palette=[(255, 0, 0), (0, 255, 0), (0, 0, 255)],
                         settings={"short_side": 32, "round_to_patch": True})


def test_seg_predict_skips_and_counts_bad_images(matrix, model, ckpt, tmp_path, capsys, caplog):
    head = _seg_head(tmp_path, model.embed_dim)
    out = tmp_path / "seg"
    code, text = _cli(capsys, caplog, "seg", "predict", matrix, "--head", head, "--model", ckpt, "--out", out,
                      "--short-side", 32, "--device", "cpu", "--no-progress")
    assert code == 0, text
    records = json.loads((out / "predictions.json").read_text())["images"]
    _partition([r["id"] for r in records if "skipped" not in r], [r["id"] for r in records if "skipped" in r])
    assert len(list((out / "masks").rglob("*.png"))) == N_GOOD  # one mask per good image, none overwritten


def _depth_head(tmp_path: Path, dim: int, depth: int) -> Path:
    from dinolab.eval.depth_heads import build_head, make_head_config, save_depth_head

    torch.manual_seed(0)
    cfg = make_head_config("lin1", dim, depth, max_depth=10.0)
    return save_depth_head(build_head(cfg), cfg, tmp_path / "depth.pth")


def test_depth_predict_skips_and_counts_bad_images(matrix, model, ckpt, tmp_path, capsys, caplog):
    head = _depth_head(tmp_path, model.embed_dim, len(model.blocks))
    out = tmp_path / "depth"
    code, text = _cli(capsys, caplog, "depth", "predict", matrix, "--head", head, "--model", ckpt, "--out", out,
                      "--short-side", 32, "--device", "cpu")
    assert code == 0, text
    assert len(list(out.rglob("*_depth.npy"))) == N_GOOD  # one per good image, none overwritten
    assert all(i.split("/")[-1] in text for i in BAD_IDS)  # each skipped image named
    assert f"{N_BAD} skipped" in text


def test_match_converts_odd_modes_and_names_a_bad_file(matrix, tmp_path, ckpt, capsys, caplog):
    code, text = _cli(capsys, caplog, "match", matrix / "sub" / "rgba.png", matrix / "cmyk.jpg", "--out",
                      tmp_path / "m.png", "--model", ckpt, "--short-side", 32, "--device", "cpu")
    assert code == 0 and (tmp_path / "m.png").exists(), text
    for bad in (matrix / "truncated.jpg", matrix / "sub" / "bomb.png", matrix / "sub" / "pipe.png"):
        code, text = _with_timeout(lambda b=bad: _cli(capsys, caplog, "match", matrix / "rgb.jpg", b, "--out",
                                                       tmp_path / "x.png", "--model", ckpt, "--short-side", 32,
                                                       "--device", "cpu"), 60)
        assert code == 2 and _one_line_error(text) and bad.name in text, text


# --------------------------------------------------------------------------------------- HTTP


def test_http_embed_accepts_convertible_uploads_and_refuses_bad_ones(matrix):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dinolab.serve.app import create_app
    from dinolab.serve.registry import ServedModel

    torch.manual_seed(0)
    app = create_app(models=[ServedModel.wrap(create_model("vit_tiny_patch4", depth=1), short_side=32)])
    client = TestClient(app, base_url="http://127.0.0.1")
    for rel in GOOD_IDS + BAD_IDS:
        path = matrix / rel
        if not path.is_file() or path.is_symlink():
            continue  # a pipe or a dangling link has no bytes to upload
        r = client.post("/v1/embed", files={"image": (path.name, path.read_bytes())})
        small = rel.endswith("one_pixel.png")  # under the server's 16-px minimum: refused by design
        if rel in GOOD_IDS and not small:
            assert r.status_code == 200, (rel, r.text)
        else:
            assert 400 <= r.status_code < 500, (rel, r.status_code, r.text)
            assert r.json().get("detail") or r.json().get("error"), rel
