"""Shared helpers: a stream-keeping reference of a memory grid."""

from __future__ import annotations

import numpy as np

import knnmem


class Stream:
    """Everything added to a Memory, in order, per grid cell (a reference model)."""

    def __init__(self, mem: knnmem.Memory) -> None:
        self.mem = mem
        self.keys = [[] for _ in range(int(np.prod(mem.shape)))]
        self.values = [[] for _ in range(int(np.prod(mem.shape)))]

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.mem.add(keys, values)
        g = len(self.keys)
        for cell, (k, v) in enumerate(
            zip(keys.reshape(g, *keys.shape[-2:]), values.reshape(g, *values.shape[-2:]))
        ):
            self.keys[cell].extend(k)
            self.values[cell].extend(v)

    def clear(self, cells: list[int]) -> None:
        flat = np.zeros(len(self.keys), bool)
        flat[cells] = True
        self.mem.clear(flat.reshape(self.mem.shape))
        for cell in cells:
            self.keys[cell], self.values[cell] = [], []

    def live(self, cell: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(keys, values, first position) of the rows a memory still holds."""
        n = len(self.keys[cell])
        first = max(0, n - self.mem.capacity)
        d, dv = self.mem.key_dim, self.mem.value_dim
        keys = np.asarray(self.keys[cell][first:], np.float32).reshape(-1, d)
        values = np.asarray(self.values[cell][first:], np.float32).reshape(-1, dv)
        return keys, values, first


def untied(ref_scores: np.ndarray, tol: float) -> np.ndarray:
    """True where a sorted reference score is more than tol from both neighbours
    (there the index of the result is determined)."""
    s = np.where(np.isfinite(ref_scores), ref_scores, np.nan)
    gap_prev = np.full(s.shape, np.inf)
    gap_next = np.full(s.shape, np.inf)
    gap_prev[..., 1:] = np.abs(s[..., 1:] - s[..., :-1])
    gap_next[..., :-1] = np.abs(s[..., :-1] - s[..., 1:])
    return ~np.isnan(s) & ~(gap_prev <= tol) & ~(gap_next <= tol)


def score_tol(keys: np.ndarray, queries: np.ndarray) -> float:
    """Float32 dot-product error bound: d * eps * max |q| |k| (with a safety factor)."""
    d = keys.shape[-1]
    kn = float(np.max(np.linalg.norm(keys, axis=-1), initial=0.0))
    qn = float(np.max(np.linalg.norm(queries, axis=-1), initial=0.0))
    return 4 * d * float(np.finfo(np.float32).eps) * max(kn * qn, kn * kn, qn * qn, 1e-30)
