"""KNNMemory: a grid of FIFO key/value memories in registered buffers, searched and
updated through the custom ops torch.ops.knnmem.*."""

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .._arrays import as_array, check_dense_tensor
from .._contract import (
    METRICS,
    PRECISIONS,
    SearchResult,
    check_search_args,
    check_sizes,
    normalize_shape,
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

    def add(self, keys: Tensor, values: Tensor) -> None:
        """Appends a segment: keys [*shape, T, key_dim], values [*shape, T, value_dim]
        (detached; FIFO; all-or-nothing)."""
        torch.ops.knnmem.add(self.keys, self.values, self.written, keys.detach(), values.detach())

    def search(self, queries: Tensor, k: int = 32, recall_target: float = 0.9) -> SearchResult:
        """Approximate top-k of queries [*shape, Q, key_dim]; a SearchResult of tensors
        on the memory's device (scores differentiable w.r.t. queries)."""
        k, recall_target = _search_args(k, recall_target, self.capacity)
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
