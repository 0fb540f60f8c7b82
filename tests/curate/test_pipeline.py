"""`dinolab curate` end to end on a tiny synthetic pool, through `dinolab.cli.main`.

Pool: 4 colour families x 8 blocky-texture images (32 x 32), plus 6 byte-identical copies named
``<i>_copy.png``. A random 2-block ViT/8 (LayerScale 1) separates the colour families (cosine
<= 0.51 across, >= 0.95 within) and gives copies cosine 1, so dedup at 0.9999 must remove exactly
the copies; seeds are 3 new images of each of the first two families.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dinolab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (200, 200, 40)]
COPIES = ["c0/3", "c1/0", "c1/5", "c2/2", "c3/7", "c3/1"]


def _image(rng, rgb):
    blocks = rng.normal(0, 40, (4, 4, 3))
    arr = np.kron(blocks, np.ones((8, 8, 1))) + np.array(rgb) + rng.normal(0, 10, (32, 32, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_vit_checkpoint):
    root = tmp_path_factory.mktemp("curate")
    rng = np.random.default_rng(0)
    imgs, seeds = root / "pool", root / "seeds"
    for c, rgb in enumerate(COLOURS):
        (imgs / f"c{c}").mkdir(parents=True)
        for i in range(8):
            _image(rng, rgb).save(imgs / f"c{c}" / f"{i}.png")
    for name in COPIES:
        shutil.copy(imgs / f"{name}.png", imgs / f"{name}_copy.png")
    seeds.mkdir()
    for c in (0, 1):
        for i in range(3):
            _image(rng, COLOURS[c]).save(seeds / f"s{c}_{i}.png")
    ckpt = tiny_vit_checkpoint(root / "m.pth")
    assert main(["embed", str(seeds), "--out", str(root / "seeds_emb"), "--resize", "32", "--crop", "32",
                 "--model", str(ckpt), "--device", "cpu", "--no-progress"]) == 0
    return {"root": root, "imgs": imgs, "ckpt": ckpt, "seeds": root / "seeds_emb"}


def _lines(path):
    return path.read_text().splitlines()


def _run(setup, out, *extra, overrides=()):
    return main(["curate", "run", "--out", str(out), "--seeds", str(setup["seeds"]), "--no-progress", *extra,
                 "dedup.threshold=0.9999", "select.k=4", "cluster.ks=[6,2]", *overrides])


def test_curate_run_end_to_end(setup, tmp_path):
    out = tmp_path / "run"
    assert _run(setup, out, "--images", str(setup["imgs"]), "--model", str(setup["ckpt"]), "--device", "cpu",
                "--n", "8", overrides=["embed.resize=32", "embed.crop=32"]) == 0
    report = json.loads((out / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["dedup", "select", "cluster", "sample"] and report["pool"]["images"] == 38
    for a, b in zip(report["stages"], report["stages"][1:]):
        assert b["n_in"] == a["n_out"]
    # dedup: exactly the 6 copies go, each listed with the original it copies
    assert stages["dedup"]["removed_duplicates"] == 6 and stages["dedup"]["n_out"] == 32
    removed = sorted(_lines(out / "dedup" / "removed.tsv"))
    assert removed == sorted(f"{c}_copy.png\tduplicate\t{c}.png" for c in COPIES)
    assert (out / "dedup" / "duplicates.png").stat().st_size > 0
    # select: seeds of families 0 and 1 retrieve only those families
    selected = _lines(out / "select" / "manifest.txt")
    assert 0 < len(selected) <= 6 * 4 and all(p.split("/")[-2] in ("c0", "c1") for p in selected)
    # cluster keeps everything and draws the size histogram; sample keeps 8 of the selection
    assert stages["cluster"]["removed"] == 0 and (out / "cluster" / "cluster_sizes.png").stat().st_size > 0
    sampled = _lines(out / "sample" / "manifest.txt")
    assert len(sampled) == 8 and set(sampled) <= set(selected)
    assert _lines(out / "manifest.txt") == sampled and report["final"]["images"] == 8
    assert "| dedup | 38 | 32 | 6 |" in (out / "report.md").read_text()
    # the manifest is what `dinolab train --data` reads
    from dinolab.train.data import training_items

    assert sorted(map(str, training_items(str(out / "manifest.txt")))) == sorted(sampled)

    # the same command again: every stage reused, same outputs
    before = {s: _lines(out / s / "manifest.txt") for s in stages}
    assert _run(setup, out, "--images", str(setup["imgs"]), "--model", str(setup["ckpt"]), "--device", "cpu",
                "--n", "8", overrides=["embed.resize=32", "embed.crop=32"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert all(s["reused"] for s in again["stages"])
    assert {s: _lines(out / s / "manifest.txt") for s in stages} == before
    # a new sample size recomputes only the sample stage
    assert _run(setup, out, "--embeddings", str(out / "embed"), "--n", "5", "--device", "cpu") == 0
    reused = {s["stage"]: s["reused"] for s in json.loads((out / "report.json").read_text())["stages"]}
    assert reused == {"dedup": True, "select": True, "cluster": True, "sample": False}
    assert len(_lines(out / "manifest.txt")) == 5
    # a fresh folder with the same inputs and seed gives the same manifests (deterministic)
    fresh = tmp_path / "fresh"
    assert _run(setup, fresh, "--embeddings", str(out / "embed"), "--n", "8", "--device", "cpu") == 0
    assert {s: _lines(fresh / s / "manifest.txt") for s in stages} == before


def test_stages_alone_chain_through_the_run_folder(setup, tmp_path, capsys):
    emb = tmp_path / "emb"
    assert main(["embed", str(setup["imgs"]), "--out", str(emb), "--resize", "32", "--crop", "32",
                 "--model", str(setup["ckpt"]), "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "alone"
    common = ["--embeddings", str(emb), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(["curate", "sample", *common, "--n", "4"]) == 2  # no tree yet: one-line error
    assert "dinolab curate cluster" in capsys.readouterr().err
    assert main(["curate", "dedup", *common, "dedup.threshold=0.9999"]) == 0
    assert main(["curate", "cluster", *common, "cluster.ks=[4,2]"]) == 0
    assert main(["curate", "sample", *common, "--n", "5"]) == 0
    report = {s["stage"]: s for s in json.loads((out / "report.json").read_text())["stages"]}
    assert report["cluster"]["n_in"] == report["dedup"]["n_out"] == 32  # cluster took dedup's output
    assert report["sample"]["n_out"] == 5 and report["sample"]["this_run"] and not report["dedup"]["this_run"]
    assert _lines(out / "manifest.txt") == _lines(out / "sample" / "manifest.txt")
    # select alone from an explicit manifest
    other = tmp_path / "other"
    assert main(["curate", "select", "--embeddings", str(emb), "--out", str(other), "--seeds", str(setup["seeds"]),
                 "--input", str(out / "dedup" / "manifest.txt"), "--device", "cpu", "--no-progress"]) == 0
    sel = json.loads((other / "select" / "report.json").read_text())
    assert sel["n_in"] == 32 and sel["mode"] == "sample"
    # clear one-line errors
    capsys.readouterr()
    assert main(["curate", "dedup", *common, "dedup.treshold=0.9"]) == 2
    assert "did you mean 'threshold'" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text(str(setup["seeds"].parent / "seeds" / "s0_0.png") + "\n")
    assert main(["curate", "cluster", *common, "--input", str(bad)]) == 2
    assert "not in the pool" in capsys.readouterr().err
    assert main(["curate", "select", *common]) == 2
    assert "seed images" in capsys.readouterr().err


def test_eval_set_protection_and_yaml_run(setup, tmp_path):
    """Pool images that copy an evaluation image are removed (reason "eval"); `run --config file.yaml`."""
    evalset = tmp_path / "evalset"
    evalset.mkdir()
    for name in ("c2/4", "c3/5"):
        shutil.copy(setup["imgs"] / f"{name}.png", evalset / f"{name.replace('/', '_')}.png")
    common = ["--resize", "32", "--crop", "32", "--model", str(setup["ckpt"]), "--device", "cpu", "--no-progress"]
    assert main(["embed", str(evalset), "--out", str(tmp_path / "eval_emb"), *common]) == 0
    assert main(["embed", str(setup["imgs"]), "--out", str(tmp_path / "emb"), *common]) == 0
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(f"""
embeddings: {tmp_path / "emb"}
out: {tmp_path / "run"}
device: cpu
dedup:
  threshold: 0.9999
  eval: [{tmp_path / "eval_emb"}]
