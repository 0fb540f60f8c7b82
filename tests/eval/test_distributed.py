"""Sharded extract_features over 2 CPU processes (gloo) equals the single-process run, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from dinolab import distributed as dd
from dinolab.data.transforms import make_classification_transform
from dinolab.errors import DinolabError
from dinolab.eval.features import extract_features
from dinolab.models import create_model

TF = make_classification_transform(resize=32, crop=32)
WORLD = 2



def _worker(rank: int, port: int, folder: str, weights: str, out: str) -> None:
    """One torchrun-like process: env vars -> init_distributed -> sharded and unsharded runs."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    assert dd.init_distributed(backend="gloo")
    try:
        model = create_model("vit_tiny_patch4", depth=1)
        model.load_state_dict(torch.load(weights))
        kw = {"transform": TF, "device": "cpu", "progress": False, "pooling": ("cls", "patch_mean")}
        # 13 images: batch 4 -> 4 batches (2 per rank), 8 -> 2 batches (1 each), 64 -> 1 (rank 0 idle)
        result = {
            (bs, sharded): extract_features(model, folder, batch_size=bs, distributed=None if sharded else False,
                                            **kw)
            for bs in (4, 8, 64) for sharded in (True, False)
        }
        result.update({
            "gathered": dd.all_gather_uneven(torch.arange(rank * 3, dtype=torch.float32).reshape(rank * 3, 1)),
            "rank": dd.get_rank(), "world": dd.get_world_size(),
        })
        dd.barrier()
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def folder(corrupt_image_folder):
    return corrupt_image_folder


def test_sharded_extract_features_equals_single_process(folder, tmp_path, monkeypatch, free_port):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4", depth=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned children
    mp.spawn(_worker, args=(free_port(), str(folder), str(tmp_path / "w.pt"), str(tmp_path)),
             nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    here = extract_features(model, folder, transform=TF, batch_size=4, device="cpu", progress=False,
                            pooling=("cls", "patch_mean"))
    assert len(here.ids) == 12 and [i for i, _ in here.skipped] == ["img05b.jpg"]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"]) == (r, WORLD)
        for bs in (4, 8, 64):
            sharded, single = res[bs, True], res[bs, False]
            assert sharded.ids == single.ids == here.ids, bs
            assert sharded.skipped == single.skipped == here.skipped, bs
            # each batch holds the same images as in the single run: bit-identical features
            assert torch.equal(sharded.cls, single.cls) and torch.equal(sharded.patch_mean, single.patch_mean), bs
            assert sharded.registers is None
            torch.testing.assert_close(single.cls, here.cls)  # another process and thread count: close
        gathered = res["gathered"]
        assert [tuple(g.shape) for g in gathered] == [(0, 1), (3, 1)]
        assert torch.equal(gathered[1].flatten(), torch.arange(3, dtype=torch.float32))
    for bs in (4, 8, 64):
        assert torch.equal(results[0][bs, True].cls, results[1][bs, True].cls)

def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dd.init_distributed() is False and not dd.is_distributed()
    assert (dd.get_rank(), dd.get_world_size()) == (0, 1)
    t = torch.ones(2, 3)
    assert dd.all_gather_uneven(t)[0] is t and dd.all_gather_objects("x") == ["x"]
    dd.barrier()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dd.init_distributed() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(DinolabError, match="launch with torchrun"):
        dd.init_distributed()


def test_distributed_true_without_process_group_says_what_to_do(folder):
    model = create_model("vit_tiny_patch4", depth=1)
    with pytest.raises(DinolabError, match="init_distributed"):
        extract_features(model, folder, transform=TF, device="cpu", progress=False, distributed=True)
