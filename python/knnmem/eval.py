"""Recall model and exact references shared by tests and benchmarks."""

from __future__ import annotations

import numpy as np

from . import _core
from ._arrays import check_int
from ._contract import KEY_DTYPES, check_recall_target

__all__ = ["expected_recall", "bins_for_recall", "bins_for_search", "exact_search", "recall"]


def expected_recall(num_bins: int, k: int) -> float:
    """r(L) = (L/k) (1 - (1 - 1/L)^k): expected fraction of the exact top-k found
    with L strided bins, when the top-k fall in independent uniform bins."""
    return _core.expected_recall(check_int(num_bins, "num_bins", 1), check_int(k, "k", 1))


def bins_for_recall(k: int, recall_target: float) -> int:
    """Smallest L >= k with expected_recall(L, k) >= recall_target; 0 means exact
    (recall_target == 1). A search uses exact top-k whenever L >= rows held."""
    return _core.bins_for_recall(check_int(k, "k", 1), check_recall_target(recall_target))


def bins_for_search(k: int, recall_target: float, dtype: str = "float32") -> int:
    """The bins a search of a memory with key storage `dtype` uses: bins_for_recall,
    with the target raised to 1 - 0.8 (1 - target) for bfloat16, float16 and int8 keys,
    whose rounding moves near-ties across the k-th, and 16 or more bins rounded up to a
    multiple of 16 (whole vectors of bins for the CPU kernels; recall only rises)."""
    if not isinstance(dtype, str) or dtype not in KEY_DTYPES:
        raise ValueError(f"dtype: expected one of {KEY_DTYPES}, got {dtype!r}")
    k, recall_target = check_int(k, "k", 1), check_recall_target(recall_target)
    return _core.bins_for_search(k, recall_target, dtype)


def scores(keys: np.ndarray, queries: np.ndarray, metric: str = "ip") -> np.ndarray:
    """[..., Q, n] float64 scores of queries [..., Q, d] against keys [..., n, d]."""
    k = np.asarray(keys, np.float64)
    q = np.asarray(queries, np.float64)
    if metric == "ip":
        return q @ np.swapaxes(k, -1, -2)
    if metric == "cosine":
        kn = np.linalg.norm(k, axis=-1, keepdims=True)
        qn = np.linalg.norm(q, axis=-1, keepdims=True)
        k = np.divide(k, kn, out=np.zeros_like(k), where=kn > 0)
        q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
        return q @ np.swapaxes(k, -1, -2)
    if metric == "l2":
        d2 = (
            np.sum(q * q, -1)[..., :, None]
            + np.sum(k * k, -1)[..., None, :]
            - 2 * q @ np.swapaxes(k, -1, -2)
        )
        return -np.maximum(d2, 0.0)
    raise ValueError(f"metric: expected one of ('ip', 'cosine', 'l2'), got {metric!r}")


def exact_search(
    keys: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (float64 reference): (scores [..., Q, k], row indices [..., Q, k]),
    best first; -inf / -1 past the number of rows."""
    k = check_int(k, "k", 1)
    s = scores(keys, queries, metric)
    n = s.shape[-1]
    kk = min(k, n)
    part = np.argpartition(-s, kk - 1, axis=-1)[..., :kk] if kk < n else np.argsort(-s, axis=-1)
    top = np.take_along_axis(s, part, -1)
    order = np.argsort(-top, axis=-1, kind="stable")
    idx = np.take_along_axis(part, order, -1)
    top = np.take_along_axis(top, order, -1)
    if kk < k:
        pad = [(0, 0)] * (s.ndim - 1) + [(0, k - kk)]
        top = np.pad(top, pad, constant_values=-np.inf)
        idx = np.pad(idx, pad, constant_values=-1)
    return top, idx.astype(np.int64)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| for index arrays [..., Q, k];
    entries < 0 are empty and ignored (queries with an empty truth are skipped)."""
    found = np.asarray(found).reshape(-1, np.shape(found)[-1])
    truth = np.asarray(truth).reshape(-1, np.shape(truth)[-1])
    valid = truth >= 0
    hits = ((found[:, :, None] == truth[:, None, :]) & valid[:, None, :]).any(axis=1)
    sizes = valid.sum(axis=1)
    keep = sizes > 0
    return float(np.mean(hits.sum(axis=1)[keep] / sizes[keep]))
