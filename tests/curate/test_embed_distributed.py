"""`dinolab embed` sharded over 2 CPU processes (gloo, as under torchrun) writes the same files as one process."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dinolab import distributed as dd
from dinolab.curate import embed as embed_module
from dinolab.curate.embed import embed, load_embeddings
from dinolab.data.transforms import make_classification_transform
from dinolab.models import create_model

TF = make_classification_transform(resize=32, crop=32)
WORLD = 2
KW = {"model_id": "tiny", "transform": TF, "device": "cpu", "progress": False, "pooling": ("cls", "patch_mean"),
      "shard_size": 3, "batch_size": 2, "num_workers": 0}



def _worker(rank: int, port: int, folder: str, weights: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    assert dd.init_distributed(backend="gloo")
    written = []  # the shards this rank embedded
    original = embed_module._write_shard
    embed_module._write_shard = lambda out_, k, *a: (written.append(k), original(out_, k, *a))
    try:
        model = create_model("vit_tiny_patch4", depth=1)
        model.load_state_dict(torch.load(weights))
        res = embed(model, folder, out, **KW)
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump({"count": res.count, "computed": res.shards_computed, "skipped": res.skipped,
                       "written": written}, f)
        dd.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def folder(corrupt_image_folder):
    return corrupt_image_folder


def test_two_process_embed_equals_single_process(folder, tmp_path, monkeypatch, one_thread, free_port):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4", depth=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned children
    mp.spawn(_worker, args=(free_port(), str(folder), str(tmp_path / "w.pt"), str(tmp_path / "dist")),
             nprocs=WORLD, join=True)
    single = embed(model, folder, tmp_path / "single", **KW)
    assert single.count == 12 and [i for i, _ in single.skipped] == ["img05b.jpg"]
    for r in range(WORLD):  # every rank returns the merged result
        info = json.loads((tmp_path / f"dist.rank{r}.json").read_text())
        assert info == {"count": 12, "computed": 5, "skipped": [["img05b.jpg", single.skipped[0][1]]],
                        "written": [0, 2, 4] if r == 0 else [1, 3]}  # shards dealt round-robin
    for name in ("ids.txt", "skipped.txt"):
        assert (tmp_path / "dist" / name).read_text() == (tmp_path / "single" / name).read_text()
    ids_d, arr_d = load_embeddings(tmp_path / "dist")
    ids_s, arr_s = load_embeddings(tmp_path / "single")
    assert ids_d == ids_s and len(ids_d) == 12
    for key in ("cls", "patch_mean"):  # same batches, same thread count: bit-identical
        np.testing.assert_array_equal(arr_d[key], arr_s[key])
    meta = json.loads((tmp_path / "dist" / "meta.json").read_text())
    assert meta["id_root"] == str(folder.resolve()) and not (tmp_path / "dist" / "shards").exists()
    # a finished folder is recognised by one process too (nothing recomputed)
    again = embed(model, folder, tmp_path / "dist", **KW)
    assert again.shards_computed == 0 and again.count == 12
