# ruff: noqa: E501 -- the tables of cases read best one per line
"""Memory.save / Memory.load: bit-identical round trips, the on-disk format, atomic
replacement, and a clear ValueError for every kind of bad file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import knnmem
from knnmem import _persist

DTYPES = ("float32", "bfloat16", "float16", "int8")
METRICS = ("ip", "cosine", "l2")
SHAPE, CAP, KD, VD = (2, 3), 83, 13, 5


def filled(dtype: str, metric: str, seed: int = 0) -> knnmem.Memory:
    """A memory that has wrapped in some cells, been cleared in one, and is partly
    filled in another."""
    rng = np.random.default_rng(seed)
    mem = knnmem.Memory(SHAPE, capacity=CAP, key_dim=KD, value_dim=VD, dtype=dtype, metric=metric)
    for t in (60, 50, 7):
        mem.add(
            rng.standard_normal((*SHAPE, t, KD)).astype(np.float32),
            rng.standard_normal((*SHAPE, t, VD)).astype(np.float32),
        )
        if t == 50:
            mem.clear((1, 2))
    mem.clear((0, 1))
    mem.add(
        rng.standard_normal((*SHAPE, 3, KD)).astype(np.float32),
        rng.standard_normal((*SHAPE, 3, VD)).astype(np.float32),
    )
    return mem


def state(mem: knnmem.Memory) -> list:
    return list(mem._core._export_state())


def assert_same_state(a: knnmem.Memory, b: knnmem.Memory) -> None:
    assert (a.shape, a.capacity, a.key_dim, a.value_dim, a.dtype, a.metric) == (
        b.shape,
        b.capacity,
        b.key_dim,
        b.value_dim,
        b.dtype,
        b.metric,
    )
    for x, y in zip(state(a), state(b)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def assert_same_search(a: knnmem.Memory, b: knnmem.Memory, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((*SHAPE, 9, KD)).astype(np.float32)
    for k, target in ((1, 0.9), (8, 0.5), (8, 1.0), (CAP, 0.9)):
        ra, rb = (
            a.search(queries, k=k, recall_target=target),
            b.search(queries, k=k, recall_target=target),
        )
        for field in ra._fields:  # bit-identical
            np.testing.assert_array_equal(getattr(ra, field), getattr(rb, field), err_msg=field)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_identical(tmp_path: Path, dtype: str, metric: str, mmap: bool) -> None:
    mem = filled(dtype, metric)
    path = tmp_path / "mem.knnmem"
    mem.save(path)
    loaded = knnmem.Memory.load(path, mmap=mmap)
    assert_same_state(mem, loaded)
    np.testing.assert_array_equal(loaded.written, mem.written)
    np.testing.assert_array_equal(loaded.count, mem.count)
    assert loaded.written[0, 1] == 3 and loaded.written[0, 0] == 120
    assert_same_search(mem, loaded)
    # both go on identically: positions continue, FIFO order is kept
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((*SHAPE, 40, KD)).astype(np.float32)
    values = rng.standard_normal((*SHAPE, 40, VD)).astype(np.float32)
    mem.add(keys, values)
    loaded.add(keys, values)
    assert_same_search(mem, loaded, seed=2)
    assert_same_state(mem, loaded)


def test_exported_rows_are_the_live_rows_oldest_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mem = knnmem.Memory(2, capacity=10, key_dim=3, value_dim=2)
    keys = rng.standard_normal((2, 13, 3)).astype(np.float32)
    values = rng.standard_normal((2, 13, 2)).astype(np.float32)
    mem.add(keys, values)
    mem.clear(1)
    mem.add(keys[:, :4], values[:, :4])
    mem.save(tmp_path / "m")
    with open(tmp_path / "m", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()

    def tensor(name, dtype):
        begin, end = header[name]["data_offsets"]
        return np.frombuffer(data[begin:end], dtype).reshape(header[name]["shape"])

    np.testing.assert_array_equal(tensor("written", np.int64), [17, 4])
    stored = tensor("keys", np.float32)
    np.testing.assert_array_equal(stored[0], np.concatenate([keys[0, 7:], keys[0, :4]]))
    np.testing.assert_array_equal(stored[1, :4], keys[1, :4])
    assert not stored[1, 4:].any()  # rows past the count are zero (cleared rows are not kept)
    np.testing.assert_array_equal(tensor("values", np.float32)[1, :4], values[1, :4])
    meta = header["__metadata__"]
    assert meta["format"] == "knnmem.memory" and meta["format_version"] == "1"
    assert (meta["shape"], meta["capacity"], meta["key_dim"], meta["value_dim"]) == (
        "[2]",
        "10",
        "3",
        "2",
    )
    assert (meta["key_dtype"], meta["value_dtype"], meta["metric"]) == ("float32", "float32", "ip")
    assert (8 + n) % 8 == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_file_is_readable_by_safetensors(tmp_path: Path, dtype: str) -> None:
    safetensors = pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    mem = filled(dtype, "cosine")
    mem.save(tmp_path / "m.safetensors")
    keys, key_scale, values, written = state(mem)
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "knnmem.memory" and meta["key_dtype"] == dtype
        expected = {"written", "values", "keys"} | ({"key_scale"} if dtype == "int8" else set())
        assert set(f.keys()) == expected
        got = f.get_tensor("keys")
        assert (
            got.dtype
            == {
                "float32": torch.float32,
                "bfloat16": torch.bfloat16,
                "float16": torch.float16,
                "int8": torch.int8,
            }[dtype]
        )
        bits = got.view(torch.int16) if dtype in ("bfloat16", "float16") else got
        np.testing.assert_array_equal(bits.numpy().reshape(keys.shape).view(keys.dtype), keys)
        np.testing.assert_array_equal(f.get_tensor("values").numpy().reshape(values.shape), values)
        np.testing.assert_array_equal(f.get_tensor("written").numpy().reshape(-1), written)
        if dtype == "int8":
            np.testing.assert_array_equal(
                f.get_tensor("key_scale").numpy().reshape(key_scale.shape), key_scale
            )


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "m"
    a, b = filled("float32", "ip", seed=1), filled("float32", "ip", seed=2)
    a.save(str(path))
    mapped = knnmem.Memory.load(path, mmap=True)  # a reader of the old file is unaffected
    b.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert_same_state(knnmem.Memory.load(path), b)
    assert_same_state(mapped, a)
    with pytest.raises(FileNotFoundError):
        a.save(tmp_path / "missing-dir" / "m")
    with pytest.raises(IsADirectoryError):
        a.save(tmp_path)  # a directory in the way: nothing written, nothing left behind
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert_same_state(knnmem.Memory.load(path), b)


def test_bad_arguments(tmp_path: Path) -> None:
    mem = filled("float32", "ip")
    with pytest.raises(TypeError, match=r"^path: expected a str or os.PathLike, got int$"):
        mem.save(3)
    mem.save(tmp_path / "m")
    with pytest.raises(TypeError, match=r"^path: expected a str or os.PathLike, got NoneType$"):
        knnmem.Memory.load(None)
    with pytest.raises(TypeError, match=r"^mmap: expected a bool, got str$"):
        knnmem.Memory.load(tmp_path / "m", mmap="yes")
    with pytest.raises(FileNotFoundError):
        knnmem.Memory.load(tmp_path / "nothing-here")


# -- bad files ----------------------------------------------------------------------------
def read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write(path: Path, header: dict, data: bytes, fix_checksum: bool = True) -> None:
    """Writes a file as save would, with the checksum recomputed (so that only the
    change under test is wrong)."""
    if fix_checksum:
        digest = hashlib.sha256(_persist._canonical(header))
        digest.update(data)
        header["__metadata__"]["checksum"] = "sha256:" + digest.hexdigest()
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_meta(**changes):
    def edit(header, data):
        header["__metadata__"].update(changes)
        return header, data

    return edit


def edit_tensor(name, **changes):
    def edit(header, data):
        header[name].update(changes)
        return header, data

    return edit


def poke(name, index, raw_value: bytes):
    """Overwrites element `index` (flat) of tensor `name` with raw bytes."""

    def edit(header, data):
        begin = header[name]["data_offsets"][0] + index * len(raw_value)
        return header, data[:begin] + raw_value + data[begin + len(raw_value) :]

    return edit


# (edit of a valid int8 file, the message expected); checksums are recomputed after
# the edit, so each case tests the check it names, not the checksum.
FIELD_CASES = {
    "newer-version": (edit_meta(format_version="2"), r"newer knnmem \(format version 2\)"),
    "foreign-format": (edit_meta(format="pt"), r"not a knnmem memory file: __metadata__.format is 'pt'"),
    "bad-version": (edit_meta(format_version="one"), r"metadata 'format_version': expected a decimal"),
    "bad-shape": (edit_meta(shape="[2, 0]"), r"metadata 'shape': expected a JSON list of positive ints"),
    "bad-capacity": (edit_meta(capacity="-83"), r"metadata 'capacity': expected a decimal"),
    "capacity-mismatch": (edit_meta(capacity="84"), r"tensor 'values': expected dtype F32 shape \[2, 3, 84, 5\]"),
    "huge-capacity": (edit_meta(capacity=str(2**31 - 1)), r"tensor 'values': expected dtype F32 shape"),
    "bad-metric": (edit_meta(metric="dot"), r"metadata 'metric': expected one of \('ip', 'cosine', 'l2'\), got 'dot'"),
    "bad-key-dtype": (edit_meta(key_dtype="float8"), r"metadata 'key_dtype': expected one of"),
    "bad-value-dtype": (edit_meta(value_dtype="bfloat16"), r"metadata 'value_dtype': expected one of"),
    "dtype-mismatch": (edit_meta(key_dtype="float32"), r"tensors: expected \['keys', 'values', 'written'\], got"),
    "wrong-tensor-dtype": (edit_tensor("keys", dtype="U8"), r"tensor 'keys': expected dtype I8 shape"),
    "wrong-offsets": (edit_tensor("written", data_offsets=[0, 40]), r"tensor 'written': expected data_offsets \[begin, begin \+ 48\]"),
    "overlap": (edit_tensor("written", data_offsets=[8, 56]), r"tensors: data_offsets leave a gap or overlap"),
    "negative-written": (poke("written", 4, struct.pack("<q", -1)), r"inconsistent data: written: expected counts >= 0, got -1 at index \[4\]"),
    "nan-value": (poke("values", 2, struct.pack("<f", float("nan"))), r"inconsistent data: values: expected finite values, got a NaN or Inf at \[0, 0, 2\]"),
    "int8-minus-128": (poke("keys", 13 * 2 + 1, b"\x80"), r"inconsistent data: keys: expected int8 values in \[-127, 127\], got -128 at \[0, 2, 1\]"),
    "inf-scale": (poke("key_scale", 5, struct.pack("<f", float("inf"))), r"inconsistent data: key_scale: expected a scale in \[0, 2.67939e\+36\], got inf at \[0, 5\]"),
    "negative-scale": (poke("key_scale", 5, struct.pack("<f", -1.0)), r"key_scale: expected a scale in \[0, 2.67939e\+36\], got -1 at \[0, 5\]"),
}  # fmt: skip


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good"
    filled("int8", "l2").save(path)
    return path


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_inconsistent_fields_raise_naming_the_problem(good_file: Path, case: str, mmap: bool):
    edit, message = FIELD_CASES[case]
    header, data = read(good_file)
    header, data = edit(header, data)
    write(good_file, header, data)
    with pytest.raises(ValueError, match="^" + re.escape(str(good_file)) + ": .*" + message):
        knnmem.Memory.load(good_file, mmap=mmap)


def test_bfloat16_nan_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m"
    filled("bfloat16", "ip").save(path)
    header, data = read(path)
    write(path, *poke("keys", 3, struct.pack("<H", 0x7FC0))(header, data))
    with pytest.raises(
        ValueError, match=r"keys: expected finite values, got a NaN or Inf at \[0, 0, 3\]"
    ):
        knnmem.Memory.load(path)


@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_files(good_file: Path, mmap: bool) -> None:
    raw = good_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    for size, message in [
        (0, r"truncated: expected 8 bytes of header length, got 0"),
        (5, r"truncated: expected 8 bytes of header length, got 5"),
        (8, r"header length \d+ does not fit the file \(8 bytes\)"),
        (8 + n // 2, r"header length \d+ does not fit the file"),
        (8 + n, r"truncated: the tensors need \d+ bytes of data, the file has 0"),
        (len(raw) // 2, r"truncated: the tensors need \d+ bytes of data"),
        (len(raw) - 1, r"truncated: the tensors need \d+ bytes of data"),
    ]:
        good_file.write_bytes(raw[:size])
        with pytest.raises(ValueError, match=message):
            knnmem.Memory.load(good_file, mmap=mmap)
    good_file.write_bytes(raw + b"\0")
    with pytest.raises(ValueError, match=r"1 unexpected bytes after the tensor data"):
        knnmem.Memory.load(good_file, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True])
def test_corrupt_bytes_fail_the_checksum(good_file: Path, mmap: bool) -> None:
    raw = good_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = np.random.default_rng(11)
    for pos in [8 + n, len(raw) - 1, *rng.integers(8 + n, len(raw), size=20)]:
        bad = bytearray(raw)
        bad[pos] ^= 1 << int(rng.integers(8))
        good_file.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=r"checksum mismatch, the file is corrupt"):
            knnmem.Memory.load(good_file, mmap=mmap)
    # a header edit that leaves valid JSON and valid fields is caught by the checksum too
    good_file.write_bytes(raw)
    header, data = read(good_file)
    header["__metadata__"]["metric"] = "ip"
    write(good_file, header, data, fix_checksum=False)
    with pytest.raises(ValueError, match=r"checksum mismatch"):
        knnmem.Memory.load(good_file, mmap=mmap)


def test_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "f"
    for raw, message in [
        (b"\x89PNG\r\n\x1a\n" + bytes(64), r"header length \d+ does not fit the file"),
        (
            struct.pack("<Q", 4) + b"\xff\xfe{}",
            r"not a safetensors file: the header is not valid JSON",
        ),
        (struct.pack("<Q", 2) + b"[]", r"not a safetensors file: the header is not a JSON object"),
        (struct.pack("<Q", 2) + b"{}", r"not a knnmem memory file: __metadata__.format is None"),
    ]:
        path.write_bytes(raw)
        with pytest.raises(ValueError, match="^" + re.escape(str(path)) + ": .*" + message):
            knnmem.Memory.load(path)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file({"weight": np.ones((2, 2), np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"not a knnmem memory file: __metadata__.format is None"):
        knnmem.Memory.load(path)


def test_big_memory_from_a_small_file_is_refused_before_allocating(good_file: Path) -> None:
    """A header that declares terabytes is checked against the file's size first."""
    header, data = read(good_file)
    header["__metadata__"].update(capacity=str(2**31 - 1), key_dim=str(2**40))
    for name, spec in header.items():
        if name != "__metadata__":
            spec["shape"][2:3] = [2**31 - 1] if len(spec["shape"]) > 2 else []
    write(good_file, header, data)
    with pytest.raises(ValueError, match=r"tensor '(values|keys|key_scale)': expected"):
        knnmem.Memory.load(good_file)


