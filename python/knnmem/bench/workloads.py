"""Workloads M1-M4, their clustered data, and the numpy ring every method is checked against."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from knnmem.eval import exact_search


def cpu_count() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    shape: tuple[int, ...]
    capacity: int
    dim: int
    queries: int
    k: int = 32

    @property
    def grid(self) -> int:
        return math.prod(self.shape)

    @property
    def step_flops(self) -> float:
        """Flops of scoring Q queries against every row of every memory."""
        return 2.0 * self.queries * self.capacity * self.dim * self.grid

    def key_bytes(self, bytes_per_element: float = 4.0) -> float:
        """Bytes of keys a brute-force step reads (every row of every memory once)."""
        return self.grid * self.capacity * self.dim * bytes_per_element

    def describe(self) -> str:
        return (
            f"{self.name}: shape={self.shape} capacity={self.capacity} d={self.dim} "
            f"Q={self.queries} k={self.k}"
        )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("M1", (1,), 65536, 128, 512),
        Workload("M2", (2, 8), 8192, 64, 512),
        Workload("M3", (1,), 1_048_576, 128, 64),
        Workload("M4", (8,), 65536, 128, 1),
    )
}
SCALING_CAPACITIES = (65536, 262144, 1_048_576)

# --tiny: the same grids, with fewer and narrower rows and fewer queries; large enough
# that knnmem r=0.9 and r=0.95 still search strided bins (160 and 304 of them at k=32).
TINY_WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("M1", (1,), 2048, 32, 32),
        Workload("M2", (2, 8), 1024, 32, 32),
        Workload("M3", (1,), 8192, 32, 16),
        Workload("M4", (8,), 2048, 32, 1),
    )
}
TINY_SCALING_CAPACITIES = (1024, 4096, 16384)


def workloads(tiny: bool = False) -> dict[str, Workload]:
    return TINY_WORKLOADS if tiny else WORKLOADS


def scaling_workloads(tiny: bool = False) -> list[Workload]:
    """M3's shape (one memory, its d and Q) at each scaling capacity."""
    m3 = workloads(tiny)["M3"]
    capacities = TINY_SCALING_CAPACITIES if tiny else SCALING_CAPACITIES
    return [Workload(f"M3@{c}", m3.shape, c, m3.dim, m3.queries, m3.k) for c in capacities]


# -- data ------------------------------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x / |x| along the last axis, float32."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


class ClusteredStream:
    """Unit rows near per-memory Gaussian cluster centres, all memories of a grid at once.

    A row is centre + N(0, noise^2 / d) noise, normalised. In stream order consecutive
    rows come from one cluster for runs of geometric length (mean `mean_run`), as text
    tokens would; queries pick a cluster independently per query.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        grid: int,
        dim: int,
        clusters: int = 256,
        mean_run: float = 8.0,
        noise: float = 0.8,
    ) -> None:
        self.rng = rng
        self.clusters = clusters
        self.mean_run = mean_run
        self.sigma = noise / math.sqrt(dim)
        self.centres = unit_rows(rng.standard_normal((grid, clusters, dim), dtype=np.float32))
        self._pending = [np.empty(0, np.int64) for _ in range(grid)]

    def _stream_labels(self, g: int, n: int) -> np.ndarray:
        labels = self._pending[g]
        while labels.size < n:
            runs = self.rng.geometric(1.0 / self.mean_run, size=int(n / self.mean_run) + 1)
            ids = self.rng.integers(0, self.clusters, size=runs.size)
            labels = np.concatenate([labels, np.repeat(ids, runs)])
        self._pending[g] = labels[n:]
        return labels[:n]

    def _sample(self, labels: np.ndarray) -> np.ndarray:
        centres = np.take_along_axis(self.centres, labels[..., None], axis=1)
        noise = self.rng.standard_normal(centres.shape, dtype=np.float32)
        return unit_rows(centres + self.sigma * noise)

    def rows(self, n: int) -> np.ndarray:
        """The next n rows of every memory's stream: [G, n, d] float32."""
        labels = np.stack([self._stream_labels(g, n) for g in range(len(self._pending))])
        return self._sample(labels)

    def queries(self, n: int) -> np.ndarray:
        """n queries per memory: [G, n, d] float32."""
        labels = self.rng.integers(0, self.clusters, size=(len(self._pending), n))
        return self._sample(labels)


def values_of(keys: np.ndarray) -> np.ndarray:
    """Values stored with keys (distinct from the keys, so a key/value mix-up shows)."""
    return -keys


# -- ring of rows in numpy: the reference, and the storage of most methods -------------------


class Ring:
    """FIFO ring [G, capacity, dim]; stream position p lives in row p % capacity."""

    def __init__(self, grid: int, capacity: int, dim: int) -> None:
        self.data = np.zeros((grid, capacity, dim), np.float32)
        self.capacity = capacity
        self.written = 0

    def next_slots(self, n: int) -> np.ndarray:
        """Slots the next n rows go to (n <= capacity)."""
        return (self.written + np.arange(n)) % self.capacity

    def add(self, rows: np.ndarray) -> None:
        skip = max(0, rows.shape[1] - self.capacity)  # rows overwritten within this add
        self.written += skip
        rows = rows[:, skip:]
        self.data[:, self.next_slots(rows.shape[1])] = rows
        self.written += rows.shape[1]

    @property
    def first_live(self) -> int:
        return max(0, self.written - self.capacity)

    def positions(self, slots: np.ndarray) -> np.ndarray:
        """Stream position of the row held in each ring slot."""
        return self.written - self.capacity + (slots - self.written) % self.capacity

    def live(self) -> tuple[int, np.ndarray]:
        """(first live position, live rows in stream order [G, n_live, dim])."""
        start = self.first_live
        return start, self.data[:, np.arange(start, self.written) % self.capacity]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Rows at stream positions [G, ...] (zeros where the position is < 0)."""
        ok = positions >= 0
        grid = np.arange(positions.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1))
        rows = self.data[grid, np.where(ok, positions, 0) % self.capacity]
        return np.where(ok[..., None], rows, np.float32(0.0))

    def exact_topk(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Float64 exact top-k stream positions [G, Q, k] over the live rows."""
        start, rows = self.live()
        _, idx = exact_search(rows, queries, k)
        return np.where(idx >= 0, idx + start, -1)
