"""Argument checks of the torch.ops.knnmem custom ops.

They read metadata only (types, dtypes, layouts, shapes, devices), so the fake
kernels run them on fake tensors too (torch.compile, export) and raise the same
errors as the real kernels. The shared rules (metric and precision names, k,
recall_target) come from knnmem._contract. Values (NaN/Inf) are checked by the
kernels in knnmem.torch._ops, where a tensor holds data.
"""

from typing import Any, Optional

import torch
from torch import Tensor

from .._arrays import check_dense_tensor
from .._contract import (
    METRICS,
    PRECISIONS,
    ROW_DTYPES,
    SearchResult,
    check_fields,
    check_row_dtype,
    check_search_args,
)

# Dtypes the ops take for queries, new_keys and new_values (converted to float32).
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_str(shape: Any) -> str:
    """A shape as the messages spell it: (2, 3), (4,), ()."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_ring(keys: Tensor, values: Tensor, written: Tensor, in_place: bool) -> tuple:
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
            f"keys: expected shape (*written.shape={shape_str(shape)}, capacity, key_dim) "
            f"with capacity and key_dim >= 1, got {shape_str(keys.shape)}"
        )
    capacity, key_dim = keys.shape[-2], keys.shape[-1]
    if (
        values.dim() != n + 2
        or tuple(values.shape[: n + 1]) != (*shape, capacity)
        or values.shape[-1] == 0
    ):
        spelled = ", ".join([*map(str, shape), f"capacity={capacity}", "value_dim"])
        raise ValueError(f"values: expected shape ({spelled}), got {shape_str(values.shape)}")
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


def check_rows(
    x: Tensor,
    name: str,
    shape: tuple,
    rows: Optional[int],
    last: int,
    rows_name: str,
    last_name: str,
    device: torch.device,
) -> int:
    """Checks x [*shape, rows, last] (rows None: any) of a float dtype on `device`;
    returns its row count."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_dense_tensor(x, name)
    if x.dtype not in FLOATS:
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
        raise ValueError(f"{name}: expected shape ({', '.join(spelled)}), got {shape_str(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (as the memory), got {x.device}")
    return x.shape[-2]


ALL_FIELDS = ",".join(SearchResult._fields)
# Row dtypes of the op's key and value results (row_dtype=).
ROW_TORCH_DTYPES = {name: getattr(torch, name) for name in ROW_DTYPES}


def parse_fields(fields: str) -> tuple:
    """The op's fields string ("scores,values": names of SearchResult fields, comma
    separated) as a tuple of 5 bools in SearchResult order."""
    if not isinstance(fields, str):
        raise TypeError(f"fields: expected a comma-separated string, got {type(fields).__name__}")
    names = [f.strip() for f in fields.split(",")]
    check_fields(names)
    return tuple(name in names for name in SearchResult._fields)


def check_which(which: Optional[Tensor], shape: tuple, device: torch.device) -> tuple:
    """The grid the op's inputs and results have: `shape`, or (len(which),) for a
    sub-grid given as a 1-d int64 tensor of flat memory indices (their range, and for
    add their distinctness, are checked where the values are read, by the kernels)."""
    if which is None:
        return shape
    if not isinstance(which, Tensor) or which.dtype != torch.int64 or which.dim() != 1:
        raise TypeError("which: expected a 1-d int64 tensor of memory indices")
    check_dense_tensor(which, "which")
    if which.device != device:
        raise ValueError(
            f"which: expected a tensor on {device} (as the memory), got {which.device}"
        )
    return (which.shape[0],)


def check_search(
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
) -> tuple:
    """Checks the arguments of knnmem::search; returns (grid shape, Q, k, recall_target,
    key_dim, value_dim, fields as 5 bools). The defaults are the op's: the dispatcher
    leaves trailing defaulted arguments out when it calls the nested-tensor refusals
    of _ops. With which, the grid is (len(which),) (queries [len(which), Q, key_dim])."""
    shape, capacity, key_dim, value_dim = check_ring(keys, values, written, in_place=False)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    k, recall_target = check_search_args(k, recall_target, capacity)
    want = parse_fields(fields)
    check_row_dtype(row_dtype)
    shape = check_which(which, shape, keys.device)
    nq = check_rows(queries, "queries", shape, None, key_dim, "Q", "key_dim", keys.device)
    return shape, nq, k, recall_target, key_dim, value_dim, want


def check_add(keys, values, written, new_keys, new_values, which=None) -> None:
    """Checks the arguments of knnmem::add (the ring must be contiguous, no grad)."""
    shape, _, key_dim, value_dim = check_ring(keys, values, written, in_place=True)
    shape = check_which(which, shape, keys.device)
    t = check_rows(new_keys, "new_keys", shape, None, key_dim, "T", "key_dim", keys.device)
    check_rows(new_values, "new_values", shape, t, value_dim, "T", "value_dim", keys.device)


def check_clear(written: Tensor, mask: Tensor) -> None:
    """Checks the arguments of knnmem::clear."""
    if not isinstance(written, Tensor) or written.dtype != torch.int64:
        got = getattr(written, "dtype", type(written).__name__)
        raise TypeError(f"written: expected an int64 torch.Tensor, got {got}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(f"mask: expected a bool torch.Tensor, got {got}")
    check_dense_tensor(written, "written")
    check_dense_tensor(mask, "mask")
    if tuple(mask.shape) != tuple(written.shape):
        want, got = shape_str(written.shape), shape_str(mask.shape)
        raise ValueError(f"mask: expected shape {want} (as written), got {got}")
    if mask.device != written.device:
        raise ValueError(
            f"mask: expected a tensor on {written.device} (as written), got {mask.device}"
        )
