"""What a kNN memory costs: a paper-like model with and without MemorizingAttention,
and the memory layer alone, forward + backward on CPU, with where the time goes.

    python bench/layer_cost.py             # B=2, segment 512, dim 512, 8x64 heads, 8K memory, k=32
    python bench/layer_cost.py --layers 12 --reps 7 --threads 2
    python bench/layer_cost.py --tiny            # a smoke run (seconds)

Model: pre-norm transformer blocks (MemorizingAttention + a 4x MLP) over a segment;
one block (the second to last, as in Wu et al. 2022) has a kNN memory, filled to
capacity before timing (a memory of 8192 rows per batch element and head); the
baseline is the same model with use_memory=False. A step is a forward and backward of
one segment after the previous one (each call adds a segment to the memory: FIFO).

Breakdown of the memory layer's extra time (each part timed alone on the shapes the
layer sees, forward + backward where it has one):
    search   memory.search of the segment's queries: the bin scan and top-k, and the
             gather of the k keys and values per query that the search returns
    gather   a reference, not a part: the same gather of the k keys and values per
             query done by torch.gather on its own (the search's own gather is
             inside `search` and cheaper; measured on one machine, torch.gather took
             longer than the whole search)
    memory attention   logits over the k retrieved keys, softmax, weighted sum of
             the values and the gated mix with the local attention (forward + backward)
    add      memory.add of the segment's keys and values (into a full ring)
    other    the layer with memory minus the layer without, minus the parts above
             (normalisation of queries for the search, masks, dtype casts)

Methods take turns within each repetition (with and without memory alternate, in
alternating order), so a slow spell of a shared machine hits both; medians are
reported. Run it on an idle machine for numbers to quote; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import knnmem._core as core
import knnmem.torch as kt


class Block(nn.Module):
    def __init__(self, a: argparse.Namespace, memory: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(a.dim), nn.LayerNorm(a.dim)
        self.attn = kt.MemorizingAttention(
            a.dim, a.heads, a.batch, capacity=a.capacity, k=a.k, use_memory=memory
        )
        self.mlp = nn.Sequential(
            nn.Linear(a.dim, 4 * a.dim), nn.GELU(), nn.Linear(4 * a.dim, a.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def build(a: argparse.Namespace, memory: bool, lean: bool = True) -> nn.Module:
    """The model; lean=False: its memory layer uses the formulation from before the
    lean search (all five fields returned, the logits recomputed from the keys)."""
    torch.manual_seed(0)
    where = max(a.layers - 2, 0)
    model = nn.Sequential(*(Block(a, memory and i == where) for i in range(a.layers)))
    model[where].attn._lean_search = lean
    return model


def fill(model: nn.Module, a: argparse.Namespace) -> None:
    """Fills every memory to capacity with the model's own keys and values."""
    with torch.no_grad():
        for _ in range(-(-a.capacity // a.segment)):
            model(torch.randn(a.batch, a.segment, a.dim))


def step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def clock(fn, reps_inner: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps_inner):
        fn()
    return (time.perf_counter() - t0) / reps_inner * 1e3


def parts(a: argparse.Namespace) -> dict:
    """Callables timing each part of the memory layer's extra work on its shapes."""
    b, h, t, d, k = a.batch, a.heads, a.segment, a.dim // a.heads, a.k
    layer = kt.MemorizingAttention(a.dim, a.heads, b, capacity=a.capacity, k=k)
    mem = layer.memory
    with torch.no_grad():
        for _ in range(-(-a.capacity // t)):
            mem.add(F.normalize(torch.randn(b, h, t, d), dim=-1), torch.randn(b, h, t, d))
    q = F.normalize(torch.randn(b, h, t, d), dim=-1)
    res = mem.search(q, k=k, recall_target=layer.recall_target)
    flat = res.indices.clamp(min=0).reshape(b, h, t * k, 1).expand(b, h, t * k, d)
    qs = (q * 10).requires_grad_()
    local = torch.randn(b, h, t, d, requires_grad=True)
    gate = torch.zeros(h, requires_grad=True)
    new_k, new_v = F.normalize(torch.randn(b, h, t, d), dim=-1), torch.randn(b, h, t, d)

    def search():
        mem.search(q, k=k, recall_target=layer.recall_target, fields=("scores", "values", "mask"))

    def search_all():
        mem.search(q, k=k, recall_target=layer.recall_target)

    def gather():
        torch.gather(mem.keys, 2, flat), torch.gather(mem.values, 2, flat)

    def attention():
        logits = torch.einsum("bhtd,bhtkd->bhtk", qs, res.keys)
        logits = logits.masked_fill(~res.mask, torch.finfo(logits.dtype).min)
        w = torch.softmax(logits, -1) * res.mask
        m = torch.einsum("bhtk,bhtkd->bhtd", w, res.values)
        g = torch.sigmoid(gate).view(1, h, 1, 1) * res.mask[..., :1]
        (g * m + (1 - g) * local).sum().backward()

    def add():
        mem.add(new_k, new_v)

    return {
        "search": search,
        "search, all five fields": search_all,
        "gather": gather,
        "memory attention": attention,
        "add": add,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--capacity", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: small shapes, 2 reps")
    a = p.parse_args(argv)
    if a.tiny:
        a.layers, a.segment, a.dim, a.heads, a.capacity, a.k, a.reps = 2, 64, 64, 2, 256, 8, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    print(
        f"kernel {core.get_kernel()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; B={a.batch}, segment {a.segment}, dim {a.dim}, {a.heads} heads of "
        f"{a.dim // a.heads}, {a.layers} layers (memory in layer {max(a.layers - 2, 0)}), "
        f"capacity {a.capacity}, k={a.k}; median of {a.reps} (forward + backward, ms)"
    )
    models = {
        "with memory": build(a, True),
        "keys returned": build(a, True, lean=False),
        "without memory": build(a, False),
    }
    fill(models["with memory"], a)
    fill(models["keys returned"], a)
    where = max(a.layers - 2, 0)
    layers = {n: m[where].attn for n, m in models.items()}
    x = torch.randn(a.batch, a.segment, a.dim)
    xl = torch.randn(a.batch, a.segment, a.dim, requires_grad=True)

    def layer_step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            layer(xl).square().mean().backward()

        return run

    jobs = {("model", n): (lambda m=m: step(m, x)) for n, m in models.items()}
    jobs.update({("layer", n): layer_step(layer) for n, layer in layers.items()})
    jobs.update({("part", n): f for n, f in parts(a).items()})
    for f in jobs.values():  # warm up
        f()
    times: dict = {key: [] for key in jobs}
    order = list(jobs)
    for r in range(a.reps):
        for key in order if r % 2 == 0 else order[::-1]:
            times[key].append(clock(jobs[key]))
    med = {key: statistics.median(v) for key, v in times.items()}

    rows = []
    for what in ("model", "layer"):
        w, wo = med[(what, "with memory")], med[(what, "without memory")]
        label = f"{a.layers}-layer model step" if what == "model" else "memory layer alone"
        rows.append((label, wo, w, w / wo))
    print("\n| | without memory | with memory | ratio |\n|---|---:|---:|---:|")
    for label, wo, w, ratio in rows:
        print(f"| {label} | {wo:.1f} | {w:.1f} | {ratio:.2f}x |")
    print(
        "\nthe same with the memory layer's formulation before the lean search (the search "
        "returns all five fields; logits recomputed from the keys):\n"
    )
    print("| | without memory | keys returned | ratio | lean vs keys returned |")
    print("|---|---:|---:|---:|---:|")
    for what, label in (("model", "model step"), ("layer", "memory layer alone")):
        wo, old, new = (med[(what, n)] for n in ("without memory", "keys returned", "with memory"))
        print(f"| {label} | {wo:.1f} | {old:.1f} | {old / wo:.2f}x | {old / new:.2f}x |")
    extra = med[("layer", "with memory")] - med[("layer", "without memory")]
    print(f"\nwhere the memory layer's extra {extra:.1f} ms go:\n")
    print("| part | ms | share |\n|---|---:|---:|")
    accounted = 0.0
    for name in ("search", "memory attention", "add"):
        v = med[("part", name)]
        accounted += v
        print(f"| {name} | {v:.1f} | {v / extra:.0%} |")
    v = med[("part", "search, all five fields")]
    label = "(reference: the search returning all five fields, not a part)"
    print(f"| {label} | {v:.1f} | {v / extra:.0%} |")
    g = med[("part", "gather")]
    label = "(reference: the same gather by torch.gather alone, not a part)"
    print(f"| {label} | {g:.1f} | {g / extra:.0%} |")
    print(f"| other | {extra - accounted:.1f} | {(extra - accounted) / extra:.0%} |")
    return {"median_ms": {f"{k[0]}/{k[1]}": v for k, v in med.items()}, "rows": rows}


if __name__ == "__main__":
    main()
