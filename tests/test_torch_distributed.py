"""knnmem.torch under torch.distributed (gloo on CPU, processes on 127.0.0.1):
a memory sharded along the capacity axis equals the unsharded one in exact mode,
and the data-parallel mode keeps per-rank memories out of DDP's buffer broadcast.

Each test starts its ranks with torch.multiprocessing and waits a bounded time
(collectives time out after 60 s; the test kills its processes after 120 s)."""

from __future__ import annotations

import datetime
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import knnmem  # noqa: E402
import knnmem.torch as kt  # noqa: E402
from conftest import score_tol, untied  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"
)

TIMEOUT_S = 120


def _entry(rank: int, world: int, rendezvous: str, check) -> None:
    torch.set_num_threads(1)
    knnmem.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        check(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check passed and the group is gone. Skip the interpreter's teardown:
    # torch 2.13 + gloo aborts now and then there ("terminate called without an
    # active exception", SIGABRT after the last line of Python), in a third of
    # the runs on a 2-core machine, with or without DDP.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(check, world: int) -> None:
    """Runs check(rank, world) in `world` processes; raises what a rank raised.

    The ranks meet through a file (a TCP rendezvous on a port picked beforehand
    could race with other processes on a busy machine)."""
    folder = tempfile.mkdtemp(prefix="knnmem-dist-")
    rendezvous = os.path.join(folder, "rendezvous")
    ctx = mp.start_processes(
        _entry, args=(world, rendezvous, check), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
        shutil.rmtree(folder, ignore_errors=True)


def same_on_all_ranks(x: torch.Tensor) -> bool:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


def assert_equal_results(got, want, queries) -> None:
    g = [x.numpy() for x in got]
    w = [x.numpy() for x in want]
    np.testing.assert_array_equal(g[4], w[4])
    tol = score_tol(np.ones((1, 1), np.float32) * 3, queries.numpy())
    sel = untied(w[0], tol)
    assert sel[w[4]].mean() > 0.95
    np.testing.assert_array_equal(g[1][sel], w[1][sel])
    np.testing.assert_allclose(g[0][w[4]], w[0][w[4]], rtol=0, atol=tol)
    same = g[1] == w[1]
    np.testing.assert_array_equal(g[2][same], w[2][same])
    np.testing.assert_array_equal(g[3][same], w[3][same])
    assert np.all(g[1][~w[4]] == -1) and np.all(g[2][~w[4]] == 0)


def check_sharded_exact(rank: int, world: int) -> None:
    """Exact searches of a sharded grid == an unsharded one, through adds, a
    wrapped ring and a clear; the same result on every rank."""
    rng = np.random.default_rng(0)  # the same stream on every rank
    shape, capacity, d, dv = (2, 3), 240, 8, 5
    sharded = kt.ShardedKNNMemory(shape, capacity, d, dv, metric="cosine")
    full = kt.KNNMemory(shape, capacity, d, dv, metric="cosine")
    assert sharded.local.capacity == capacity // world
    for step, t in enumerate([48, 96, 120, 0, 24, 72]):
        keys = torch.from_numpy(rng.standard_normal((*shape, t, d), dtype=np.float32))
        values = torch.from_numpy(rng.standard_normal((*shape, t, dv), dtype=np.float32))
        sharded.add(keys, values)
        full.add(keys, values)
        if step == 2:
            sharded.clear((1, 2))
            full.clear((1, 2))
        q = torch.from_numpy(rng.standard_normal((*shape, 11, d), dtype=np.float32))
        got = sharded.search(q, k=20, recall_target=1.0)
        want = full.search(q, k=20, recall_target=1.0)
        assert_equal_results(got, want, q)
        assert torch.equal(sharded.written, full.written)
        assert torch.equal(sharded.count, full.count)
        for x in got:
            assert same_on_all_ranks(x)
    with pytest.raises(ValueError, match="multiple of the group size"):
        sharded.add(torch.ones(*shape, world + 1, d), torch.ones(*shape, world + 1, dv))


def check_sharded_approx_and_attention(rank: int, world: int) -> None:
    rng = np.random.default_rng(1)
    # Approximate mode: each shard keeps the recall promise for its part of the top-k.
    big = kt.ShardedKNNMemory(1, 8160, 16, 16)
    keys = torch.from_numpy(rng.standard_normal((1, 8160, 16), dtype=np.float32))
    big.add(keys, keys)
    q = torch.from_numpy(rng.standard_normal((1, 64, 16), dtype=np.float32))
    res = big.search(q, k=32, recall_target=0.9)
    _, truth = knnmem.eval.exact_search(keys.numpy(), q.numpy(), 32)
    assert knnmem.eval.recall(res.indices.numpy(), truth) >= 0.88
    assert same_on_all_ranks(res.indices)

    # MemorizingAttention on a sharded memory == on an unsharded one (exact search).
    torch.manual_seed(0)
    memory = kt.ShardedKNNMemory((2, 4), 96, 8, 8, metric="ip")
    a = kt.MemorizingAttention(32, 4, 2, capacity=96, k=8, recall_target=1.0, memory=memory)
    b = kt.MemorizingAttention(32, 4, 2, capacity=96, k=8, recall_target=1.0)
    b.load_state_dict(a.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        x = torch.randn(2, 24, 32, generator=gen)
        reset = torch.tensor([i == 3, False])
        torch.testing.assert_close(a(x, reset), b(x, reset))
    assert torch.equal(memory.written, b.memory.written)


def check_data_parallel(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)  # the same initial weights everywhere
    model = torch.nn.Sequential(kt.MemorizingAttention(32, 4, batch_size=2, capacity=64, k=4))
    ignored = kt.ddp_ignore_memories(model)
    assert ignored == ["0.memory.keys", "0.memory.values", "0.memory.written"]
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    for _ in range(3):
        x = torch.randn(2, 16, 32, generator=gen)
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    memory = model[0].memory
    assert memory.written.tolist() == [[48] * 4] * 2
    for p in model.parameters():
        assert same_on_all_ranks(p.detach())  # gradients were averaged
    assert not same_on_all_ranks(memory.keys)  # memories stayed per rank

    # Without ddp_ignore_memories, DDP's buffer broadcast overwrites them with rank 0's.
    plain = torch.nn.Sequential(kt.MemorizingAttention(32, 4, batch_size=2, capacity=64, k=4))
    plain[0].memory.add(torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8))
    assert not same_on_all_ranks(plain[0].memory.keys)
    DDP(plain)
    assert same_on_all_ranks(plain[0].memory.keys)
    # DDP objects sit in reference cycles: collect them while the process group
    # lives (collected at interpreter exit, gloo aborted the rank now and then).
    del ddp, opt
    gc.collect()


def check_all(rank: int, world: int) -> None:
    check_sharded_exact(rank, world)
    check_sharded_approx_and_attention(rank, world)
    check_data_parallel(rank, world)


def test_two_ranks_sharded_and_data_parallel() -> None:
    """One process group of 2 ranks runs every check (process start-up dominates)."""
    run_ranks(check_all, 2)


def test_three_ranks_sharded_exact() -> None:
    run_ranks(check_sharded_exact, 3)


def test_sharded_memory_needs_an_initialized_group() -> None:
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        kt.ShardedKNNMemory(2, 64, 8)
