"""The XLA custom calls: registration of the handlers and the calls themselves.

``knnmem_search`` (platform "cpu") is exported by knnmem._core (bindings/xla_ffi.cpp)
and runs the same C++ kernels as knnmem.ops.search on XLA's buffers, zero-copy: it
writes only the results asked for (the others are given shape (0,)), key and value rows
in the dtype of their results (float32, bfloat16 or float16), searches a sub-grid when
given cells, and writes into operand buffers aliased to its results (out=).
``knnmem_search_cuda`` (platform "CUDA") is exported by knnmem._cuda
(bindings/xla_ffi_cuda.cpp) and runs the CUDA kernels on XLA's stream (docs/cuda.md).
Both are registered when knnmem.jax is imported, each where its module was built with
jax's FFI headers; :func:`ffi_available` / :func:`ffi_cuda_available` say whether they
were.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _core
from .._contract import FIELDS
from ._reference import _offset_table, _search_ref

_FFI_TARGET = "knnmem_search"
_FFI_TARGET_CUDA = "knnmem_search_cuda"
_FFI_ABI_VERSION = 3


# -- registration ----------------------------------------------------------------------------


def _register_ffi() -> str | None:
    """Registers the CPU handler exported by knnmem._core; returns why not, or None."""
    try:
        lib = ctypes.CDLL(_core.__file__)
        handler = lib.KnnmemSearch
        version = lib.KnnmemFfiAbiVersion
    except (OSError, AttributeError):
        return "knnmem._core was built without the XLA FFI handlers (jax was not found)"
    version.restype = ctypes.c_int64
    if version() != _FFI_ABI_VERSION:
        return f"knnmem._core has FFI ABI {version()}, knnmem.jax expects {_FFI_ABI_VERSION}"
    jax.ffi.register_ffi_target(_FFI_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return None


_FFI_MISSING = _register_ffi()


def _register_ffi_cuda() -> str | None:
    """Registers the CUDA handler exported by knnmem._cuda; returns why not, or None."""
    from .. import cuda as _kcuda

    if not _kcuda.built():
        return _kcuda.unavailable_reason()
    try:
        lib = ctypes.CDLL(_kcuda._cuda.__file__)
        handler = lib.KnnmemSearchCuda
    except (OSError, AttributeError):
        return "knnmem._cuda was built without the XLA FFI handler (jax was not found)"
    jax.ffi.register_ffi_target(_FFI_TARGET_CUDA, jax.ffi.pycapsule(handler), platform="CUDA")
    return None


_FFI_CUDA_MISSING = _register_ffi_cuda()


def ffi_cuda_available() -> bool:
    """True when the CUDA custom call is registered (knnmem._cuda built with jax's headers)."""
    return _FFI_CUDA_MISSING is None


def ffi_available() -> bool:
    """True when the CPU custom call is registered (knnmem._core built with jax's headers)."""
    return _FFI_MISSING is None


def _warn_missing_ffi() -> None:  # pragma: no cover - depends on the build
    if _FFI_MISSING is not None:
        warnings.warn(
            f"knnmem.jax: {_FFI_MISSING}; search runs the pure-JAX reference on CPU too",
            RuntimeWarning,
            stacklevel=3,
        )


# -- the calls -------------------------------------------------------------------------------


def _result_types(
    keys, values, written, queries, k, fields=FIELDS, key_dtype="float32", value_dtype="float32"
):
    """Shapes and dtypes of (scores, indices, keys, values, mask) for the queries
    [*grid, Q, key_dim] (grid: the memories searched); a field not among `fields` has
    shape (0,): the handler does not compute it."""
    lead = tuple(queries.shape[:-1]) + (k,)
    types = (
        (lead, jnp.float32),
        (lead, written.dtype),
        (lead + (keys.shape[-1],), jnp.dtype(key_dtype)),
        (lead + (values.shape[-1],), jnp.dtype(value_dtype)),
        (lead, jnp.bool_),
    )
    return tuple(
        jax.ShapeDtypeStruct(shape if name in fields else (0,), dtype)
        for name, (shape, dtype) in zip(FIELDS, types)
    )


def _varying_axes(x: Any) -> frozenset:
    """Mesh axes along which x varies inside shard_map (empty outside)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(t, "vma", ()))


def _vary_like(out, operands) -> tuple:
    # Inside shard_map the results vary along every axis an operand varies along (the
    # custom call's abstract evaluation does not say so).
    axes = frozenset().union(*map(_varying_axes, operands))
    return tuple(
        lax.pcast(o, tuple(sorted(axes - _varying_axes(o), key=str)), to="varying")
        if axes - _varying_axes(o)
        else o
        for o in out
    )


def _search_ffi(
    keys, values, written, queries, cells, outs, k, recall_target, metric, precision, request
):
    """The CPU custom call on keys [*grid, C, d], values, written [*grid] and queries
    [*grid, Q, d] (or, with request.sub_grid, queries [n, Q, d] of the memories cells
    [n] of the flattened grid; else cells is an empty placeholder). Writes the fields of
    `request` (the others come back with shape (0,)); outs are the buffers of the
    fields request.aliased, which the results alias (donated under jit: no new buffer)."""
    aliases = {5 + i: FIELDS.index(name) for i, name in enumerate(request.aliased)}
    call = jax.ffi.ffi_call(
        _FFI_TARGET,
        _result_types(
            keys,
            values,
            written,
            queries,
            k,
            request.fields,
            request.key_dtype,
            request.value_dtype,
        ),
        vmap_method="broadcast_all",
        input_output_aliases=aliases or None,
    )
    out = call(
        keys,
        values,
        written,
        queries,
        cells,
        *outs,
        k=np.int64(k),
        recall_target=np.float64(recall_target),
        metric=metric,
        precision=precision,
    )
    return _vary_like(out, (keys, values, written, queries))


def _search_ffi_cuda(keys, values, written, queries, k, recall_target, metric, precision):
    """The CUDA custom call (bindings/xla_ffi_cuda.cpp) on XLA's stream; its workspace
    is one more result, so XLA allocates it with the others. float32 scoring only:
    other precisions take the reference (docs/cuda.md)."""
    from .. import cuda as _kcuda

    if precision != "float32":
        return _search_ref(keys, values, written, queries, k, recall_target, metric, precision)
    grid = math.prod(written.shape)
    capacity, key_dim = keys.shape[-2], keys.shape[-1]
    ws = _kcuda._cuda.search_workspace_bytes(
        grid, capacity, key_dim, queries.shape[-2], k, recall_target, jnp.dtype(keys.dtype).name
    )
    offset_of = jnp.asarray(_offset_table(capacity))
    call = jax.ffi.ffi_call(
        _FFI_TARGET_CUDA,
        (
            *_result_types(keys, values, written, queries, k),
            jax.ShapeDtypeStruct((max(ws, 1),), jnp.uint8),
        ),
    )
    out = call(
        keys,
        values,
        written,
        queries,
        offset_of,
        k=np.int64(k),
        recall_target=np.float64(recall_target),
        metric=metric,
    )
    return _vary_like(out[:5], (keys, values, written, queries))
