"""GPU benchmark of the CUDA engine against torch matmul + topk, all measured in one run.

    python bench/cuda_bench.py                      # M1-M4, bfloat16 and float32 keys
    python bench/cuda_bench.py --workloads M2 --dtypes bfloat16 --json bench/out/cuda.json

Needs knnmem built with its CUDA kernels (knnmem.cuda.available()) and torch with CUDA
(torch is the timer, the data generator and the baseline; the pinned CPU torch of
constraints.txt cannot run this).

Workloads (docs/design.md; M2 at grid shape (8, 8)), k = 32:
    M1 shape (1,)   capacity 65,536     d=128 Q=512
    M2 shape (8, 8) capacity 8,192      d=64  Q=512
    M3 shape (1,)   capacity 1,048,576  d=128 Q=64
    M4 shape (8,)   capacity 65,536     d=128 Q=1
Data: per memory 256 unit-norm cluster centres, each row a centre plus noise, normalised
(metric "ip" on unit vectors); memories are filled to capacity before timing.

Rows per workload and key dtype:
    knnmem search      the CUDA search alone (recall_target 0.9), CUDA-event timed;
                       "no gather": the same without copying keys and values out
    knnmem step        add one segment of Q rows + search Q queries
    torch mm+topk      torch.matmul(queries, keys^T) + topk + gather, exact, same dtype
and once per run the bf16 rate of a large torch.matmul (8192^3), so the search's rate
(2 Q n d flops per memory) is stated as a fraction of it. Recall@k is against exact
top-k of the float32 keys (torch, float32 accumulate). Targets (H100): bf16 search on M2
at >= 50% of the bf16 matmul rate with recall >= 0.9, and >= 5x faster than torch
matmul + topk at the same recall bar.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys

WORKLOADS = {
    "M1": ((1,), 65536, 128, 512),
    "M2": ((8, 8), 8192, 64, 512),
    "M3": ((1,), 1 << 20, 128, 64),
    "M4": ((8,), 65536, 128, 1),
}
K = 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", default="M1,M2,M3,M4")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--recall-target", type=float, default=0.9)
    ap.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    ap.add_argument("--reps", type=int, default=5, help="measurements (median reported)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--profile", action="store_true", help="print each kernel's device time")
    args = ap.parse_args()

    import torch

    import knnmem.cuda as kcuda

    reason = kcuda.unavailable_reason()
    if reason is not None:
        print(f"cuda_bench: skipped: {reason}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("cuda_bench: skipped: torch has no CUDA (install a CUDA build of torch)")
        return 2

    dev = torch.device("cuda")

    def timed(fn) -> float:
        """Median seconds per call over reps of `iters` back-to-back calls."""
        fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / args.iters)
        return statistics.median(out)

    mm_rate = matmul_rate(torch, dev, timed)
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"bf16 torch.matmul 8192^3: {mm_rate / 1e12:.1f} TFLOP/s")
    gen = torch.Generator(device=dev).manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "bf16_matmul_tflops": mm_rate / 1e12}
    rows_out = []
    for name in args.workloads.split(","):
        for dtype_name in args.dtypes.split(","):
            row = bench_one(
                torch, kcuda, dev, gen, timed, name, dtype_name, args.recall_target, args.profile
            )
            row["fraction_of_bf16_matmul"] = row["search_tflops"] * 1e12 / mm_rate
            rows_out.append(row)
            print(
                f"{name} {dtype_name:8s} search {row['search_s'] * 1e6:9.1f} us  "
                f"(no gather {row['scores_only_s'] * 1e6:8.1f} us, "
                f"{row['scores_only_tflops']:6.1f} TFLOP/s)  step "
                f"{row['step_s'] * 1e6:9.1f} us  recall {row['recall']:.3f}  "
                f"{row['search_tflops']:7.1f} TFLOP/s ({100 * row['fraction_of_bf16_matmul']:5.1f}%"
                f" of bf16 mm)  torch mm+topk {row['torch_mm_topk_s'] * 1e6:9.1f} us "
                f"({row['speedup_vs_torch']:.1f}x)"
            )
            torch.cuda.empty_cache()
    results["rows"] = rows_out
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def matmul_rate(torch, dev, timed) -> float:
    """Flop/s of a large bf16 torch.matmul (8192^3), measured in this run."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: torch.matmul(a, b))


