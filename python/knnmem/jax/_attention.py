"""memorizing_attention: the kNN-augmented attention layer of Memorizing Transformers."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._search import search
from ._state import MemoryState, _check_rows, _check_state, add, reset


def _normalize(x: jax.Array) -> jax.Array:
    sq = jnp.sum(x * x, -1, keepdims=True)
    return x * jnp.where(sq > 0, lax.rsqrt(jnp.where(sq > 0, sq, 1)), 0)


def _softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    logits = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(logits, -1, keepdims=True)
    top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0))
    e = jnp.where(mask, jnp.exp(logits - top), 0)
    z = jnp.sum(e, -1, keepdims=True)
    return e / jnp.where(z > 0, z, 1)


def bounded_scale(log_scale: Any, max_scale: float | None = 32.0) -> jax.Array:
    """A learned temperature with an upper bound, for ``memorizing_attention(scale=...)``:
    1 / (exp(-log_scale) + 1 / max_scale), which is exp(log_scale) while that is small
    against max_scale and approaches max_scale smoothly (max_scale None: exp(log_scale)).
    An unbounded temperature can run away under a constant learning rate. The value of
    log_scale that starts at temperature s is :func:`bounded_scale_init`."""
    log_scale = jnp.asarray(log_scale, jnp.float32)
    if max_scale is None:
        return jnp.exp(log_scale)
    return 1.0 / (jnp.exp(-log_scale) + 1.0 / max_scale)


def bounded_scale_init(scale: float, max_scale: float | None = 32.0) -> float:
    """The log_scale whose :func:`bounded_scale` is ``scale`` (0 < scale < max_scale)."""
    if not scale > 0:
        raise ValueError(f"scale: expected a number > 0, got {scale!r}")
    if max_scale is None:
        return math.log(scale)
    if not max_scale > scale:
        raise ValueError(f"max_scale: expected None or a number > scale={scale}, got {max_scale!r}")
    return -math.log(1.0 / scale - 1.0 / max_scale)


def memorizing_attention(
    queries: Any,
    keys: Any,
    values: Any,
    state: MemoryState,
    gate_bias: Any,
    *,
    scale: Any = None,
    k: int = 32,
    recall_target: float = 0.9,
    reset_mask: Any = None,
    context_keys: Any = None,
    context_values: Any = None,
    local_bias: Any = None,
    impl: str = "auto",
    capacity_axis: Any = None,
    update: bool = True,
) -> tuple[jax.Array, MemoryState]:
    """The kNN-augmented attention layer of Memorizing Transformers (Wu et al., 2022).

    queries, keys, values: [*shape, T, head_dim] for one segment, where state.shape is the
    grid (e.g. (batch, heads)). Queries and keys are L2-normalised; each query attends
    (a) causally over the segment, after the optional ``context_keys/values``
    [*shape, Tc, head_dim] (e.g. the previous segment, Transformer-XL), with the optional
    additive ``local_bias`` [..., T, Tc + T], and (b) over its k memories retrieved from
    the state (no position bias). The two are combined by a per-memory learned gate
    g = sigmoid(gate_bias) (gate_bias broadcastable to state.shape, e.g. [heads]):
    out = g * memory + (1 - g) * local; a query with nothing in memory uses local only.
    ``scale`` multiplies the cosine logits, a scalar or broadcastable to state.shape
    (default sqrt(head_dim); pass a learned temperature to train it).

    Per segment: reset (``reset_mask``, bool [*shape] or a leading prefix: memories of new
    documents are cleared, and their context is hidden) -> search -> add (the segment's
    normalised keys and values), so a query never sees its own segment in memory.
    Gradients flow through queries, keys and values of the segment and through the
    retrieved keys/values' scores into the queries, never into the memory. The state
    should use metric "ip" (keys are stored normalised). ``impl`` and ``capacity_axis``
    are passed to search (and ``capacity_axis`` to add). Returns (out, new_state).

    ``update=False`` leaves the memory as it is (only a reset applies): one-token
    decoding passes the segment decoded so far as context (after the previous segment)
    and adds the segment to the memory when it is complete, with
    ``add(state, normalized_keys, values)``; see docs/memory.md."""
    state = _check_state(state)
    shape = state.shape
    q = _check_rows(queries, "queries", shape, None, state.key_dim, "key_dim", rows_name="T")
    t = q.shape[-2]
    kk = _check_rows(keys, "keys", shape, t, state.key_dim, "key_dim")
    vv = _check_rows(values, "values", shape, t, state.value_dim, "value_dim")
    if scale is None:
        scale = math.sqrt(state.key_dim)
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), shape)[..., None, None]
    qn, kn = _normalize(q), _normalize(kk)

    visible_context = None
    if reset_mask is not None:
        state = reset(state, reset_mask)
        m = jnp.asarray(reset_mask)
        visible_context = ~m.reshape(m.shape + (1,) * (len(shape) - m.ndim))

    # (b) memory
    # Only what the layer reads: the memory logits are the search's scores (keys are
    # fetched only when differentiating, and on a capacity-sharded memory never cross
    # the devices).
    res = search(
        state,
        qn,
        k,
        recall_target,
        impl=impl,
        capacity_axis=capacity_axis,
        fields=("scores", "values", "mask"),
    )
    # (-inf scores of empty entries must not meet the scale: -inf * 0 is a NaN gradient)
    w_mem = _softmax(scale * jnp.where(res.mask, res.scores, 0), res.mask)
    mem_out = jnp.einsum("...qk,...qkd->...qd", w_mem, res.values)
    has_mem = jnp.any(res.mask, -1, keepdims=True)

    # (a) local causal attention (after the optional context)
    causal = jnp.tril(jnp.ones((t, t), bool))
    if context_keys is not None:
        ck = _check_rows(context_keys, "context_keys", shape, None, state.key_dim, "key_dim")
        tc = ck.shape[-2]
        cv = _check_rows(context_values, "context_values", shape, tc, state.value_dim, "value_dim")
        all_k = jnp.concatenate([_normalize(ck), kn], -2)
        all_v = jnp.concatenate([cv, vv], -2)
        ctx = jnp.ones((t, tc), bool)
        allowed = jnp.concatenate([ctx, causal], -1)
        if visible_context is not None:
            vis = jnp.concatenate(
                [
                    jnp.broadcast_to(visible_context[..., None, None], (*shape, t, tc)),
                    jnp.ones((*shape, t, t), bool),
                ],
                -1,
            )
            allowed = allowed & vis
    else:
        all_k, all_v, allowed = kn, vv, causal
    logits = scale * jnp.einsum("...qd,...kd->...qk", qn, all_k)
    if local_bias is not None:
        logits = logits + local_bias
    local_out = jnp.einsum("...qk,...kd->...qd", _softmax(logits, allowed), all_v)

    gate = jax.nn.sigmoid(jnp.asarray(gate_bias, jnp.float32))
    gate = jnp.broadcast_to(gate, shape)[..., None, None]
    out = jnp.where(has_mem, gate * mem_out + (1 - gate) * local_out, local_out)
    if not update:
        return out, state
    new_state = add(state, kn, vv, capacity_axis=capacity_axis)
    return out, new_state
