"""Micro-benchmarks of the knnmem kernels (pytest-benchmark), on one small memory grid.

    python -m pytest bench/test_micro.py --benchmark-only
    python -m pytest bench/test_micro.py --benchmark-only --benchmark-group-by=group

Memory.search and ops.search run once per CPU kernel variant this machine supports
(knnmem._core.supported_kernels(), forced with set_kernel and reset to automatic
afterwards), approximate (r=0.9) and exact; Memory.add appends one segment to a full
memory. Not part of the test suite (tests/ is the only testpath); collected without
pytest-benchmark it is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

import knnmem  # noqa: E402
from knnmem import _core  # noqa: E402

SHAPE = (2, 4)  # eight memories
CAPACITY = 8192
DIM = 64
QUERIES = 64
SEGMENT = 512
K = 32
TARGETS = (0.9, 1.0)
KERNELS: list[str] = list(getattr(_core, "supported_kernels", lambda: [""])())


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    keys = unit(rng.standard_normal((*SHAPE, CAPACITY, DIM), dtype=np.float32))
    return {
        "keys": keys,
        "values": -keys,
        "queries": unit(rng.standard_normal((*SHAPE, QUERIES, DIM), dtype=np.float32)),
        "segment": unit(rng.standard_normal((*SHAPE, SEGMENT, DIM), dtype=np.float32)),
    }


@pytest.fixture(scope="module")
def memory(data: dict[str, np.ndarray]) -> knnmem.Memory:
    mem = knnmem.Memory(SHAPE, CAPACITY, DIM, DIM)
    mem.add(data["keys"], data["values"])
    return mem


@pytest.fixture(scope="module")
def ring(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys, values, written = knnmem.ops.init(SHAPE, CAPACITY, DIM, DIM)
    knnmem.ops.add(keys, values, written, data["keys"], data["values"])
    return keys, values, written


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Forces one kernel variant for the test, then restores the automatic choice."""
    name: str = request.param
    if name:
        _core.set_kernel(name)
    try:
        yield name or "auto"
    finally:
        if name:
            _core.set_kernel("")


def check(res: knnmem.SearchResult) -> None:
    assert res.indices.shape == (*SHAPE, QUERIES, K)
    assert bool(np.all(res.mask))


@pytest.mark.parametrize("target", TARGETS)
def test_memory_search(
    benchmark: Any, kernel: str, memory: knnmem.Memory, data: dict[str, np.ndarray], target: float
) -> None:
    benchmark.group = f"Memory.search r={target}"
    benchmark.extra_info.update(kernel=kernel, target=target)
    check(benchmark(memory.search, data["queries"], k=K, recall_target=target))


@pytest.mark.parametrize("target", TARGETS)
def test_ops_search(
    benchmark: Any,
    kernel: str,
    ring: tuple[np.ndarray, np.ndarray, np.ndarray],
    data: dict[str, np.ndarray],
    target: float,
) -> None:
    benchmark.group = f"ops.search r={target}"
    benchmark.extra_info.update(kernel=kernel, target=target)
    keys, values, written = ring
    queries = data["queries"]
    check(benchmark(knnmem.ops.search, keys, values, written, queries, k=K, recall_target=target))


def test_memory_add(benchmark: Any, data: dict[str, np.ndarray]) -> None:
    """One segment into every memory of a full grid (FIFO overwrite)."""
    benchmark.group = "Memory.add"
    mem = knnmem.Memory(SHAPE, CAPACITY, DIM, DIM)
    mem.add(data["keys"], data["values"])
    segment = data["segment"]
    benchmark(mem.add, segment, -segment)
    assert bool(np.all(mem.count == CAPACITY))
