"""Train a small byte-level transformer with MemorizingAttention on real text (CPU).

The text is the source of Python's standard library, read from the local
installation: one document per .py file, byte-level tokens (vocabulary 256).
Each batch row reads its own documents segment by segment; when a row starts a
new document its kNN memories are cleared (reset=...), so a memory only ever
holds the earlier segments of the current document, as in Memorizing
Transformers (Wu et al. 2022). One layer (the second to last, as in the paper)
has a kNN memory; the others are local attention. The same model without the
memory is the baseline; both see the same batches, from the same seed.

    python examples/torch_memorizing.py                     # memory vs baseline, 300 steps
    python examples/torch_memorizing.py --steps 600 --no-baseline
    python examples/torch_memorizing.py --context           # + the previous segment (XL)

Prints training loss and the held-out loss in bits per byte, overall and on
segments that are not the first of their document (where the memory has
something to offer).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import knnmem.torch as kt


@dataclasses.dataclass
class Config:
    steps: int = 300
    batch: int = 8
    segment: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4
    capacity: int = 4096  # rows per memory: 16 segments of 256 bytes
    k: int = 32
    recall_target: float = 0.9
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    max_files: int = 2000
    max_doc_bytes: int = 0  # 0: whole files
    eval_segments: int = 24
    memory: bool = True
    context: bool = False  # every layer also attends to the previous segment (XL cache)
    log_every: int = 50


# -- data -----------------------------------------------------------------------------------


def load_documents(cfg: Config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, valid) documents: stdlib .py files as uint8 arrays, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    rng = np.random.default_rng(cfg.seed)
    rng.shuffle(paths)
    docs = []
    for path in paths:
        if len(docs) >= cfg.max_files:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if cfg.max_doc_bytes:
            data = data[: cfg.max_doc_bytes]
        if len(data) > 2 * cfg.segment + 1:
            docs.append(np.frombuffer(data, dtype=np.uint8))
    if len(docs) < 10:
        raise RuntimeError(f"found only {len(docs)} usable .py files under {root}")
    n_valid = max(2, len(docs) // 20)
    return docs[n_valid:], docs[:n_valid]


class Segments:
    """Batch rows that each read documents in order, one segment at a time.

    next() -> (inputs [B, T] int64, targets [B, T] int64, reset [B] bool,
    first [B] bool): reset where the row starts a new document with this segment.
    """

    def __init__(self, docs: list[np.ndarray], batch: int, segment: int, seed: int) -> None:
        self.docs, self.t = docs, segment
        self.rng = np.random.default_rng(seed)
        self.order = list(self.rng.permutation(len(docs)))
        self.rows = [self._take() for _ in range(batch)]
        self.pos = [0] * batch

    def _take(self) -> np.ndarray:
        if not self.order:
            self.order = list(self.rng.permutation(len(self.docs)))
        return self.docs[self.order.pop()]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets, reset = [], [], []
        for b, doc in enumerate(self.rows):
            new = False
            if self.pos[b] + self.t + 1 > len(doc):
                self.rows[b], self.pos[b], new = self._take(), 0, True
            doc, p = self.rows[b], self.pos[b]
            new = new or p == 0
            inputs.append(doc[p : p + self.t])
            targets.append(doc[p + 1 : p + self.t + 1])
            reset.append(new)
            self.pos[b] = p + self.t
        return (
            torch.from_numpy(np.stack(inputs).astype(np.int64)),
            torch.from_numpy(np.stack(targets).astype(np.int64)),
            torch.tensor(reset),
        )


# -- model ----------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: Config, memory: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = kt.MemorizingAttention(
            cfg.dim,
            cfg.heads,
            cfg.batch,
            capacity=cfg.capacity,
            k=cfg.k,
            recall_target=cfg.recall_target,
            use_memory=memory,
            context=cfg.context,
        )
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim)
        )

    def forward(self, x: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), reset)
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output layer
        memory_layer = max(0, cfg.layers - 2) if cfg.memory else -1
        self.blocks = nn.ModuleList(Block(cfg, i == memory_layer) for i in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, reset)
        return self.norm(x) @ self.embed.weight.t()

    def memories(self) -> list[kt.KNNMemory]:
        return [b.attn.memory for b in self.blocks if b.attn.memory is not None]

    def reset_memories(self) -> None:
        for b in self.blocks:
            b.attn.reset()


# -- training -------------------------------------------------------------------------------


def evaluate(model: ByteLM, docs: list[np.ndarray], cfg: Config) -> dict[str, float]:
    """Held-out loss in bits per byte: all segments, and those after a document's first."""
    model.eval()
    model.reset_memories()
    stream = Segments(docs, cfg.batch, cfg.segment, seed=cfg.seed + 1)
    total, later = [], []
    with torch.no_grad():
        for _ in range(cfg.eval_segments):
            inputs, targets, reset = stream.next()
            logits = model(inputs, reset)
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
            bits = (loss / math.log(2)).tolist()
            total += bits
            later += [x for x, r in zip(bits, reset.tolist()) if not r]
    model.reset_memories()
    model.train()
    return {
        "bits_per_byte": float(np.mean(total)),
        "bits_per_byte_later_segments": float(np.mean(later)) if later else float("nan"),
    }


