"""knnmem.jax.memorizing_attention against a direct numpy computation, and the example
language model (fast version) as an integration test."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import knnmem.jax as kj  # noqa: E402
from knnmem.eval import exact_search  # noqa: E402
from knnmem.ops import placement  # noqa: E402

B, H, T, D = 2, 3, 6, 8


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def local_reference(q, k, v, scale, ck=None, cv=None, bias=None) -> np.ndarray:
    q, k = unit(q), unit(k)
    t = q.shape[-2]
    allowed = np.tril(np.ones((t, t), bool))
    if ck is not None:
        k = np.concatenate([unit(ck), k], -2)
        v = np.concatenate([cv, v], -2)
        allowed = np.concatenate([np.ones((t, ck.shape[-2]), bool), allowed], -1)
    logits = scale * np.einsum("...qd,...kd->...qk", q, k) + (0 if bias is None else bias)
    return np.einsum("...qk,...kd->...qd", softmax(np.where(allowed, logits, -np.inf)), v)


@pytest.fixture(scope="module")
def segment() -> tuple:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(3))
    return q, k, v, rng


def test_empty_memory_is_local_attention_and_segment_is_added_after(segment: tuple) -> None:
    q, k, v, _ = segment
    state = kj.init((B, H), 64, D)
    out, new = kj.memorizing_attention(q, k, v, state, jnp.zeros(H), k=4, scale=3.0)
    # nothing in memory: the gate is not applied, the output is the local attention;
    # the segment's own keys were added only after the search
    np.testing.assert_allclose(out, local_reference(q, k, v, 3.0), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(new.written), np.full((B, H), T))
    held = kj.search(new, unit(k), 1, 1.0)
    np.testing.assert_allclose(held.keys[..., 0, :], unit(k), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(held.values[..., 0, :], v)


def test_gated_memory_and_context(segment: tuple) -> None:
    q, k, v, rng = segment
    n, kk = 40, 5
    mem_k = rng.standard_normal((B, H, n, D), dtype=np.float32)
    mem_v = rng.standard_normal((B, H, n, D), dtype=np.float32)
    state = kj.add(kj.init((B, H), 64, D), unit(mem_k), mem_v)
    gate_bias = np.array([-1.0, 0.0, 2.0], np.float32)
    ck = rng.standard_normal((B, H, 4, D), dtype=np.float32)
    cv = rng.standard_normal((B, H, 4, D), dtype=np.float32)
    bias = rng.standard_normal((H, T, 4 + T)).astype(np.float32)
    scale = np.array([2.0, 3.0, 4.0], np.float32)
    out, _ = jax.jit(
        lambda q, k, v, s: kj.memorizing_attention(
            q, k, v, s, gate_bias, scale=scale, k=kk, recall_target=1.0,
            context_keys=ck, context_values=cv, local_bias=bias,
        )
    )(q, k, v, state)  # fmt: skip
    # reference: exact top-kk by cosine, softmax over them, gate per head
    sc, idx = exact_search(unit(mem_k), unit(q), kk)
    s = scale[:, None, None] * sc
    w = softmax(s.astype(np.float64))
    picked = np.take_along_axis(mem_v[..., None, :, :], idx[..., None], -2)
    mem_out = np.einsum("...qk,...qkd->...qd", w, picked)
    local = local_reference(q, k, v, scale[:, None, None], ck, cv, bias)
    g = (1 / (1 + np.exp(-gate_bias)))[:, None, None]
    np.testing.assert_allclose(out, g * mem_out + (1 - g) * local, rtol=1e-4, atol=1e-5)

    # a reset hides the context and empties the memory: local attention over the segment
    reset = np.array([True, False])
    out_r, new = kj.memorizing_attention(
        q, k, v, state, gate_bias, scale=scale, k=kk, recall_target=1.0,
        reset_mask=reset, context_keys=ck, context_values=cv, local_bias=bias,
    )  # fmt: skip
    alone = local_reference(q, k, v, scale[:, None, None], bias=bias[..., 4:])
    np.testing.assert_allclose(out_r[0], alone[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_r[1], out[1], rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(new.written), [[T] * H, [n + T] * H])


def test_gradients_reach_the_layer_not_the_memory(segment: tuple) -> None:
    q, k, v, rng = segment
    mem = rng.standard_normal((B, H, 30, D), dtype=np.float32)
    state = kj.add(kj.init((B, H), 64, D), unit(mem), mem)  # slots 0..29 (64 < block)

    def loss(q, k, v, gate_bias, scale, state):
        out, new = kj.memorizing_attention(
            q, k, v, state, gate_bias, scale=scale, k=4, recall_target=0.9
        )
        # the slots the segment went to: no gradient flows back through the write either
        slots = placement(64)[0][30 : 30 + T]  # slot_of
        return jnp.sum(out**2) + jnp.sum(new.keys[..., slots, :] + new.values[..., slots, :])

    args = (q, k, v, jnp.zeros(H), jnp.full(H, 3.0), state)
    grads = jax.jit(jax.grad(loss, argnums=range(6), allow_int=True))(*args)
    for g in grads[:5]:
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    assert not np.any(grads[5].keys) and not np.any(grads[5].values)
    # the query gradient includes the memory path: it differs with the gate closed
    closed = jax.jit(jax.grad(loss))(q, k, v, jnp.full(H, -30.0), jnp.full(H, 3.0), state)
    assert not np.allclose(grads[0], closed, rtol=1e-3)


def test_example_language_model_fast() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "jax_memorizing_lm.py"
    spec = importlib.util.spec_from_file_location("jax_memorizing_lm", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # (dataclasses look their module up)
    try:
        spec.loader.exec_module(example)
    finally:
        del sys.modules[spec.name]
    results = example.main(["--fast"])
    with_mem, without = results["with memory"], results["without memory"]
    assert with_mem["steps"] == without["steps"] == example.FAST.max_steps
    for value in (with_mem["eval"], with_mem["eval_memory_off"], without["eval"]):
        assert math.isfinite(value) and value < 8.0  # below a uniform guess over bytes
