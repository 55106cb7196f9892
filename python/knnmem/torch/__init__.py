"""PyTorch front end: custom ops, the KNNMemory and MemorizingAttention modules.

Importing it registers custom ops (namespace ``knnmem``). They work on explicit
tensors in the ring layout of knnmem.ops; the memory's tensors are arguments, never
hidden state, so torch.compile, export and checkpoints see everything:

    torch.ops.knnmem.search(keys, values, written, queries, k=32, recall_target=0.9,
                            metric="ip", precision="float32")
        -> (scores, indices, keys, values, mask)
    torch.ops.knnmem.add(keys, values, written, new_keys, new_values)   # mutates the ring
    torch.ops.knnmem.clear(written, mask)                                # mutates written

    keys    [*shape, capacity, key_dim]   float32, C-contiguous
    values  [*shape, capacity, value_dim] float32, C-contiguous
    written [*shape]                      int64: rows added since the last clear

CPU tensors go to the C++ core zero-copy (through ``Tensor.numpy()`` views).
CUDA tensors run the CUDA kernels of knnmem._cuda on torch's current stream
(when knnmem was built with them and a GPU is usable, see knnmem.cuda; float32
scoring); tensors on other devices, CUDA without that build, and CUDA searches
with precision "bfloat16" / "int8" run a pure-torch implementation of the same
strided-bin algorithm (knnmem.torch_reference). use_reference() runs that
implementation on CPU / CUDA tensors too (tests, comparisons).
Each op has a fake (meta) implementation, so torch.compile(fullgraph=True)
traces them without graph breaks. ``scores`` is differentiable with respect to
``queries`` (the memory and the returned keys/values are constants).

Modules:
    KNNMemory(shape, capacity, key_dim, value_dim, metric, *, precision, device)
        a memory grid held in registered buffers (state_dict, .to(device),
        checkpoints); add / search / clear like knnmem.Memory.
    MemorizingAttention(dim, num_heads, batch_size, ...)
        local causal attention plus attention over the top-k of a per-(batch,
        head) kNN memory of past segments, mixed by a learned per-head gate
        (Wu et al., Memorizing Transformers, ICLR 2022).
    ShardedKNNMemory: a memory sharded over the ranks of a torch.distributed
        group along the capacity axis; ddp_ignore_memories: per-rank memories
        under DistributedDataParallel.

Layout (each private module imports only the ones above it in this list):
    _reference    the pure-torch implementation (public as knnmem.torch_reference)
    _checks       the ops' argument checks (metadata only: fake tensors pass them)
    _ops          the custom ops: kernels, fake kernels, autograd, nested-tensor
                  refusals; use_reference()
    _memory       KNNMemory
    _attention    MemorizingAttention
    _distributed  ShardedKNNMemory, ddp_ignore_memories
                  (public as knnmem.torch_distributed too)
"""

from .._contract import SearchResult
from ._attention import MemorizingAttention, at_batch_size
from ._distributed import ShardedKNNMemory, ddp_ignore_memories
from ._memory import KNNMemory
from ._ops import add, clear, search, use_reference

__all__ = [
    "search",
    "add",
    "clear",
    "KNNMemory",
    "MemorizingAttention",
    "at_batch_size",
    "SearchResult",
    "ShardedKNNMemory",
    "ddp_ignore_memories",
    "use_reference",
]
