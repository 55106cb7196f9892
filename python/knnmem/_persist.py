"""Memory.save / Memory.load: a safetensors file with knnmem metadata (docs/format.md).

Written with numpy and the standard library only. Saving is atomic (temporary file in
the same directory, fsync, os.replace, fsync of the directory); loading checks every
field and a sha256 checksum before a memory is built, and raises ValueError naming the
file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap as mmap_module
import os
import secrets
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .memory import Memory

FORMAT = "knnmem.memory"
VERSION = 1
MAX_HEADER = 100_000_000  # the safetensors limit
# safetensors dtype of each stored element type, and its numpy dtype (bfloat16 as raw bits)
KEY_DTYPES = {
    "float32": ("F32", np.float32),
    "bfloat16": ("BF16", np.uint16),
    "float16": ("F16", np.uint16),
    "int8": ("I8", np.int8),
}
_CHUNK = 1 << 24  # bytes per write / read call


def _fspath(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):  # bytes paths
        path = os.fsdecode(path)
    return path


def _canonical(header: dict) -> bytes:
    """The header as the checksum sees it: without the checksum, keys sorted, compact."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != "checksum"}
    body = {**header, "__metadata__": meta}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _tensor_specs(meta: dict[str, Any]) -> list[tuple[str, str, type, tuple[int, ...]]]:
    """(name, safetensors dtype, numpy dtype, shape) of the tensors, in file order: 8-byte
    elements first, then 4-byte ones, keys last, so every tensor is aligned."""
    shape, cap = tuple(meta["shape"]), meta["capacity"]
    st_dtype, np_dtype = KEY_DTYPES[meta["key_dtype"]]
    specs = [
        ("written", "I64", np.int64, shape),
        ("values", "F32", np.float32, (*shape, cap, meta["value_dim"])),
    ]
    if meta["key_dtype"] == "int8":
        specs.append(("key_scale", "F32", np.float32, (*shape, cap)))
    specs.append(("keys", st_dtype, np_dtype, (*shape, cap, meta["key_dim"])))
    return specs


def _nbytes(np_dtype: type, shape: tuple[int, ...]) -> int:
    return np.dtype(np_dtype).itemsize * math.prod(shape)


