"""Tensor parallelism as a layout, applied from outside the model (gpt-fast's `apply_tp` idea, written for BLOOM).

Each checkpoint tensor is either replicated or split along one dim into `world` equal parts; rank r keeps part r.
  query_key_value  [3h, h] rows  (column-parallel). BLOOM stores the fused rows head-major, (head, {q,k,v}, head_dim),
                   so a contiguous block of rows is whole heads: rank r gets heads [r*hp, (r+1)*hp) with their q, k, v.
  dense            [h, h]  cols  (row-parallel: each rank holds the input columns of its own heads; partial sums
                   are all-reduced, then the bias is added once).
  dense_h_to_4h    [4h, h] rows  (column-parallel, bias split with it).
  dense_4h_to_h    [h, 4h] cols  (row-parallel, bias after the all-reduce).
  word_embeddings  [V, h]  rows  (vocab-parallel: the input lookup is masked + all-reduced, the tied head gives each
                   rank a slice of the logits, all-gathered). V is padded up to a multiple of world.
  layer norms      replicated.
The model code only calls `all_reduce` / `all_gather_last`, which are no-ops for one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bloom_server.fast.catalog import SPLIT_DIM


def split_dim(name: str) -> int | None:
    for suffix, dim in SPLIT_DIM.items():
        if name.endswith(suffix):
            return dim
    raise KeyError(f"not a BLOOM tensor: {name}")


def shard_range(size: int, rank: int, world: int, pad: bool = False) -> tuple[int, int]:
    """[start, stop) of rank's part of a dim of `size`. Without `pad` the dim must divide evenly (heads, 4h);
    with it (the vocabulary) the last ranks' parts may run short, and the caller pads them to ceil(size/world)."""
    if pad:
        part = -(-size // world)
        return min(rank * part, size), min((rank + 1) * part, size)
    if size % world:
        raise ValueError(f"a dim of {size} does not split over {world} ranks")
    part = size // world
    return rank * part, (rank + 1) * part


@dataclass
class TPGroup:
    """This rank's place in the tensor-parallel group. `group` is a torch.distributed group (None: the default)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def all_reduce(self, x: Any, op: str = "sum") -> Any:
        """Sum (or "max", "min") of x over ranks, in place ([..., h] partial outputs of row-parallel layers; the row
        maxima of int8 scales; the device memory free on the emptiest rank)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(x, op=ops[op], group=self.group)
        return x

    def all_gather_last(self, x: Any) -> Any:
        """[..., n] on each rank -> [..., world * n], rank-major along the last dim (the vocab-parallel logits)."""
        if self.world == 1:
            return x
        import torch
        import torch.distributed as dist

        # Gather into [world * rows, n] (rank-major along dim 0), then lay the ranks' parts side by side.
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty((self.world * rows.shape[0], rows.shape[1]), dtype=x.dtype, device=x.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, rows, group=self.group)
        out = out.view(self.world, *rows.shape).permute(1, 0, 2)
        return out.reshape(*x.shape[:-1], self.world * x.shape[-1])
