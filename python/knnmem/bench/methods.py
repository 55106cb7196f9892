"""The interface every contestant implements, and knnmem itself as one.

Every method holds its own copy of a grid of G FIFO memories of `capacity` rows and
answers Q queries per memory with k stream positions (and the values stored with
them). Rows are unit length, so inner product is cosine; every method scores by
inner product.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

import knnmem
from knnmem.eval import bins_for_search, expected_recall

from .workloads import Workload

# knnmem key dtypes beside float32: (short name in the method's name, bytes per element)
KEY_DTYPES = {"bfloat16": ("bf16", 2), "float16": ("f16", 2), "int8": ("i8", 1)}


@dataclass
class Found:
    positions: np.ndarray  # [G, Q, k] int64 stream positions, -1 where none
    values: np.ndarray  # [G, Q, k, dv] float32


class Method:
    """One contestant. The harness calls fill (untimed) until every memory is full,
    then build (timed, reported as build_s), tune (untimed), and per step add + search
    (timed) and found (untimed)."""

    name: str = ""
    note: str = ""
    key_bytes: float = 4.0  # bytes per key element it stores (for the bandwidth limit)
    expected_recall: float | None = None
    build_s: float | None = None
    tunable: bool = False  # whether tune() does anything (it needs exact answers)

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def fill(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.add(keys, values)

    def build(self) -> None:
        """Work done once on the filled memory (index construction)."""

    def tune(self, queries: np.ndarray, true_topk: np.ndarray) -> None:
        """Picks search parameters on held-out queries (untimed)."""

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, queries: np.ndarray) -> Any:
        raise NotImplementedError

    def found(self, raw: Any) -> Found:
        raise NotImplementedError


class KnnmemMethod(Method):
    """knnmem.Memory at one recall_target (1.0 = exact) and key dtype."""

    def __init__(self, wl: Workload, recall_target: float, dtype: str = "float32") -> None:
        super().__init__()
        self.recall_target = recall_target
        self.wl = wl
        self.mem = knnmem.Memory(wl.shape, wl.capacity, wl.dim, wl.dim, dtype=dtype)
        self.reuse_out = "out" in inspect.signature(self.mem.search).parameters
        self._out: knnmem.SearchResult | None = None
        short, self.key_bytes = KEY_DTYPES.get(dtype, ("", 4))
        target = "exact" if recall_target >= 1.0 else f"r={recall_target:.2f}"
        self.name = " ".join(filter(None, ("knnmem", short, target)))
        self.params = {"recall_target": recall_target, "dtype": dtype}
        bins = bins_for_search(wl.k, recall_target)
        if 0 < bins < wl.capacity:
            self.expected_recall = expected_recall(bins, wl.k)
            self.note = f"L={bins} strided bins"
        else:
            self.note = "exact top-k"
        if dtype != "float32" and self.expected_recall is not None:
            # The core widens the bins of rounded keys (Memory docstring); "expected" stays
            # the float32 model at this target, which their recall should reach.
            self.note = f"{dtype} keys; L={bins_for_search(wl.k, recall_target, dtype)} bins"

    def _grid(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.wl.shape + x.shape[1:])

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.mem.add(self._grid(keys), self._grid(values))

    def search(self, queries: np.ndarray) -> knnmem.SearchResult:
        """Reuses the previous result's arrays where Memory.search takes out= (the numpy
        baseline keeps its buffers too); the harness reads a result before the next."""
        q, kw = self._grid(queries), {"k": self.wl.k, "recall_target": self.recall_target}
        if self._out is not None and self._out.indices.shape[-2] == q.shape[-2]:
            return self.mem.search(q, out=self._out, **kw)
        res = self.mem.search(q, **kw)
        if self.reuse_out:
            self._out = res
        return res

    def found(self, raw: knnmem.SearchResult) -> Found:
        g, dv = self.wl.grid, self.wl.dim
        return Found(
            raw.indices.reshape(g, -1, self.wl.k), raw.values.reshape(g, -1, self.wl.k, dv)
        )
