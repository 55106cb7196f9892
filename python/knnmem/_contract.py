"""The argument contract every front end shares: names of key dtypes, precisions and
metrics, the SearchResult type, and the rules for grid shapes, sizes, k and
recall_target. knnmem.Memory, knnmem.ops, the JAX and PyTorch front ends and the file
loader all check their arguments here (the C++ core checks again what its kernels rely
on), so a rule and its message live in one place."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _core
from ._arrays import INT64_MAX, as_array, check_int, framework_of, int_str, to_framework

KEY_DTYPES = ("float32", "bfloat16", "float16", "int8")
# Formats a search can score float32 rows in (knnmem.ops / jax / torch precision=).
PRECISIONS = ("float32", "bfloat16", "int8")
METRICS = ("ip", "cosine", "l2")


class SearchResult(NamedTuple):
    """Top-k of each query, best first. Shapes for queries [*shape, Q, key_dim]:

    scores  [*shape, Q, k] float32; -inf where no entry. For metric "l2" the
            score is the negated squared distance (higher is nearer).
    indices [*shape, Q, k] int64: position of the row in its memory's stream
            (0 = first row added since the last clear); -1 where no entry.
    keys    [*shape, Q, k, key_dim] float32 (zeros where no entry).
    values  [*shape, Q, k, value_dim] float32 (zeros where no entry).
    mask    [*shape, Q, k] bool: False where no entry (fewer than k rows held).
    """

    scores: Any
    indices: Any
    keys: Any
    values: Any
    mask: Any


def normalize_shape(shape: Any) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(
            f"shape: expected an int or a tuple of ints, got {type(shape).__name__}"
        ) from None
    if len(dims) == 0:
        raise ValueError("shape: expected at least one grid dimension, got ()")
    dims = tuple(check_int(d, "shape", minimum=1, maximum=2**256) for d in dims)
    if math.prod(dims) > INT64_MAX:
        raise MemoryError(
            f"shape: a grid of {int_str(math.prod(dims))} memories cannot be allocated"
        )
    return dims


MAX_CAPACITY = 2**31 - 1  # slots are int32 in the placement tables


def check_sizes(capacity: Any, key_dim: Any, value_dim: Any) -> tuple[int, int, int]:
    """(capacity, key_dim, value_dim) as ints; value_dim None means key_dim."""
    capacity = check_int(capacity, "capacity", minimum=1, maximum=MAX_CAPACITY)
    key_dim = check_int(key_dim, "key_dim", minimum=1)
    value_dim = key_dim if value_dim is None else check_int(value_dim, "value_dim", minimum=1)
    return capacity, key_dim, value_dim


def check_recall_target(recall_target: Any) -> float:
    """recall_target converted to a float: TypeError for non-numbers (bool included).
    The range rule, (0, 1], is the core's (knnmem._core.check_search_options /
    bins_for_search), applied by whatever the value is passed to; only ints beyond a
    float's range, which the core cannot be given, are refused here."""
    real = (int, float, np.integer, np.floating)
    if isinstance(recall_target, (bool, np.bool_)) or not isinstance(recall_target, real):
        raise TypeError(
            f"recall_target: expected a number in (0, 1], got {type(recall_target).__name__}"
        )
    if isinstance(recall_target, (int, np.integer)):
        value = int(recall_target)
        try:
            return float(value)
        except OverflowError:
            shown = int_str(value)
            raise ValueError(f"recall_target: expected a number in (0, 1], got {shown}") from None
    return float(recall_target)


def check_search_args(k: Any, recall_target: Any, capacity: int) -> tuple[int, float]:
    """(k, recall_target) converted and checked against the core's rules."""
    k = check_int(k, "k", maximum=None)
    recall_target = check_recall_target(recall_target)
    if not -INT64_MAX - 1 <= k <= INT64_MAX:  # beyond what the core can be given
        raise ValueError(f"k: expected an integer in [1, capacity={capacity}], got {int_str(k)}")
    _core.check_search_options(k, recall_target, capacity)
    return k, recall_target


FIELDS = SearchResult._fields
# Element types a search can write key and value rows in (row_dtype=, out= arrays).
ROW_DTYPES = ("float32", "bfloat16", "float16")


def check_fields(fields: Any) -> tuple[str, ...] | None:
    """fields= of a search: None (every field, or those of out=), a name, or names of
    SearchResult fields."""
    if fields is None:
        return None
    names = (fields,) if isinstance(fields, str) else fields
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(
            f"fields: expected a name or names among {FIELDS}, got {type(fields).__name__}"
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"fields: expected names (str), got {type(name).__name__}")
        if name not in FIELDS:
            raise ValueError(f"fields: expected names among {FIELDS}, got {name!r}")
    return names


def check_row_dtype(row_dtype: Any) -> str:
    """row_dtype= of a search as a name in ROW_DTYPES (numpy / torch dtypes accepted)."""
    name = row_dtype if isinstance(row_dtype, str) else str(row_dtype).replace("torch.", "")
    if name not in ROW_DTYPES:
        raise ValueError(f"row_dtype: expected one of {ROW_DTYPES}, got {row_dtype!r}")
    return name


