"""knnmem for JAX: a memory grid as a pytree, searched by an XLA custom call.

    import knnmem.jax as kj
    state = kj.init((batch, heads), capacity=65536, key_dim=128)
    state = kj.add(state, keys, values)              # [*shape, T, d]; in place under donation
    res = kj.search(state, queries, k=32, recall_target=0.9)
    res.scores, res.indices, res.keys, res.values, res.mask    # like knnmem.Memory.search
    kj.search(state, q, 32, out=res, fields=("scores", "values"), row_dtype=jnp.bfloat16,
              which=mask)                       # lean: see search (and add(..., which=))
    state = kj.reset(state, new_document)            # bool [*shape] (or a leading prefix)

Every function is pure and works under jit, vmap (extra leading batch dimensions on the
state and/or the queries), lax.scan and shard_map. The state is the ring layout of
knnmem.ops (keys [*shape, capacity, key_dim], values [*shape, capacity, value_dim],
written [*shape]): row p of a memory's stream lives in slot slot_of[p % capacity], so
a state fed the same rows as a knnmem.Memory gives bit-identical search results.

search is an XLA FFI custom call on CPU: ``knnmem_search``, whose handler (bindings/
xla_ffi.cpp, part of knnmem._core) runs the same C++ kernels as knnmem.ops.search on
XLA's buffers, zero-copy. On NVIDIA GPUs it is the custom call ``knnmem_search_cuda``
(bindings/xla_ffi_cuda.cpp, part of knnmem._cuda; docs/cuda.md) when knnmem was built
with its CUDA kernels. On TPU it is a Pallas kernel (knnmem.pallas, docs/pallas.md).
Anywhere else, or where a custom call is missing, it runs :func:`search_reference`, a
pure-JAX implementation of the same strided-bin algorithm, which is also the reference
the tests compare the custom calls and the kernel against.

Gradients: a search is a constant with respect to the memory. Indices, mask and the
retrieved keys and values carry no gradient into the memory; ``res.scores`` is
differentiable with respect to the queries (the score of each retrieved key, recomputed
for the tangent), so a loss over memory attention trains the query projection, as in
Memorizing Transformers. :func:`memorizing_attention` is that layer.

Sharding (inside jax.shard_map; see :func:`sharded_search` for a wrapper): split the
grid over a mesh axis and nothing changes (each device searches its own memories). To
spread one memory's capacity over a mesh axis of D devices, pass ``capacity_axis``: the
memory is then D interleaved rings (row p of the stream goes to device p % D), each
device searches its ring with the bins of the global recall target, and the per-device
top-k are merged. Exact searches equal the unsharded ones; approximate ones have at least
the unsharded expected recall.

The modules of this package, one job each (all private; this namespace is the API):

    _reference  the pure-JAX search, the placement tables and the pieces knnmem.pallas
                shares with it (imports nothing else from knnmem.jax, nothing from pallas)
    _ffi        registration of the CPU and CUDA custom calls, and the calls
    _state      MemoryState, init, count, add, reset; argument checks; ring arithmetic
                of a capacity-sharded memory
    _search     search: backend choice, batching rule, gradient rule, capacity merge
    _sharding   partition_specs, sharded_search, sharded_add, sharded_init, save_shards,
                load_shards (one process or one per host)
    _attention  memorizing_attention, bounded_scale(_init)
"""

from __future__ import annotations

# Besides __all__: the constants METRICS, PRECISIONS, IMPLS and PLACEMENT_BLOCK.
from .._contract import METRICS as METRICS
from .._contract import PRECISIONS as PRECISIONS
from .._contract import SearchResult
from ._attention import bounded_scale, bounded_scale_init, memorizing_attention
from ._ffi import _warn_missing_ffi, ffi_available, ffi_cuda_available
from ._reference import PLACEMENT_BLOCK as PLACEMENT_BLOCK
from ._search import IMPLS as IMPLS
from ._search import search, search_reference
from ._sharding import (
    load_shards,
    partition_specs,
    save_shards,
    sharded_add,
    sharded_init,
    sharded_search,
)
from ._state import MemoryState, add, count, init, reset

__all__ = [
    "MemoryState",
    "SearchResult",
    "init",
    "add",
    "reset",
    "search",
    "search_reference",
    "count",
    "memorizing_attention",
    "bounded_scale",
    "bounded_scale_init",
    "partition_specs",
    "sharded_add",
    "sharded_search",
    "sharded_init",
    "save_shards",
    "load_shards",
    "ffi_available",
    "ffi_cuda_available",
]

# The public names report this namespace as their home (help(), pickles of MemoryState).
for _obj in (
    MemoryState,
    init,
    add,
    reset,
    search,
    search_reference,
    count,
    memorizing_attention,
    bounded_scale,
    bounded_scale_init,
    partition_specs,
    sharded_add,
    sharded_search,
    sharded_init,
    save_shards,
    load_shards,
    ffi_available,
    ffi_cuda_available,
):
    _obj.__module__ = __name__
del _obj

_warn_missing_ffi()