def test_import_state_checks_every_size_and_changes_nothing_on_error() -> None:
    mem = filled("int8", "cosine")
    keys, scale, values, written = state(mem)
    target = filled("int8", "cosine", seed=9)
    before = state(target)
    core = target._core
    for args, message in [
        ((keys[:, :-1], scale, values, written), r"^keys: expected shape \(6, 83, 13\), got"),
        ((keys, scale[:, :-1], values, written), r"^key_scale: expected shape \(6, 83\), got"),
        ((keys, scale, values[..., :-1], written), r"^values: expected shape \(6, 83, 5\)"),
        ((keys, scale, values, written[:-1]), r"^written: expected shape \(6\), got \(5,\)"),
        ((keys.astype(np.int16), scale, values, written), r"^keys: expected an aligned C-cont"),
        ((keys, scale, values.astype(np.float64), written), r"^values: expected an aligned C-c"),
        ((keys, None, values, written), r"^key_scale: expected a float32 array for int8 keys"),
        ((keys[:, ::-1], scale, values, written), r"^keys: expected an aligned C-contiguous"),
    ]:
        with pytest.raises(ValueError, match=message):
            core._import_state(*args)
        for a, b in zip(before, state(target)):
            np.testing.assert_array_equal(a, b)
    f32 = filled("float32", "ip")
    with pytest.raises(ValueError, match=r"^key_scale: expected None for float32 keys"):
        f32._core._import_state(*[a if i != 1 else scale for i, a in enumerate(state(f32))])


def test_memories_on_a_cuda_device_are_refused_clearly(tmp_path: Path) -> None:
    class OnDevice(knnmem.Memory):  # stands in for device="cuda" without a GPU
        device = property(lambda self: "cuda:0")

    mem = OnDevice(2, capacity=8, key_dim=4)
    with pytest.raises(NotImplementedError, match=r"^save: memories on cuda:0 cannot be saved"):
        mem.save(tmp_path / "m")
    assert os.listdir(tmp_path) == []