def _index_part(x: Any) -> Any:
    """One component of a grid index, checked: ints, int arrays, slices."""
    if x is Ellipsis or isinstance(x, slice):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
        return x
    arr = as_array(x, "which")
    if arr.size == 0 and arr.dtype.kind in "fO":  # [] comes in as float64
        return arr.astype(np.intp)
    if arr.dtype.kind in "iu" or (arr.dtype == object and all(type(v) is int for v in arr.flat)):
        return arr
    raise TypeError(f"which: expected None, a bool mask or integer indices, got dtype {arr.dtype}")


def grid_index(which: Any, shape: tuple[int, ...]) -> Any:
    """`which` (a bool mask of the grid's shape, or indices as numpy takes them for a
    [*shape] array: an int, ints for the first axis, a tuple with one per axis, slices)
    as a numpy index into a [*shape] array."""
    if isinstance(which, tuple):
        return tuple(_index_part(x) for x in which)
    arr = None if isinstance(which, slice) or which is Ellipsis else as_array(which, "which")
    if arr is not None and arr.dtype == bool:
        if arr.shape != shape:
            raise ValueError(f"which: expected a bool mask of shape {shape}, got shape {arr.shape}")
        return arr
    return _index_part(which)


def select_cells(which: Any, shape: tuple[int, ...]) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """The memories `which` selects (grid_index): (their flat indices as int64, in
    numpy's order, and the sub-grid's shape, which inputs and results then have in
    place of the grid's), or (None, shape) for None (the whole grid)."""
    if which is None:
        return None, shape
    index = grid_index(which, shape)
    ids = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    try:
        picked = np.asarray(ids[index])
    except (IndexError, OverflowError) as e:
        raise IndexError(f"which: {e} (grid shape {shape})") from None
    return np.ascontiguousarray(picked.reshape(-1)), picked.shape


def cells_first(arr: np.ndarray) -> np.ndarray:
    """[*shape, rows, cols] for the core, which takes any leading dims whose product is
    the number of memories (and names bad values in the caller's coordinates); a
    sub-grid of shape () (one memory) gets a leading axis of 1."""
    return arr if arr.ndim >= 3 else arr[None]


def core_out_array(arr: Any, field: str, fallback: str) -> tuple[Any, str]:
    """A caller's out= array for the core: numpy arrays as they are; CPU torch tensors
    as numpy views (bfloat16 ones as their int16 bits, with the dtype named)."""
    if framework_of(arr) == "torch":
        if arr.device.type != "cpu":
            raise ValueError(f"out: {field} must be a CPU tensor, got device {arr.device}")
        if str(arr.dtype) == "torch.bfloat16":
            import torch

            return arr.detach().view(torch.int16).numpy(), "bfloat16"
        return arr.detach().numpy(), fallback
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"out: {field} must be a numpy array or a torch tensor, got {type(arr)}")
    return arr, fallback


def prepare_out(
    out: Any,
    shape: tuple[int, ...],
    nq: int,
    k: int,
    key_dim: int,
    value_dim: int,
    row_dtype: str,
) -> tuple[tuple | None, str, str]:
    """out= of a search checked against the result's shape [*shape, Q, k, ...] and
    turned into what the core takes: (arrays or None per field, key_dtype, value_dtype)."""
    if out is None:
        return None, row_dtype, row_dtype
    if not isinstance(out, tuple) or len(out) != 5:
        raise TypeError(f"out: expected a SearchResult (5 fields), got {type(out).__name__}")
    dims = {"keys": (key_dim,), "values": (value_dim,)}
    arrays, dtypes = [], {"keys": row_dtype, "values": row_dtype}
    for name, arr in zip(FIELDS, out):
        if arr is None:
            arrays.append(None)
            continue
        core_arr, dtypes[name] = core_out_array(arr, name, dtypes.get(name, row_dtype))
        want = (*shape, nq, k, *dims.get(name, ()))
        if tuple(arr.shape) != want:
            raise ValueError(f"out: {name} must have shape {want}, got {tuple(arr.shape)}")
        arrays.append(core_arr)
    return tuple(arrays), dtypes["keys"], dtypes["values"]


def _bfloat16_view(arr: np.ndarray, framework: str) -> Any:
    """bfloat16 rows the core wrote as uint16 bits, as the framework's bfloat16 type."""
    if framework == "torch":
        import torch

        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(
            "row_dtype='bfloat16' for numpy results needs the ml_dtypes package "
            "(pip install ml_dtypes), or pass out= arrays of uint16 to receive the bits"
        ) from None
    return to_framework(arr.view(ml_dtypes.bfloat16), framework)


def wrap_result(
    raw: tuple,
    shape: tuple[int, ...],
    framework: str,
    out: Any = None,
) -> SearchResult:
    """Reshapes the core's new [G, Q, k, ...] arrays to [*shape, Q, k, ...] in the
    caller's framework; fields written into out= arrays are those arrays, fields not
    asked for None. (New bfloat16 rows come from the core as uint16 bits.)"""
    result = []
    for i, arr in enumerate(raw):
        if arr is None:
            result.append(None)
        elif out is not None and out[i] is not None:
            result.append(out[i])
        else:
            arr = arr.reshape(shape + arr.shape[1:])
            bf16 = arr.dtype == np.uint16
            result.append(_bfloat16_view(arr, framework) if bf16 else to_framework(arr, framework))
    if isinstance(out, SearchResult) and all(a is b for a, b in zip(result, out)):
        return out  # everything was written into out: the caller's object itself
    return SearchResult(*result)
