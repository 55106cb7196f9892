"""A byte-level transformer language model with one memorizing layer (knnmem.jax), trained
on CPU on the source files of the Python standard library, with and without the memory.

    python examples/jax_memorizing_lm.py                 # ~8 minutes on 2 cores
    python examples/jax_memorizing_lm.py --minutes 10    # longer runs
    python examples/jax_memorizing_lm.py --fast          # seconds (the integration test)

Data: every .py file of the standard library outside tests and site-packages is a
document (about 740 files, 12 MB). Source code repeats itself over long distances
(identifiers, imports, docstrings, whole idioms), which is what a kNN memory is for.
Files are shuffled with a fixed seed and split into train and eval documents. Each of B
streams reads its documents one after another in segments of T bytes (the last segment
of a document is padded; padding is not scored); a document's first segment resets that
stream's memory and hides the previous segment from local attention.

Model (Memorizing Transformers, Wu et al. 2022, scaled down): byte embeddings, pre-norm
blocks with cosine attention (normalised queries/keys, a learned per-head temperature,
ALiBi position bias) over the segment and the previous segment (Transformer-XL cache,
no gradient), and one memorizing layer (knnmem.jax.memorizing_attention): k=32 memories
per query from a per-(stream, head) memory of `capacity` past keys/values, combined with
local attention by a learned per-head gate. Each training step is one segment per stream;
the memory and the caches are carried from step to step, the way the paper trains.

It trains the same architecture twice, with the memory and without (the memorizing layer
is then plain local attention), for the same number of steps, then evaluates both on the
held-out documents (the memory model also with its memory switched off) and prints the
loss in bits per byte.
"""

from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import random
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import knnmem.jax as kj


@dataclass(frozen=True)
class Config:
    batch: int = 16  # streams
    seg: int = 64  # bytes per segment
    dim: int = 96
    heads: int = 4
    layers: int = 4
    memory_layer: int = 3  # index of the memorizing layer
    capacity: int = 2048  # rows per (stream, head) memory: 32 segments
    k: int = 32
    recall_target: float = 0.9
    lr: float = 3e-3
    warmup: int = 100
    minutes: float = 4.0  # training time of the memory model; the other runs as many steps
    max_steps: int = 100_000
    eval_segments: int = 128
    files: int = 0  # 0: all


FAST = Config(
    batch=2,
    seg=32,
    dim=32,
    heads=2,
    layers=2,
    memory_layer=1,
    capacity=128,
    k=4,
    lr=3e-3,
    warmup=2,
    minutes=10.0,
    max_steps=8,
    eval_segments=4,
    files=30,
)

PAD = 0  # the NUL byte does not occur in the sources


# -- data ------------------------------------------------------------------------------------


