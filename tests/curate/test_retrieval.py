"""`dinolab embed` -> `dinolab index build` -> `dinolab index search` end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli import main


def test_embed_index_search_round_trip(tmp_path, capsys, tiny_vit_checkpoint):
    imgs = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        (imgs / f"c{c}").mkdir(parents=True)
        for i in range(4):
            arr = np.clip(np.array(rgb) + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(imgs / f"c{c}" / f"{i}.png")
    ckpt = tiny_vit_checkpoint(tmp_path / "m.pth")
    common = ["--model", str(ckpt), "--device", "cpu"]
    assert main(["embed", str(imgs), "--out", str(tmp_path / "emb"), "--resize", "32", "--crop", "32",
                 "--no-progress", *common]) == 0
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
    out = tmp_path / "res.json"
    assert main(["index", "search", "--index", str(tmp_path / "idx"), "--id", "c0/0.png", "c2/1.png", "-k", "3",
                 "--out", str(out), "--sheet", str(tmp_path / "sheet.png"), "--images-root", str(imgs)]) == 0
    res = json.loads(out.read_text())
    assert [r["query"] for r in res] == ["c0/0.png", "c2/1.png"]
    for r in res:  # neighbours: same colour class, never the query itself
        assert len(r["neighbours"]) == 3 and all(n["id"] != r["query"] for n in r["neighbours"])
        assert all(n["id"].split("/")[0] == r["query"].split("/")[0] for n in r["neighbours"])
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_search_unknown_id_is_one_line_error(tmp_path, capsys):
    from dinolab.curate.index import ExactIndex

    ExactIndex(torch.randn(4, 8), ["a", "b", "c", "d"], "m").save(tmp_path / "idx")
    rc = main(["index", "search", "--index", str(tmp_path / "idx"), "--id", "zzz", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "zzz" in err and err.count("\n") == 1


def test_faiss_kinds_and_batch_queries_from_cli(tmp_path, capsys, tiny_vit_checkpoint):
    """build --kind ivf/hnsw, search a folder of query files; the query transform comes from the index."""
    pytest.importorskip("faiss")
    imgs = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for c, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        (imgs / f"c{c}").mkdir(parents=True)
        for i in range(14):
            arr = np.clip(np.array(rgb) + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(imgs / f"c{c}" / f"{i}.png")
    queries = tmp_path / "queries"
    queries.mkdir()
    for q, rgb in enumerate([(220, 30, 30), (30, 40, 220)]):
        arr = np.clip(np.array(rgb) + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(queries / f"q{q}.png")
    ckpt = tiny_vit_checkpoint(tmp_path / "m.pth")
    assert main(["embed", str(imgs), "--out", str(tmp_path / "emb"), "--resize", "32", "--crop", "32",
                 "--no-progress", "--model", str(ckpt), "--device", "cpu"]) == 0
    for kind, extra in (("ivf", ["--nlist", "1"]), ("hnsw", ["--hnsw-m", "8"])):
        idx = tmp_path / f"idx_{kind}"
        assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(idx), "--kind", kind,
                     *extra]) == 0
        meta = json.loads((idx / "meta.json").read_text())
        assert meta["kind"] == kind and meta["info"]["resize"] == 32 and meta["info"]["crop"] == 32
        out = tmp_path / f"{kind}.json"
        assert main(["index", "search", "--index", str(idx), "--images", str(queries), "-k", "5", "--out", str(out),
                     "--device", "cpu", "--sheet", str(tmp_path / f"{kind}.png")]) == 0
        res = json.loads(out.read_text())
        assert [r["query"].rsplit("/", 1)[-1] for r in res] == ["q0.png", "q1.png"]
        assert all(n["id"].startswith("c0/") for n in res[0]["neighbours"])  # red query -> red images
        assert all(n["id"].startswith("c2/") for n in res[1]["neighbours"]) and len(res[1]["neighbours"]) == 5
        assert (tmp_path / f"{kind}.png").stat().st_size > 0  # images found through the recorded id_root
    capsys.readouterr()
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "ex"),
                 "--kind", "exact"]) == 0
    assert main(["index", "search", "--index", str(tmp_path / "ex"), "--id", "c0/0.png", "--nprobe", "4"]) == 2
    assert "faiss indexes" in capsys.readouterr().err


def test_search_skips_bad_queries_and_sheet_finds_relative_query_files(tmp_path, monkeypatch, tiny_vit_checkpoint):
    """--images with an unreadable file once stopped at it; a query path relative to the working directory
    was looked up under the index's image root and drawn as "missing"."""
    import dinolab.curate.retrieval as retrieval

    imgs = tmp_path / "imgs"
    (imgs / "c0").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / "c0" / f"{i}.png")
    (tmp_path / "work" / "queries").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "work" / "queries" / "q.png")
    (tmp_path / "work" / "queries" / "broken.png").write_bytes(b"not a png")
    ckpt = tiny_vit_checkpoint(tmp_path / "m.pth")
    assert main(["embed", str(imgs), "--out", str(tmp_path / "emb"), "--resize", "32", "--crop", "32",
                 "--no-progress", "--model", str(ckpt), "--device", "cpu"]) == 0
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
    monkeypatch.chdir(tmp_path / "work")
    from dinolab.data import images as images_mod

    drawn, real_sheet, real_load = [], retrieval.contact_sheet, images_mod.load_rgb

    def spy(path):
        img = real_load(path)
        drawn.append(str(path))  # loaded and drawn, not "missing"
        return img

    def sheet(*args, **kwargs):  # spy on the files the contact sheet reads, and only on those
        with monkeypatch.context() as m:
            m.setattr(images_mod, "load_rgb", spy)
            return real_sheet(*args, **kwargs)

    monkeypatch.setattr(retrieval, "contact_sheet", sheet)
    rc = main(["index", "search", "--index", str(tmp_path / "idx"), "--images", "queries", "-k", "2",
               "--out", "hits.json", "--sheet", "hits.png", "--device", "cpu"])
    assert rc == 0
    res = json.loads(Path("hits.json").read_text())
    assert [(r["query"], len(r["neighbours"]), "skipped" in r) for r in res] == [
        (str(Path("queries") / "q.png"), 2, False), (str(Path("queries") / "broken.png"), 0, True)]
    assert str(Path("queries") / "q.png") in drawn  # the query tile: the file in the working directory
    assert not any(p.endswith("broken.png") for p in drawn) and Path("hits.png").stat().st_size > 0


def test_index_reads_the_transform_of_new_and_old_embed_folders():
    """meta.json now holds the transform as a dict; folders written before hold its repr text."""
    from dinolab.curate.retrieval import transform_sizes
    from dinolab.data.transforms import describe_transform, make_classification_transform

    tf = make_classification_transform(64, 48)
    assert transform_sizes(describe_transform(tf)) == {"resize": 64, "crop": 48}
    assert transform_sizes(repr(tf)) == {"resize": 64, "crop": 48}  # an old folder
    assert transform_sizes({"steps": []}) == {} and transform_sizes("Compose(custom)") == {}
