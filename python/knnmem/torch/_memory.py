"""KNNMemory: a grid of FIFO key/value memories in registered buffers, searched and
updated through the custom ops torch.ops.knnmem.*."""

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .._arrays import as_array, check_dense_tensor
from .._contract import (
    METRICS,
    PRECISIONS,
    SearchResult,
    check_fields,
    check_row_dtype,
    check_search_args,
    check_sizes,
    normalize_shape,
    select_cells,
)
from ..memory import grid_mask  # the index forms of clear(), as knnmem.Memory.clear takes them
from . import _ops  # noqa: F401  (registers torch.ops.knnmem.*, which the methods call)

__all__ = ["KNNMemory"]


@torch.compiler.assume_constant_result
def _search_args(k: Any, recall_target: Any, capacity: int) -> tuple[int, float]:
    """check_search_args, which torch.compile calls while tracing, with the (constant)
    arguments, instead of tracing into it: it calls the C++ core
    (knnmem._core.check_search_options), which dynamo cannot trace (a graph break)."""
    return check_search_args(k, recall_target, capacity)


def _rows_first(x: Any, shape: tuple, name: str, extra: bool = False, view: bool = False) -> Any:
    """x [*shape, rows, cols] (with extra: [*shape, rows, k, cols]) as [S, rows, ...]
    for the ops, whose sub-grid is flat; a view where x allows one (with view: always,
    else a RuntimeError from torch)."""
    lead = len(shape)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    tail = 3 if extra else 2
    if x.dim() != lead + tail or tuple(x.shape[:lead]) != shape:
        raise ValueError(
            f"{name}: expected a tensor whose leading dims are the selected sub-grid "
            f"{shape}, got shape {tuple(x.shape)}"
        )
    flat = (math.prod(shape), *x.shape[lead:])
    return x.view(flat) if view else x.reshape(flat)


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
    built, buffers on other devices (or CUDA without them) by knnmem.torch_reference.
    Nothing flows back into the memory: add() stores detached rows.

    Args:
        shape: the grid, an int or a tuple of ints (one memory per cell).
        capacity: rows each memory holds (FIFO). key_dim, value_dim: widths of
            the keys and values (value_dim None: key_dim).
        metric: "ip", "cosine" or "l2".
        precision: "float32", or "bfloat16" / "int8" to score the keys rounded to
            that format (2-3x faster searches for blocks of queries at the same
            recall bar; the returned keys stay the stored float32 rows). See
            knnmem.ops.search.
        device: where the buffers are allocated.
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

    def _which(self, which: Any) -> tuple:
        """(flat int64 indices on the memory's device or None, the sub-grid's shape)."""
        if isinstance(which, Tensor):
            which = as_array(which, "which")
        cells, shape = select_cells(which, self.shape)
        if cells is None:
            return None, shape
        return torch.from_numpy(cells).to(self.written.device), shape

    def add(self, keys: Tensor, values: Tensor, *, which: Any = None) -> None:
        """Appends a segment: keys [*shape, T, key_dim], values [*shape, T, value_dim]
        (detached; FIFO; all-or-nothing). which: add to some memories only (a bool
        mask of the grid's shape, or indices as knnmem.Memory.add takes them); keys
        and values then have the sub-grid's shape. On the CPU no other memory is
        read or copied."""
        cells, shape = self._which(which)
        keys, values = keys.detach(), values.detach()
        if cells is not None:
            keys = _rows_first(keys, shape, "keys")
            values = _rows_first(values, shape, "values")
        torch.ops.knnmem.add(self.keys, self.values, self.written, keys, values, cells)

    def search(
        self,
        queries: Tensor,
        k: int = 32,
        recall_target: float = 0.9,
        *,
        fields: Any = None,
        which: Any = None,
        row_dtype: Any = "float32",
        out: Optional[SearchResult] = None,
    ) -> SearchResult:
        """Approximate top-k of queries [*shape, Q, key_dim]; a SearchResult of tensors
        on the memory's device (scores differentiable w.r.t. queries).

        fields: the fields to compute (a name or names); the others are None and cost
            nothing. Where queries require grad and scores are asked for, the keys are
            fetched too (the gradient needs them) but not returned unless asked.
        which: search some memories only (as add); queries and results then have the
            sub-grid's shape.
        row_dtype: torch.float32, torch.bfloat16 or torch.float16 (or their names):
            the dtype of the key and value rows.
        out: a SearchResult of tensors written in place (None where a field is not
            wanted), as knnmem.Memory.search's out; not differentiable. The
            fields are those of out.
        """
        k, recall_target = _search_args(k, recall_target, self.capacity)
        names = check_fields(fields)
        row_dtype = check_row_dtype(row_dtype)
        cells, shape = self._which(which)
        q = queries if cells is None else _rows_first(queries, shape, "queries")
        args = (self.keys, self.values, self.written, q, k, recall_target, self.metric)
        if out is not None:
            if names is not None or row_dtype != "float32":
                raise ValueError("out: give either out or fields / row_dtype (out sets both)")
            if not isinstance(out, tuple) or len(out) != 5:
                raise TypeError(
                    f"out: expected a SearchResult (5 fields), got {type(out).__name__}"
                )
            flat = list(out)
            if cells is not None:  # views of the caller's tensors with the sub-grid flat
                flat = [
                    None
                    if t is None
                    else _rows_first(t, shape, "out", extra=n in (2, 3), view=True)
                    for n, t in enumerate(out)
                ]
            torch.ops.knnmem.search_out(*args, self.precision, cells, *flat)
            return out
        want = set(SearchResult._fields if names is None else names)
        ask = set(want)
        if "scores" in ask and torch.is_grad_enabled() and queries.requires_grad:
            ask.add("keys")  # the gradient of scores needs them
        fields = ",".join(f for f in SearchResult._fields if f in ask)
        raw = torch.ops.knnmem.search(*args, self.precision, fields, row_dtype, cells)
        return SearchResult(
            *(
                (a if cells is None else a.reshape(*shape, *a.shape[1:])) if f in want else None
                for f, a in zip(SearchResult._fields, raw)
            )
        )

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
