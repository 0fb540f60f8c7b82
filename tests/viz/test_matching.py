"""Patch matching: mutual nearest neighbours against brute force, symmetry, pixel centres, CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dinolab
from dinolab.cli import main
from dinolab.models import save_official
from dinolab.viz.matching import _centres, draw_matches, match_patches, mutual_nearest_neighbours


def _brute_force(f1: np.ndarray, f2: np.ndarray, rows1, rows2) -> set[tuple[int, int]]:
    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    pairs = set()
    for i in rows1:
        j = max(rows2, key=lambda jj: cos(f1[i], f2[jj]))
        if max(rows1, key=lambda ii: cos(f1[ii], f2[j])) == i:
            pairs.add((i, j))
    return pairs


@pytest.mark.parametrize("masked", [False, True])
def test_mutual_nn_equals_brute_force_and_is_symmetric(masked):
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(23, 6, generator=g), torch.randn(31, 6, generator=g)
    m1 = torch.rand(23, generator=g) > 0.3 if masked else None
    m2 = torch.rand(31, generator=g) > 0.3 if masked else None
    i, j, s = mutual_nearest_neighbours(f1, f2, m1, m2)
    rows1 = [r for r in range(23) if m1 is None or m1[r]]
    rows2 = [r for r in range(31) if m2 is None or m2[r]]
    expected = _brute_force(f1.numpy().astype(np.float64), f2.numpy().astype(np.float64), rows1, rows2)
    assert set(zip(i.tolist(), j.tolist())) == expected and len(expected) > 0
    cos = torch.nn.functional.cosine_similarity(f1[i], f2[j])
    torch.testing.assert_close(s, cos, rtol=1e-5, atol=1e-6)
    assert torch.all(s[:-1] >= s[1:])  # best first
    j2, i2, s2 = mutual_nearest_neighbours(f2, f1, m2, m1)
    assert set(zip(i2.tolist(), j2.tolist())) == expected
    torch.testing.assert_close(torch.sort(s2).values, torch.sort(s).values)


def test_mutual_nn_edge_cases():
    f = torch.randn(4, 3)
    i, j, s = mutual_nearest_neighbours(f, f, torch.zeros(4, dtype=torch.bool), None)
    assert len(i) == len(j) == len(s) == 0
    with pytest.raises(ValueError, match=r"\(N1, D\)"):
        mutual_nearest_neighbours(f, torch.randn(4, 5))


def test_patch_centres_in_original_pixels():
    # grid 2 x 3 of 14-px patches on a 28 x 42 network input, original image 84 wide, 56 high (x2)
    rc, xy = _centres(np.array([0, 5]), (2, 3), 14, (28, 42), (84, 56))
    np.testing.assert_array_equal(rc, [[0, 0], [1, 2]])
    np.testing.assert_allclose(xy, [[14.0, 14.0], [70.0, 42.0]])  # (col + 0.5) * 14 * 2, (row + 0.5) * 14 * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("match")
    torch.manual_seed(0)
    model = dinolab.create_model("vit_tiny_patch4", depth=2, img_size=32)
    save_official(model, root / "bb.pth")
    rng = np.random.default_rng(0)
    img = (rng.random((24, 36, 3)) * 255).astype(np.uint8)
    img[6:18, 10:26] = [250, 40, 40]  # a red block in the middle
    Image.fromarray(img).save(root / "a.png")
    Image.fromarray(img[:, ::-1]).save(root / "b.png")
    return root, model


def test_image_matches_itself_patch_for_patch(tiny, one_thread):
    root, model = tiny
    m = match_patches(model, root / "a.png", root / "a.png", short_side=24, device="cpu")
    assert m.grid1 == m.grid2 == (6, 9)
    assert len(m) == 54  # every patch's features are distinct: each is its own mutual nearest neighbour
    np.testing.assert_array_equal(m.idx1, m.idx2)
    np.testing.assert_allclose(m.xy1, m.xy2)
    np.testing.assert_allclose(m.similarity, 1.0, atol=1e-5)
    fg = match_patches(model, root / "a.png", root / "b.png", foreground=True, short_side=24, device="cpu")
    assert fg.mask1.sum() < 54 and all(fg.mask1.flat[i] for i in fg.idx1) and all(fg.mask2.flat[j] for j in fg.idx2)
    draw_matches(root / "a.png", root / "b.png", fg, root / "fg.png")
    assert Image.open(root / "fg.png").size[0] > Image.open(root / "fg.png").size[1]  # side by side


def test_cli_match_writes_png_and_json(tiny, tmp_path, capsys, one_thread):
    root, _ = tiny
    out = tmp_path / "m.png"
    assert main(["match", str(root / "a.png"), str(root / "b.png"), "--model", str(root / "bb.pth"),
                 "--out", str(out), "--short-side", "24", "--max-lines", "5", "--device", "cpu"]) == 0
    assert "mutual nearest-neighbour matches" in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["n_matches"] == len(data["matches"]) > 0 and data["size1"] == [36, 24]
    first = data["matches"][0]
    assert set(first) == {"xy1", "xy2", "patch1", "patch2", "similarity"}
    assert 0 <= first["xy1"][0] <= 36 and 0 <= first["xy2"][1] <= 24
    assert Image.open(out).format == "PNG"


def test_match_of_a_one_pixel_strip_is_bounded(tiny, one_thread):
    """A 1 x 5000 px image became 448 x 2,240,000 px in the dense transform (MemoryError at 5 GB)."""
    _, model = tiny
    strip = Image.new("RGB", (5000, 1), (200, 30, 30))
    m = match_patches(model, strip, strip, short_side=448, device="cpu")
    assert m.grid1 == (1, 2 * 448 // 4)  # one patch tall, the long side capped at 2 x 448 px
    assert len(m) > 0 and m.size1 == (5000, 1)
