"""The CUDA engine (knnmem._cuda, docs/cuda.md).

Two parts:
* checks that run everywhere: the package imports without the CUDA build or a GPU,
  Memory(device="cuda") then raises a clear error, arguments are checked before the
  device is touched, and (where the build exists) the search plan;
* GPU tests, skipped with the reason CUDA is unavailable: knnmem.Memory(device="cuda")
  against a float64 model of the same algorithm (placement, strided bins, ties to the
  lowest slot, exact fallback) and against the CPU engine, FIFO / clear / positions,
  the torch custom ops on CUDA tensors and the JAX custom call on a GPU.
Seeded; tolerances come from the precision of the scores.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import zlib

import numpy as np
import pytest

import knnmem
import knnmem.cuda as kcuda
from conftest import Stream

REASON = kcuda.unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"needs a CUDA GPU: {REASON}")
needs_build = pytest.mark.skipif(
    not kcuda.built(), reason="knnmem was built without its CUDA kernels (nvcc not found)"
)


# -- everywhere ------------------------------------------------------------------------------


def test_package_imports_and_reports_cuda_state() -> None:
    assert isinstance(kcuda.available(), bool)
    assert kcuda.device_count() >= 0
    if kcuda.available():
        assert kcuda.unavailable_reason() is None
    else:
        assert "CUDA" in kcuda.unavailable_reason() or "built" in kcuda.unavailable_reason()


@pytest.mark.skipif(REASON is None, reason="a CUDA device is usable here")
def test_memory_on_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="device='cuda'.*CUDA is not available"):
        knnmem.Memory(4, capacity=64, key_dim=8, device="cuda")
    assert knnmem.Memory(4, capacity=64, key_dim=8, device="cpu").device == "cpu"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"device": "gpu"}, ValueError, "device: expected 'cpu', 'cuda' or 'cuda:N'"),
        ({"device": "cuda:x"}, ValueError, "device"),
        ({"device": "cuda", "dtype": "int8"}, ValueError, "dtype: expected one of"),
        ({"device": "cuda", "metric": "dot"}, ValueError, "metric"),
        ({"device": "cuda", "dtype": "float64"}, ValueError, "dtype: expected one of"),
    ],
)
def test_arguments_are_checked_before_the_device(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        knnmem.Memory(2, capacity=16, key_dim=4, **kwargs)


class _NoDevice:
    """A stand-in for knnmem._cuda on a machine where no CUDA device is usable."""

    def __init__(self, status: str) -> None:
        self.status = status

    def device_count(self) -> int:
        return 0

    def device_status(self) -> str:
        return self.status


INSUFFICIENT = (
    "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
)
NO_DEVICE = "cudaErrorNoDevice: no CUDA-capable device is detected"


@pytest.mark.parametrize("status", [INSUFFICIENT, NO_DEVICE])
def test_reason_without_a_driver_says_so(monkeypatch, status) -> None:
    # The CUDA runtime reports a missing libcuda.so.1 as an insufficient driver.
    monkeypatch.setattr(kcuda, "_cuda", _NoDevice(status))
    monkeypatch.setattr(kcuda, "_driver_missing", lambda: "libcuda.so.1 cannot be loaded")
    reason = kcuda.unavailable_reason()
    expected = "no NVIDIA driver found (libcuda.so.1 cannot be loaded)"
    assert reason == f"no CUDA device is usable: {expected}"
    assert "insufficient" not in reason and not kcuda.available()


@pytest.mark.parametrize(
    "status, missing",
    [
        (INSUFFICIENT, None),  # a driver is here: it is too old, as the runtime says
        (NO_DEVICE, None),  # a driver without a visible GPU
        ("cudaErrorDevicesUnavailable: CUDA-capable device(s) is/are busy", "no driver"),
        ("no CUDA device found", "no driver"),
    ],
)
def test_other_reasons_are_the_runtimes(monkeypatch, status, missing) -> None:
    monkeypatch.setattr(kcuda, "_cuda", _NoDevice(status))
    monkeypatch.setattr(kcuda, "_driver_missing", lambda: missing)
    assert kcuda.unavailable_reason() == f"no CUDA device is usable ({status})"


def test_driver_probe(monkeypatch) -> None:
    if not sys.platform.startswith("linux"):
        assert kcuda._driver_missing() is None
        return
    monkeypatch.setattr(kcuda, "_DRIVER_LIB", "libknnmem-no-such-driver.so.1")
    assert kcuda._driver_missing() == "libknnmem-no-such-driver.so.1 cannot be loaded"
    monkeypatch.setattr(kcuda, "_DRIVER_LIB", ctypes.util.find_library("c") or "libc.so.6")
    monkeypatch.setattr(kcuda, "_DRIVER_PROC", "/proc/knnmem-no-such-dir")
    if not os.path.exists("/dev/dxg"):
        assert kcuda._driver_missing() == (
            "/proc/knnmem-no-such-dir is absent: the nvidia kernel module is not loaded"
        )
    monkeypatch.setattr(kcuda, "_DRIVER_PROC", "/proc")
    assert kcuda._driver_missing() is None


def test_parse_device() -> None:
    assert kcuda.parse_device(None) is None
    assert kcuda.parse_device("cpu") is None
    assert kcuda.parse_device("cuda") == 0
    assert kcuda.parse_device("cuda:3") == 3


@needs_build
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_plan_matches_the_core_bins_and_bounds_the_workspace(dtype) -> None:
    core_dtype = dtype
    for k, target in ((32, 0.9), (32, 0.95), (8, 0.5), (1, 0.9)):
        plan = kcuda._cuda.plan(16, 8192, 64, 512, k, target, dtype)
        assert plan["num_bins"] == knnmem._core.bins_for_search(k, target, core_dtype)
        assert plan["bins"] == min(plan["num_bins"], 8192)
        assert plan["split_len"] % plan["bins"] == 0  # whole rounds of the bins
        assert plan["splits"] * plan["split_len"] >= 8192 > (plan["splits"] - 1) * plan["split_len"]
        bins_bytes = plan["splits"] * 16 * plan["query_chunk"] * plan["bins"] * 8
        assert plan["workspace_bytes"] == bins_bytes + 16 * plan["query_chunk"] * k * 4
    exact = kcuda._cuda.plan(1, 65536, 128, 4096, 32, 1.0, dtype)
    assert exact["num_bins"] == 0 and exact["bins"] == 65536 and exact["splits"] == 1
    assert exact["workspace_bytes"] <= 1 << 30 and exact["query_chunk"] % 64 == 0
    with pytest.raises(ValueError, match="k: expected an integer in"):
        kcuda._cuda.plan(1, 100, 8, 1, 101, 0.9, dtype)
    with pytest.raises(ValueError, match="recall_target"):
        kcuda._cuda.plan(1, 100, 8, 1, 10, 1.5, dtype)
    with pytest.raises(ValueError, match="key_dim: .* too large"):
        kcuda._cuda.plan(1, 100, 100_000, 1, 10, 0.9, dtype)
    with pytest.raises(ValueError, match="dtype"):
        kcuda._cuda.plan(1, 100, 8, 1, 10, 0.9, "int8")


# -- a float64 model of the algorithm --------------------------------------------------------


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x.astype(np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def model_search(stream: Stream, queries, k, recall_target, metric, dtype):
    """(scores, indices, mask) of the strided-bin search in float64, with keys and
    queries rounded as the CUDA kernels round them."""
    mem = stream.mem
    cap = mem.capacity
    core_dtype = "float32" if dtype == "float32" else "bfloat16"
    num_bins = knnmem._core.bins_for_search(k, recall_target, core_dtype)
    slot_of, offset_of = knnmem.ops.placement(cap)
    g_count = len(stream.keys)
    q_flat = queries.reshape(g_count, queries.shape[-2], queries.shape[-1])
    nq = q_flat.shape[1]
    scores = np.full((g_count, nq, k), -np.inf)
    indices = np.full((g_count, nq, k), -1, np.int64)
    for g in range(g_count):
        keys, _, first = stream.live(g)
        written = first + len(keys)
        live = len(keys)
        if live == 0:
            continue
        pos = np.arange(first, written)
        slots = slot_of[pos % cap].astype(np.int64)
        kr = _round(keys, dtype).astype(np.float64)
        for qi in range(nq):
            q32 = q_flat[g, qi].astype(np.float32)
            q_sq = float(np.dot(q32.astype(np.float64), q32.astype(np.float64)))
            q = q32.astype(np.float64)
            if metric == "cosine" and q_sq > 0:
                q = q / np.sqrt(q_sq)
            q = _round(q, dtype).astype(np.float64)
            dot = kr @ q
            k_sq = np.einsum("ij,ij->i", kr, kr)
            if metric == "cosine":
                s = dot * np.where(k_sq > 0, 1 / np.sqrt(np.maximum(k_sq, 1e-300)), 0.0)
            elif metric == "l2":
                s = np.minimum(0.0, 2 * dot - (q_sq + k_sq))
            else:
                s = dot
            cand = np.arange(live)
            if num_bins and num_bins < live:
                bins = slots % num_bins
                order = np.lexsort((slots, -s, bins))  # by bin, then score desc, slot asc
                firsts = order[np.r_[True, bins[order][1:] != bins[order][:-1]]]
                if len(firsts) >= min(k, live):
                    cand = firsts
            best = cand[np.lexsort((slots[cand], -s[cand]))][:k]
            scores[g, qi, : len(best)] = s[best]
            indices[g, qi, : len(best)] = pos[best]
    shape = (*mem.shape, nq, k)
    return scores.reshape(shape), indices.reshape(shape), (indices >= 0).reshape(shape)


def tolerance(stream: Stream, queries: np.ndarray, dtype: str) -> float:
    """Summation-order error of a float32-accumulated dot product (16-bit products
    are exact in float32), with a safety factor."""
    d = queries.shape[-1]
    keys = np.concatenate([np.asarray(k, np.float32).reshape(-1, d) for k in stream.keys])
    kn = float(np.max(np.linalg.norm(keys, axis=-1), initial=1.0))
    qn = float(np.max(np.linalg.norm(queries, axis=-1), initial=1.0))
    return 8 * d * float(np.finfo(np.float32).eps) * max(kn * qn, kn * kn, qn * qn)


def check_against_model(stream, queries, res, k, recall_target, metric, dtype) -> None:
    ref_s, ref_i, ref_m = model_search(stream, queries, k, recall_target, metric, dtype)
    np.testing.assert_array_equal(res.mask, ref_m)
    tol = tolerance(stream, queries, dtype)
    # Scores of the same rank agree to the summation-order error.
    finite = np.isfinite(ref_s)
    np.testing.assert_allclose(res.scores[finite], ref_s[finite], rtol=0, atol=tol)
    assert np.all(np.isneginf(res.scores[~finite]))
    assert np.all(res.indices[~ref_m] == -1)
    # Indices agree except where a near-tie (within tol) may swap rows, in a bin or in
    # the final order; such swaps are rare on random data.
    agree = (res.indices == ref_i) | ~ref_m
    assert agree.mean() >= 0.995, f"{(~agree).sum()} of {agree.size} indices differ"
    # Results are sorted (score desc, slot order is internal) and keys/values match rows.
    s = np.where(res.mask, res.scores, -np.inf)
    assert np.all(s[..., :-1] >= s[..., 1:])


def gaussian_stream(mem, rng, steps, t) -> Stream:
    stream = Stream(mem)
    for _ in range(steps):
        keys = rng.standard_normal((*mem.shape, t, mem.key_dim)).astype(np.float32)
        values = rng.standard_normal((*mem.shape, t, mem.value_dim)).astype(np.float32)
        stream.add(keys, values)
    return stream


# -- GPU: knnmem.Memory(device="cuda") -------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize(
    "shape, capacity, d, t, steps, nq, k, target",
    [
        ((2, 3), 1000, 64, 300, 5, 37, 32, 0.9),  # wrapped, odd Q
        ((2,), 113, 59, 40, 2, 5, 8, 0.9),  # odd sizes, not full
        ((1,), 4096, 128, 512, 3, 70, 32, 0.95),  # not full: masked slots
        ((3,), 500, 16, 200, 4, 9, 500, 1.0),  # exact, k = capacity
    ],
)
def test_cuda_memory_matches_the_model(dtype, metric, shape, capacity, d, t, steps, nq, k, target):
    rng = np.random.default_rng(zlib.crc32(f"{dtype} {metric} {capacity}".encode()))
    mem = knnmem.Memory(
        shape, capacity=capacity, key_dim=d, value_dim=7, dtype=dtype, metric=metric, device="cuda"
    )
    stream = gaussian_stream(mem, rng, steps, t)
    queries = rng.standard_normal((*shape, nq, d)).astype(np.float32)
    res = mem.search(queries, k=k, recall_target=target)
    check_against_model(stream, queries, res, k, target, metric, dtype)
    # Keys and values are the stored rows of the returned positions.
    for cell in np.ndindex(*shape):
        g = int(np.ravel_multi_index(cell, shape))
        keys, values, first = stream.live(g)
        m = res.mask[cell]
        rows = res.indices[cell][m] - first
        np.testing.assert_array_equal(res.keys[cell][m], _round(keys[rows], dtype))
        np.testing.assert_array_equal(res.values[cell][m], values[rows])
        assert np.all(res.keys[cell][~m] == 0) and np.all(res.values[cell][~m] == 0)


@needs_gpu
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_cuda_float32_matches_the_cpu_engine(metric) -> None:
    rng = np.random.default_rng(7)
    cpu = knnmem.Memory((2, 4), capacity=2048, key_dim=64, metric=metric)
    gpu = knnmem.Memory((2, 4), capacity=2048, key_dim=64, metric=metric, device="cuda")
    for _ in range(5):
        keys = rng.standard_normal((2, 4, 512, 64)).astype(np.float32)
        cpu.add(keys, keys)
        gpu.add(keys, keys)
    np.testing.assert_array_equal(gpu.written, cpu.written)
    q = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
    for target in (0.9, 1.0):
        a, b = cpu.search(q, k=32, recall_target=target), gpu.search(q, k=32, recall_target=target)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert (a.indices == b.indices).mean() >= 0.995
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4, atol=1e-3)


@needs_gpu
def test_cuda_fifo_clear_and_positions() -> None:
    rng = np.random.default_rng(3)
    mem = knnmem.Memory((2, 2), capacity=10, key_dim=3, value_dim=2, device="cuda")
    stream = Stream(mem)
    total = 0
    for t in (4, 0, 5, 3, 11, 25, 1):
        stream.add(
            rng.standard_normal((2, 2, t, 3)).astype(np.float32),
            rng.standard_normal((2, 2, t, 2)).astype(np.float32),
        )
        total += t
        np.testing.assert_array_equal(mem.written, np.full((2, 2), total))
        np.testing.assert_array_equal(mem.count, np.full((2, 2), min(total, 10)))
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
    res = mem.search(np.ones((2, 2, 3, 3), np.float32), k=4)
    assert not res.mask[0, 1].any() and not res.mask[1, 0].any()
    assert np.all(res.indices[0, 1] == -1) and np.all(np.isneginf(res.scores[0, 1]))
    assert res.mask[0, 0].all() and res.mask[1, 1].all()
    mem.clear()
    assert mem.count.sum() == 0


@needs_gpu
def test_cuda_sparse_memory_falls_back_to_exact() -> None:
    # 40 rows over 8192 slots with 36 bins leave bins empty: as on the CPU, the search
    # is then exact and every query gets min(k, rows) results.
    rng = np.random.default_rng(5)
    mem = knnmem.Memory(3, capacity=8192, key_dim=32, device="cuda")
    stream = gaussian_stream(mem, rng, 1, 40)
    q = rng.standard_normal((3, 6, 32)).astype(np.float32)
    res = mem.search(q, k=32, recall_target=0.5)
    assert res.mask.all()
    check_against_model(stream, q, res, 32, 0.5, "ip", "float32")


@needs_gpu
def test_cuda_rejects_bad_input_and_changes_nothing() -> None:
    mem = knnmem.Memory(2, capacity=16, key_dim=4, device="cuda")
    good = np.ones((2, 3, 4), np.float32)
    mem.add(good, good)
    bad = good.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="keys: expected finite"):
        mem.add(bad, good)
    with pytest.raises(ValueError, match="keys: expected shape"):
        mem.add(np.ones((2, 3, 5), np.float32), good)
    with pytest.raises(ValueError, match="queries: expected finite"):
        mem.search(bad, k=4)
    with pytest.raises(ValueError, match="k: expected"):
        mem.search(good, k=17)
    np.testing.assert_array_equal(mem.written, [3, 3])


# -- GPU: torch and JAX front ends -----------------------------------------------------------


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA (the pinned torch is a CPU build)")
    return torch


@needs_gpu
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_torch_ops_on_cuda_match_the_reference(metric) -> None:
    torch = _torch_cuda()
    import knnmem.torch as kt

    gen = torch.Generator(device="cuda").manual_seed(0)
    mem_a = kt.KNNMemory((2, 3), 1000, 32, 16, metric, device="cuda")
    mem_b = kt.KNNMemory((2, 3), 1000, 32, 16, metric, device="cuda")
    for _ in range(4):
        k = torch.randn(2, 3, 300, 32, device="cuda", generator=gen)
        v = torch.randn(2, 3, 300, 16, device="cuda", generator=gen)
        mem_a.add(k, v)
        with kt.use_reference("cuda"):
            mem_b.add(k, v)
    torch.testing.assert_close(mem_a.keys, mem_b.keys, rtol=0, atol=0)
    torch.testing.assert_close(mem_a.written, mem_b.written)
    q = torch.randn(2, 3, 50, 32, device="cuda", generator=gen, requires_grad=True)
    a = mem_a.search(q, k=16)
    with kt.use_reference("cuda"):
        b = mem_b.search(q, k=16)
    assert a.scores.is_cuda
    assert torch.equal(a.mask, b.mask)
    assert (a.indices == b.indices).float().mean() >= 0.995
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    a.scores.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@needs_gpu
def test_torch_cuda_memory_zero_copy_on_a_side_stream() -> None:
    torch = _torch_cuda()
    mem = knnmem.Memory(
        (2, 2), capacity=256, key_dim=16, device="cuda", dtype="bfloat16", metric="cosine"
    )
    keys = torch.randn(2, 2, 100, 16, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        mem.add(keys, keys)
        res = mem.search(keys[:, :, :10], k=4, recall_target=1.0)
    side.synchronize()
    assert res.indices.is_cuda and res.indices.dtype == torch.int64
    # Each query finds itself first (cosine 1 up to bfloat16 rounding; others are far).
    top = res.indices[..., 0].cpu().numpy()
    np.testing.assert_array_equal(top, np.broadcast_to(np.arange(10), (2, 2, 10)))


@needs_gpu
def test_jax_search_on_gpu_matches_the_reference() -> None:
    jax = pytest.importorskip("jax")
    import knnmem.jax as kj

    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("needs jax with a GPU backend (jax[cuda])")
    if not kj.ffi_cuda_available():
        from knnmem.jax._ffi import _FFI_CUDA_MISSING  # why registration failed (private)

        pytest.skip(f"the CUDA custom call is not registered: {_FFI_CUDA_MISSING}")
    with jax.default_device(gpu):
        state = kj.init((2, 3), capacity=512, key_dim=32)
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 700, 32))
        state = kj.add(state, x, x)
        q = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 20, 32))
        a = jax.jit(lambda s, q: kj.search(s, q, k=8))(state, q)
        b = kj.search(state, q, k=8, impl="reference")
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    assert (np.asarray(a.indices) == np.asarray(b.indices)).mean() >= 0.995
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize(
    "shape, capacity, d, t, steps, nq, k, target",
    [
        ((2, 3), 1000, 64, 300, 5, 37, 32, 0.9),
        ((2,), 113, 59, 40, 2, 5, 8, 0.9),
        ((1,), 4096, 128, 512, 3, 70, 32, 0.95),
        ((3,), 8192, 32, 40, 1, 6, 32, 0.5),
    ],
)
def test_the_model_matches_the_cpu_engine(metric, shape, capacity, d, t, steps, nq, k, target):
    # The GPU tests compare against model_search; here it is checked against the CPU
    # engine, on every machine.
    rng = np.random.default_rng(11)
    mem = knnmem.Memory(shape, capacity=capacity, key_dim=d, value_dim=7, metric=metric)
    stream = gaussian_stream(mem, rng, steps, t)
    queries = rng.standard_normal((*shape, nq, d)).astype(np.float32)
    res = mem.search(queries, k=k, recall_target=target)
    check_against_model(stream, queries, res, k, target, metric, "float32")
