"""`train()` under two gloo processes (what torchrun does): ranks stay in sync, rank 0 writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from dinolab.errors import DinolabError
from dinolab.models import load_model


def _worker(rank: int, port: int, images: str, out: str, parallel: str = "ddp") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dinolab.config import load_config
    from dinolab.train.loop import train

    cfg = load_config("cpu-smoke", [f"train.output_dir={out}", "train.batch_size_per_gpu=8",
                                    f"train.parallel={parallel}"])
    res = train(cfg, images, device="cpu", progress=False)
    torch.save(res, os.path.join(out, f"result-rank{rank}.pt"))
    dist.destroy_process_group()


def _images(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    return images



def test_two_process_training_writes_one_loadable_run(tmp_path, free_port):
    images = _images(tmp_path)
    out = tmp_path / "run"
    mp.start_processes(_worker, args=(free_port(), str(images), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    assert (out / "results.json").exists()
    rank0, rank1 = (torch.load(out / f"result-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["iterations"] == rank1["iterations"] == 6 and "teacher_backbone" in rank0
    assert len(list((out / "checkpoints").glob("ckpt-*.pt"))) == 2  # keep_last=2, written by rank 0 only
    backbone = load_model(out / "teacher_backbone.pth")
    assert backbone(torch.randn(1, 3, 32, 32)).cls_token.shape == (1, 192)


def test_fsdp_training_matches_ddp_and_resumes_in_one_process(tmp_path, free_port):
    """train.parallel=fsdp: same weights as the DDP run; its checkpoint resumes without torchrun."""
    images = _images(tmp_path)
    for parallel in ("ddp", "fsdp"):
        mp.start_processes(_worker, args=(free_port(), str(images), str(tmp_path / parallel), parallel), nprocs=2,
                           join=True, start_method="spawn")
    ddp, fsdp = (load_model(tmp_path / p / "teacher_backbone.pth").state_dict() for p in ("ddp", "fsdp"))
    for name, v in ddp.items():
        torch.testing.assert_close(fsdp[name], v, rtol=1e-4, atol=1e-5, msg=name)
    # the FSDP checkpoint (full state, optimizer keyed by name) resumes in a single process
    from dinolab.config import load_config
    from dinolab.train.loop import train

    (tmp_path / "fsdp" / "checkpoints" / "ckpt-00000006.pt").unlink()
    (tmp_path / "fsdp" / "results.json").unlink()
    cfg = load_config("cpu-smoke", [f"train.output_dir={tmp_path / 'fsdp'}", "train.batch_size_per_gpu=16"])
    with pytest.raises(DinolabError, match=r"train\.batch_size_per_gpu: 8 -> 16"):  # train.parallel may change
        train(cfg, str(images), device="cpu", progress=False)
    # the same global batch (2 x 8) in one process: a change of the per-process batch, accepted when forced
    assert train(cfg, str(images), device="cpu", progress=False, force=True)["iterations"] == 6
