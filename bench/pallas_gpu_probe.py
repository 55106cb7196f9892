"""Probe: does knnmem's strided-bin fold go through Pallas's GPU backends? (docs/pallas.md)

Not part of the package. The TPU kernel (knnmem.pallas) uses scalar prefetch, VMEM
scratch and lane rotations, which only Mosaic TPU has. This file holds a GPU-shaped body
of the same algorithm: the key loop inside the kernel, and instead of rotating a chunk of
128 scores into place it loads/compares/stores the output block at the unaligned column
offset o = slot mod L, which GPUs address natively. Position p of the output still only
receives slots with slot mod L == p mod L, in increasing order, so
knnmem.pallas.fold_positions turns it into the reference's bin winners.

    python bench/pallas_gpu_probe.py interpret   # CPU: equals the reference's winners
    python bench/pallas_gpu_probe.py triton      # lower for CUDA with Triton
    python bench/pallas_gpu_probe.py mosaic_gpu  # lower for CUDA with Mosaic GPU

Lowering for CUDA needs jax-cuda12-plugin and jax-cuda12-pjrt of jax's version, not a
GPU. Found with jax 0.10.2: interpret == reference; Triton lowers; Mosaic GPU stops at
"Failed to infer the output layout of the iota" (it wants explicit layouts).
Full memories only (no live-slot masking); keys a multiple of 128 rows.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export, lax
from jax.experimental import pallas as pl

NUM_BINS, WIDTH, CHUNK = 145, 512, 128  # W: a power of two >= L + 127 (Triton shapes)


def body(q_ref, k_ref, best_ref, slot_ref, *, chunks):
    q = q_ref[...]
    best_ref[...] = jnp.full(best_ref.shape, -jnp.inf, jnp.float32)
    slot_ref[...] = jnp.full(slot_ref.shape, 2**31 - 1, jnp.int32)
    lane = lax.broadcasted_iota(jnp.int32, (1, CHUNK), 1)

    def step(t, carry):
        c0 = t * CHUNK
        s = jnp.dot(q, k_ref[pl.ds(c0, CHUNK), :].T, preferred_element_type=jnp.float32)
        cols = pl.ds(lax.rem(c0, NUM_BINS), CHUNK)
        cur_s, cur_i = best_ref[:, cols], slot_ref[:, cols]
        take = s > cur_s
        best_ref[:, cols] = jnp.where(take, s, cur_s)
        slot_ref[:, cols] = jnp.where(take, c0 + lane, cur_i)
        return carry

    lax.fori_loop(0, chunks, step, 0)


def positions(q, k, compiler_params=None, interpret=False):
    g, nq, d = q.shape
    cap = k.shape[1]
    bq = min(64, nq)
    out = jax.ShapeDtypeStruct((g, nq, WIDTH), jnp.float32)
    return pl.pallas_call(
        functools.partial(body, chunks=cap // CHUNK),
        grid=(g, nq // bq),
        in_specs=[
            pl.BlockSpec((None, bq, d), lambda c, i: (c, i, 0)),
            pl.BlockSpec((None, cap, d), lambda c, i: (c, 0, 0)),
        ],
        out_specs=[pl.BlockSpec((None, bq, WIDTH), lambda c, i: (c, i, 0))] * 2,
        out_shape=[out, out.update(dtype=jnp.int32)],
        compiler_params=compiler_params,
        interpret=interpret,
    )(q, k)


def lower_for_cuda(params, q_shape, k_shape) -> None:
    spec = jax.ShapeDtypeStruct
    unchecked = [export.DisabledSafetyCheck.custom_call(t) for t in ("__gpu$xla.gpu.triton",)]
    try:
        export.export(
            jax.jit(lambda q, k: positions(q, k, params)),
            platforms=["cuda"],
            disabled_checks=unchecked,
        )(spec(q_shape, jnp.float32), spec(k_shape, jnp.float32))
        print("lowered for CUDA")
    except Exception as e:  # noqa: BLE001 - a probe: report whatever stops it
        print("failed:", type(e).__name__, str(e).splitlines()[0][:300])


def main(mode: str) -> None:
    if mode == "interpret":
        from knnmem.pallas import fold_positions

        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.integers(-3, 4, (2, 128, 128)), jnp.float32)
        k = jnp.asarray(rng.integers(-3, 4, (2, 4096, 128)), jnp.float32)
        got = fold_positions(*positions(q, k, interpret=True), NUM_BINS)
        # the pure-JAX reference's pieces (private: this probe compares against them)
        from knnmem.jax._reference import _bin_winners, _scores

        ref = _bin_winners(_scores(q, k, "ip"), NUM_BINS)
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, ref))
        print("interpreted == reference bin winners:", same)
    elif mode == "triton":
        from jax.experimental.pallas import triton as pltr

        lower_for_cuda(
            pltr.CompilerParams(num_warps=4, num_stages=2), (2, 128, 128), (2, 4096, 128)
        )
    elif mode == "mosaic_gpu":
        from jax.experimental.pallas import mosaic_gpu as plmgpu

        lower_for_cuda(plmgpu.CompilerParams(), (2, 16, 128), (2, 128, 128))
    else:
        raise SystemExit(f"mode: expected interpret, triton or mosaic_gpu, got {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "interpret")