def stdlib_documents(limit: int = 0, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(
        p
        for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if "site-packages" not in p and f"{os.sep}test" not in p[len(root) :]
    )
    random.Random(seed).shuffle(paths)
    if limit:
        paths = paths[:limit]
    docs = []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read().replace(b"\0", b"")
        if len(data) > 64:
            docs.append(data)
    n_eval = max(2, len(docs) // 20)
    return docs[n_eval:], docs[:n_eval]


def segments(docs: list[bytes], cfg: Config, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches (tokens [B, T+1] uint8 as int32, new_document [B] bool), forever: stream b
    reads documents b, b + B, ... (reshuffled each epoch) segment by segment."""
    rng = random.Random(seed)
    order = [list(range(b, len(docs), cfg.batch)) or [b % len(docs)] for b in range(cfg.batch)]

    def stream(b: int) -> Iterator[tuple[np.ndarray, bool]]:
        while True:
            rng.shuffle(order[b])
            for i in order[b]:
                doc = np.frombuffer(docs[i], np.uint8).astype(np.int32)
                for start in range(0, len(doc) - 1, cfg.seg):
                    piece = doc[start : start + cfg.seg + 1]
                    yield np.pad(piece, (0, cfg.seg + 1 - len(piece))), start == 0

    streams = [stream(b) for b in range(cfg.batch)]
    while True:
        parts = [next(s) for s in streams]
        yield np.stack([p[0] for p in parts]), np.array([p[1] for p in parts])


# -- model -----------------------------------------------------------------------------------


def init_params(cfg: Config, key: jax.Array) -> dict:
    d, h = cfg.dim, cfg.heads
    keys = iter(jax.random.split(key, 4 * cfg.layers + 2))

    def dense(n_in: int, n_out: int, scale: float = 1.0) -> jax.Array:
        return jax.random.normal(next(keys), (n_in, n_out)) * (scale / math.sqrt(n_in))

    layers = []
    for _ in range(cfg.layers):
        layers.append(
            {
                "ln1": jnp.ones(d),
                "qkv": dense(d, 3 * d),
                "out": dense(d, d, 1 / math.sqrt(2 * cfg.layers)),
                "ln2": jnp.ones(d),
                "up": dense(d, 4 * d),
                "down": dense(4 * d, d, 1 / math.sqrt(2 * cfg.layers)),
                "log_scale": jnp.full((h,), math.log(math.sqrt(d // h) * 2), jnp.float32),
            }
        )
    return {
        "embed": jax.random.normal(next(keys), (256, d)) * 0.02,
        "layers": layers,
        "ln_f": jnp.ones(d),
        "gate_bias": jnp.zeros(h),
    }


def rms_norm(x: jax.Array, w: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def alibi(cfg: Config) -> jax.Array:
    """[H, T, 2T] linear distance penalty over (previous segment, segment)."""
    slopes = 2.0 ** (-8.0 * (jnp.arange(cfg.heads) + 1) / cfg.heads)
    i = jnp.arange(cfg.seg)[:, None] + cfg.seg
    j = jnp.arange(2 * cfg.seg)[None, :]
    return -slopes[:, None, None] * jnp.maximum(i - j, 0)


def normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def local_attention(q, k, v, ck, cv, scale, bias, visible):
    """Cosine attention over (previous segment, causal segment) -- the other layers."""
    t = q.shape[-2]
    allowed = jnp.concatenate(
        [
            jnp.broadcast_to(visible[:, None, None, None], (*q.shape[:2], t, t)),
            jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (*q.shape[:2], t, t)),
        ],
        -1,
    )
    logits = scale[:, None, None] * jnp.einsum(
        "bhqd,bhkd->bhqk", normalize(q), normalize(jnp.concatenate([ck, k], -2))
    )
    logits = jnp.where(allowed, logits + bias, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, -1), jnp.concatenate([cv, v], -2))


def forward(
    params: dict,
    carry: dict,
    tokens: jax.Array,
    new_doc: jax.Array,
    cfg: Config,
    *,
    use_memory: bool,
):
    """Logits [B, T, 256] for tokens [B, T], and the carry for the next segment."""
    b, t = tokens.shape
    h, dh = cfg.heads, cfg.dim // cfg.heads
    bias = alibi(cfg)
    x = params["embed"][tokens]
    caches_k, caches_v = [], []
    memory = carry["memory"]
    for i, p in enumerate(params["layers"]):
        y = rms_norm(x, p["ln1"]) @ p["qkv"]
        q, k, v = (a.reshape(b, t, h, dh).transpose(0, 2, 1, 3) for a in jnp.split(y, 3, -1))
        ck, cv = carry["k"][i], carry["v"][i]
        scale = jnp.exp(p["log_scale"])
        if i == cfg.memory_layer and use_memory:
            att, memory = kj.memorizing_attention(
                q,
                k,
                v,
                memory,
                params["gate_bias"],
                scale=scale,
                k=cfg.k,
                recall_target=cfg.recall_target,
                reset_mask=new_doc,
                context_keys=ck,
                context_values=cv,
                local_bias=bias,
            )
        else:
            att = local_attention(q, k, v, ck, cv, scale, bias, ~new_doc)
        caches_k.append(jax.lax.stop_gradient(k))
        caches_v.append(jax.lax.stop_gradient(v))
        x = x + att.transpose(0, 2, 1, 3).reshape(b, t, cfg.dim) @ p["out"]
        x = x + jax.nn.gelu(rms_norm(x, p["ln2"]) @ p["up"]) @ p["down"]
    logits = rms_norm(x, params["ln_f"]) @ params["embed"].T
    return logits, {"k": jnp.stack(caches_k), "v": jnp.stack(caches_v), "memory": memory}


def init_carry(cfg: Config) -> dict:
    dh = cfg.dim // cfg.heads
    cache = (cfg.layers, cfg.batch, cfg.heads, cfg.seg, dh)
    memory = kj.init((cfg.batch, cfg.heads), cfg.capacity, dh, metric="ip")
    return {"k": jnp.zeros(cache), "v": jnp.zeros(cache), "memory": memory}


def loss_fn(params, carry, batch, new_doc, cfg, use_memory):
    tokens, targets = batch[:, :-1], batch[:, 1:]
    logits, carry = forward(params, carry, tokens, new_doc, cfg, use_memory=use_memory)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    scored = (targets != PAD).astype(jnp.float32)
    return jnp.sum(nll * scored) / jnp.maximum(jnp.sum(scored), 1), (
        carry,
        jnp.sum(nll * scored),
        jnp.sum(scored),
    )


@functools.lru_cache(maxsize=8)
def make_steps(cfg: Config, use_memory: bool):
    def train_step(params, opt, carry, batch, new_doc):
        (loss, (carry, _, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, carry, batch, new_doc, cfg, use_memory
        )
        # Adam with warmup and global-norm clipping
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / (norm + 1e-6)), grads)
        step = opt["step"] + 1
        lr = cfg.lr * jnp.minimum(1.0, step / cfg.warmup)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, opt["m"], grads)
        v = jax.tree.map(lambda v, g: 0.99 * v + 0.01 * g * g, opt["v"], grads)
        c1, c2 = 1 - 0.9**step, 1 - 0.99**step
        params = jax.tree.map(
            lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + 1e-8), params, m, v
        )
        return params, {"step": step, "m": m, "v": v}, carry, loss

    def eval_step(params, carry, batch, new_doc):
        _, (carry, nll, n) = loss_fn(params, carry, batch, new_doc, cfg, use_memory)
        return carry, nll, n

    return jax.jit(train_step, donate_argnums=(1, 2)), jax.jit(eval_step, donate_argnums=1)


def train(cfg: Config, docs: list[bytes], use_memory: bool, seed: int, log) -> tuple[dict, list]:
    params = init_params(cfg, jax.random.PRNGKey(seed))
    opt = {
        "step": jnp.zeros((), jnp.int32),
        "m": jax.tree.map(jnp.zeros_like, params),
        "v": jax.tree.map(jnp.zeros_like, params),
    }
    carry = init_carry(cfg)
    step_fn, _ = make_steps(cfg, use_memory)
    data = segments(docs, cfg, seed)
    start, losses, step = time.perf_counter(), [], 0
    while step < cfg.max_steps and time.perf_counter() - start < 60 * cfg.minutes:
        batch, new_doc = next(data)
        params, opt, carry, loss = step_fn(params, opt, carry, batch, new_doc)
        step += 1
        if step % 25 == 0 or step == cfg.max_steps or step == 1:
            losses.append(float(loss))
            log(
                f"  step {step:5d}  loss {float(loss) / math.log(2):.3f} bits/byte  "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return params, [step, time.perf_counter() - start]


def evaluate(
    cfg: Config,
    params: dict,
    docs: list[bytes],
    use_memory: bool,
    reset_every_segment: bool = False,
) -> float:
    """Mean bits per byte over the first eval_segments segments of every stream."""
    _, eval_fn = make_steps(cfg, use_memory)
    carry = init_carry(cfg)
    data = segments(docs, cfg, seed=1234)
    total, count = 0.0, 0.0
    for _ in range(cfg.eval_segments):
        batch, new_doc = next(data)
        if reset_every_segment:  # memory off: nothing older than the previous segment
            carry["memory"] = kj.reset(carry["memory"])
        carry, nll, n = eval_fn(params, carry, batch, new_doc)
        total, count = total + float(nll), count + float(n)
    return total / max(count, 1) / math.log(2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="tiny model, a few steps (the test)")
    ap.add_argument("--minutes", type=float, help="training time per model")
    ap.add_argument("--steps", type=int, help="at most this many steps per model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = FAST if args.fast else Config()
    if args.minutes is not None:
        cfg = Config(**{**cfg.__dict__, "minutes": args.minutes})
    if args.steps is not None:
        cfg = Config(**{**cfg.__dict__, "max_steps": args.steps})
    train_docs, eval_docs = stdlib_documents(cfg.files, seed=args.seed)
    print(
        f"{len(train_docs)} train / {len(eval_docs)} eval documents "
        f"({sum(map(len, train_docs)) / 1e6:.1f} MB / {sum(map(len, eval_docs)) / 1e6:.2f} MB); "
        f"B={cfg.batch} T={cfg.seg} d={cfg.dim} H={cfg.heads} L={cfg.layers}, memory in layer "
        f"{cfg.memory_layer}: capacity {cfg.capacity}, k={cfg.k}, recall {cfg.recall_target}"
    )
    results = {}
    for use_memory in (True, False):
        name = "with memory" if use_memory else "without memory"
        print(f"training {name}")
        params, (steps, secs) = train(cfg, train_docs, use_memory, args.seed, print)
        # the baseline trains for exactly as many steps (it is faster per step)
        cfg = Config(**{**cfg.__dict__, "max_steps": steps, "minutes": 1e9})
        results[name] = {"steps": steps, "seconds": secs}
        results[name]["eval"] = evaluate(cfg, params, eval_docs, use_memory)
        if use_memory:
            gate = jax.nn.sigmoid(params["gate_bias"])
            results[name]["gate"] = [round(float(g), 3) for g in gate]
            results[name]["eval_memory_off"] = evaluate(
                cfg, params, eval_docs, use_memory, reset_every_segment=True
            )
    mem, base = results["with memory"], results["without memory"]
    print(
        f"\neval loss (bits/byte, {cfg.eval_segments} segments x {cfg.batch} streams of "
        f"held-out files)\n"
        f"  trained with memory     {mem['eval']:.4f}   ({mem['steps']} steps, "
        f"{mem['seconds']:.0f} s; gates {mem['gate']})\n"
        f"    same model, memory off {mem['eval_memory_off']:.4f}\n"
        f"  trained without memory  {base['eval']:.4f}   ({base['steps']} steps, "
        f"{base['seconds']:.0f} s)"
    )
    return results


if __name__ == "__main__":
    main()
