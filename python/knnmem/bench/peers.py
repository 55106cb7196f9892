"""The methods knnmem is compared with (python -m knnmem.bench --peers ...).

Each peer's library is imported when the peer is made; a peer whose library does not
import is skipped with a note (missing_module). Every method holds its own copy of the
grid of FIFO memories and scores by inner product (rows are unit length).

Peers without a FIFO get their fairest equivalent (the `note` column says which):

- brute force (numpy, torch, jax, faiss IndexFlatIP): a ring, new rows overwrite the
  oldest in place, exactly as in knnmem;
- graph and IVF indexes (faiss HNSW / IVF, hnswlib, usearch): built once on the
  filled memory (timed, reported as build_s, not in ms/step), then per step the
  segment is added to the index and the rows it evicts from the FIFO are taken out
  of the answers with what the library offers: deleted (hnswlib mark_deleted with
  slot reuse; usearch remove) or filtered at search time with an id range
  (faiss, which cannot delete from HNSW). Every method thus answers over the same
  live rows; the cost of eviction is in ms/step. Search parameters (efSearch, ef,
  nprobe) are tuned once after the build on held-out queries to the smallest value
  that reaches recall 0.9, or the largest tried.

One index per memory (per grid cell).
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from knnmem.eval import recall

from .methods import Found, Method
from .workloads import Ring, Workload, cpu_count

TUNE_TARGET = 0.9  # recall the graph / IVF search parameters are tuned to


# -- brute force on rings ----------------------------------------------------------------------


class NumpyExact(Method):
    """Keys/values rings in numpy; sgemm per memory + argpartition + sort of the k + gather.

    The score buffer is kept between searches and argpartition runs on blocks of rows
    so that its index arrays stay small: fresh multi-100 MB arrays every step cost
    page faults that made this baseline vary up to 2x from run to run.
    """

    name = "numpy exact"
    note = "exact; ring"
    PARTITION_BLOCK = 1 << 19  # elements per argpartition call (4 MiB of int64 indices)

    def __init__(self, wl: Workload) -> None:
        super().__init__()
        self.k = wl.k
        self.keys = Ring(wl.grid, wl.capacity, wl.dim)
        self.values = Ring(wl.grid, wl.capacity, wl.dim)
        self._scores = np.empty((wl.grid, 0, wl.capacity), np.float32)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys.add(keys)
        self.values.add(values)

    def _score(self, queries: np.ndarray) -> np.ndarray:
        """[G, Q, n] scores of every ring row (the benchmark searches full memories only)."""
        if self._scores.shape[1] != queries.shape[1]:
            self._scores = np.empty(queries.shape[:2] + (self.keys.capacity,), np.float32)
        for g in range(queries.shape[0]):
            np.matmul(queries[g], self.keys.data[g].T, out=self._scores[g])
        return self._scores

    def _top_slots(self, scores: np.ndarray) -> np.ndarray:
        """Ring slots of the k best scores of each row of [R, n], best first."""
        k, n = self.k, scores.shape[-1]
        part = np.empty((scores.shape[0], k), np.int64)
        block = max(1, self.PARTITION_BLOCK // n)
        for r in range(0, scores.shape[0], block):
            part[r : r + block] = np.argpartition(scores[r : r + block], n - k, axis=-1)[:, n - k :]
        top = np.take_along_axis(scores, part, axis=-1)
        return np.take_along_axis(part, np.argsort(-top, axis=-1), axis=-1)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self._score(queries)
        grid, nq, n = scores.shape
        slots = self._top_slots(scores.reshape(grid * nq, n)).reshape(grid, nq, self.k)
        grid_index = np.arange(slots.shape[0])[:, None, None]
        return slots, self.values.data[grid_index, slots]

    def found(self, raw: tuple[np.ndarray, np.ndarray]) -> Found:
        slots, values = raw
        return Found(self.keys.positions(slots), values)


class TorchExact(Method):
    """torch.matmul + torch.topk on rings held as tensors (sharing the numpy rings'
    memory), all cores (torch.set_num_threads)."""

    name = "torch exact"

    def __init__(self, wl: Workload) -> None:
        super().__init__()
        import torch

        torch.set_num_threads(cpu_count())
        self.torch = torch
        self.k = wl.k
        self.keys = Ring(wl.grid, wl.capacity, wl.dim)
        self.values = Ring(wl.grid, wl.capacity, wl.dim)
        self.tkeys = torch.from_numpy(self.keys.data)
        self.tvalues = torch.from_numpy(self.values.data)
        self.grid_index = torch.arange(wl.grid)[:, None, None]
        self._scores = torch.empty(0)
        self.note = f"exact; ring; {torch.get_num_threads()} threads"
        self.params = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    def fill(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys.add(keys)
        self.values.add(values)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        slots = self.torch.from_numpy(self.keys.next_slots(keys.shape[1]))
        with self.torch.inference_mode():
            self.tkeys[:, slots] = self.torch.from_numpy(keys)
            self.tvalues[:, slots] = self.torch.from_numpy(values)
        self.keys.written += keys.shape[1]
        self.values.written += keys.shape[1]

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            q = torch.from_numpy(queries)
            shape = (q.shape[0], q.shape[1], self.tkeys.shape[1])
            if tuple(self._scores.shape) != shape:
                self._scores = torch.empty(shape)
            torch.matmul(q, self.tkeys.transpose(1, 2), out=self._scores)
            slots = torch.topk(self._scores, self.k, dim=-1, sorted=True).indices
            values = self.tvalues[self.grid_index, slots]
        return slots.numpy(), values.numpy()

    def found(self, raw: tuple[np.ndarray, np.ndarray]) -> Found:
        slots, values = raw
        return Found(self.keys.positions(slots), values)


class JaxApproxMaxK(Method):
    """jax.lax.approx_max_k(recall_target=0.9) over einsum scores, jit'd, on rings held as
    jax arrays; add is a jit'd scatter into the donated rings. XLA on CPU lowers
    approx_max_k to an exact top-k (sort), so expect recall 1."""

    name = "jax approx_max_k r=0.90"
    RECALL_TARGET = 0.9

    def __init__(self, wl: Workload) -> None:
        super().__init__()
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.wl = wl
        self.keys = Ring(wl.grid, wl.capacity, wl.dim)  # filled here, moved to jax at build
        self.values = Ring(wl.grid, wl.capacity, wl.dim)
        backend = jax.default_backend()
        self.params = {"recall_target": self.RECALL_TARGET, "jax": jax.__version__}
        self.note = "ring; " + ("XLA CPU: exact sort" if backend == "cpu" else backend)
        self._add = jax.jit(self._add_fn, donate_argnums=(0, 1))
        self._search = jax.jit(self._search_fn)
        self.jkeys: Any = None
        self.jvalues: Any = None

    def _add_fn(self, keys: Any, values: Any, slots: Any, new_keys: Any, new_values: Any) -> Any:
        return keys.at[:, slots].set(new_keys), values.at[:, slots].set(new_values)

    def _search_fn(self, keys: Any, values: Any, queries: Any) -> Any:
        scores = self.jnp.einsum("gqd,gnd->gqn", queries, keys)
        _, slots = self.jax.lax.approx_max_k(scores, self.wl.k, recall_target=self.RECALL_TARGET)
        grid = self.jnp.arange(keys.shape[0])[:, None, None]
        return slots, values[grid, slots]

    def fill(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys.add(keys)
        self.values.add(values)

    def build(self) -> None:
        """Moves the rings to jax and compiles add (rewriting rows with themselves); the
        harness's warm-up search compiles search."""
        self.jkeys = self.jax.device_put(self.keys.data)
        self.jvalues = self.jax.device_put(self.values.data)
        slots = np.arange(self.wl.queries)
        same = (self.keys.data[:, slots], self.values.data[:, slots])
        self.jkeys, self.jvalues = self._add(self.jkeys, self.jvalues, slots, *same)
        self.jax.block_until_ready(self.jkeys)
        self.keys.data = self.values.data = np.empty((0, 0, 0), np.float32)  # jax holds them

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        slots = self.keys.next_slots(keys.shape[1])
        self.jkeys, self.jvalues = self._add(self.jkeys, self.jvalues, slots, keys, values)
        self.keys.written += keys.shape[1]

    def search(self, queries: np.ndarray) -> Any:
        return self.jax.block_until_ready(self._search(self.jkeys, self.jvalues, queries))

    def found(self, raw: Any) -> Found:
        slots, values = raw
        return Found(self.keys.positions(np.asarray(slots).astype(np.int64)), np.asarray(values))


