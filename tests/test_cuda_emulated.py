"""The CUDA kernels, run on the CPU by an emulation of CUDA (tests/cuda_emu).

csrc/cuda/kernels.cu and bindings/cuda.cpp are compiled by the host C++ compiler
against fake CUDA headers (a block's threads are real threads with barriers for
__syncthreads, __syncwarp and shuffles; mma.sync is computed from the fragments the
lanes publish; cp.async copies at once; device memory is host memory) into a
stand-in for knnmem._cuda, and knnmem.Memory(device="cuda") runs on it. That checks
the kernels' logic - indexing, bins, ties, the exact fallback, the thread
synchronisation - on any machine; not their speed, the real tensor cores or the CUDA
runtime (tests/test_cuda.py does, on a GPU). Small sizes: the emulation runs about a
million times slower than a GPU.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import knnmem
import knnmem.cuda as kcuda
from conftest import Stream
from test_cuda import _round, check_against_model, gaussian_stream, model_search

BUILD = Path(__file__).parent / "cuda_emu" / "build.py"

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or sys.platform != "linux",
    reason="needs a C++20 compiler (c++) on Linux to build the CUDA emulation",
)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """knnmem.cuda running on the emulated module for the tests of this file."""
    pytest.importorskip("pybind11", reason="needs pybind11 to build the CUDA emulation")
    spec = importlib.util.spec_from_file_location("cuda_emu_build", BUILD)
    emu_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu_build)
    target = emu_build.build(tmp_path_factory.mktemp("cuda_emu"))
    spec = importlib.util.spec_from_file_location("_cuda_emu", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = kcuda._cuda
    kcuda._cuda = module
    try:
        yield module
    finally:
        kcuda._cuda = saved


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_emulated_search_matches_the_model(emulated, dtype, metric) -> None:
    # Wrapped memories with odd sizes (d = 19: padded tiles), L = 19 < 32 lanes.
    rng = np.random.default_rng(len(dtype) * 10 + len(metric))
    mem = knnmem.Memory(
        (2,), capacity=150, key_dim=19, value_dim=3, dtype=dtype, metric=metric, device="cuda"
    )
    stream = gaussian_stream(mem, rng, 4, 50)
    q = rng.standard_normal((2, 3, 19)).astype(np.float32)
    res = mem.search(q, k=5, recall_target=0.9)
    check_against_model(stream, q, res, 5, 0.9, metric, dtype)
    ref_s, ref_i, _ = model_search(stream, q, 5, 0.9, metric, dtype)
    np.testing.assert_array_equal(res.indices, ref_i)  # no near-ties in this data
    for g in range(2):
        keys, values, first = stream.live(g)
        rows = res.indices[g][res.mask[g]] - first
        np.testing.assert_array_equal(res.keys[g][res.mask[g]], _round(keys[rows], dtype))
        np.testing.assert_array_equal(res.values[g][res.mask[g]], values[rows])


@pytest.mark.parametrize(
    "capacity, t, steps, nq, k, target, what",
    [
        (2100, 700, 2, 2, 8, 0.9, "not full: masked slots, three slot ranges merged"),
        (500, 100, 6, 2, 40, 1.0, "exact: bins in global memory (500 per query)"),
        (4096, 12, 1, 3, 8, 0.5, "sparse: fewer non-empty bins than k, exact fallback"),
        (200, 30, 1, 2, 16, 0.9, "bins >= rows held: exact by stream offset"),
        (64, 10, 1, 2, 32, 0.9, "k > rows held: empty entries"),
    ],
)
def test_emulated_search_cases(emulated, capacity, t, steps, nq, k, target, what) -> None:
    rng = np.random.default_rng(capacity + k)
    mem = knnmem.Memory(1, capacity=capacity, key_dim=16, value_dim=2, device="cuda")
    stream = gaussian_stream(mem, rng, steps, t)
    q = rng.standard_normal((1, nq, 16)).astype(np.float32)
    res = mem.search(q, k=k, recall_target=target)
    check_against_model(stream, q, res, k, target, "ip", "float32")
    _, want, _ = model_search(stream, q, k, target, "ip", "float32")
    np.testing.assert_array_equal(res.indices, want)
    cpu = knnmem.Memory(1, capacity=capacity, key_dim=16, value_dim=2)
    rows = [np.asarray(a, np.float32)[None] for a in (stream.keys[0], stream.values[0])]
    cpu.add(*rows)
    np.testing.assert_array_equal(res.indices, cpu.search(q, k=k, recall_target=target).indices)


def test_emulated_fifo_clear_and_positions(emulated) -> None:
    rng = np.random.default_rng(3)
    mem = knnmem.Memory((2, 2), capacity=10, key_dim=3, value_dim=2, device="cuda")
    stream = Stream(mem)
    total = 0
    for t in (4, 0, 11, 25, 1):
        stream.add(
            rng.standard_normal((2, 2, t, 3)).astype(np.float32),
            rng.standard_normal((2, 2, t, 2)).astype(np.float32),
        )
        total += t
        np.testing.assert_array_equal(mem.written, np.full((2, 2), total))
        res = mem.search(np.zeros((2, 2, 1, 3), np.float32), k=10, recall_target=1.0)
        for cell in np.ndindex(2, 2):
            keys, values, first = stream.live(int(np.ravel_multi_index(cell, (2, 2))))
            m = res.mask[cell][0]
            order = np.argsort(res.indices[cell][0][m])
            np.testing.assert_array_equal(res.indices[cell][0][m][order], np.arange(first, total))
            np.testing.assert_array_equal(res.keys[cell][0][m][order], keys)
            np.testing.assert_array_equal(res.values[cell][0][m][order], values)
    stream.clear([1, 2])
    np.testing.assert_array_equal(mem.count, [[10, 0], [0, 10]])
    res = mem.search(np.ones((2, 2, 2, 3), np.float32), k=4)
    assert not res.mask[0, 1].any() and np.all(res.indices[0, 1] == -1)
    assert np.all(np.isneginf(res.scores[1, 0])) and np.all(res.keys[1, 0] == 0)
    assert res.mask[0, 0].all() and res.mask[1, 1].all()


def test_emulated_raw_entry_points(emulated) -> None:
    # The pointer-level API knnmem.torch uses, on caller-owned arrays (here numpy
    # arrays stand in for device buffers: the emulation's device memory is host memory).
    rng = np.random.default_rng(9)
    g, cap, d = 3, 100, 8
    keys = np.zeros((g, cap, d), np.float32)
    values = np.zeros((g, cap, d), np.float32)
    written = np.zeros(g, np.int64)
    slot_of, offset_of = knnmem.ops.placement(cap)
    new = rng.standard_normal((g, 130, d)).astype(np.float32)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    emulated.add(ptr(keys), "float32", ptr(values), ptr(written), ptr(slot_of), g, cap, d, d,
                 ptr(new), ptr(new), 130, 0, 0)  # fmt: skip
    ops_keys, ops_values, ops_written = knnmem.ops.init(g, cap, d, d)
    knnmem.ops.add(ops_keys, ops_values, ops_written, new, new)
    np.testing.assert_array_equal(written, ops_written)
    np.testing.assert_array_equal(keys, ops_keys)
    np.testing.assert_array_equal(values, ops_values)
    q = rng.standard_normal((g, 4, d)).astype(np.float32)
    k = 6
    ws = emulated.search_workspace_bytes(g, cap, d, 4, k, 0.9, "float32")
    workspace = np.zeros(max(ws, 1), np.uint8)
    scores = np.zeros((g, 4, k), np.float32)
    indices = np.zeros((g, 4, k), np.int64)
    mask = np.zeros((g, 4, k), bool)
    out_k = np.zeros((g, 4, k, d), np.float32)
    out_v = np.zeros((g, 4, k, d), np.float32)
    ring = emulated.Ring(keys=ptr(keys), dtype="float32", values=ptr(values),
                         written=ptr(written), offset_of=ptr(offset_of), grid=g, capacity=cap,
                         key_dim=d, value_dim=d)  # fmt: skip
    buffers = emulated.Outputs(scores=ptr(scores), indices=ptr(indices), mask=ptr(mask),
                               keys=ptr(out_k), values=ptr(out_v))  # fmt: skip
    args = dict(queries=ptr(q), num_queries=4, k=k, recall_target=0.9, metric="ip", out=buffers,
                workspace=ptr(workspace), stream=0, device=0)  # fmt: skip
    with pytest.raises(ValueError, match="workspace: expected at least"):
        emulated.search(ring, workspace_bytes=ws - 1, **args)
    emulated.search(ring, workspace_bytes=ws, **args)
    want = knnmem.ops.search(keys, values, written, q, k=k, recall_target=0.9)
    np.testing.assert_array_equal(indices, want.indices)
    np.testing.assert_array_equal(mask, want.mask)
    np.testing.assert_allclose(scores, want.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_k, want.keys)
    np.testing.assert_array_equal(out_v, want.values)
    which = np.array([True, False, True])
    emulated.clear(ptr(written), ptr(which), g, 0, 0)
    np.testing.assert_array_equal(written, [0, 130, 0])


def test_emulated_int32_counters(emulated) -> None:
    # XLA without x64 keeps written (and so the indices) as int32.
    rng = np.random.default_rng(4)
    g, cap, d, k, nq = 2, 300, 8, 4, 3
    keys, values, written = knnmem.ops.init(g, cap, d, d)
    rows = rng.standard_normal((g, 400, d)).astype(np.float32)
    knnmem.ops.add(keys, values, written, rows, rows)
    q = rng.standard_normal((g, nq, d)).astype(np.float32)
    want = knnmem.ops.search(keys, values, written, q, k=k)
    written32 = written.astype(np.int32)
    _, offset_of = knnmem.ops.placement(cap)
    ws_bytes = emulated.search_workspace_bytes(g, cap, d, nq, k, 0.9, "float32")
    ws = np.zeros(max(ws_bytes, 1), np.uint8)
    out = [np.zeros((g, nq, k), t) for t in (np.float32, np.int32, bool)]
    out += [np.zeros((g, nq, k, d), np.float32) for _ in range(2)]
    ptr = lambda a: a.ctypes.data  # noqa: E731
    ring = emulated.Ring(keys=ptr(keys), dtype="float32", values=ptr(values),
                         written=ptr(written32), offset_of=ptr(offset_of), grid=g, capacity=cap,
                         key_dim=d, value_dim=d, written_int32=True)  # fmt: skip
    buffers = emulated.Outputs(scores=ptr(out[0]), indices=ptr(out[1]), mask=ptr(out[2]),
                               keys=ptr(out[3]), values=ptr(out[4]))  # fmt: skip
    emulated.search(ring, queries=ptr(q), num_queries=nq, k=k, recall_target=0.9, metric="ip",
                    out=buffers, workspace=ptr(ws), workspace_bytes=ws.size, stream=0,
                    device=0)  # fmt: skip
    np.testing.assert_array_equal(out[1], want.indices)
    np.testing.assert_array_equal(out[2], want.mask)
    np.testing.assert_array_equal(out[3], want.keys)


def test_emulated_two_query_tiles_per_memory(emulated) -> None:
    # 70 queries: two 64-query tiles per memory, the second one partly filled.
    rng = np.random.default_rng(12)
    mem = knnmem.Memory((2,), capacity=200, key_dim=16, value_dim=2, device="cuda")
    stream = gaussian_stream(mem, rng, 3, 90)
    q = rng.standard_normal((2, 70, 16)).astype(np.float32)
    res = mem.search(q, k=4, recall_target=0.9)
    check_against_model(stream, q, res, 4, 0.9, "ip", "float32")
    np.testing.assert_array_equal(res.indices, model_search(stream, q, 4, 0.9, "ip", "float32")[1])


@pytest.mark.parametrize(
    "dtype, d, metric",
    [
        ("bfloat16", 72, "ip"),  # 16-bit, key_dim > 64: query fragments from shared memory
        ("float16", 40, "l2"),  # 16-bit, query fragments in registers, 16-byte key copies
        ("float32", 36, "cosine"),  # float32 tiles, 16-byte key copies
    ],
)
def test_emulated_bin_tiles_rounds_and_ranges(emulated, dtype, d, metric) -> None:
    # k = 32 at 0.9: L > 128, so three tiles of bins (the last one partial); one query
    # tile per memory, so the rounds are cut into several ranges, merged by the select.
    rng = np.random.default_rng(d)
    # value_dim 4: rows gathered 4 elements per load (bfloat16/float16 keys: 8 bytes).
    mem = knnmem.Memory(
        (2,), capacity=3000, key_dim=d, value_dim=4, dtype=dtype, metric=metric, device="cuda"
    )
    plan = kcuda._cuda.plan(2, 3000, d, 5, 32, 0.9, dtype)
    assert plan["bins"] > 128 and plan["splits"] > 1
    stream = gaussian_stream(mem, rng, 2, 1700)  # wrapped
    q = rng.standard_normal((2, 5, d)).astype(np.float32)
    res = mem.search(q, k=32, recall_target=0.9)
    check_against_model(stream, q, res, 32, 0.9, metric, dtype)
    for g in range(2):
        keys, values, first = stream.live(g)
        rows = res.indices[g][res.mask[g]] - first
        np.testing.assert_array_equal(res.keys[g][res.mask[g]], _round(keys[rows], dtype))
        np.testing.assert_array_equal(res.values[g][res.mask[g]], values[rows])
