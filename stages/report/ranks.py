"""torchrun ranks of ``report``: every rank generates its share of a split, then rank 0 alone scores it.

A gloo process group (CPU collectives, on GPU hosts too) carries the two meeting points: rank 0
prepares shared files first (the untrained baseline's weights), and after generation every rank
hands rank 0 the images it could not caption and waits until all predictions are on disk. Without
torchrun (``WORLD_SIZE`` unset or 1) there is one rank and nothing to wait for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")
WAIT = timedelta(hours=12)  # a rank done with its share waits for the slowest one (gloo's default: 30 minutes)


@dataclass
class Ranks:
    rank: int
    world: int
    owns_group: bool = False  # the group was started here (and is ended by close())

    @classmethod
    def start(cls) -> Ranks:
        """This process's rank and world size from torchrun's environment; joins them in a gloo group."""
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        owns = world > 1 and not dist.is_initialized()
        if owns:
            dist.init_process_group("gloo", timeout=WAIT)
        return cls(rank, world, owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then, once it has finished, on the other ranks (which then find its files)."""
        if self.main:
            result = fn()
        self.barrier()
        if not self.main:
            result = fn()
        return result

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank; no rank returns before all have called it."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
