"""Data-parallel processes: which one this is, its shard of a list, and the few collectives the loop needs.

In a single process every operation is the identity; under `torchrun` / `accelerate launch` they use the process
group accelerate initialised (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Processes":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's items: every `world`-th, starting at `rank` (`unshard` puts them back in order)."""
        return items[self.rank :: self.world]

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def unshard(self, shards: list[list]) -> list:
        """The inverse of `shard`: the per-rank lists of `gather(shard(items))` -> items in their order."""
        out = [None] * sum(len(s) for s in shards)
        for rank, items in enumerate(shards):
            out[rank :: self.world] = items
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