class FaissFlat(Method):
    """faiss IndexFlatIP per memory, its rows overwritten in place (a ring of slots)."""

    name = "faiss IndexFlatIP"

    def __init__(self, wl: Workload) -> None:
        super().__init__()
        import faiss

        self.faiss = faiss
        self.k = wl.k
        self.keys = Ring(wl.grid, wl.capacity, wl.dim)
        self.values = Ring(wl.grid, wl.capacity, wl.dim)
        self.indexes: list[Any] = []
        self.views: list[np.ndarray] = []
        self.note = "exact; ring (rows overwritten in place)"
        self.params = {"faiss": faiss.__version__}

    def fill(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys.add(keys)
        self.values.add(values)

    def build(self) -> None:
        n, d = self.keys.data.shape[1:]
        for rows in self.keys.data:
            index = self.faiss.IndexFlatIP(d)
            index.add(rows)
            self.indexes.append(index)
            self.views.append(self.faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d))
        self.keys.data = np.empty((0, 0, 0), np.float32)  # the indexes hold the keys now

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        slots = self.values.next_slots(keys.shape[1])
        for view, rows in zip(self.views, keys):
            view[slots] = rows
        self.values.add(values)
        self.keys.written = self.values.written

    def search(self, queries: np.ndarray) -> np.ndarray:
        return np.stack([index.search(q, self.k)[1] for index, q in zip(self.indexes, queries)])

    def found(self, raw: np.ndarray) -> Found:
        positions = np.where(raw >= 0, self.values.positions(raw), -1)
        return Found(positions, self.values.gather(positions))


