"""knnmem: approximate kNN key/value memories for kNN-augmented attention.

mem = knnmem.Memory(shape=(batch, heads), capacity=65536, key_dim=128)
mem.add(keys, values)                    # [*shape, T, d] each, FIFO
res = mem.search(queries, k=32, recall_target=0.9)
res.scores, res.indices, res.keys, res.values, res.mask
"""

from . import _core, cuda, eval, ops
from ._arrays import check_int
from ._core import get_num_threads
from .memory import Memory, SearchResult


def set_num_threads(num_threads: int) -> None:
    """Size of the core's thread pool (default: the CPU count, or KNNMEM_NUM_THREADS)."""
    _core.set_num_threads(check_int(num_threads, "num_threads", minimum=1, maximum=4096))


__all__ = ["Memory", "SearchResult", "ops", "eval", "cuda", "get_num_threads", "set_num_threads"]
__version__ = "0.1.0"
