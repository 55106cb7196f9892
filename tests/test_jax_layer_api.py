"""knnmem.jax: the bounded temperature, one-token decoding (update=False plus the
decoded part of the segment as context) equal to the segment-at-once layer, and
another batch size for evaluation (a state is per call: init one of that size, as
examples/jax_memory.py does)."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import knnmem.jax as kj  # noqa: E402

B, H, T, D = 2, 3, 4, 8


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_bounded_scale() -> None:
    p = kj.bounded_scale_init(10.0, 32.0)
    assert float(kj.bounded_scale(p, 32.0)) == pytest.approx(10.0, rel=1e-6)
    assert float(kj.bounded_scale(0.0, 32.0)) == pytest.approx(1 / (1 + 1 / 32), rel=1e-6)
    big = kj.bounded_scale(jnp.array([5.0, 20.0, 80.0]), 32.0)
    assert np.all(np.asarray(big) <= 32.0) and float(big[2]) == pytest.approx(32.0, rel=1e-6)
    assert float(kj.bounded_scale(5.0, None)) == pytest.approx(math.exp(5.0), rel=1e-6)
    assert kj.bounded_scale_init(10.0, None) == pytest.approx(math.log(10.0))
    slope = jax.grad(lambda s: kj.bounded_scale(s, 32.0))
    assert float(slope(p)) > 0 and float(slope(80.0)) < 1e-6
    with pytest.raises(ValueError, match="max_scale: expected None or a number > scale=40.0"):
        kj.bounded_scale_init(40.0, 32.0)
    with pytest.raises(ValueError, match="scale: expected a number > 0, got 0.0"):
        kj.bounded_scale_init(0.0)


def test_one_token_decoding_equals_the_segment_layer() -> None:
    batch = B
    rng = np.random.default_rng(0)
    segs = 3
    q, k, v = (rng.standard_normal((batch, H, segs * T, D), dtype=np.float32) for _ in range(3))
    gate = jnp.array([-1.0, 0.0, 1.5])
    scale = kj.bounded_scale(jnp.full((H,), kj.bounded_scale_init(6.0)))
    kw = dict(k=4, recall_target=1.0, scale=scale)

    state, ctx, want = kj.init((batch, H), 64, D), None, []
    for s in range(segs):
        sl = slice(s * T, (s + 1) * T)
        extra = {} if ctx is None else dict(context_keys=ctx[0], context_values=ctx[1])
        out, state = kj.memorizing_attention(q[..., sl, :], k[..., sl, :], v[..., sl, :], state,
                                             gate, **kw, **extra)  # fmt: skip
        want.append(out)
        ctx = (k[..., sl, :], v[..., sl, :])
    want = np.concatenate(want, -2)

    @jax.jit
    def step(q, k, v, st, ck, cv):
        return kj.memorizing_attention(
            q, k, v, st, gate, **kw, context_keys=ck, context_values=cv, update=False
        )

    state, prev, got = kj.init((batch, H), 64, D), None, []
    for s in range(segs):
        for i in range(T):
            p = s * T + i
            seen_k = k[..., s * T : p, :]
            seen_v = v[..., s * T : p, :]
            ck = seen_k if prev is None else np.concatenate([prev[0], seen_k], -2)
            cv = seen_v if prev is None else np.concatenate([prev[1], seen_v], -2)
            if ck.shape[-2] == 0:  # the very first token: nothing before it
                out, new = kj.memorizing_attention(
                    q[..., p : p + 1, :], k[..., p : p + 1, :], v[..., p : p + 1, :], state,
                    gate, **kw, update=False)  # fmt: skip
            else:
                out, new = step(q[..., p : p + 1, :], k[..., p : p + 1, :], v[..., p : p + 1, :],
                                state, ck, cv)  # fmt: skip
            # update=False: the memory waits for the whole segment
            np.testing.assert_array_equal(np.asarray(new.written), np.asarray(state.written))
            got.append(out)
        sl = slice(s * T, (s + 1) * T)
        state = kj.add(state, unit(k[..., sl, :]), v[..., sl, :])
        prev = (k[..., sl, :], v[..., sl, :])
    np.testing.assert_allclose(np.concatenate(got, -2), want, rtol=1e-5, atol=1e-5)