def save(mem: Memory, path: Any) -> None:
    path = _fspath(path)
    if mem.device != "cpu":
        raise NotImplementedError(
            f"save: memories on {mem.device} cannot be saved yet; only device='cpu' ones"
        )
    keys, key_scale, values, written = mem._core._export_state()  # one consistent snapshot
    arrays = {"keys": keys, "key_scale": key_scale, "values": values, "written": written}
    meta = {
        "shape": list(mem.shape),
        "capacity": mem.capacity,
        "key_dim": mem.key_dim,
        "value_dim": mem.value_dim,
        "key_dtype": mem.dtype,
    }
    header: dict[str, Any] = {
        "__metadata__": {
            "format": FORMAT,
            "format_version": str(VERSION),
            "shape": json.dumps(meta["shape"]),
            "capacity": str(mem.capacity),
            "key_dim": str(mem.key_dim),
            "value_dim": str(mem.value_dim),
            "key_dtype": mem.dtype,
            "value_dtype": "float32",
            "metric": mem.metric,
            "layout": "rows oldest first",
        }
    }
    offset = 0
    buffers = []
    for name, st_dtype, _, shape in _tensor_specs(meta):
        arr = arrays[name]
        buf = memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + buf.nbytes],
        }
        offset += buf.nbytes
        buffers.append(buf)
    digest = hashlib.sha256(_canonical(header))
    for buf in buffers:
        digest.update(buf)
    header["__metadata__"]["checksum"] = "sha256:" + digest.hexdigest()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for buf in buffers:
                for start in range(0, buf.nbytes, _CHUNK):
                    f.write(buf[start : start + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes the rename durable (POSIX); a no-op where directories cannot be opened."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Bad(ValueError):
    pass


def _int_field(meta: dict, name: str, minimum: int, maximum: int) -> int:
    raw = meta.get(name)
    if not isinstance(raw, str) or not raw.isascii() or not raw.isdigit():
        raise _Bad(f"metadata {name!r}: expected a decimal integer string, got {raw!r}")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise _Bad(f"metadata {name!r}: expected an integer in [{minimum}, {maximum}], got {value}")
    return value


def _parse_metadata(header: Any) -> dict[str, Any]:
    from .memory import MAX_CAPACITY, METRICS

    if not isinstance(header, dict):
        raise _Bad("not a safetensors file: the header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise _Bad(f"not a knnmem memory file: __metadata__.format is {got!r}, expected {FORMAT!r}")
    version = _int_field(meta, "format_version", 1, 2**31)
    if version > VERSION:
        raise _Bad(
            f"written by a newer knnmem (format version {version}); "
            f"this knnmem reads format version {VERSION}"
        )
    out: dict[str, Any] = {}
    try:
        shape = json.loads(meta.get("shape", ""))
    except (TypeError, ValueError):
        shape = None
    if (
        not isinstance(shape, list)
        or not shape
        or not all(type(d) is int and 1 <= d < 2**63 for d in shape)
        or math.prod(shape) >= 2**63
    ):
        raise _Bad(
            f"metadata 'shape': expected a JSON list of positive ints, got {meta.get('shape')!r}"
        )
    out["shape"] = shape
    out["capacity"] = _int_field(meta, "capacity", 1, MAX_CAPACITY)
    out["key_dim"] = _int_field(meta, "key_dim", 1, 2**62)
    out["value_dim"] = _int_field(meta, "value_dim", 1, 2**62)
    for name, allowed in (
        ("key_dtype", tuple(KEY_DTYPES)),
        ("value_dtype", ("float32",)),
        ("metric", METRICS),
        ("layout", ("rows oldest first",)),
    ):
        if meta.get(name) not in allowed:
            raise _Bad(f"metadata {name!r}: expected one of {allowed}, got {meta.get(name)!r}")
        out[name] = meta[name]
    checksum = meta.get("checksum")
    if (
        not isinstance(checksum, str)
        or not checksum.startswith("sha256:")
        or len(checksum) != 71
        or any(c not in "0123456789abcdef" for c in checksum[7:])
    ):
        raise _Bad(f"metadata 'checksum': expected 'sha256:' and 64 hex digits, got {checksum!r}")
    out["checksum"] = checksum
    return out


def _check_tensors(header: dict, meta: dict, data_bytes: int) -> dict[str, tuple[int, int]]:
    """Offsets of each tensor, after checking names, dtypes, shapes and that they tile the
    data section exactly."""
    specs = _tensor_specs(meta)
    names = {name for name, *_ in specs}
    found = set(header) - {"__metadata__"}
    if found != names:
        raise _Bad(f"tensors: expected {sorted(names)}, got {sorted(found)}")
    spans = {}
    for name, st_dtype, np_dtype, shape in specs:
        entry = header[name]
        if not isinstance(entry, dict):
            raise _Bad(f"tensor {name!r}: expected an object, got {entry!r}")
        if entry.get("dtype") != st_dtype or entry.get("shape") != list(shape):
            raise _Bad(
                f"tensor {name!r}: expected dtype {st_dtype} shape {list(shape)}, got dtype "
                f"{entry.get('dtype')!r} shape {entry.get('shape')!r}"
            )
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or offsets[1] - offsets[0] != _nbytes(np_dtype, shape)
            or offsets[0] < 0
        ):
            raise _Bad(
                f"tensor {name!r}: expected data_offsets [begin, begin + "
                f"{_nbytes(np_dtype, shape)}], got {offsets!r}"
            )
        spans[name] = (offsets[0], offsets[1])
    ordered = sorted(spans.values())
    end = 0
    for begin, stop in ordered:
        if begin != end:
            raise _Bad("tensors: data_offsets leave a gap or overlap")
        end = stop
    if data_bytes < end:
        raise _Bad(f"truncated: the tensors need {end} bytes of data, the file has {data_bytes}")
    if data_bytes > end:
        raise _Bad(f"{data_bytes - end} unexpected bytes after the tensor data")
    return spans


def load(path: Any, mmap: bool = False) -> Memory:
    path = _fspath(path)
    if not isinstance(mmap, (bool, np.bool_)):
        raise TypeError(f"mmap: expected a bool, got {type(mmap).__name__}")
    try:
        return _load(path, bool(mmap))
    except _Bad as e:
        raise ValueError(f"{path}: {e}") from None


def _read_exact(f: Any, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Bad(f"truncated: expected {n} bytes of {what}, got {len(data)}")
    return data


def _load(path: str, use_mmap: bool) -> Memory:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        (n,) = struct.unpack("<Q", _read_exact(f, 8, "header length"))
        if n > MAX_HEADER or n > size - 8:
            raise _Bad(
                f"not a knnmem file, or truncated: header length {n} does not fit the file "
                f"({size} bytes)"
            )
        raw = _read_exact(f, n, "header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _Bad(f"not a safetensors file: the header is not valid JSON ({e})") from None
        meta = _parse_metadata(header)
        spans = _check_tensors(header, meta, size - 8 - n)
        data_bytes = size - 8 - n
        mapped = None
        try:
            if use_mmap and data_bytes > 0:
                mapped = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
                data = memoryview(mapped)[8 + n :]
            else:
                buf = bytearray(data_bytes)
                data = memoryview(buf)
                got = 0
                while got < data_bytes:
                    r = f.readinto(data[got : got + _CHUNK])
                    if not r:
                        raise _Bad(f"truncated: expected {data_bytes} bytes of data, got {got}")
                    got += r
            return _build(header, meta, spans, data)
        finally:
            data = None  # noqa: F841 -- release the views before the map closes
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:  # a traceback still holds a view: unmapped when it goes
                    pass


def _build(header: dict, meta: dict, spans: dict, data: memoryview) -> Memory:
    from .memory import Memory

    digest = hashlib.sha256(_canonical(header))
    digest.update(data)
    if "sha256:" + digest.hexdigest() != meta["checksum"]:
        raise _Bad(
            f"checksum mismatch, the file is corrupt: stored {meta['checksum']}, "
            f"computed sha256:{digest.hexdigest()}"
        )
    arrays = {}
    grid = math.prod(meta["shape"])
    for name, _, np_dtype, shape in _tensor_specs(meta):
        begin, stop = spans[name]
        arr = np.frombuffer(data[begin:stop], dtype=np_dtype)
        arr = arr.reshape((grid, *shape[len(meta["shape"]) :]))
        arrays[name] = np.require(arr, requirements=("C", "A"))  # copies only if unaligned
    mem = Memory(
        shape=tuple(meta["shape"]),
        capacity=meta["capacity"],
        key_dim=meta["key_dim"],
        value_dim=meta["value_dim"],
        dtype=meta["key_dtype"],
        metric=meta["metric"],
    )
    try:
        mem._core._import_state(
            arrays["keys"], arrays.get("key_scale"), arrays["values"], arrays["written"]
        )
    except ValueError as e:
        raise _Bad(f"inconsistent data: {e}") from None
    finally:
        arrays.clear()
    return mem
