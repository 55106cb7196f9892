"""knnmem: approximate kNN key/value memories for kNN-augmented attention.

mem = knnmem.Memory(shape=(batch, heads), capacity=65536, key_dim=128)
mem.add(keys, values)                    # [*shape, T, d] each, FIFO
res = mem.search(queries, k=32, recall_target=0.9)
res.scores, res.indices, res.keys, res.values, res.mask
"""

from . import eval, ops
from ._core import get_num_threads, set_num_threads
from .memory import Memory, SearchResult

__all__ = ["Memory", "SearchResult", "ops", "eval", "get_num_threads", "set_num_threads"]
__version__ = "0.1.0"
