"""Memory.save / Memory.load: a safetensors file with knnmem metadata (docs/format.md).

Written with numpy and the standard library only. Saving is atomic (temporary file in
the same directory, fsync, os.replace, fsync of the directory); loading checks every
field and a sha256 checksum before a memory is built, and raises ValueError naming the
file and the problem. What load promises against hostile files (what it refuses, how much
it allocates) is in docs/format.md, "What load promises".
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap as mmap_module
import os
import secrets
import stat
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from ._contract import KEY_DTYPES, MAX_CAPACITY, METRICS

if TYPE_CHECKING:
    from .memory import Memory

FORMAT = "knnmem.memory"
VERSION = 1
# A knnmem header is a few KiB (the grid shape appears five times); safetensors allows
# 100 MB, whose JSON would parse into 20x that in Python objects.
MAX_HEADER = 1 << 16
# The memory a file may describe: its storage pads each memory to 16-slot panels with
# per-slot terms, just under 16x the file for capacities below 16 and the smallest rows
# (capacity 1, int8 keys of one dimension: 268 bytes a memory for 17 in the file). The
# bound admits every file `save` writes; a file describing more is refused unread.
MAX_GROWTH, MAX_EXTRA = 16, 64 << 20
# safetensors dtype of each stored element type, and its numpy dtype (bfloat16 as raw bits)
STORED_DTYPES = {
    "float32": ("F32", np.float32),
    "bfloat16": ("BF16", np.uint16),
    "float16": ("F16", np.uint16),
    "int8": ("I8", np.int8),
}
assert tuple(STORED_DTYPES) == KEY_DTYPES  # every key dtype of the contract, in its order
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
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except RecursionError as e:
        raise _Bad("malformed header: nested too deeply") from e
    return text.encode()


def _tensor_specs(meta: dict[str, Any]) -> list[tuple[str, str, type, tuple[int, ...]]]:
    """(name, safetensors dtype, numpy dtype, shape) of the tensors, in file order: 8-byte
    elements first, then 4-byte ones, keys last, so every tensor is aligned."""
    shape, cap = tuple(meta["shape"]), meta["capacity"]
    st_dtype, np_dtype = STORED_DTYPES[meta["key_dtype"]]
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


def _footprint(meta: dict[str, Any]) -> int:
    """Bytes of storage the memory will hold: Memory::nbytes (csrc/core/memory.cpp), keys
    in 16-slot panels of 4-byte words with a norm term (and int8 scale and sum) a slot."""
    cap, dim, int8 = meta["capacity"], meta["key_dim"], meta["key_dtype"] == "int8"
    words = {"float32": dim, "int8": (dim + 3) // 4}.get(meta["key_dtype"], (dim + 1) // 2)
    per_cell = 4 * (-(-cap // 16) * 16 * (words + 1 + 2 * int8) + cap * meta["value_dim"]) + 8
    return math.prod(meta["shape"]) * per_cell + 8 * cap


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


def _shown(value: Any) -> str:
    """repr of a value from the file, cut short: a header may hold 64 KiB of anything."""
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:80]}... ({len(text)} characters)"


def _int_field(meta: dict, name: str, minimum: int, maximum: int) -> int:
    raw = meta.get(name)
    if not isinstance(raw, str) or not raw.isascii() or not raw.isdigit():
        raise _Bad(f"metadata {name!r}: expected a decimal integer string, got {_shown(raw)}")
    digits = len(raw.lstrip("0"))
    if digits > len(str(maximum)):  # int() of thousands of digits is slow, or refused
        raise _Bad(
            f"metadata {name!r}: expected an integer in [{minimum}, {maximum}], "
            f"got a {digits}-digit number"
        )
    value = int(raw)
    if not minimum <= value <= maximum:
        raise _Bad(f"metadata {name!r}: expected an integer in [{minimum}, {maximum}], got {value}")
    return value


def _grid_size(shape: Any) -> int | None:
    """The number of memories of a grid shape (a list of ints >= 1 with a product below
    2**63), else None; stops at the first bad dimension, so no huge product is formed."""
    if not isinstance(shape, list) or not shape:
        return None
    grid = 1
    for d in shape:
        if type(d) is not int or not 1 <= d < 2**63:
            return None
        grid *= d
        if grid >= 2**63:
            return None
    return grid


def _parse_metadata(header: Any) -> dict[str, Any]:

    if not isinstance(header, dict):
        raise _Bad("not a safetensors file: the header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise _Bad(
            f"not a knnmem memory file: __metadata__.format is {_shown(got)}, expected {FORMAT!r}"
        )
    for name, value in meta.items():  # safetensors metadata maps strings to strings
        if not isinstance(value, str):
            raise _Bad(f"metadata {_shown(name)}: expected a string, got {type(value).__name__}")
    version = _int_field(meta, "format_version", 1, 2**31)
    if version > VERSION:
        raise _Bad(
            f"written by a newer knnmem (format version {version}); "
            f"this knnmem reads format version {VERSION}"
        )
    out: dict[str, Any] = {}
    try:
        shape = json.loads(meta.get("shape", ""))
    except (ValueError, RecursionError):
        shape = None
    if _grid_size(shape) is None:
        got = _shown(meta.get("shape"))
        raise _Bad(f"metadata 'shape': expected a JSON list of positive ints, got {got}")
    out["shape"] = shape
    out["capacity"] = _int_field(meta, "capacity", 1, MAX_CAPACITY)
    out["key_dim"] = _int_field(meta, "key_dim", 1, 2**62)
    out["value_dim"] = _int_field(meta, "value_dim", 1, 2**62)
    for name, allowed in (
        ("key_dtype", KEY_DTYPES),
        ("value_dtype", ("float32",)),
        ("metric", METRICS),
        ("layout", ("rows oldest first",)),
    ):
        if meta.get(name) not in allowed:
            raise _Bad(
                f"metadata {name!r}: expected one of {allowed}, got {_shown(meta.get(name))}"
            )
        out[name] = meta[name]
    checksum = meta.get("checksum")
    if (
        not isinstance(checksum, str)
        or not checksum.startswith("sha256:")
        or len(checksum) != 71
        or any(c not in "0123456789abcdef" for c in checksum[7:])
    ):
        raise _Bad(
            f"metadata 'checksum': expected 'sha256:' and 64 hex digits, got {_shown(checksum)}"
        )
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
            raise _Bad(f"tensor {name!r}: expected an object, got {_shown(entry)}")
        if entry.get("dtype") != st_dtype or entry.get("shape") != list(shape):
            raise _Bad(
                f"tensor {name!r}: expected dtype {st_dtype} shape {list(shape)}, got dtype "
                f"{_shown(entry.get('dtype'))} shape {_shown(entry.get('shape'))}"
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
                f"{_nbytes(np_dtype, shape)}], got {_shown(offsets)}"
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


def load(cls: type[Memory], path: Any, mmap: bool = False) -> Memory:
    """A memory of class `cls` (knnmem.Memory) built from the file at `path`."""
    path = _fspath(path)
    if not isinstance(mmap, (bool, np.bool_)):
        raise TypeError(f"mmap: expected a bool, got {type(mmap).__name__}")
    try:
        return _load(cls, path, bool(mmap))
    except _Bad as e:
        raise ValueError(f"{path}: {e}") from e.__cause__  # None unless a decoder's error


def _read_exact(f: Any, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Bad(f"truncated: expected {n} bytes of {what}, got {len(data)}")
    return data


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise _Bad(f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'not a file')})")


def _open_regular(path: str) -> Any:
    """Opens a regular file for reading. Others are refused before they are opened (a FIFO
    would block, a device could be endless); the open does not block and fstat checks the
    file opened, in case the path was replaced in between."""
    _check_regular(os.stat(path).st_mode)
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX only
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | nonblock)
    try:
        _check_regular(os.fstat(fd).st_mode)
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _checksum(header: dict, f: Any, start: int, size: int, out: Any = None) -> str:
    """The checksum of the header and `size` bytes of f from `start`, read _CHUNK bytes at
    a time into `out` (a writable buffer of `size` bytes) or, without it, through one
    reused buffer: a file is checked without holding its data."""
    digest = hashlib.sha256(_canonical(header))
    chunk = memoryview(bytearray(min(_CHUNK, size))) if out is None else None
    f.seek(start)
    got = 0
    while got < size:
        step = min(_CHUNK, size - got)
        view = chunk[:step] if chunk is not None else out[got : got + step]
        r = f.readinto(view)
        if not r:
            raise _Bad(f"truncated: expected {size} bytes of data, got {got}")
        digest.update(view[:r])
        got += r
    return "sha256:" + digest.hexdigest()


def _load(cls: type[Memory], path: str, use_mmap: bool) -> Memory:
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        (n,) = struct.unpack("<Q", _read_exact(f, 8, "header length"))
        if n > size - 8:
            raise _Bad(
                f"not a knnmem file, or truncated: header length {n} does not fit the file "
                f"({size} bytes)"
            )
        if n > MAX_HEADER:
            raise _Bad(f"header length {n} is more than a knnmem header takes ({MAX_HEADER})")
        raw = _read_exact(f, n, "header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except RecursionError as e:
            raise _Bad(
                "not a safetensors file: the header is not valid JSON (nested too deeply)"
            ) from e
        except (UnicodeDecodeError, ValueError) as e:  # also ints of over 4300 digits
            raise _Bad(f"not a safetensors file: the header is not valid JSON ({e})") from e
        meta = _parse_metadata(header)
        data_bytes = size - 8 - n
        spans = _check_tensors(header, meta, data_bytes)
        if _footprint(meta) > MAX_GROWTH * size + MAX_EXTRA:
            raise _Bad(
                f"the memory it describes would take {_footprint(meta)} bytes, more than "
                f"{MAX_GROWTH}x the file's {size} bytes + {MAX_EXTRA >> 20} MiB"
            )
        computed = _checksum(header, f, 8 + n, data_bytes)  # before the data is held
        if computed != meta["checksum"]:
            raise _Bad(
                f"checksum mismatch, the file is corrupt: stored {meta['checksum']}, "
                f"computed {computed}"
            )
        mapped = None
        try:
            if use_mmap:
                try:
                    mapped = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
                except ValueError:  # the file is empty now
                    raise _Bad(f"truncated while loading: 0 bytes, was {size}") from None
                if len(mapped) < size:
                    raise _Bad(f"truncated while loading: {len(mapped)} bytes, was {size}")
                data = memoryview(mapped)[8 + n : size]
            else:  # a private copy, checked again: built from exactly the bytes checked
                data = memoryview(bytearray(data_bytes))
                if _checksum(header, f, 8 + n, data_bytes, data) != computed:
                    raise _Bad("changed while loading: the data no longer matches the checksum")
            return _build(cls, meta, spans, data)
        finally:
            data = None  # noqa: F841 -- release the views before the map closes
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:  # a traceback still holds a view: unmapped when it goes
                    pass


def _build(cls: type[Memory], meta: dict, spans: dict, data: memoryview) -> Memory:
    arrays = {}
    grid = math.prod(meta["shape"])
    for name, _, np_dtype, shape in _tensor_specs(meta):
        begin, stop = spans[name]
        arr = np.frombuffer(data[begin:stop], dtype=np_dtype)
        arr = arr.reshape((grid, *shape[len(meta["shape"]) :]))
        arrays[name] = np.require(arr, requirements=("C", "A"))  # copies only if unaligned
    mem = cls(
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
