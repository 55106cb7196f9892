"""PyTorch front end: custom ops, the KNNMemory and MemorizingAttention modules.

Custom ops (namespace ``knnmem``) work on explicit tensors in the ring layout of
knnmem.ops; the memory's tensors are arguments, never hidden state, so
torch.compile, export and checkpoints see everything:

    torch.ops.knnmem.search(keys, values, written, queries, k=32, recall_target=0.9,
                            metric="ip") -> (scores, indices, keys, values, mask)
    torch.ops.knnmem.add(keys, values, written, new_keys, new_values)   # mutates the ring
    torch.ops.knnmem.clear(written, mask)                                # mutates written

    keys    [*shape, capacity, key_dim]   float32, C-contiguous
    values  [*shape, capacity, value_dim] float32, C-contiguous
    written [*shape]                      int64: rows added since the last clear

CPU tensors go to the C++ core zero-copy (through ``Tensor.numpy()`` views).
CUDA tensors run the CUDA kernels of knnmem._cuda on torch's current stream
(when knnmem was built with them and a GPU is usable, see knnmem.cuda); tensors
on other devices, or CUDA without that build, run a pure-torch implementation
of the same strided-bin algorithm (knnmem.torch_reference).
Each op has a fake (meta) implementation, so torch.compile(fullgraph=True)
traces them without graph breaks. ``scores`` is differentiable with respect to
``queries`` (the memory and the returned keys/values are constants).

Modules:
    KNNMemory(shape, capacity, key_dim, value_dim, metric)
        a memory grid held in registered buffers (state_dict, .to(device),
        checkpoints); add / search / clear like knnmem.Memory.
    MemorizingAttention(dim, num_heads, batch_size, ...)
        local causal attention plus attention over the top-k of a per-(batch,
        head) kNN memory of past segments, mixed by a learned per-head gate
        (Wu et al., Memorizing Transformers, ICLR 2022).
    ShardedKNNMemory (knnmem.torch_distributed): a memory sharded over ranks
        along the capacity axis.
"""

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _core
from . import cuda as _kcuda
from . import torch_reference as _reference
from ._arrays import as_array, as_float32, check_dense_tensor
from .memory import (
    METRICS,
    PRECISIONS,
    SearchResult,
    check_search_args,
    check_sizes,
    grid_mask,
    normalize_shape,
)

