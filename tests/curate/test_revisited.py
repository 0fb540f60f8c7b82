"""Revisited Oxford / Paris protocol: metrics against a hand computation, ground-truth loading, CLI end to end."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli import main
from dinolab.curate.index import average_precision
from dinolab.curate.revisited import load_revisited, revisited_ap, revisited_map, setting_ground_truth
from dinolab.errors import DinolabError

pytestmark = pytest.mark.usefixtures("one_thread")

# Query 0: easy {1, 4}, hard {6}, junk {2}; query 1: easy {3}, nothing hard (skipped in "hard").
GND = [{"easy": [1, 4], "hard": [6], "junk": [2], "bbx": [0, 0, 1, 1]},
       {"easy": [3], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]
RANKS = np.array([[2, 1, 5, 6, 0, 4, 3, 7],
                  [3, 0, 1, 2, 4, 5, 6, 7]])


def test_settings_relabel():
    easy, medium, hard = (setting_ground_truth(GND, s)[0] for s in ("easy", "medium", "hard"))
    assert sorted(easy["ok"]) == [1, 4] and sorted(easy["junk"]) == [2, 6]
    assert sorted(medium["ok"]) == [1, 4, 6] and sorted(medium["junk"]) == [2]
    assert sorted(hard["ok"]) == [6] and sorted(hard["junk"]) == [1, 2, 4]


def test_map_by_hand():
    # easy, query 0: junk 2 and 6 dropped -> [1, 5, 0, 4, 3, 7], positives at 0-based ranks 0 and 3:
    #   trapezoids (1 + 1) / 2 + (1/3 + 2/4) / 2 = 17/12, over 2 positives -> 17/24
    assert revisited_ap(RANKS[0], [1, 4], [2, 6]) == pytest.approx(17 / 24)
    # the non-interpolated AP of the same list is (1/1 + 2/4) / 2 = 0.75: the protocol's AP differs
    assert average_precision([1, 0, 0, 1, 0, 0]) == pytest.approx(0.75)
    # medium, query 0: junk 2 dropped -> positives 1, 6, 4 at ranks 0, 2, 4:
    #   (1 + (1/2 + 2/3) / 2 + (2/4 + 3/5) / 2) / 3
    ap_medium = (1 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3
    # hard, query 0: 2, 1, 4 dropped -> [5, 6, 0, 3, 7], the positive at rank 1: (0 + 1/2) / 2 = 1/4
    res = revisited_map(RANKS, GND)
    assert res["easy"]["mAP"] == pytest.approx((17 / 24 + 1) / 2)
    assert res["medium"]["mAP"] == pytest.approx((ap_medium + 1) / 2)
    assert res["hard"]["mAP"] == pytest.approx(0.25) and res["hard"]["queries"] == 1
    # mP@k: 1-based positive ranks; kq = min(k, last positive rank); easy q0 ranks [1, 4]
    assert res["easy"]["mP@1"] == pytest.approx(1.0)
    assert res["easy"]["mP@5"] == pytest.approx((2 / 4 + 1) / 2)
    assert res["medium"]["mP@5"] == pytest.approx((3 / 5 + 1) / 2)  # medium q0 ranks [1, 3, 5]
    assert res["hard"]["mP@1"] == 0.0 and res["hard"]["mP@10"] == pytest.approx(1 / 2)  # hard q0 rank [2]
    assert np.isnan(revisited_ap(RANKS[1], []))
    with pytest.raises(DinolabError, match="n_queries=2"):
        revisited_map(RANKS[:1], GND)


def test_perfect_and_truncated_lists():
    assert revisited_ap([4, 1, 9, 0], [1, 4], [9]) == pytest.approx(1.0)
    # a positive missing from a truncated list adds nothing: (1 + 1) / 2 / 2
    assert revisited_ap([4, 0, 2], [4, 7]) == pytest.approx(0.5)


def _write_gnd(base, data):
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(data, f)


def test_load_layouts_and_refuse_code(tmp_path):
    data = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [1], "bbx": [1, 2, 3, 4]}]}
    _write_gnd(tmp_path / "datasets" / "roxford5k", data)
    ds = load_revisited(tmp_path, "roxford5k")
    assert ds.imlist == ["a", "b"] and ds.image_path("q") == tmp_path / "datasets" / "roxford5k" / "jpg" / "q.jpg"
    with pytest.raises(DinolabError, match="rparis6k"):
        load_revisited(tmp_path, "rparis6k")
    with pytest.raises(DinolabError, match="unknown dataset"):
        load_revisited(tmp_path, "holidays")
    evil = tmp_path / "evil" / "gnd_roxford5k.pkl"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": print}))
    with pytest.raises(DinolabError, match="refusing to load .*gnd_roxford5k.pkl: it pickles builtins.print"):
        load_revisited(tmp_path / "evil", "roxford5k")


def test_cli_end_to_end(tmp_path):
    """Database of two colour families; query regions cut by bbx from larger images; full pipeline vs brute force."""
    from dinolab.data.transforms import make_classification_transform
    from dinolab.eval.features import extract_features
    from dinolab.models import create_model, save_official

    rng = np.random.default_rng(0)
    base = tmp_path / "roxford5k"
    (base / "jpg").mkdir(parents=True)
    colours = [(220, 40, 40)] * 3 + [(40, 40, 220)] * 3
    for i, c in enumerate(colours):
        arr = np.clip(np.array(c) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(base / "jpg" / f"db{i}.jpg", quality=95)
    for q, c in enumerate([(220, 40, 40), (40, 40, 220)]):
        arr = np.full((64, 64, 3), 128, np.uint8)  # grey frame, coloured region inside the bbx
        arr[8:48, 12:60] = np.clip(np.array(c) + rng.normal(0, 25, (40, 48, 3)), 0, 255)
        Image.fromarray(arr).save(base / "jpg" / f"q{q}.jpg", quality=95)
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [], "bbx": [12.0, 8.0, 60.0, 48.0]},
           {"easy": [3], "hard": [4, 5], "junk": [0], "bbx": [12.0, 8.0, 60.0, 48.0]}]
    _write_gnd(base, {"imlist": [f"db{i}" for i in range(6)], "qimlist": ["q0", "q1"], "gnd": gnd})
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch8", depth=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.fill_(1.0)
    ckpt = save_official(model, tmp_path / "m.pth")
    out = tmp_path / "run"
    assert main(["index", "revisited", "--root", str(tmp_path), "--dataset", "roxford5k", "--model", str(ckpt),
                 "--resize", "32", "--crop", "32", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    # independent: crop the queries by hand, embed, rank with numpy
    tf = make_classification_transform(32, 32)
    db = extract_features(model, [base / "jpg" / f"db{i}.jpg" for i in range(6)], transform=tf, progress=False)
    crops = [Image.open(base / "jpg" / f"q{q}.jpg").convert("RGB").crop((12, 8, 60, 48)) for q in range(2)]
    qf = extract_features(model, crops, transform=tf, progress=False)
    d = torch.nn.functional.normalize(db.cls, dim=1).numpy()
    qn = torch.nn.functional.normalize(qf.cls, dim=1).numpy()
    ranks = np.argsort(-(qn @ d.T), axis=1, kind="stable")
    expected = revisited_map(ranks, gnd)
    for s in ("easy", "medium", "hard"):
        assert res[s]["mAP"] == pytest.approx(expected[s]["mAP"], abs=1e-6)
    assert res["easy"]["mAP"] > 0.8  # the colour families separate even with a random backbone
    assert res["database"] == 6 and res["queries"] == 2
    # whole images (no centre crop), sides rounded to the patch size, one image per batch
    assert main(["index", "revisited", "--root", str(base), "--model", str(ckpt), "--resize", "32",
                 "--device", "cpu", "--out", str(tmp_path / "run2"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["transform"]["crop"] is None
