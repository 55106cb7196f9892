"""The custom ops torch.ops.knnmem.search / add / clear: kernels, fake kernels,
autograd, and the refusal of nested tensors.

Importing this module registers the ops (knnmem.torch imports it). Where a call runs:

* tensors on a device type in _CORE_DEVICES (the CPU): the C++ core, zero-copy through
  ``Tensor.numpy()`` views;
* CUDA tensors, when _CUDA_KERNELS is on and knnmem.cuda.available(): knnmem's CUDA
  kernels on torch's current stream (float32 scoring; other precisions run the
  reference);
* anything else: the pure-torch reference (knnmem.torch._reference).

use_reference() switches the first two to the reference for a block (tests, comparisons).
"""

import contextlib
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import _core
from .. import cuda as _kcuda
from .._arrays import as_float32
from .._contract import SearchResult, core_out_array
from . import _reference
from ._checks import (
    ALL_FIELDS,
    ROW_TORCH_DTYPES,
    check_add,
    check_clear,
    check_search,
    parse_fields,
)

__all__ = ["search", "search_out", "add", "clear", "use_reference"]

# Device types whose tensors the C++ core serves (zero-copy); the rest run the reference.
_CORE_DEVICES: tuple[str, ...] = ("cpu",)
# CUDA tensors run the CUDA kernels of knnmem._cuda when they are built and a device is
# usable (knnmem.cuda.available()); off: they run the reference.
_CUDA_KERNELS = True
# The device types use_reference() can switch (the others always run the reference).
_SWITCHABLE = ("cpu", "cuda")


@contextlib.contextmanager
def use_reference(*device_types: str) -> Iterator[None]:
    """Within the ``with`` block, the custom ops (and the modules built on them) run the
    pure-torch reference (knnmem.torch_reference) for tensors on the given device types:
    "cpu" (instead of the C++ core), "cuda" (instead of the CUDA kernels); both if none
    is given. For tests and comparisons: the switch is process-wide, not per thread, and
    the previous setting comes back when the block exits."""
    for d in device_types:
        if not isinstance(d, str):
            raise TypeError(f"device_types: expected str, got {type(d).__name__}")
        if d not in _SWITCHABLE:
            raise ValueError(f"device_types: expected names in {_SWITCHABLE}, got {d!r}")
    chosen = device_types or _SWITCHABLE
    global _CORE_DEVICES, _CUDA_KERNELS
    saved = _CORE_DEVICES, _CUDA_KERNELS
    _CORE_DEVICES = tuple(d for d in _CORE_DEVICES if d not in chosen)
    _CUDA_KERNELS = _CUDA_KERNELS and "cuda" not in chosen
    try:
        yield
    finally:
        _CORE_DEVICES, _CUDA_KERNELS = saved


def _use_cuda_kernels(t: Tensor) -> bool:
    return t.device.type == "cuda" and _CUDA_KERNELS and _kcuda.available()


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


def _tensor(a: Optional[np.ndarray], shape: tuple, dtype: torch.dtype) -> Tensor:
    """A result of the core as a tensor of the op's grid shape; a field not asked for
    (None) as an empty tensor of its dtype. bfloat16 rows come as uint16 bits."""
    if a is None:
        return torch.empty(0, dtype=dtype)
    if a.dtype == np.uint16:
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return t.reshape(*shape, *a.shape[1:])
    return torch.from_numpy(a).reshape(*shape, *a.shape[1:])


def _field_dtypes(row_dtype: str) -> tuple:
    row = ROW_TORCH_DTYPES[row_dtype]
    return (torch.float32, torch.int64, row, row, torch.bool)


