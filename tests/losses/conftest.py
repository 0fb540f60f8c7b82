"""Shared fixtures: one torch thread, and fake all-reduce ranks run in lock-step threads."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor


class LockstepAllReduce:
    """An in-place all-reduce SUM among ``world`` Python threads: rank r calls ``reduce(r)(t)``."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)

    def reduce(self, rank: int) -> Callable[[Tensor], Tensor]:
        def all_reduce_sum(t: Tensor) -> Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()  # everyone has posted
            total = torch.stack([s for s in self.slots]).sum(dim=0)  # same order on every rank
            self.barrier.wait()  # everyone has read before slots are overwritten
            return t.copy_(total)  # in place, like torch.distributed.all_reduce

        return all_reduce_sum


def _run_ranks(fns: list[Callable[[Callable[[Tensor], Tensor]], object]]) -> list[object]:
    """Run ``fns[r](reduce_r)`` for every rank r in its own thread; return their results."""
    comm = LockstepAllReduce(len(fns))
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fns[rank](comm.reduce(rank))
        except BaseException as e:  # noqa: BLE001 (re-raised in the test thread)
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def run_ranks():
    return _run_ranks


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every loss test runs on one thread (the shared ``one_thread`` fixture)."""
