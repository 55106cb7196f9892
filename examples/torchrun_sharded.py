"""One kNN memory grid spread over the ranks of a torchrun job (knnmem.torch.ShardedKNNMemory).

    torchrun --nproc-per-node 2 examples/torchrun_sharded.py
    python -m torch.distributed.run --nproc-per-node 4 examples/torchrun_sharded.py --capacity 65536
    # several hosts: the same command on each, plus
    #   --nnodes 2 --node-rank <0|1> --rdzv-backend c10d --rdzv-endpoint <host0>:29500

Each of the W ranks keeps capacity / W rows of every memory (row p of a memory's stream
on rank p % W). All ranks make the same calls with the same segments, as tensor- or
sequence-parallel ranks that hold the same activations do; here rank 0 draws each
segment and broadcasts it. A step adds a segment, then searches the whole memory: a
local search per rank, an all_gather of the k candidates' scores and positions, and one
all_reduce of the k winning rows. Every rank gets the same result.

At the end each rank checkpoints its own shard (``state_dict``, one file per rank), a
fresh memory loads it and searches again. With ``--check`` every rank also keeps an
unsharded KNNMemory and checks that exact searches agree with it.

gloo runs on CPU; on GPUs pass ``--backend nccl`` (each rank then keeps its shard on
cuda:LOCAL_RANK, which needs knnmem built with its CUDA kernels, docs/cuda.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist

import knnmem.torch as kt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--capacity", type=int, default=16384, help="rows per memory, all ranks")
    p.add_argument("--key-dim", type=int, default=64)
    p.add_argument("--segment", type=int, default=512, help="rows added per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--recall-target", type=float, default=0.9)
    p.add_argument("--checkpoint-dir", default=None, help="default: a temporary folder")
    p.add_argument("--check", action="store_true", help="compare with an unsharded memory")
    args = p.parse_args()

    dist.init_process_group(args.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if args.backend == "nccl":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    shape = (args.batch, args.heads)
    d = args.key_dim

    memory = kt.ShardedKNNMemory(shape, args.capacity, d, metric="ip", device=device)
    full = kt.KNNMemory(shape, args.capacity, d, metric="ip") if args.check else None
    gen = torch.Generator().manual_seed(0)

    centres = torch.randn(*shape, 16, d, generator=gen)  # used on rank 0 only

    def segment(rows: int) -> torch.Tensor:
        """Unit rows around 16 centres per memory, drawn on rank 0, the same everywhere."""
        x = torch.empty(*shape, rows, d)
        if rank == 0:
            pick = torch.randint(0, 16, (*shape, rows), generator=gen)
            x = torch.gather(centres, -2, pick[..., None].expand(*shape, rows, d))
            x = x + 0.5 * torch.randn(*shape, rows, d, generator=gen)
            x = x / x.norm(dim=-1, keepdim=True)
        x = x.to(device)
        dist.broadcast(x, src=0)
        return x

    if rank == 0:
        print(
            f"{world} ranks ({args.backend}), memories {shape} x {args.capacity} rows x {d}: "
            f"{args.capacity // world} rows per memory per rank"
        )
    for step in range(args.steps):
        keys = segment(args.segment)
        memory.add(keys, keys)  # values: the keys themselves, for the demo
        queries = segment(64)
        t0 = time.perf_counter()
        res = memory.search(queries, k=args.k, recall_target=args.recall_target)
        ms = 1e3 * (time.perf_counter() - t0)
        if full is not None:
            full.add(keys.cpu(), keys.cpu())
            check(memory, full, queries, args.k)
        if rank == 0:
            held = int(memory.count.min())
            print(
                f"step {step}: {held} rows per memory, search {ms:.1f} ms, "
                f"best score {res.scores[..., 0].mean():.3f}"
            )

    # Checkpoint: each rank saves its own shard and loads it into a fresh memory.
    folder = args.checkpoint_dir or tempfile.mkdtemp(prefix="knnmem-ckpt-")
    if args.checkpoint_dir is None:  # every rank writes into rank 0's folder
        box = [folder]
        dist.broadcast_object_list(box, src=0)
        folder = box[0]
    path = os.path.join(folder, f"memory.rank{rank}.pt")
    torch.save(memory.state_dict(), path)
    restored = kt.ShardedKNNMemory(shape, args.capacity, d, metric="ip", device=device)
    restored.load_state_dict(torch.load(path, weights_only=True))
    queries = segment(64)
    a = memory.search(queries, k=args.k, recall_target=1.0)
    b = restored.search(queries, k=args.k, recall_target=1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "the restored shard searches differently"
    dist.barrier()
    if rank == 0:
        print(f"checkpoint: one file per rank in {folder}; the restored memory searches the same")
        if args.check:
            print("check: exact searches equal an unsharded memory's on every rank")
    dist.destroy_process_group()


def check(memory: kt.ShardedKNNMemory, full: kt.KNNMemory, queries, k: int) -> None:
    """Exact search of the sharded memory == the unsharded one (up to the order of equal
    scores), and the same result on every rank."""
    res = memory.search(queries, k=k, recall_target=1.0)
    want = full.search(queries.cpu(), k=k, recall_target=1.0)
    got = [x.cpu() for x in res]
    assert torch.equal(got[4], want.mask)
    torch.testing.assert_close(got[0], want.scores, rtol=0, atol=1e-5)
    same = got[1] == want.indices
    assert same.float().mean() > 0.99, same.float().mean()  # differ only where scores tie
    assert torch.equal(got[2][same], want.keys[same])
    parts = [torch.empty_like(res.indices) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, res.indices.contiguous())
    assert all(torch.equal(x, parts[0]) for x in parts)


if __name__ == "__main__":
    main()