def train(cfg: Config, docs=None, log=None) -> dict:
    """Trains one model; returns losses, held-out bits per byte and memory stats."""
    log = log or functools.partial(print, flush=True)
    torch.manual_seed(cfg.seed)
    train_docs, valid_docs = docs if docs is not None else load_documents(cfg)
    model = ByteLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    stream = Segments(train_docs, cfg.batch, cfg.segment, seed=cfg.seed)
    losses, resets, start = [], 0, time.perf_counter()
    for step in range(cfg.steps):
        inputs, targets, reset = stream.next()
        resets += int(reset.sum()) if step else 0
        logits = model(inputs, reset)
        loss = F.cross_entropy(logits.transpose(1, 2), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = np.mean(losses[-cfg.log_every :]) / math.log(2)
            elapsed = time.perf_counter() - start
            log(f"  step {step + 1:4d}  train {recent:.3f} bits/byte  ({elapsed:.0f} s)")
    written = [m.written.clone() for m in model.memories()]
    gates = [torch.sigmoid(b.attn.gate).tolist() for b in model.blocks if b.attn.memory is not None]
    result = {
        "gates": gates,
        "losses": losses,
        "resets": resets,
        "written": written,
        "seconds": time.perf_counter() - start,
        "model": model,
    }
    result.update(evaluate(model, valid_docs, cfg))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        if f.name == "memory":
            continue
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
            continue
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without memory")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = vars(parser.parse_args(argv))
    no_baseline, threads = args.pop("no_baseline"), args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    cfg = Config(**args)
    docs = load_documents(cfg)
    print(
        f"{len(docs[0])} training and {len(docs[1])} held-out documents "
        f"({sum(map(len, docs[0])) / 1e6:.1f} MB); {cfg.steps} steps of "
        f"{cfg.batch} x {cfg.segment} bytes"
    )
    results = {}
    for memory in (True, False) if not no_baseline else (True,):
        name = "memory" if memory else "baseline"
        print(f"{name}:")
        results[name] = train(dataclasses.replace(cfg, memory=memory), docs)
    print()
    print(f"{'model':10s} {'held-out bits/byte':>19s} {'(later segments)':>17s} {'time':>7s}")
    for name, r in results.items():
        print(
            f"{name:10s} {r['bits_per_byte']:19.3f} {r['bits_per_byte_later_segments']:17.3f}"
            f" {r['seconds']:6.0f}s"
        )
    for gates in results["memory"]["gates"]:
        print("memory gate g per head (0.5 at the start): " + " ".join(f"{g:.2f}" for g in gates))
    return results


if __name__ == "__main__":
    main()
