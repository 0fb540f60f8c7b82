"""`dinolab train` end to end on CPU: cpu-smoke run, export through our loader, exact resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli import main
from dinolab.config import load_config
from dinolab.errors import DinolabError
from dinolab.models import load_model
from dinolab.train import loop
from tests.conftest import random_pngs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = random_pngs(tmp_path_factory.mktemp("imgs"), 40, 36, "{i:03d}.png")
    (root / "broken.png").write_bytes(b"not an image")  # counted and skipped, never fatal
    return root


def test_cpu_smoke_run_exports_a_loadable_backbone(images, tmp_path, capsys):
    rc = main(["train", "--config", "cpu-smoke", "--data", str(images), "--no-progress",
               f"train.output_dir={tmp_path}"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["iterations"] == 6 and res["skipped_images"] >= 0
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "teacher_backbone.pth"):
        assert (tmp_path / name).exists(), name
    backbone = load_model(tmp_path / "teacher_backbone.pth")  # our loader, official layout
    assert backbone.patch_size == 4 and len(backbone.blocks) == 2
    out = backbone(torch.randn(2, 3, 32, 32))
    assert out.cls_token.shape == (2, 192)


def test_periodic_knn_evaluation(images, tmp_path):
    labelled = tmp_path / "labelled"
    rng = np.random.default_rng(1)
    for c, rgb in enumerate([(200, 30, 30), (30, 30, 200)]):
        (labelled / str(c)).mkdir(parents=True)
        for i in range(6):
            img = np.clip(np.array(rgb) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(labelled / str(c) / f"{i}.png")
    cfg = load_config("cpu-smoke", [f"train.output_dir={tmp_path / 'run'}", "train.eval_every=3"])
    res = loop.train(cfg, str(images), device="cpu", progress=False, eval_train=str(labelled),
                     eval_test=str(labelled))
    assert [r["iteration"] for r in res["knn"]] == [3, 6]
    assert all(0 <= r["knn_top1"] <= 100 for r in res["knn"])
    assert len((tmp_path / "run" / "knn.jsonl").read_text().splitlines()) == 2


def _teacher(run_dir):
    return torch.load(run_dir / "teacher_backbone.pth", weights_only=True)


def test_resume_after_a_kill_gives_the_same_weights(images, tmp_path):
    cfg_a = load_config("cpu-smoke", [f"train.output_dir={tmp_path / 'a'}"])
    loop.train(cfg_a, str(images), device="cpu", progress=False)
    cfg_b = load_config("cpu-smoke", [f"train.output_dir={tmp_path / 'b'}"])
    loop.train(cfg_b, str(images), device="cpu", progress=False)
    # "kill" run b after its first checkpoint (iteration 3): drop what came later, run again
    (tmp_path / "b" / "checkpoints" / "ckpt-00000006.pt").unlink()
    for name in ("results.json", "teacher_backbone.pth"):
        (tmp_path / "b" / name).unlink()
    loop.train(cfg_b, str(images), device="cpu", progress=False)
    a, b = _teacher(tmp_path / "a"), _teacher(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:  # resume is exact by design: same steps, same inputs, same process and threads -> bit-equal
        assert torch.equal(a[k], b[k]), k


def test_non_finite_losses_stop_the_run_with_advice(images, tmp_path, monkeypatch):
    from dinolab.train.meta_arch import SSLMetaArch

    monkeypatch.setattr(SSLMetaArch, "forward_backward", lambda self, batch, teacher_temp: (torch.tensor(float("nan")), {}))
    monkeypatch.setattr(loop, "MAX_NONFINITE", 3)
    cfg = load_config("cpu-smoke", [f"train.output_dir={tmp_path}"])
    with pytest.raises(DinolabError, match="non-finite"):
        loop.train(cfg, str(images), device="cpu", progress=False)


def test_training_reads_tar_shards(images, tmp_path):
    import tarfile

    from dinolab.train.data import TarMember, tar_members, training_items

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(images.glob("*.png"))
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:03d}.tar", "w") as tf:
            for f in files[s::2]:
                tf.add(f, arcname=f"{s}/{f.name}")
    items = training_items(str(shards))
    assert len(items) == len(files) and isinstance(items[0], TarMember)
    assert items[0].read() == (images / items[0].name.split("/")[1]).read_bytes()
    cfg = load_config("cpu-smoke", [f"train.output_dir={tmp_path / 'run'}"])
    res = loop.train(cfg, str(shards), device="cpu", progress=False)
    assert res["iterations"] == 6 and res["skipped_images"] >= 1  # the broken PNG is in a shard too
    with pytest.raises(DinolabError, match="uncompressed"):
        tar_members([tmp_path / "x.tar.gz"])


HIGHRES = ["highres.iterations=4", "highres.global_size=48", "highres.local_size=24",
           "highres.batch_size_per_gpu=8", "train.checkpoint_every=3"]


def test_highres_phase_switches_crops_and_resumes_exactly(images, tmp_path, monkeypatch):
    from dinolab.train.meta_arch import SSLMetaArch

    seen = []
    original = SSLMetaArch.forward_backward

    def spy(self, batch, teacher_temp):
        g, loc = batch["global_crops"].shape, batch["local_crops"].shape
        seen.append((g[0] // 2, g[-1], loc[0] // 2, loc[-1]))  # images (the broken one is skipped), sizes
        return original(self, batch, teacher_temp=teacher_temp)

    monkeypatch.setattr(SSLMetaArch, "forward_backward", spy)
    cfg_a = load_config("cpu-smoke", HIGHRES + [f"train.output_dir={tmp_path / 'a'}"])
    res = loop.train(cfg_a, str(images), device="cpu", progress=False)
    assert res["iterations"] == 10  # 6 main + 4 high-res
    # main phase: <= 16 images, 2 global crops of 32 px, 2 locals of 16; high-res: <= 8 images, 48 / 24 px
    assert all(n <= 16 and g == 32 and nl == n and loc == 16 for n, g, nl, loc in seen[:6]) and len(seen) == 10
    assert all(n <= 8 and g == 48 and nl == n and loc == 24 for n, g, nl, loc in seen[6:])
    assert sum(n for n, *_ in seen[6:]) >= 30  # at most the one broken image of 40 skipped in 32 draws
    cfg_b = load_config("cpu-smoke", HIGHRES + [f"train.output_dir={tmp_path / 'b'}"])
    loop.train(cfg_b, str(images), device="cpu", progress=False)
    # "kill" run b inside the high-res phase, after its checkpoint at iteration 9
    (tmp_path / "b" / "checkpoints" / "ckpt-00000010.pt").unlink()
    for name in ("results.json", "teacher_backbone.pth"):
        (tmp_path / "b" / name).unlink()
    seen.clear()
    loop.train(cfg_b, str(images), device="cpu", progress=False)
    assert len(seen) == 1 and seen[0][1] == 48
    a, b = _teacher(tmp_path / "a"), _teacher(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
