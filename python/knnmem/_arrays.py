"""Conversion and checking of arguments at the boundary of the API.

Inputs of numpy, torch or JAX come in as float32 numpy arrays (a zero-copy view
where the input already is one); results go back out in the framework the
queries came from. Every message names the argument.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_F32_MAX = float(np.finfo(np.float32).max)
INT64_MAX = 2**63 - 1


def framework_of(x: Any) -> str:
    """'torch', 'jax' or 'numpy', from the type's module (never imports either)."""
    module = type(x).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith(("jax", "jaxlib")):
        return "jax"
    return "numpy"


def _is_tensor(x: Any) -> bool:
    return framework_of(x) == "torch" and hasattr(x, "layout")  # not torch.Size and the like


def check_dense_tensor(x: Any, name: str) -> None:
    """TypeError for a torch tensor without the plain strided layout (sparse, nested,
    mkldnn). Reads metadata only, so fake tensors (torch.compile) pass."""
    if getattr(x, "is_nested", False):
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a nested tensor")
    if str(x.layout) != "torch.strided":
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")


def _torch_numpy(x: Any, name: str, widen: bool = False) -> np.ndarray:
    """The values of torch tensor x as a numpy array (a view where x is a dense CPU
    tensor); widen: float16 / bfloat16 to float32 first. TypeError / ValueError naming
    the argument where x holds no data numpy can take."""
    check_dense_tensor(x, name)
    if x.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor holding data, got one on the meta device")
    x = x.detach()
    if widen:
        x = x.float()
    x = x.cpu().resolve_conj().resolve_neg()
    try:
        return x.numpy()
    except (TypeError, RuntimeError) as e:  # dtypes numpy lacks, tensor subclasses
        raise TypeError(f"{name}: expected a tensor numpy can read, got {x.dtype} ({e})") from None


def as_array(x: Any, name: str) -> np.ndarray:
    """np.asarray(x), with a message naming the argument when it cannot be one."""
    if _is_tensor(x):
        return _torch_numpy(x, name)
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: expected an array, got {type(x).__name__} ({e})") from None


def index_str(index: tuple) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def as_float32(x: Any, name: str) -> np.ndarray:
    """A C-contiguous float32 numpy array holding `x`; TypeError for non-floats,
    ValueError for float64 values outside the float32 range."""
    if _is_tensor(x):
        dtype = str(x.dtype).replace("torch.", "")
        if dtype not in _FLOAT_NAMES:  # before numpy, which lacks float8, qint8, ...
            raise TypeError(
                f"{name}: expected a floating-point array ({', '.join(_FLOAT_NAMES)}), "
                f"got dtype {dtype}"
            )
        x = _torch_numpy(x, name, widen=dtype in ("float16", "bfloat16"))
    arr = as_array(x, name)
    if arr.dtype.name not in _FLOAT_NAMES:
        raise TypeError(
            f"{name}: expected a floating-point array ({', '.join(_FLOAT_NAMES)}), "
            f"got dtype {arr.dtype.name}"
        )
    if arr.dtype == np.float64:
        outside = ~(np.abs(arr) <= _F32_MAX)  # NaN, Inf and finite values float32 cannot hold
        if outside.any():
            at = np.unravel_index(int(np.argmax(outside)), arr.shape)
            value = float(arr[at])
            what = "values within the float32 range" if np.isfinite(value) else "finite values"
            raise ValueError(f"{name}: expected {what}, got {value!r} at index {index_str(at)}")
    return np.asarray(arr, dtype=np.float32, order="C")


def to_framework(arr: np.ndarray, framework: str) -> Any:
    if framework == "torch":
        import torch

        return torch.from_numpy(arr)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(arr)
    return arr


def int_str(value: int) -> str:
    """str(value), or its size where the digits would be too many to read (or for
    str() to make: it refuses more than 4300)."""
    if value.bit_length() <= 1024:
        return str(value)
    return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits"


def check_int(
    value: Any, name: str, minimum: int | None = None, maximum: int | None = INT64_MAX
) -> int:
    """`value` as a Python int; TypeError for non-integers (bool included), ValueError
    outside [minimum, maximum] (None: unbounded)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {int_str(value)}")
    if maximum is not None and value > maximum:
        lo = "" if minimum is None else f"{minimum}"
        raise ValueError(f"{name}: expected an integer in [{lo}, {maximum}], got {int_str(value)}")
    return value


def check_grid_array(
    arr: np.ndarray,
    name: str,
    shape: tuple[int, ...],
    rows: int | None,
    last: int,
    row_name: str,
    last_name: str,
) -> int:
    """Checks arr is [*shape, rows, last]; returns rows (any count when None)."""
    ok = (
        arr.ndim == len(shape) + 2
        and arr.shape[: len(shape)] == shape
        and arr.shape[-1] == last
        and (rows is None or arr.shape[-2] == rows)
    )
    if not ok:
        spelled = [str(s) for s in shape]
        spelled += [row_name if rows is None else f"{row_name}={rows}", f"{last_name}={last}"]
        raise ValueError(f"{name}: expected shape ({', '.join(spelled)}), got {tuple(arr.shape)}")
    return int(arr.shape[-2])
