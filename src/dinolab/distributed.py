"""Small ``torch.distributed`` helpers that are safe to call in a plain single process.

Processes are started by ``torchrun`` (or SLURM through it), which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init_distributed`` reads them. Without them
(or with ``WORLD_SIZE=1``) everything here is a no-op: rank 0 of a world of 1.

Example (``torchrun --nproc-per-node 2 script.py``)::

    init_distributed()                                  # nccl on CUDA, gloo on CPU
    feats = extract_features(model, "images/")          # each rank embeds a shard; all get the whole
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import Tensor

from dinolab.errors import DinolabError

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank in the default group, 0 when not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group, 1 when not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    ``backend`` defaults to ``nccl`` when CUDA is available (and then selects GPU ``LOCAL_RANK``)
    and ``gloo`` otherwise. Returns True when running with more than one process, False (and does
    nothing) when ``WORLD_SIZE`` is unset or 1. Calling it again once initialised is harmless.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if not dist.is_available():
        raise DinolabError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DinolabError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, which sets "
            f"{', '.join(_TORCHRUN_VARS)} and LOCAL_RANK"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    logger.info("joined process group: rank %d of %d (%s)", get_rank(), get_world_size(), backend)
    return True


def barrier() -> None:
    """Wait for all processes (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes, in place, and return it (the ``Reduce`` of ``dinolab.losses``).

    The identity in a single process. With nccl, ``t`` must live on this process's GPU.
    """
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_uneven(t: Tensor) -> list[Tensor]:
    """Gather ``t`` from every rank when the ranks' first dimensions differ (0 allowed).

    All ranks must pass tensors with the same dtype and trailing shape. Each is padded to the
    longest length, gathered, and trimmed again; the result (one tensor per rank, in rank order)
    lives on ``t``'s device. In a single process it is ``[t]``.
    """
    if t.dim() == 0:
        raise DinolabError("all_gather_uneven needs a tensor with at least one dimension, got a scalar")
    if not is_distributed():
        return [t]
    dev, world = _comm_device(), get_world_size()
    x = t.to(dev)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    lengths = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(max(lengths), 1), *x.shape[1:]))  # at least 1 row: no empty collectives
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:m].to(t.device) for o, m in zip(out, lengths)]


def all_gather_objects(obj: object) -> list[object]:
    """Gather one picklable object from every rank, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