def _search_cpu(
    keys,
    values,
    written,
    queries,
    k,
    recall_target,
    metric,
    precision,
    want,
    row_dtype,
    which,
    shape,
):
    k_np, v_np, w_np = _np_ring(keys.contiguous(), values.contiguous(), written.contiguous())
    q = _f32_numpy(queries, "queries")
    raw = _core.search(
        k_np,
        v_np,
        w_np,
        q,
        k,
        recall_target,
        metric,
        precision,
        fields=tuple(f for f, w in zip(SearchResult._fields, want) if w),
        which=None if which is None else which.detach().numpy(),
        key_dtype=row_dtype,
        value_dtype=row_dtype,
    )
    return tuple(_tensor(a, shape, dt) for a, dt in zip(raw, _field_dtypes(row_dtype)))


def _sub_ring(keys: Tensor, values: Tensor, written: Tensor, which: Tensor) -> tuple:
    """Copies of the memories `which` selects, as a ring of grid (len(which),), for the
    paths without a sub-grid kernel (the reference, CUDA). Indices checked here."""
    grid = written.numel()
    if which.numel() and (int(which.min()) < 0 or int(which.max()) >= grid):
        bad = which[(which < 0) | (which >= grid)][0]
        raise ValueError(f"which: memory {int(bad)} is outside the grid of {grid} memories")
    k = keys.reshape(grid, *keys.shape[-2:])[which]
    v = values.reshape(grid, *values.shape[-2:])[which]
    return k, v, written.reshape(grid)[which]


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
    fields: str = ALL_FIELDS,
    row_dtype: str = "float32",
    which: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-k of queries [*shape, Q, key_dim] in the ring (keys, values, written);
    returns (scores [*shape, Q, k] float32, indices int64 stream positions,
    keys [*shape, Q, k, key_dim], values [*shape, Q, k, value_dim], mask bool),
    as knnmem.ops.search. recall_target=1.0 is exact. precision "bfloat16" or
    "int8" scores the keys rounded to that format (see knnmem.ops.search).

    fields: the results to compute, comma separated ("scores,values"); the others
    come back as empty tensors and cost nothing (keys and values not asked for are
    never read). The gradient of scores needs "keys" among the fields.
    row_dtype: "float32", "bfloat16" or "float16", the dtype of the key and value rows.
    which: a 1-d int64 tensor of flat memory indices: search those memories only;
    queries are then [len(which), Q, key_dim] and results [len(which), Q, k, ...]."""
    shape, *_, want = check_search(
        keys,
        values,
        written,
        queries,
        k,
        recall_target,
        metric,
        precision,
        fields,
        row_dtype,
        which,
    )
    if keys.device.type in _CORE_DEVICES:
        return _search_cpu(
            keys,
            values,
            written,
            queries,
            k,
            recall_target,
            metric,
            precision,
            want,
            row_dtype,
            which,
            shape,
        )
    _check_finite(queries, "queries")
    if which is not None:
        keys, values, written = _sub_ring(keys, values, written, which)
    if precision == "float32" and _use_cuda_kernels(keys):
        full = _kcuda.torch_search(keys, values, written, queries, k, recall_target, metric)
    else:  # other devices (and CUDA with precision bfloat16/int8): torch ops
        full = _reference.search(
            keys, values, written, queries, k, recall_target, metric, precision
        )
    dtypes = _field_dtypes(row_dtype)
    return tuple(
        a.to(dt) if w else a.new_empty(0, dtype=dt) for a, w, dt in zip(full, want, dtypes)
    )


@search.register_fake
def _(
    keys,
    values,
    written,
    queries,
    k=32,
    recall_target=0.9,
    metric="ip",
    precision="float32",
    fields=ALL_FIELDS,
    row_dtype="float32",
    which=None,
):
    shape, nq, k, _, key_dim, value_dim, want = check_search(
        keys,
        values,
        written,
        queries,
        k,
        recall_target,
        metric,
        precision,
        fields,
        row_dtype,
        which,
    )
    dims = (*shape, nq, k)
    sizes = (dims, dims, (*dims, key_dim), (*dims, value_dim), dims)
    return tuple(
        queries.new_empty(size if w else (0,), dtype=dt)
        for size, w, dt in zip(sizes, want, _field_dtypes(row_dtype))
    )


def _search_setup_context(ctx, inputs, output) -> None:
    queries, metric = inputs[3], inputs[6]
    fields = inputs[8] if len(inputs) > 8 else ALL_FIELDS
    scores, _, keys, _, mask = output
    ctx.mark_non_differentiable(*output[1:4])
    # Only scores carry a gradient: no zero gradients are made for the other outputs
    # (for the key and value rows of a big result, a fill of as many bytes).
    ctx.set_materialize_grads(False)
    ctx.metric = metric
    ctx.query_dtype = queries.dtype
    ctx.has_keys = parse_fields(fields)[2]
    ctx.save_for_backward(queries, scores, keys, mask)


def _search_backward(ctx, grad_scores, *_):
    """d scores / d queries with the retrieved keys held constant."""
    if grad_scores is None:  # the scores were not used (set_materialize_grads(False))
        return (None,) * 11
    if not ctx.has_keys:
        raise RuntimeError(
            "knnmem::search: the gradient of scores needs the retrieved keys; include "
            "'keys' in fields (KNNMemory.search does so by itself when queries require grad)"
        )
    queries, scores, keys, mask = ctx.saved_tensors
    keys = keys.to(torch.float32)
    if mask.shape != scores.shape:  # mask not among the fields: misses score -inf
        mask = scores != float("-inf")
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
    return (None, None, None, grad.to(ctx.query_dtype)) + (None,) * 7


search.register_autograd(_search_backward, setup_context=_search_setup_context)


_OUTS = ("out_scores", "out_indices", "out_keys", "out_values", "out_mask")


def _check_search_out(
    keys, values, written, queries, k, recall_target, metric, precision, which, outs
) -> str:
    """Checks the arguments of knnmem::search_out (the kernel's and the fake's); returns
    the fields to compute, those with an out_ tensor, comma separated."""
    fields = ",".join(f for f, t in zip(SearchResult._fields, outs) if t is not None)
    if not fields:
        raise ValueError("out: expected at least one tensor to write")
    shape, nq, k, _, key_dim, value_dim, _ = check_search(
        keys,
        values,
        written,
        queries,
        k,
        recall_target,
        metric,
        precision,
        fields,
        "float32",
        which,
    )
    dims = (*shape, nq, k)
    sizes = (dims, dims, (*dims, key_dim), (*dims, value_dim), dims)
    for name, t, size in zip(SearchResult._fields, outs, sizes):
        if t is not None and tuple(t.shape) != size:
            raise ValueError(f"out: {name} must have shape {size}, got {tuple(t.shape)}")
        if t is not None and t.device != keys.device:
            raise ValueError(
                f"out: {name} must be on {keys.device} (as the memory), got {t.device}"
            )
    return fields


@torch.library.custom_op("knnmem::search_out", mutates_args=_OUTS)
def search_out(
    keys: Tensor,
    values: Tensor,
    written: Tensor,
    queries: Tensor,
    k: int,
    recall_target: float,
    metric: str,
    precision: str,
    which: Optional[Tensor],
    out_scores: Optional[Tensor],
    out_indices: Optional[Tensor],
    out_keys: Optional[Tensor],
    out_values: Optional[Tensor],
    out_mask: Optional[Tensor],
) -> None:
    """knnmem::search written into the caller's tensors: the fields whose out_ tensor
    is given (shapes of the result; scores float32, indices int64, mask bool, key and
    value rows float32, bfloat16 or float16 in any view whose rows are equally
    spaced, e.g. the halves of an interleaved [..., k, 2, d] buffer). On the CPU the
    core writes into them directly; elsewhere the result is computed and copied.
    Not differentiable."""
    outs = (out_scores, out_indices, out_keys, out_values, out_mask)
    fields = _check_search_out(
        keys, values, written, queries, k, recall_target, metric, precision, which, outs
    )
    if keys.device.type not in _CORE_DEVICES:
        full = search(
            keys,
            values,
            written,
            queries,
            k,
            recall_target,
            metric,
            precision,
            fields,
            "float32",
            which,
        )
        for t, a in zip(outs, full):
            if t is not None:
                t.copy_(a)
        return
    k_np, v_np, w_np = _np_ring(keys.contiguous(), values.contiguous(), written.contiguous())
    q = _f32_numpy(queries, "queries")
    # numpy views of the tensors (bfloat16 ones as their bits, with that row dtype)
    arrays, dtypes = zip(
        *(
            core_out_array(t, f, "float32") if t is not None else (None, "float32")
            for f, t in zip(SearchResult._fields, outs)
        )
    )
    key_dtype, value_dtype = dtypes[2], dtypes[3]
    _core.search(
        k_np,
        v_np,
        w_np,
        q,
        k,
        recall_target,
        metric,
        precision,
        out=tuple(arrays),
        which=None if which is None else which.detach().numpy(),
        key_dtype=key_dtype,
        value_dtype=value_dtype,
    )


@search_out.register_fake
def _(keys, values, written, queries, k, recall_target, metric, precision, which, *outs):
    _check_search_out(
        keys, values, written, queries, k, recall_target, metric, precision, which, outs
    )


def _check_finite(x: Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        at = np.unravel_index(int(bad.reshape(-1).to(torch.uint8).argmax()), tuple(x.shape))
        value = float(x.reshape(-1)[int(np.ravel_multi_index(at, tuple(x.shape)))])
        index = "[" + ", ".join(str(int(i)) for i in at) + "]"
        raise ValueError(f"{name}: expected finite values, got {value} at index {index}")


@torch.library.custom_op("knnmem::add", mutates_args=("keys", "values", "written"))
def add(
    keys: Tensor,
    values: Tensor,
    written: Tensor,
    new_keys: Tensor,
    new_values: Tensor,
    which: Optional[Tensor] = None,
) -> None:
    """Appends new_keys [*shape, T, key_dim] / new_values [*shape, T, value_dim] to
    the ring in place (FIFO). All-or-nothing: everything is checked first.
    which: a 1-d int64 tensor of distinct flat memory indices: add to those memories
    only (new_keys [len(which), T, key_dim]); on the CPU the others are not touched."""
    check_add(keys, values, written, new_keys, new_values, which)
    if keys.device.type in _CORE_DEVICES:
        k_np, v_np, w_np = _np_ring(keys, values, written)
        nk, nv = _f32_numpy(new_keys, "new_keys"), _f32_numpy(new_values, "new_values")
        _core.add(
            k_np,
            v_np,
            w_np,
            nk,
            nv,
            which=None if which is None else which.detach().numpy(),
        )
        return
    if which is not None:  # no sub-grid kernel here: add to copies, then write them back
        if which.unique().numel() != which.numel():
            raise ValueError("which: a memory is selected twice; an add writes each memory once")
        k, v, w = _sub_ring(keys, values, written, which)
        add(k, v, w, new_keys, new_values)
        grid = written.numel()
        keys.view(grid, *keys.shape[-2:])[which] = k
        values.view(grid, *values.shape[-2:])[which] = v
        written.view(grid)[which] = w
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
def _(keys, values, written, new_keys, new_values, which=None):
    check_add(keys, values, written, new_keys, new_values, which)


@torch.library.custom_op("knnmem::clear", mutates_args=("written",))
def clear(written: Tensor, mask: Tensor) -> None:
    """Empties the memories where mask [*shape] is True (written = 0). O(1) each."""
    check_clear(written, mask)
    written.masked_fill_(mask, 0)


@clear.register_fake
def _(written, mask):
    check_clear(written, mask)


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
    ("search", search, check_search),
    ("add", add, check_add),
    ("clear", clear, check_clear),
):
    _refuse = _refuse_nested(_check)
    for _key in ("NestedTensorCPU", "NestedTensorCUDA", "NestedTensorMeta"):
        _NESTED_LIB.impl(_name, _refuse, _key)
    if _JaggedTensor is not None:
        _op.register_torch_dispatch(
            _JaggedTensor, lambda cls, func, types, args, kwargs, f=_refuse: f(*args, **kwargs)
        )