def clustered(torch, dev, gen, grid: int, n: int, d: int):
    centres = torch.randn(grid, 256, d, device=dev, generator=gen)
    centres /= centres.norm(dim=-1, keepdim=True)
    labels = torch.randint(0, 256, (grid, n), device=dev, generator=gen)
    noise = torch.randn(grid, n, d, device=dev, generator=gen) * (0.8 / math.sqrt(d))
    rows = torch.gather(centres, 1, labels[..., None].expand(grid, n, d)) + noise
    return rows / rows.norm(dim=-1, keepdim=True)


def print_kernel_times(torch, name: str, dtype_name: str, fn, calls: int = 10) -> None:
    """Device time per call of each CUDA kernel that fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:3]:
        if ev.device_time_total <= 0:
            continue
        found = re.search(r"(\w+_kernel)", ev.key)
        label = found[1] if found else ev.key[:40]
        print(f"  {name} {dtype_name:8s} kernel {label:40s} {ev.device_time_total / calls:9.1f} us")


def bench_one(
    torch, kcuda, dev, gen, timed, name: str, dtype_name: str, target: float, profile: bool
) -> dict:
    shape, capacity, d, q_count = WORKLOADS[name]
    grid = math.prod(shape)
    dtype = getattr(torch, dtype_name)
    keys32 = clustered(torch, dev, gen, grid, capacity, d)
    keys = torch.zeros(*shape, capacity, d, device=dev, dtype=dtype)
    values = torch.zeros(*shape, capacity, d, device=dev)
    written = torch.zeros(shape, device=dev, dtype=torch.int64)
    rows = keys32.reshape(*shape, capacity, d).contiguous()
    kcuda.torch_add(keys, values, written, rows, rows)  # filled: row r in slot slot_of[r]
    queries = clustered(torch, dev, gen, grid, q_count, d).reshape(*shape, q_count, d)
    segment = clustered(torch, dev, gen, grid, q_count, d).reshape(*shape, q_count, d)

    def search():
        return kcuda.torch_search(keys, values, written, queries, K, target, "ip")

    t_search = timed(search)
    t_scores = timed(
        lambda: kcuda.torch_search(keys, values, written, queries, K, target, "ip", gather=False)
    )
    if profile:
        print_kernel_times(torch, name, dtype_name, search)
    res = search()
    # Recall against exact top-k of the float32 rows, in slot space (knnmem's indices
    # are stream positions: slot = slot_of[position % capacity]).
    slot_of = kcuda.placement_tensors(dev, capacity)[0].long()
    originals = torch.empty_like(keys32)
    originals[:, slot_of] = keys32
    q = queries.reshape(grid, q_count, d)
    exact = torch.topk(torch.bmm(q, originals.transpose(1, 2)), K, dim=-1).indices
    got = slot_of[res[1].reshape(grid, q_count, K) % capacity]
    recall = (got[..., :, None] == exact[..., None, :]).any(-1).float().mean().item()
    del originals, exact

    def step():
        kcuda.torch_add(keys, values, written, segment, segment)
        return search()

    t_step = timed(step)
    kt = keys.reshape(grid, capacity, d)
    vt = values.reshape(grid, capacity, d)
    qt = q.to(dtype)

    def torch_topk():
        top = torch.topk(torch.bmm(qt, kt.transpose(1, 2)), K, dim=-1)
        idx = top.indices.reshape(grid, -1, 1).expand(grid, q_count * K, d)
        return top.values, torch.gather(vt, 1, idx)

    t_torch = timed(torch_topk)
    flops = 2 * grid * q_count * capacity * d
    return {
        "workload": name,
        "dtype": dtype_name,
        "search_s": t_search,
        "scores_only_s": t_scores,
        "step_s": t_step,
        "torch_mm_topk_s": t_torch,
        "recall": recall,
        "search_tflops": flops / t_search / 1e12,
        "scores_only_tflops": flops / t_scores / 1e12,
        "speedup_vs_torch": t_torch / t_search,
        "plan": kcuda._cuda.plan(grid, capacity, d, q_count, K, target, dtype_name),
    }


if __name__ == "__main__":
    sys.exit(main())