cluster:
  ks: [5, 2]
sample:
  n: 10
""")
    assert main(["curate", "run", "--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "run"
    removed = _lines(out / "dedup" / "removed.tsv")
    assert sorted(r for r in removed if "\teval\t" in r) == ["c2/4.png\teval\t-", "c3/5.png\teval\t-"]
    report = json.loads((out / "dedup" / "report.json").read_text())
    assert report["removed_duplicates"] == 6 and report["removed_eval"] == 2 and report["n_out"] == 30
    stages = [s["stage"] for s in json.loads((out / "report.json").read_text())["stages"]]
    assert stages == ["dedup", "cluster", "sample"] and len(_lines(out / "manifest.txt")) == 10


def test_config_loading():
    from dinolab.curate.config import CurateConfig, load_curate_config
    from dinolab.errors import DinolabError

    assert load_curate_config("default") == CurateConfig() == load_curate_config()
    cfg = load_curate_config(None, ["cluster.ks=[100, 10]", "dedup.eval=a/b"], {"sample.n": 5, "out": "x y"})
    assert cfg.cluster.ks == (100, 10) and cfg.dedup.eval == ("a/b",) and cfg.sample.n == 5 and cfg.out == "x y"
    with pytest.raises(DinolabError, match="expected one of"):
        load_curate_config(None, ["cluster.backend=sklearn"])
    with pytest.raises(DinolabError, match="expected int"):
        load_curate_config(None, ["sample.n=many"])
    with pytest.raises(DinolabError, match="is a value"):
        load_curate_config(None, ["seed.x=1"])
