"""knnmem.Memory: a grid of FIFO key/value memories held by the C++ core."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _core, _persist, cuda
from ._arrays import as_float32, check_grid_array, framework_of, to_framework
from ._contract import (
    KEY_DTYPES,
    MAX_CAPACITY,
    METRICS,
    PRECISIONS,
    ROW_DTYPES,
    SearchResult,
    cells_first,
    check_fields,
    check_recall_target,
    check_row_dtype,
    check_search_args,
    check_sizes,
    grid_index,
    normalize_shape,
    prepare_out,
    select_cells,
    wrap_result,
)

# The contract's names stay importable from here, where they lived before _contract.
__all__ = [
    "Memory",
    "SearchResult",
    "KEY_DTYPES",
    "MAX_CAPACITY",
    "METRICS",
    "PRECISIONS",
    "ROW_DTYPES",
    "check_recall_target",
    "check_search_args",
    "check_sizes",
    "normalize_shape",
    "grid_mask",
]


class Memory:
    """A grid of independent key/value memories, each a FIFO ring of `capacity` rows.

    Args:
        shape: int or tuple, the grid (e.g. (batch, heads)); one memory per cell.
        capacity: rows each memory holds; older rows are overwritten first.
        key_dim, value_dim: row widths (value_dim defaults to key_dim).
        dtype: key storage. "float32"; "bfloat16" (half the bytes; scored with
            bfloat16 dot products where the CPU has AVX512_BF16); "float16" (half the
            bytes, 11-bit precision, widened to float32 for the dot products; keys
            must lie within +-65504); "int8" (a quarter
            of the bytes: per-row scale, 7-bit queries, integer dot products, VNNI
            where the CPU has it). Keys come back as stored (rounded / dequantised)
            float32; quantised memories choose their bins for a fifth less missing
            recall so that recall against float32 keys stays at the target. Values
            are stored as float32. Inputs of float16, bfloat16, float32 and float64
            are accepted and converted.
        metric: "ip" (inner product), "cosine", or "l2" (scores are -|q - k|^2).
        device: "cpu" (default), or "cuda" / "cuda:N" to hold the memory on a GPU
            (knnmem.cuda; dtype "float32", "bfloat16" or "float16"). CUDA torch
            tensors are used in place and give CUDA tensor results; other inputs are
            copied. See docs/cuda.md.

    Thread safety: searches may run concurrently from many threads; add and
    clear wait for running searches and vice versa, so every call sees the
    memory wholly before or wholly after any other. The GIL is released while
    the core works.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        capacity: int = 65536,
        key_dim: int = 128,
        value_dim: int | None = None,
        dtype: str = "float32",
        metric: str = "ip",
        device: Any = "cpu",
    ) -> None:
        self._shape = normalize_shape(shape)
        self._device = cuda.parse_device(device)
        capacity, key_dim, value_dim = check_sizes(capacity, key_dim, value_dim)
        if not isinstance(dtype, str) and dtype is not None:
            try:
                dtype = np.dtype(dtype).name
            except TypeError:
                raise TypeError(f"dtype: expected one of {KEY_DTYPES}, got {dtype!r}") from None
        if dtype not in KEY_DTYPES:
            raise ValueError(f"dtype: expected one of {KEY_DTYPES}, got {dtype!r}")
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        self._dtype = dtype
        if self._device is not None:
            self._core = cuda.DeviceCore(
                math.prod(self._shape), capacity, key_dim, value_dim, metric, dtype, self._device
            )
            return
        self._core = _core.Memory(
            math.prod(self._shape), capacity, key_dim, value_dim, metric, dtype
        )

    # -- description ------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def capacity(self) -> int:
        return self._core.capacity

    @property
    def key_dim(self) -> int:
        return self._core.key_dim

    @property
    def value_dim(self) -> int:
        return self._core.value_dim

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def metric(self) -> str:
        return self._core.metric

    @property
    def device(self) -> str:
        """ "cpu" or "cuda:N": where the memory's storage lives."""
        return "cpu" if self._device is None else f"cuda:{self._device}"

    @property
    def nbytes(self) -> int:
        """Bytes of storage the memory holds (allocated up front)."""
        return self._core.nbytes

    @property
    def count(self) -> np.ndarray:
        """[*shape] int64: rows each memory holds now (at most capacity)."""
        return self._core.count.reshape(self._shape)

    @property
    def written(self) -> np.ndarray:
        """[*shape] int64: rows added to each memory since its last clear,
        evicted ones included; the next row added gets this position."""
        return self._core.written.reshape(self._shape)

    def __repr__(self) -> str:
        return (
            f"knnmem.Memory(shape={self._shape}, capacity={self.capacity}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, dtype={self._dtype!r}, "
            f"metric={self.metric!r}"
            + ("" if self._device is None else f", device={self.device!r}")
            + ")"
        )

    # -- operations -------------------------------------------------------------
    def add(self, keys: Any, values: Any, *, which: Any = None) -> None:
        """Appends a segment: keys [*shape, T, key_dim], values [*shape, T, value_dim].

        FIFO per memory; if T > capacity only the last `capacity` rows are kept
        (positions still advance by T). All-or-nothing: bad input raises and
        changes nothing.

        which: add to some memories only -- a bool mask of the grid's shape, or
        indices as numpy takes them for a [*shape] array (as for clear); keys and
        values then have the selected sub-grid's shape in place of the grid's
        (e.g. [len(rows), heads, T, key_dim] for which=rows of a (batch, heads)
        grid). Each memory may be selected once. No other memory is read or copied.
        """
        cells, shape = select_cells(which, self._shape)
        if self._device is not None:
            if cells is not None:
                raise ValueError("which: not supported by CUDA memories")
            self._core.add(self._shape, keys, values)
            return
        keys = as_float32(keys, "keys")
        values = as_float32(values, "values")
        t = check_grid_array(keys, "keys", shape, None, self.key_dim, "T", "key_dim")
        check_grid_array(values, "values", shape, t, self.value_dim, "T", "value_dim")
        self._core.add(cells_first(keys), cells_first(values), which=cells)

    def search(
        self,
        queries: Any,
        k: int = 32,
        recall_target: float = 0.9,
        out: SearchResult | None = None,
        *,
        fields: Any = None,
        which: Any = None,
        row_dtype: Any = "float32",
    ) -> SearchResult:
        """Approximate top-k of queries [*shape, Q, key_dim] in their memories.

        recall_target: expected fraction of the exact top-k found, in (0, 1];
        1.0 means exact search. See knnmem.eval.expected_recall.
        fields: the SearchResult fields to compute, e.g. ("scores", "values") or
            "values"; the others are None and cost nothing (keys and values not
            asked for are never read). Default: all five, or, with out=, the
            fields of out that are not None.
        out: a SearchResult whose arrays (numpy arrays or CPU torch tensors) are
            written in place, None where a field is returned new or not wanted.
            Shapes are the result's; key and value arrays may be float32, float16
            or bfloat16 and any view whose rows are equally spaced -- e.g. the two
            halves of one interleaved buffer, buf[..., 0, :] and buf[..., 1, :] of
            a [*shape, Q, k, 2, d] array. A loop that reuses out saves allocating
            (and page-faulting) fresh result memory every step.
        which: search some memories only (see add); queries and results then have
            the sub-grid's shape.
        row_dtype: "float32", "bfloat16" or "float16": the dtype of new key and
            value arrays (rounded to nearest even). bfloat16 results are torch
            bfloat16 tensors for torch queries, ml_dtypes.bfloat16 arrays otherwise.
        """
        framework = framework_of(queries)
        k, recall_target = check_search_args(k, recall_target, self.capacity)
        fields = check_fields(fields)
        row_dtype = check_row_dtype(row_dtype)
        cells, shape = select_cells(which, self._shape)
        if self._device is not None:
            lean = (out, fields, cells) != (None, None, None) or row_dtype != "float32"
            if lean:
                raise ValueError("out, fields, which, row_dtype: not supported by CUDA memories")
            raw = self._core.search(self._shape, queries, k, recall_target)
            if isinstance(raw[0], np.ndarray):
                raw = tuple(to_framework(a, framework) for a in raw)
            return SearchResult(*raw)
        q = as_float32(queries, "queries")
        nq = check_grid_array(q, "queries", shape, None, self.key_dim, "Q", "key_dim")
        core_out, key_dtype, value_dtype = prepare_out(
            out, shape, nq, k, self.key_dim, self.value_dim, row_dtype
        )
        raw = self._core.search(
            cells_first(q),
            k,
            recall_target,
            out=core_out,
            fields=fields,
            which=cells,
            key_dtype=key_dtype,
            value_dtype=value_dtype,
        )
        return wrap_result(raw, shape, framework, out)

    def save(self, path: Any) -> None:
        """Writes the memory to `path` atomically (docs/format.md): a safetensors file
        with knnmem metadata and a sha256 checksum, written to a temporary file in the
        same directory, fsynced, renamed over `path`, and the directory fsynced. A crash
        leaves either the old file or the new one at `path`. Safe while other threads
        use the memory: the state is copied out as one snapshot."""
        _persist.save(self, path)

    @classmethod
    def load(cls, path: Any, mmap: bool = False) -> Memory:
        """Reads a memory written by save; it searches bit-identically to the saved one.
        Every field and the checksum are verified first: a truncated, corrupt, foreign
        or newer-version file raises ValueError naming the file and the problem.
        mmap=True maps the file read-only and copies the tensors from the map into the
        memory's aligned storage (no second in-RAM copy of the file; the file must not
        be modified in place while loading -- save never does that)."""
        return _persist.load(cls, path, mmap=mmap)

    def clear(self, which: Any = None) -> None:
        """Empties memories: all (None), a bool mask of the grid's shape, or indices
        into the grid as numpy takes them for a [*shape] array (an int, a list or
        array of ints for the first axis, a tuple with one per axis, slices).
        O(1) per memory."""
        if which is None:
            self._core.clear(None)
            return
        self._core.clear(grid_mask(which, self._shape).reshape(-1))


def grid_mask(which: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A [*shape] bool array selecting the memories `which` names."""
    index = grid_index(which, shape)
    if isinstance(index, np.ndarray) and index.dtype == bool:
        return index.copy()
    mask = np.zeros(shape, dtype=bool)
    try:
        mask[index] = True
    except (IndexError, OverflowError) as e:
        raise IndexError(f"which: {e} (grid shape {shape})") from None
    return mask
