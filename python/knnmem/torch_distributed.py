"""The documented path of knnmem.torch.ShardedKNNMemory (a kNN memory sharded over
the ranks of a torch.distributed group along the capacity axis), which lives in
knnmem.torch._distributed."""

from .torch._distributed import ShardedKNNMemory

__all__ = ["ShardedKNNMemory"]