__all__ = [
    "search",
    "add",
    "clear",
    "KNNMemory",
    "MemorizingAttention",
    "SearchResult",
    "ShardedKNNMemory",
    "ddp_ignore_memories",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Device types whose tensors the C++ core serves (zero-copy); the rest run
# knnmem.torch_reference. Tests empty it to run the reference path on CPU.
_CORE_DEVICES = ("cpu",)
# CUDA tensors run the CUDA kernels of knnmem._cuda when they are built and a device
# is usable (knnmem.cuda.available()); tests turn this off to run the reference there.
_CUDA_KERNELS = True


def _use_cuda_kernels(t: Tensor) -> bool:
    return t.device.type == "cuda" and _CUDA_KERNELS and _kcuda.available()


# -- argument checks (metadata only: they run on fake tensors too) ------------------------------


def _shape_str(shape: Any) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_ring(keys: Tensor, values: Tensor, written: Tensor, in_place: bool) -> tuple:
    """Checks a ring's dtypes, shapes and devices; returns (grid shape, capacity,
    key_dim, value_dim)."""
    for t, name, dtype in (
        (keys, "keys", torch.float32),
        (values, "values", torch.float32),
        (written, "written", torch.int64),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        check_dense_tensor(t, name)
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    shape = tuple(written.shape)
    n = len(shape)
    if keys.dim() != n + 2 or tuple(keys.shape[:n]) != shape or 0 in tuple(keys.shape[n:]):
        raise ValueError(
            f"keys: expected shape (*written.shape={_shape_str(shape)}, capacity, key_dim) "
            f"with capacity and key_dim >= 1, got {_shape_str(keys.shape)}"
        )
    capacity, key_dim = keys.shape[-2], keys.shape[-1]
    if (
        values.dim() != n + 2
        or tuple(values.shape[: n + 1]) != (*shape, capacity)
        or values.shape[-1] == 0
    ):
        spelled = ", ".join([*map(str, shape), f"capacity={capacity}", "value_dim"])
        raise ValueError(f"values: expected shape ({spelled}), got {_shape_str(values.shape)}")
    for t, name in ((values, "values"), (written, "written")):
        if t.device != keys.device:
            raise ValueError(
                f"{name}: expected a tensor on {keys.device} (as keys), got {t.device}"
            )
    if in_place:
        for t, name in ((keys, "keys"), (values, "values"), (written, "written")):
            if not t.is_contiguous():
                raise ValueError(
                    f"{name}: expected a contiguous tensor (it is updated in place); "
                    f"keep the ring in tensors made by knnmem.torch.KNNMemory or torch.zeros"
                )
            if t.requires_grad:
                raise ValueError(
                    f"{name}: expected a tensor that does not require grad (it is updated "
                    f"in place, outside autograd)"
                )
    return shape, capacity, key_dim, values.shape[-1]


def _check_rows(
    x: Tensor,
    name: str,
    shape: tuple,
    rows: Optional[int],
    last: int,
    rows_name: str,
    last_name: str,
    device: torch.device,
) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_dense_tensor(x, name)
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
    n = len(shape)
    ok = (
        x.dim() == n + 2
        and tuple(x.shape[:n]) == shape
        and x.shape[-1] == last
        and (rows is None or x.shape[-2] == rows)
    )
    if not ok:
        spelled = [str(s) for s in shape]
        spelled += [rows_name if rows is None else f"{rows_name}={rows}", f"{last_name}={last}"]
        raise ValueError(
            f"{name}: expected shape ({', '.join(spelled)}), got {_shape_str(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (as the memory), got {x.device}")
    return x.shape[-2]


def _check_search(
    keys, values, written, queries, k=32, recall_target=0.9, metric="ip", precision="float32"
) -> tuple:
    shape, capacity, key_dim, value_dim = _check_ring(keys, values, written, in_place=False)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    k, recall_target = check_search_args(k, recall_target, capacity)
    nq = _check_rows(queries, "queries", shape, None, key_dim, "Q", "key_dim", keys.device)
    return shape, nq, k, recall_target, key_dim, value_dim


def _check_add(keys, values, written, new_keys, new_values) -> None:
    shape, _, key_dim, value_dim = _check_ring(keys, values, written, in_place=True)
    t = _check_rows(new_keys, "new_keys", shape, None, key_dim, "T", "key_dim", keys.device)
    _check_rows(new_values, "new_values", shape, t, value_dim, "T", "value_dim", keys.device)


def _check_clear(written: Tensor, mask: Tensor) -> None:
    if not isinstance(written, Tensor) or written.dtype != torch.int64:
        got = getattr(written, "dtype", type(written).__name__)
        raise TypeError(f"written: expected an int64 torch.Tensor, got {got}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(f"mask: expected a bool torch.Tensor, got {got}")
    check_dense_tensor(written, "written")
    check_dense_tensor(mask, "mask")
    if tuple(mask.shape) != tuple(written.shape):
        want, got = _shape_str(written.shape), _shape_str(mask.shape)
        raise ValueError(f"mask: expected shape {want} (as written), got {got}")
    if mask.device != written.device:
        raise ValueError(
            f"mask: expected a tensor on {written.device} (as written), got {mask.device}"
        )


# -- kernels ------------------------------------------------------------------------------------


def _f32(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32).contiguous()


def _f32_numpy(x: Tensor, name: str) -> np.ndarray:
    """A C-contiguous float32 numpy array of a CPU tensor: a view if it already is
    one, else converted by numpy in this thread (a torch conversion would start
    torch's OpenMP threads, which then spin beside the core's threads)."""
    x = x.detach()
    if x.dtype == torch.float32:
        return np.ascontiguousarray(x.numpy())
    if x.dtype == torch.bfloat16:  # float32 with the low 16 bits zero: exact
        bits = np.ascontiguousarray(x.view(torch.int16).numpy()).view(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return as_float32(x.numpy(), name)  # float16, float64 (range-checked)


def _np_ring(keys: Tensor, values: Tensor, written: Tensor) -> tuple:
    """[G, C, d] / [G, C, dv] / [G] numpy views of CPU ring tensors (zero-copy)."""
    grid = written.numel()
    return (
        keys.detach().reshape(grid, keys.shape[-2], keys.shape[-1]).numpy(),
        values.detach().reshape(grid, values.shape[-2], values.shape[-1]).numpy(),
        written.detach().reshape(grid).numpy(),
    )


def _search_cpu(keys, values, written, queries, k, recall_target, metric, precision):
    shape = tuple(written.shape)
    k_np, v_np, w_np = _np_ring(keys.contiguous(), values.contiguous(), written.contiguous())
    q = _f32_numpy(queries, "queries")
    raw = _core.search(k_np, v_np, w_np, q, k, recall_target, metric, precision)
    return tuple(torch.from_numpy(a).reshape(*shape, *a.shape[1:]) for a in raw)


@torch.library.custom_op("knnmem::search", mutates_args=())
def search(
    keys: Tensor,
    values: Tensor,
    written: Tensor,
    queries: Tensor,
    k: int = 32,
    recall_target: float = 0.9,
    metric: str = "ip",
    precision: str = "float32",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-k of queries [*shape, Q, key_dim] in the ring (keys, values, written);
    returns (scores [*shape, Q, k] float32, indices int64 stream positions,
    keys [*shape, Q, k, key_dim], values [*shape, Q, k, value_dim], mask bool),
    as knnmem.ops.search. recall_target=1.0 is exact. precision "bfloat16" or
    "int8" scores the keys rounded to that format (see knnmem.ops.search)."""
    _check_search(keys, values, written, queries, k, recall_target, metric, precision)
    if keys.device.type in _CORE_DEVICES:
        return _search_cpu(keys, values, written, queries, k, recall_target, metric, precision)
    _check_finite(queries, "queries")
    if precision == "float32" and _use_cuda_kernels(keys):
        return _kcuda.torch_search(keys, values, written, queries, k, recall_target, metric)
    # Other devices (and CUDA with precision bfloat16/int8): the same algorithm in torch ops.
    return _reference.search(keys, values, written, queries, k, recall_target, metric, precision)


@search.register_fake
def _(keys, values, written, queries, k=32, recall_target=0.9, metric="ip", precision="float32"):
    shape, nq, k, _, key_dim, value_dim = _check_search(
        keys, values, written, queries, k, recall_target, metric, precision
    )
    dims = (*shape, nq, k)
    return (
        queries.new_empty(dims, dtype=torch.float32),
        queries.new_empty(dims, dtype=torch.int64),
        queries.new_empty((*dims, key_dim), dtype=torch.float32),
        queries.new_empty((*dims, value_dim), dtype=torch.float32),
        queries.new_empty(dims, dtype=torch.bool),
    )


def _search_setup_context(ctx, inputs, output) -> None:
    queries, metric = inputs[3], inputs[6]
    scores, _, keys, _, mask = output
    ctx.mark_non_differentiable(*output[1:4])
    ctx.metric = metric
    ctx.query_dtype = queries.dtype
    ctx.save_for_backward(queries, scores, keys, mask)


def _search_backward(ctx, grad_scores, *_):
    """d scores / d queries with the retrieved keys held constant."""
    queries, scores, keys, mask = ctx.saved_tensors
    q = queries.to(torch.float32)
    g = torch.where(mask, grad_scores.to(torch.float32), 0.0)
    if ctx.metric == "ip":
        grad = torch.einsum("...qk,...qkd->...qd", g, keys)
    elif ctx.metric == "cosine":
        k_norm = keys.norm(dim=-1, keepdim=True)
        k_hat = torch.where(k_norm > 0, keys / k_norm.clamp_min(1e-38), 0.0)
        q_norm = q.norm(dim=-1, keepdim=True)
        q_hat = torch.where(q_norm > 0, q / q_norm.clamp_min(1e-38), 0.0)
        s = torch.where(mask, scores, 0.0)
        along = (
            torch.einsum("...qk,...qkd->...qd", g, k_hat) - (g * s).sum(-1, keepdim=True) * q_hat
        )
        grad = torch.where(q_norm > 0, along / q_norm.clamp_min(1e-38), 0.0)
    else:  # l2: score = -max(0, |q - k|^2)
        g = torch.where(scores < 0, g, 0.0)
        grad = -2.0 * (g.sum(-1, keepdim=True) * q - torch.einsum("...qk,...qkd->...qd", g, keys))
    return None, None, None, grad.to(ctx.query_dtype), None, None, None, None


search.register_autograd(_search_backward, setup_context=_search_setup_context)


def _check_finite(x: Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        at = np.unravel_index(int(bad.reshape(-1).to(torch.uint8).argmax()), tuple(x.shape))
        value = float(x.reshape(-1)[int(np.ravel_multi_index(at, tuple(x.shape)))])
        index = "[" + ", ".join(str(int(i)) for i in at) + "]"
        raise ValueError(f"{name}: expected finite values, got {value} at index {index}")


@torch.library.custom_op("knnmem::add", mutates_args=("keys", "values", "written"))
def add(
    keys: Tensor, values: Tensor, written: Tensor, new_keys: Tensor, new_values: Tensor
) -> None:
    """Appends new_keys [*shape, T, key_dim] / new_values [*shape, T, value_dim] to
    the ring in place (FIFO). All-or-nothing: everything is checked first."""
    _check_add(keys, values, written, new_keys, new_values)
    if keys.device.type in _CORE_DEVICES:
        k_np, v_np, w_np = _np_ring(keys, values, written)
        _core.add(
            k_np, v_np, w_np, _f32_numpy(new_keys, "new_keys"), _f32_numpy(new_values, "new_values")
        )
        return
    nk, nv = _f32(new_keys), _f32(new_values)
    _check_finite(nk, "new_keys")
    _check_finite(nv, "new_values")
    if bool((written < 0).any()):
        raise ValueError("written: expected counts >= 0")
    if bool((written > 2**63 - 1 - nk.shape[-2]).any()):
        raise ValueError("new_keys: adding them overflows the 64-bit position counter")
    if _use_cuda_kernels(keys):
        _kcuda.torch_add(keys, values, written, nk, nv)
        return
    _reference.add(keys, values, written, nk, nv)


@add.register_fake
def _(keys, values, written, new_keys, new_values):
    _check_add(keys, values, written, new_keys, new_values)


@torch.library.custom_op("knnmem::clear", mutates_args=("written",))
def clear(written: Tensor, mask: Tensor) -> None:
    """Empties the memories where mask [*shape] is True (written = 0). O(1) each."""
    _check_clear(written, mask)
    written.masked_fill_(mask, 0)


@clear.register_fake
def _(written, mask):
    _check_clear(written, mask)


# Nested tensors never reach the kernels above (there is none for the nested dispatch
# keys, nor a rule for the jagged subclass): these run the op's checks instead, which
# raise a TypeError naming the nested argument, in place of torch's NotImplementedError.
# (The dispatcher leaves out trailing defaulted arguments, hence _check_search's defaults.)
def _refuse_nested(check):
    def refuse(*args, **kwargs):
        check(*args, **kwargs)
        raise TypeError("expected dense (strided) tensors, got a nested tensor")

    return refuse


try:
    from torch.nested._internal.nested_tensor import NestedTensor as _JaggedTensor
except ImportError:  # pragma: no cover - a torch without jagged nested tensors
    _JaggedTensor = None

_NESTED_LIB = torch.library.Library("knnmem", "IMPL")
for _name, _op, _check in (
    ("search", search, _check_search),
    ("add", add, _check_add),
    ("clear", clear, _check_clear),
):
    _refuse = _refuse_nested(_check)
    for _key in ("NestedTensorCPU", "NestedTensorCUDA", "NestedTensorMeta"):
        _NESTED_LIB.impl(_name, _refuse, _key)
    if _JaggedTensor is not None:
        _op.register_torch_dispatch(
            _JaggedTensor, lambda cls, func, types, args, kwargs, f=_refuse: f(*args, **kwargs)
        )


# -- modules ------------------------------------------------------------------------------------


class KNNMemory(nn.Module):
    """A grid of FIFO key/value memories in registered buffers.

    Buffers (persistent, so in state_dict and checkpoints; .to(device) moves them):
        keys    [*shape, capacity, key_dim]   float32
        values  [*shape, capacity, value_dim] float32
        written [*shape]                      int64

    Keys and values are stored as float32 whatever the module's dtype: ``.half()``
    or ``.to(torch.bfloat16)`` move the buffers but keep them float32, and
    float16/bfloat16/float64 inputs are converted. CPU buffers are searched by
    the C++ core zero-copy; CUDA buffers by the CUDA kernels (knnmem.cuda) when
    built, buffers on other devices by knnmem.torch_reference.
    Nothing flows back into the memory: add() stores detached rows.

    precision: "float32", or "bfloat16" / "int8" to score the keys rounded to that
    format (2-3x faster searches for blocks of queries at the same recall bar; the
    returned keys stay the stored float32 rows). See knnmem.ops.search.
    """

    keys: Tensor
    values: Tensor
    written: Tensor

    def __init__(
        self,
        shape: Any,
        capacity: int = 65536,
        key_dim: int = 128,
        value_dim: Optional[int] = None,
        metric: str = "ip",
        *,
        precision: str = "float32",
        device: Any = None,
    ) -> None:
        super().__init__()
        self.shape = normalize_shape(shape)
        self.capacity, self.key_dim, self.value_dim = check_sizes(capacity, key_dim, value_dim)
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        self.metric, self.precision = metric, precision
        for name, dims, dtype in (
            ("keys", (*self.shape, self.capacity, self.key_dim), torch.float32),
            ("values", (*self.shape, self.capacity, self.value_dim), torch.float32),
            ("written", self.shape, torch.int64),
        ):
            try:
                buf = torch.zeros(dims, dtype=dtype, device=device)
            except RuntimeError as e:
                raise MemoryError(
                    f"{name}: cannot allocate a tensor of shape {dims} ({e})"
                ) from None
            self.register_buffer(name, buf)

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, capacity={self.capacity}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, metric={self.metric!r}, precision={self.precision!r}"
        )

    def _apply(self, fn, recurse=True):  # keeps the storage float32 under .half() etc.
        before = {name: self._buffers[name] for name in ("keys", "values")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return self

    @property
    def count(self) -> Tensor:
        """[*shape] int64: rows each memory holds now (at most capacity)."""
        return self.written.clamp(max=self.capacity)

    def add(self, keys: Tensor, values: Tensor) -> None:
        """Appends a segment: keys [*shape, T, key_dim], values [*shape, T, value_dim]
        (detached; FIFO; all-or-nothing)."""
        torch.ops.knnmem.add(self.keys, self.values, self.written, keys.detach(), values.detach())

    def search(self, queries: Tensor, k: int = 32, recall_target: float = 0.9) -> SearchResult:
        """Approximate top-k of queries [*shape, Q, key_dim]; a SearchResult of tensors
        on the memory's device (scores differentiable w.r.t. queries)."""
        k, recall_target = check_search_args(k, recall_target, self.capacity)
        out = torch.ops.knnmem.search(
            self.keys,
            self.values,
            self.written,
            queries,
            k,
            recall_target,
            self.metric,
            self.precision,
        )
        return SearchResult(*out)

    def clear(self, which: Any = None) -> None:
        """Empties memories: all (None); a bool tensor of the grid's shape, or of a
        prefix of it (e.g. [batch] for a (batch, heads) grid: whole rows); or
        indices as knnmem.Memory.clear takes them. O(1) per memory."""
        if which is None:
            self.written.zero_()
            return
        if isinstance(which, Tensor) and which.dtype == torch.bool:
            check_dense_tensor(which, "which")
            if which.device.type == "meta" and self.written.device.type != "meta":
                raise ValueError(
                    f"which: expected a tensor holding data, got one on {which.device}"
                )
            n = which.dim()
            if n == 0 or tuple(which.shape) != self.shape[:n]:
                raise ValueError(
                    f"which: expected a bool mask of shape {self.shape} or a prefix of it, "
                    f"got shape {tuple(which.shape)}"
                )
            mask = which.to(self.written.device).reshape(
                *which.shape, *([1] * (len(self.shape) - n))
            )
            mask = mask.expand(self.shape).contiguous()
        else:
            if isinstance(which, Tensor):
                which = as_array(which, "which")
            mask = torch.from_numpy(grid_mask(which, self.shape)).to(self.written.device)
        torch.ops.knnmem.clear(self.written, mask)


def _rotate(x: Tensor, base: float, start: int = 0) -> Tensor:
    """Rotary position embedding over the segment axis (-2) of x [..., T, d], the rows
    at positions start .. start + T - 1."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / max(half, 1))
    positions = torch.arange(start, start + t, device=x.device, dtype=torch.float32)
    angles = positions[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class MemorizingAttention(nn.Module):
    """Multi-head attention over the current segment plus a kNN memory of past ones.

    Per head (Wu et al. 2022): queries and keys are L2-normalised and scaled by a
    learned per-head temperature; local attention is causal over the segment
    (rotary positions); memory attention retrieves the top-k keys of each query
    from that (batch element, head)'s memory of *past* segments (searched before
    the segment is added, so a query never sees its own segment), attends over
    them with a softmax over the k entries (no position information), and the
    two are mixed by a learned gate g = sigmoid(b) per head:

        out = g * memory_attention + (1 - g) * local_attention

    (where a memory is still empty, e.g. the first segment of a document, out is
    the local attention alone). The retrieved keys and values are constants;
    gradients flow into the queries (and the temperature and gate). After the
    attention the segment's keys and values are appended (detached).

    With ``context=True`` the local attention also sees the previous segment, as
    in the paper (a Transformer-XL cache): its keys and values, kept detached in
    the module after each call (not in the state_dict), come before the segment's
    with the rotary positions running on, so a query attends to the previous T
    rows and the causal part of its own segment. A reset of a batch element (the
    ``reset`` argument or ``reset()``) hides its context; a batch of another size
    than the context's raises.

    Args:
        dim: model width. num_heads: heads. batch_size: rows of x (one memory per
            batch element and head).
        head_dim: per-head width (default dim // num_heads).
        capacity: rows each memory holds (FIFO). k, recall_target: of the search.
        scale_init: initial temperature of the normalised dot products.
        use_memory: False gives the same layer without a memory (a baseline).
        memory: a memory module to use instead of a KNNMemory (e.g.
            knnmem.torch_distributed.ShardedKNNMemory) with grid (batch_size,
            num_heads) and key_dim = value_dim = head_dim.
        context: local attention over the previous segment too (above).

    forward(x [B, T, dim], reset=None) -> [B, T, dim]; reset: bool [B], True
    where a new document starts with this segment (its memories are cleared
    before the search).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        batch_size: int,
        *,
        head_dim: Optional[int] = None,
        capacity: int = 8192,
        k: int = 32,
        recall_target: float = 0.9,
        scale_init: float = 10.0,
        rotary_base: float = 10000.0,
        bias: bool = False,
        use_memory: bool = True,
        memory: Optional[nn.Module] = None,
        context: bool = False,
        device: Any = None,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        if head_dim < 1:
            raise ValueError(
                f"head_dim: expected >= 1, got {head_dim} (dim={dim}, num_heads={num_heads})"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.batch_size = batch_size
        self.k, self.recall_target = check_search_args(k, recall_target, capacity)
        self.rotary_base = rotary_base
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias, device=device)
        self.out = nn.Linear(inner, dim, bias=bias, device=device)
        self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(scale_init), device=device))
        self.gate = nn.Parameter(torch.zeros(num_heads, device=device))
        self.use_memory = use_memory
        if use_memory and memory is None:
            memory = KNNMemory(
                (batch_size, num_heads), capacity, head_dim, head_dim, "ip", device=device
            )
        if memory is not None and tuple(memory.shape) != (batch_size, num_heads):
            raise ValueError(
                f"memory: expected grid shape {(batch_size, num_heads)}, got {tuple(memory.shape)}"
            )
        self.memory = memory if use_memory else None
        self.context = context
        # previous segment: normalised keys, values [B, H, Tc, d], visible [B]
        self._context: Optional[tuple[Tensor, Tensor, Tensor]] = None

    def reset(self, mask: Optional[Tensor] = None) -> None:
        """Clears the memories (and hides the context) of the batch elements where
        mask [B] is True (all if None)."""
        if self.memory is not None:
            self.memory.clear(mask)
        self._hide_context(mask)

    def _hide_context(self, mask: Optional[Tensor]) -> None:
        if self._context is None:
            return
        keys, values, visible = self._context
        hidden = torch.ones_like(visible) if mask is None else mask.to(visible.device, torch.bool)
        self._context = (keys, values, visible & ~hidden)

    def _local(self, qs: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention over the segment, after the previous one's context if kept."""
        base = self.rotary_base
        if self._context is None:
            return F.scaled_dot_product_attention(
                _rotate(qs, base), _rotate(k, base), v, is_causal=True, scale=1.0
            )
        ck, cv, visible = self._context
        b, _, t, _ = qs.shape
        tc = ck.shape[-2]
        keys = torch.cat([_rotate(ck.to(k.dtype), base), _rotate(k, base, tc)], -2)
        values = torch.cat([cv.to(v.dtype), v], -2)
        causal = torch.ones(t, t, dtype=torch.bool, device=qs.device).tril()
        allowed = torch.cat(
            [visible.view(b, 1, 1, 1).expand(b, 1, t, tc), causal.expand(b, 1, t, t)], -1
        )
        return F.scaled_dot_product_attention(
            _rotate(qs, base, tc), keys, values, attn_mask=allowed, scale=1.0
        )

    def forward(self, x: Tensor, reset: Optional[Tensor] = None) -> Tensor:
        check_dense_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, T, dim={self.dim}), got {_shape_str(x.shape)}")
        if x.device != self.gate.device:
            raise ValueError(
                f"x: expected a tensor on {self.gate.device} (as the module), got {x.device}"
            )
        b, t, _ = x.shape
        if self.memory is not None and b != self.batch_size:
            raise ValueError(f"x: expected batch size {self.batch_size} (one memory each), got {b}")
        if self._context is not None and self._context[0].shape[0] != b:
            raise ValueError(
                f"x: expected batch size {self._context[0].shape[0]} (the previous segment's "
                f"context), got {b}"
            )
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, d]
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        scale = self.log_scale.exp().to(q.dtype).view(1, h, 1, 1)
        qs = q * scale
        if reset is not None:
            self._hide_context(reset)
        local = self._local(qs, k, v)
        if self.context:
            self._context = (
                k.detach(),
                v.detach(),
                torch.ones(b, dtype=torch.bool, device=x.device),
            )
        out = local
        if self.memory is not None:
            if reset is not None:
                self.memory.clear(reset)
            res = self.memory.search(q.detach(), k=self.k, recall_target=self.recall_target)
            mem_k = res.keys.to(q.dtype)
            mem_v = res.values.to(v.dtype)
            logits = torch.einsum("bhtd,bhtkd->bhtk", qs, mem_k)
            logits = logits.masked_fill(~res.mask, torch.finfo(logits.dtype).min)
            weights = torch.softmax(logits, dim=-1) * res.mask
            mem = torch.einsum("bhtk,bhtkd->bhtd", weights, mem_v)
            g = torch.sigmoid(self.gate).to(q.dtype).view(1, h, 1, 1) * res.mask[..., :1]
            out = g * mem + (1 - g) * local
            self.memory.add(k.detach(), v.detach())
        return self.out(out.transpose(1, 2).reshape(b, t, h * d))


def ddp_ignore_memories(model: nn.Module) -> list[str]:
    """Data-parallel training with per-rank memories: tells DistributedDataParallel
    not to broadcast the memory buffers of `model` (each rank keeps the memories of
    its own batch elements). Call before wrapping the model in DDP; returns the
    names ignored."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, KNNMemory):
            names += [f"{prefix}.{n}" if prefix else n for n in ("keys", "values", "written")]
    from torch.nn.parallel import DistributedDataParallel

    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, existing + names)
    return names


# Last: torch_distributed builds on KNNMemory.
from .torch_distributed import ShardedKNNMemory  # noqa: E402
