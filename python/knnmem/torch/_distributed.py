"""torch.distributed: per-rank memories under DDP (ddp_ignore_memories) and a kNN
memory sharded over ranks along the capacity axis (ShardedKNNMemory).

Two ways to run memories under torch.distributed (docs/torch.md has the details):

* Data parallel (no communication): each rank holds a KNNMemory for the batch
  elements it sees. Wrap the model in DistributedDataParallel after
  ``ddp_ignore_memories(model)`` (below) so DDP does not overwrite every rank's
  memories with rank 0's (its buffer broadcast).

* Sharded (ShardedKNNMemory): one logical memory grid of ``capacity`` rows per cell is
  split over the W ranks of a process group, capacity / W rows each. Every rank
  calls add / search / clear with the same arguments (replicated inputs, e.g.
  tensor- or sequence-parallel ranks that hold the same activations). Row p of a
  memory's stream is kept by rank p % W as its local row p // W, so the ranks
  together hold exactly the last ``capacity`` rows, like an unsharded memory.
  A search is a local search (top-k of the shard), an all_gather of the k
  scores and positions of every rank, the same merge on every rank (top-k of
  the W*k candidates; ties: lower rank first), and one all_reduce (sum) that
  assembles the winners' keys and values from the ranks that hold them
  (exact: each entry is one rank's row plus zeros). In exact mode the result
  equals an unsharded memory's (up to the order of tied scores); in approximate
  mode each shard keeps the recall promise for its part of the top-k.
"""

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._contract import SearchResult, check_search_args, check_sizes, normalize_shape
from ._memory import KNNMemory

__all__ = ["ShardedKNNMemory", "ddp_ignore_memories"]


class ShardedKNNMemory(nn.Module):
    """A KNNMemory grid of `capacity` rows per memory, sharded over the ranks of
    `group` (default: the world) along the capacity axis.

    Every rank must make the same calls with the same arguments. add() takes
    segments whose length T is a multiple of the group size (each rank keeps
    the rows r, r + W, ...). search() returns global stream positions and the
    same SearchResult on every rank. The local shard is ``self.local`` (a
    KNNMemory with capacity // W rows); state_dict holds the shard, so
    checkpoint per rank.

    Args:
        shape, capacity, key_dim, value_dim, metric: as for KNNMemory (capacity a
            multiple of the group size; the keys are scored in float32).
        group: the process group (None: the default group, the world).
        device: where the shard's buffers are allocated.
    """

    def __init__(
        self,
        shape: Any,
        capacity: int = 65536,
        key_dim: int = 128,
        value_dim: Optional[int] = None,
        metric: str = "ip",
        *,
        group: Optional[dist.ProcessGroup] = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedKNNMemory: torch.distributed is not initialized "
                "(call torch.distributed.init_process_group first)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shape = normalize_shape(shape)
        self.capacity, self.key_dim, self.value_dim = check_sizes(capacity, key_dim, value_dim)
        if self.capacity % self.world_size:
            raise ValueError(
                f"capacity: expected a multiple of the group size {self.world_size}, "
                f"got {self.capacity}"
            )
        self.metric = metric
        self.local = KNNMemory(
            self.shape,
            self.capacity // self.world_size,
            self.key_dim,
            self.value_dim,
            metric,
            device=device,
        )

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, capacity={self.capacity}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, metric={self.metric!r}, "
            f"rank={self.rank}/{self.world_size}"
        )

    @property
    def written(self) -> Tensor:
        """[*shape] int64: rows added to each (global) memory since its last clear."""
        return self.local.written * self.world_size

    @property
    def count(self) -> Tensor:
        return self.written.clamp(max=self.capacity)

    def add(self, keys: Tensor, values: Tensor) -> None:
        """Appends a segment keys [*shape, T, key_dim] / values [*shape, T, value_dim]
        (the same on every rank; T a multiple of the group size)."""
        t = keys.shape[-2] if keys.dim() >= 2 else 0
        if t % self.world_size:
            raise ValueError(
                f"keys: expected a segment length T that is a multiple of the group size "
                f"{self.world_size} (each rank keeps every {self.world_size}th row), got T={t}"
            )
        r, w = self.rank, self.world_size
        self.local.add(keys[..., r::w, :], values[..., r::w, :])

    def clear(self, which: Any = None) -> None:
        """As KNNMemory.clear (call it on every rank)."""
        self.local.clear(which)

    @torch.no_grad()
    def search(self, queries: Tensor, k: int = 32, recall_target: float = 0.9) -> SearchResult:
        """Top-k of queries [*shape, Q, key_dim] over all shards; the same result on
        every rank, with global stream positions. Results carry no gradient
        (MemorizingAttention recomputes its logits from the returned keys)."""
        k, recall_target = check_search_args(k, recall_target, self.local.capacity)
        w, r = self.world_size, self.rank
        res = self.local.search(queries.detach(), k=k, recall_target=recall_target)
        positions = torch.where(res.mask, res.indices * w + r, torch.full_like(res.indices, -1))
        scores = self._all_gather(res.scores)  # [W, *shape, Q, k]
        indices = self._all_gather(positions)
        # Candidates rank-major along the last axis: [*shape, Q, W * k].
        scores = torch.movedim(scores, 0, -2).flatten(-2)
        indices = torch.movedim(indices, 0, -2).flatten(-2)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        top_scores = torch.gather(scores, -1, order)
        top_indices = torch.gather(indices, -1, order)
        mask = top_indices >= 0
        top_scores = top_scores.masked_fill(~mask, float("-inf"))
        mine = (order // k == r) & mask
        j = torch.where(mine, order % k, torch.zeros_like(order))

        def winners(rows: Tensor) -> Tensor:
            picked = torch.gather(rows, -2, j[..., None].expand(*j.shape, rows.shape[-1]))
            picked = torch.where(mine[..., None], picked, torch.zeros_like(picked)).contiguous()
            dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=self.group)
            return picked

        return SearchResult(top_scores, top_indices, winners(res.keys), winners(res.values), mask)

    def _all_gather(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.stack(parts)


def ddp_ignore_memories(model: nn.Module) -> list[str]:
    """Data-parallel training with per-rank memories: tells DistributedDataParallel
    not to broadcast the memory buffers of `model` (each rank keeps the memories of
    its own batch elements). Call before wrapping the model in DDP; returns the
    names of the buffers it adds (names ignored before stay ignored)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, KNNMemory):
            names += [f"{prefix}.{n}" if prefix else n for n in ("keys", "values", "written")]
    from torch.nn.parallel import DistributedDataParallel

    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, existing + names)
    return names
