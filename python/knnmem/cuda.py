"""CUDA support: whether it is here, and the device side of knnmem.Memory(device="cuda").

The kernels live in the extension module knnmem._cuda, built when nvcc is found at
install time (CMake option KNNMEM_CUDA) and linked to the CUDA runtime statically:
``import knnmem`` never needs it, and on a machine without a GPU ``available()`` is
False and ``unavailable_reason()`` says why. See docs/cuda.md.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from typing import Any

import numpy as np

from ._arrays import as_float32, check_dense_tensor, check_grid_array, framework_of
from ._contract import KEY_DTYPES as _CONTRACT_KEY_DTYPES

if importlib.util.find_spec(f"{__package__}._cuda") is None:  # built without nvcc
    _cuda = None
    _IMPORT_ERROR = "not built"
else:
    try:
        _cuda = importlib.import_module(f"{__package__}._cuda")
        _IMPORT_ERROR = ""
    except ImportError as e:  # a broken build
        _cuda = None
        _IMPORT_ERROR = str(e)

# The contract's key dtypes that the CUDA kernels store (no int8 kernels yet).
KEY_DTYPES = tuple(d for d in _CONTRACT_KEY_DTYPES if d != "int8")

__all__ = ["available", "unavailable_reason", "device_count", "parse_device", "KEY_DTYPES"]


def built() -> bool:
    """True when knnmem was built with its CUDA kernels (knnmem._cuda imports)."""
    return _cuda is not None


def device_count() -> int:
    """CUDA devices this process can use (0 without the CUDA build, a driver or a GPU)."""
    return _cuda.device_count() if _cuda is not None else 0


def unavailable_reason() -> str | None:
    """None when CUDA memories can be made; otherwise what is missing, in words."""
    if _cuda is None:
        return (
            "knnmem was built without its CUDA kernels (knnmem._cuda: "
            f"{_IMPORT_ERROR or 'not built'}); reinstall where nvcc is on PATH, or with "
            "-C cmake.define.KNNMEM_CUDA=ON to make a missing nvcc an error"
        )
    if _cuda.device_count() == 0:
        status = _cuda.device_status()
        if status.startswith(_NO_DRIVER_ERRORS):
            missing = _driver_missing()
            if missing is not None:
                return f"no CUDA device is usable: no NVIDIA driver found ({missing})"
        return f"no CUDA device is usable ({status})"
    return None


# What the CUDA runtime reports when it finds no driver: without libcuda.so.1 it says
# cudaErrorInsufficientDriver ("CUDA driver version is insufficient for CUDA runtime
# version"), which reads as an old driver; unavailable_reason() then says what is missing.
_NO_DRIVER_ERRORS = ("cudaErrorInsufficientDriver", "cudaErrorNoDevice")
_DRIVER_LIB = "libcuda.so.1"
_DRIVER_PROC = "/proc/driver/nvidia"


def _driver_missing() -> str | None:
    """What shows that no NVIDIA driver is installed, or None when one seems to be
    (Linux only: elsewhere None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        ctypes.CDLL(_DRIVER_LIB)
    except OSError:
        return f"{_DRIVER_LIB} cannot be loaded"
    # WSL2 has the driver library but no /proc/driver/nvidia (its GPU is /dev/dxg).
    if not os.path.exists(_DRIVER_PROC) and not os.path.exists("/dev/dxg"):
        return f"{_DRIVER_PROC} is absent: the nvidia kernel module is not loaded"
    return None


def available() -> bool:
    """True when the CUDA build is present and a CUDA device is usable."""
    return unavailable_reason() is None


def require(what: str):
    """knnmem._cuda, or RuntimeError naming `what` and the reason CUDA is unavailable."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{what}: CUDA is not available: {reason}")
    return _cuda


def parse_device(device: Any) -> int | None:
    """None for the CPU, else the CUDA device index: "cpu", "cuda", "cuda:N",
    a torch.device, or None (CPU)."""
    if device is None:
        return None
    text = str(device)
    if text == "cpu":
        return None
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _is_cuda_tensor(x: Any) -> bool:
    return framework_of(x) == "torch" and getattr(x, "is_cuda", False)


class DeviceCore:
    """The device storage of a knnmem.Memory(device="cuda"), with the interface of
    knnmem._core.Memory (add, search, clear, count, written, sizes).

    numpy (and JAX, and CPU torch) inputs are copied to the device and results come
    back as numpy; CUDA torch tensors on the memory's device are used in place and
    results are CUDA tensors, enqueued on torch's current stream without a host sync
    (inputs are still checked for finite values, which waits for the device).
    """

    def __init__(
        self,
        grid: int,
        capacity: int,
        key_dim: int,
        value_dim: int,
        metric: str,
        dtype: str,
        device: int,
    ) -> None:
        if dtype not in KEY_DTYPES:
            raise ValueError(f"dtype: expected one of {KEY_DTYPES} on CUDA, got {dtype!r}")
        cuda = require("knnmem.Memory(device='cuda')")
        if device >= cuda.device_count():
            raise ValueError(
                f"device: expected a CUDA device index in [0, {cuda.device_count()}), got {device}"
            )
        self._mem = cuda.DeviceMemory(grid, capacity, key_dim, value_dim, metric, dtype, device)
        self.grid = grid

    capacity = property(lambda self: self._mem.capacity)
    key_dim = property(lambda self: self._mem.key_dim)
    value_dim = property(lambda self: self._mem.value_dim)
    metric = property(lambda self: self._mem.metric)
    nbytes = property(lambda self: self._mem.nbytes)
    device = property(lambda self: self._mem.device)

    @property
    def written(self) -> np.ndarray:
        return self._mem.written

    @property
    def count(self) -> np.ndarray:
        return np.minimum(self._mem.written, self.capacity)

    def _tensor(self, x: Any, name: str):
        """A contiguous float32 CUDA tensor on this memory's device, checked finite."""
        import torch

        check_dense_tensor(x, name)
        if x.device.index != self.device:
            raise ValueError(f"{name}: expected a tensor on cuda:{self.device}, got {x.device}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        x = x.detach().to(torch.float32).contiguous()
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            at = tuple(int(i) for i in np.unravel_index(int(bad.reshape(-1).argmax()), x.shape))
            value = float(x[at])
            raise ValueError(f"{name}: expected finite values, got {value} at index {list(at)}")
        return x

    def add(self, shape: tuple, keys: Any, values: Any) -> None:
        if _is_cuda_tensor(keys) and _is_cuda_tensor(values):
            import torch

            k = self._tensor(keys, "keys")
            v = self._tensor(values, "values")
            t = check_grid_array(k, "keys", shape, None, self.key_dim, "T", "key_dim")
            check_grid_array(v, "values", shape, t, self.value_dim, "T", "value_dim")
            stream = torch.cuda.current_stream(k.device).cuda_stream
            self._mem.add_device(k.data_ptr(), v.data_ptr(), t, stream)
            return
        k = as_float32(keys, "keys")
        v = as_float32(values, "values")
        t = check_grid_array(k, "keys", shape, None, self.key_dim, "T", "key_dim")
        check_grid_array(v, "values", shape, t, self.value_dim, "T", "value_dim")
        for arr, name in ((k, "keys"), (v, "values")):
            if not np.isfinite(arr).all():
                raise ValueError(f"{name}: expected finite values")
        self._mem.add_host(k, v, t)

    def search(self, shape: tuple, queries: Any, k: int, recall_target: float) -> Any:
        """Returns (scores, indices, keys, values, mask) shaped [*shape, Q, k, ...]:
        CUDA tensors for CUDA tensor queries, else numpy."""
        if _is_cuda_tensor(queries):
            import torch

            q = self._tensor(queries, "queries")
            nq = check_grid_array(q, "queries", shape, None, self.key_dim, "Q", "key_dim")
            dims = (*shape, nq, k)
            new = lambda *d, dtype=torch.float32: torch.empty(d, dtype=dtype, device=q.device)  # noqa: E731
            out = (
                new(*dims),
                new(*dims, dtype=torch.int64),
                new(*dims, self.key_dim),
                new(*dims, self.value_dim),
                new(*dims, dtype=torch.bool),
            )
            stream = torch.cuda.current_stream(q.device).cuda_stream
            s, i, kk, vv, m = (t.data_ptr() for t in out)
            self._mem.search_device(q.data_ptr(), nq, k, recall_target, s, i, m, kk, vv, stream)
            return out
        q = as_float32(queries, "queries")
        nq = check_grid_array(q, "queries", shape, None, self.key_dim, "Q", "key_dim")
        if not np.isfinite(q).all():
            raise ValueError("queries: expected finite values")
        raw = self._mem.search_host(q, nq, k, recall_target)
        return tuple(a.reshape(shape + a.shape[1:]) for a in raw)

    def clear(self, flat_mask: np.ndarray | None) -> None:
        self._mem.clear_host(None if flat_mask is None else np.ascontiguousarray(flat_mask, bool))


_PLACEMENTS: dict = {}


def placement_tensors(device: Any, capacity: int):
    """(slot_of, offset_of) int32 torch tensors of a capacity on a CUDA device, made
    once per (device, capacity) and kept (the tables are immutable)."""
    import torch

    from . import _core

    key = (str(device), capacity)
    tables = _PLACEMENTS.get(key)
    if tables is None:
        slot_of, offset_of = _core.placement(capacity)
        tables = (
            torch.from_numpy(slot_of).to(device),
            torch.from_numpy(offset_of).to(device),
        )
        if len(_PLACEMENTS) >= 32:
            _PLACEMENTS.pop(next(iter(_PLACEMENTS)))
        _PLACEMENTS[key] = tables
    return tables


def torch_search(
    keys, values, written, queries, k: int, recall_target: float, metric: str, gather: bool = True
):
    """The CUDA search on CUDA torch tensors in the ring layout (keys float32,
    bfloat16 or float16; values float32; written int64), on torch's current stream.
    Returns (scores, indices, keys, values, mask) shaped [*shape, Q, k, ...]; checks
    nothing (knnmem.torch checks first). gather=False returns None for keys and
    values and does not copy them (scores, indices and mask only)."""
    import torch

    cuda = require("knnmem CUDA search")
    device = keys.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    shape = tuple(written.shape)
    grid = written.numel()
    capacity, key_dim = int(keys.shape[-2]), int(keys.shape[-1])
    value_dim = int(values.shape[-1])
    dtype = str(keys.dtype).replace("torch.", "")
    keys, values, written = keys.contiguous(), values.contiguous(), written.contiguous()
    q = queries.detach().to(torch.float32).contiguous()
    nq = int(q.shape[-2])
    _, offset_of = placement_tensors(device, capacity)
    ws_bytes = cuda.search_workspace_bytes(grid, capacity, key_dim, nq, k, recall_target, dtype)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=device)
    dims = (*shape, nq, k)
    rows = (
        (
            torch.empty((*dims, key_dim), dtype=torch.float32, device=device),
            torch.empty((*dims, value_dim), dtype=torch.float32, device=device),
        )
        if gather
        else (None, None)
    )
    out = (
        torch.empty(dims, dtype=torch.float32, device=device),
        torch.empty(dims, dtype=torch.int64, device=device),
        *rows,
        torch.empty(dims, dtype=torch.bool, device=device),
    )
    row_ptrs = [0 if a is None else a.data_ptr() for a in rows]
    ring = cuda.Ring(
        keys=keys.data_ptr(), dtype=dtype, values=values.data_ptr(), written=written.data_ptr(),
        offset_of=offset_of.data_ptr(), grid=grid, capacity=capacity, key_dim=key_dim,
        value_dim=value_dim,
    )  # fmt: skip
    buffers = cuda.Outputs(
        scores=out[0].data_ptr(), indices=out[1].data_ptr(), mask=out[4].data_ptr(),
        keys=row_ptrs[0], values=row_ptrs[1],
    )  # fmt: skip
    cuda.search(
        ring, queries=q.data_ptr(), num_queries=nq, k=k, recall_target=recall_target,
        metric=metric, out=buffers, workspace=workspace.data_ptr(), workspace_bytes=ws_bytes,
        stream=torch.cuda.current_stream(device).cuda_stream, device=index,
    )  # fmt: skip
    return out


def torch_add(keys, values, written, new_keys, new_values) -> None:
    """The CUDA ring write on CUDA torch tensors (contiguous ring; new rows float32
    contiguous), on torch's current stream. Checks nothing."""
    import torch

    cuda = require("knnmem CUDA add")
    device = keys.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    capacity, key_dim = int(keys.shape[-2]), int(keys.shape[-1])
    slot_of, _ = placement_tensors(device, capacity)
    cuda.add(
        keys.data_ptr(), str(keys.dtype).replace("torch.", ""), values.data_ptr(),
        written.data_ptr(), slot_of.data_ptr(), written.numel(), capacity, key_dim,
        int(values.shape[-1]), new_keys.data_ptr(), new_values.data_ptr(),
        int(new_keys.shape[-2]), torch.cuda.current_stream(device).cuda_stream, index,
    )  # fmt: skip