# -- indexes: built once, add + evict per step ---------------------------------------------


class IndexPeer(Method):
    """One index per memory, built on the filled memory, ids = stream positions.

    Subclasses implement _build_one, _insert (add rows with ids), _evict (take ids out,
    or nothing where the search filters by id range), _query (positions [Q, k]) and
    the tuned parameter (_set_param over PARAM_LADDER).
    """

    PARAM: str = ""
    PARAM_LADDER: tuple[int, ...] = ()
    EVICTION: str = ""
    tunable = True

    def __init__(self, wl: Workload) -> None:
        super().__init__()
        self.wl = wl
        self.keys = Ring(wl.grid, wl.capacity, wl.dim)  # only until the build
        self.values = Ring(wl.grid, wl.capacity, wl.dim)
        self.indexes: list[Any] = []

    # subclass hooks
    def _build_one(self, rows: np.ndarray, ids: np.ndarray) -> Any:
        raise NotImplementedError

    def _insert(self, index: Any, rows: np.ndarray, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _evict(self, index: Any, ids: np.ndarray) -> None:
        """Default: nothing (the search filters by live id range)."""

    def _query(self, index: Any, queries: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _set_param(self, value: int) -> None:
        raise NotImplementedError

    # harness interface
    def fill(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys.add(keys)
        self.values.add(values)

    def build(self) -> None:
        start, rows = self.keys.live()
        ids = np.arange(start, self.keys.written, dtype=np.int64)
        t0 = time.perf_counter()
        self.indexes = [self._build_one(np.ascontiguousarray(r), ids) for r in rows]
        self.build_s = time.perf_counter() - t0
        self.keys.data = np.empty((0, 0, 0), np.float32)  # the indexes hold the keys now

    @property
    def live(self) -> tuple[int, int]:
        """[lo, hi) stream positions the FIFO holds."""
        return self.values.first_live, self.values.written

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        n = keys.shape[1]
        first, written = self.live
        evicted = np.arange(first, max(first, written + n - self.wl.capacity), dtype=np.int64)
        ids = np.arange(written, written + n, dtype=np.int64)
        for index, rows in zip(self.indexes, keys):
            if evicted.size:
                self._evict(index, evicted)
            self._insert(index, rows, ids)
        self.values.add(values)

    def search(self, queries: np.ndarray) -> np.ndarray:
        return np.stack([self._query(index, q) for index, q in zip(self.indexes, queries)])

    def found(self, raw: np.ndarray) -> Found:
        lo, hi = self.live
        if np.any((raw >= 0) & ((raw < lo) | (raw >= hi))):
            raise AssertionError(f"{self.name}: returned a position outside the live rows")
        return Found(raw, self.values.gather(raw))

    def tune(self, queries: np.ndarray, true_topk: np.ndarray) -> None:
        """Smallest value on PARAM_LADDER with recall >= TUNE_TARGET on these queries."""
        got = 0.0
        for value in self.PARAM_LADDER:
            self._set_param(value)
            got = recall(self.search(queries), true_topk)
            if got >= TUNE_TARGET:
                break
        tuned_on = queries.shape[0] * queries.shape[1]
        self.params.update({self.PARAM: value, "tune_recall": got, "tune_queries": tuned_on})
        reached = "" if got >= TUNE_TARGET else f" < {TUNE_TARGET} at the largest tried"
        self.note = f"{self.PARAM}={value} (tune recall {got:.3f}{reached}); {self.EVICTION}"


class FaissIndex(IndexPeer):
    """A faiss index per memory. faiss cannot delete from an HNSW graph (and IVF removal
    scans every list), so rows are only added and the evicted ones are filtered out of
    every search by an id range (ids are stream positions: faiss numbers rows in the
    order they are added, from position 0)."""

    EVICTION = "add-only + id-range filter"

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        import faiss

        self.faiss = faiss
        self.param = self.PARAM_LADDER[0]
        self.params = {"faiss": faiss.__version__}

    def _insert(self, index: Any, rows: np.ndarray, ids: np.ndarray) -> None:
        assert index.ntotal == ids[0], "faiss ids must stay equal to stream positions"
        index.add(rows)

    def _set_param(self, value: int) -> None:
        self.param = value

    def _search_params(self, selector: Any) -> Any:
        raise NotImplementedError

    def _query(self, index: Any, queries: np.ndarray) -> np.ndarray:
        params = self._search_params(self.faiss.IDSelectorRange(*self.live))
        return index.search(queries, self.wl.k, params=params)[1]


class FaissHNSW(FaissIndex):
    """faiss IndexHNSWFlat (inner product), efConstruction 40 (the faiss default)."""

    PARAM = "efSearch"
    PARAM_LADDER = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
    EF_CONSTRUCTION = 40

    def __init__(self, wl: Workload, m: int = 32) -> None:
        super().__init__(wl)
        self.m = m
        self.name = f"faiss IndexHNSWFlat M={m}"
        self.params.update(M=m, efConstruction=self.EF_CONSTRUCTION)

    def _build_one(self, rows: np.ndarray, ids: np.ndarray) -> Any:
        index = self.faiss.IndexHNSWFlat(rows.shape[1], self.m, self.faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.EF_CONSTRUCTION
        index.add(rows)
        return index

    def _search_params(self, selector: Any) -> Any:
        return self.faiss.SearchParametersHNSW(efSearch=self.param, sel=selector)


class FaissIVF(FaissIndex):
    """faiss IndexIVFFlat (inner product, flat quantizer), nlist = sqrt(capacity), trained
    on the filled memory."""

    PARAM = "nprobe"

    def __init__(self, wl: Workload) -> None:
        self.nlist = max(1, round(math.sqrt(wl.capacity)))
        ladder = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
        self.PARAM_LADDER = tuple(p for p in ladder if p < self.nlist) + (self.nlist,)
        super().__init__(wl)
        self.name = "faiss IndexIVFFlat"
        self.params.update(nlist=self.nlist)

    def _build_one(self, rows: np.ndarray, ids: np.ndarray) -> Any:
        faiss, d = self.faiss, rows.shape[1]
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(rows)
        index.add(rows)
        return index

    def _search_params(self, selector: Any) -> Any:
        return self.faiss.SearchParametersIVF(nprobe=self.param, sel=selector)


class Hnswlib(IndexPeer):
    """hnswlib (space "ip"), a true FIFO: evicted rows are mark_deleted and their graph
    slots reused by the new rows (allow_replace_deleted)."""

    PARAM = "ef"
    PARAM_LADDER = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
    EVICTION = "FIFO: mark_deleted + slot reuse"
    EF_CONSTRUCTION = 100

    def __init__(self, wl: Workload, m: int) -> None:
        super().__init__(wl)
        import hnswlib

        self.hnswlib = hnswlib
        self.m = m
        self.name = f"hnswlib M={m}"
        self.params = {"M": m, "ef_construction": self.EF_CONSTRUCTION}

    def _build_one(self, rows: np.ndarray, ids: np.ndarray) -> Any:
        index = self.hnswlib.Index(space="ip", dim=rows.shape[1])
        index.init_index(
            max_elements=self.wl.capacity,
            ef_construction=self.EF_CONSTRUCTION,
            M=self.m,
            allow_replace_deleted=True,
        )
        index.add_items(rows, ids)
        return index

    def _evict(self, index: Any, ids: np.ndarray) -> None:
        for label in ids.tolist():
            index.mark_deleted(label)

    def _insert(self, index: Any, rows: np.ndarray, ids: np.ndarray) -> None:
        index.add_items(rows, ids, replace_deleted=True)

    def _set_param(self, value: int) -> None:
        for index in self.indexes:
            index.set_ef(value)

    def _query(self, index: Any, queries: np.ndarray) -> np.ndarray:
        return index.knn_query(queries, k=self.wl.k)[0].astype(np.int64)


class Usearch(IndexPeer):
    """usearch Index (f32 storage, metric ip), FIFO by remove + add."""

    PARAM = "expansion_search"
    PARAM_LADDER = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
    EVICTION = "FIFO: remove + add"

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        import usearch
        from usearch.index import Index

        self.index_class = Index
        self.name = "usearch"
        self.params = {"dtype": "f32", "metric": "ip", "usearch": usearch.__version__}

    def _build_one(self, rows: np.ndarray, ids: np.ndarray) -> Any:
        index = self.index_class(ndim=rows.shape[1], metric="ip", dtype="f32")
        index.add(ids, rows)
        self.params.update(connectivity=index.connectivity, expansion_add=index.expansion_add)
        return index

    def _evict(self, index: Any, ids: np.ndarray) -> None:
        index.remove(ids)

    def _insert(self, index: Any, rows: np.ndarray, ids: np.ndarray) -> None:
        index.add(ids, rows)

    def _set_param(self, value: int) -> None:
        for index in self.indexes:
            index.expansion_search = value

    def _query(self, index: Any, queries: np.ndarray) -> np.ndarray:
        k = self.wl.k
        matches = index.search(queries, k)
        if hasattr(matches, "counts"):  # BatchMatches: [Q, k] keys, valid up to counts
            keys = np.asarray(matches.keys, np.int64).reshape(len(queries), k)
            counts = np.asarray(matches.counts).reshape(-1, 1)
        else:  # one query gives a Matches holding only the keys found
            found = np.asarray(matches.keys, np.int64)
            keys = np.full((1, k), -1, np.int64)
            keys[0, : found.size] = found
            counts = np.array([[found.size]])
        return np.where(np.arange(k) < counts, keys, -1)


# -- registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    key: str  # its name in --peers
    module: str  # what must be importable
    fast: bool  # in --peers fast
    make: Callable[[Workload], Method]


PEERS: tuple[Peer, ...] = (
    Peer("numpy", "numpy", True, NumpyExact),
    Peer("torch", "torch", True, TorchExact),
    Peer("jax", "jax", True, JaxApproxMaxK),
    Peer("faiss-flat", "faiss", False, FaissFlat),
    Peer("faiss-hnsw", "faiss", False, FaissHNSW),
    Peer("faiss-ivf", "faiss", False, FaissIVF),
    Peer("hnswlib16", "hnswlib", False, lambda wl: Hnswlib(wl, 16)),
    Peer("hnswlib32", "hnswlib", False, lambda wl: Hnswlib(wl, 32)),
    Peer("usearch", "usearch", False, Usearch),
)


def select_peers(spec: str) -> list[Peer]:
    """'fast', 'all' or a comma list of peer keys; numpy is always in (the baseline)."""
    keys = {p.key for p in PEERS}
    if spec == "all":
        return list(PEERS)
    if spec == "fast":
        return [p for p in PEERS if p.fast]
    wanted = {s.strip() for s in spec.split(",") if s.strip()} | {"numpy"}
    unknown = wanted - keys
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from {sorted(keys)}")
    return [p for p in PEERS if p.key in wanted]


def missing_module(peer: Peer) -> str | None:
    """None if the peer's library imports, else a one-line reason."""
    try:
        importlib.import_module(peer.module)
    except Exception as e:  # ImportError, or a broken install failing at import
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None
