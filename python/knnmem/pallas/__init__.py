"""Pallas kernels for knnmem: the strided-bin search on TPU TensorCores.

``knnmem.jax.search`` uses :func:`search_flat` on TPU backends (and with
``impl="pallas"``, interpreted elsewhere). :func:`bin_winners` is the kernel's result on
its own: each strided bin's best score and lowest slot. See docs/pallas.md.
"""

from ._kernel import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    block_sizes,
    fold_positions,
    num_positions,
    position_winners,
    vmem_bytes,
)
from ._search import bin_winners, search_flat

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "bin_winners",
    "block_sizes",
    "fold_positions",
    "num_positions",
    "position_winners",
    "search_flat",
    "vmem_bytes",
]
