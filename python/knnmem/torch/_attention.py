"""MemorizingAttention: local causal attention plus attention over the top-k of a
kNN memory of past segments, mixed by a learned per-head gate (Wu et al.,
Memorizing Transformers, ICLR 2022)."""

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._arrays import check_dense_tensor
from .._contract import check_search_args
from ._checks import shape_str
from ._memory import KNNMemory

__all__ = ["MemorizingAttention", "at_batch_size"]


def _rotate(x: Tensor, base: float, start: int = 0) -> Tensor:
    """Rotary position embedding over the segment axis (-2) of x [..., T, d], the rows
    at positions start .. start + T - 1."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / max(half, 1))
    positions = torch.arange(start, start + t, device=x.device, dtype=torch.float32)
    angles = positions[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def _temperature(log_scale: Tensor, max_scale: Optional[float]) -> Tensor:
    """The per-head temperature: exp(log_scale), or with a bound
    1 / (exp(-log_scale) + 1 / max_scale), which is exp(log_scale) while that is small
    against max_scale and never exceeds max_scale (smoothly: the gradient vanishes
    only as the temperature approaches the bound)."""
    if max_scale is None:
        return log_scale.exp()
    return 1.0 / (torch.exp(-log_scale) + 1.0 / max_scale)


def _log_scale_init(scale_init: float, max_scale: Optional[float]) -> float:
    """The parameter value whose temperature (_temperature) is scale_init."""
    if max_scale is None:
        return math.log(scale_init)
    return -math.log(1.0 / scale_init - 1.0 / max_scale)


# The gate bias of a layer built from a pretrained one: the memory's share starts at
# sigmoid(-5) = 0.7% (the pretrained output nearly unchanged) while staying within reach
# of Adam (it moves a bias by about lr per step; a share of 12% at -2 already kept a
# small recall model from learning in 250 steps, docs/memory.md).
PRETRAINED_GATE_INIT = -5.0


class MemorizingAttention(nn.Module):
    """Multi-head attention over the current segment plus a kNN memory of past ones.

    Per head (Wu et al. 2022): queries and keys are L2-normalised and scaled by a
    learned per-head temperature; local attention is causal over the segment
    (rotary positions); memory attention retrieves the top-k keys of each query
    from that (batch element, head)'s memory of *past* segments (searched before
    the segment is added, so a query never sees its own segment), attends over
    them with a softmax over the k entries (no position information), and the
    two are mixed by a learned gate g = sigmoid(gate) per head:

        out = g * memory_attention + (1 - g) * local_attention

    (where a memory is still empty, e.g. the first segment of a document, out is
    the local attention alone). The retrieved keys and values are constants;
    gradients flow into the queries (and the temperature and gate). After the
    attention the segment's keys and values are appended (detached).

    The temperature is bounded: scale = 1 / (exp(-log_scale) + 1 / max_scale), that is
    exp(log_scale) while it is small against max_scale, and never above max_scale (an
    unbounded temperature, ``max_scale=None``, can run away under a constant learning
    rate and sharpen the memory attention until retrieval errors cost accuracy).

    With ``context=True`` the local attention also sees the previous segment, as
    in the paper (a Transformer-XL cache): its keys and values, kept detached in
    the module after each call (not in the state_dict), come before the segment's
    with the rotary positions running on, so a query attends to the previous T
    rows and the causal part of its own segment. A reset of a batch element (the
    ``reset`` argument or ``reset()``) hides its context; a batch of another size
    than the context's raises.

    The memory has one row of memories per batch element: ``resize(n)`` gives the
    layer fresh memories for batches of n, and ``knnmem.torch.at_batch_size(model, n)``
    does so for every MemorizingAttention of a model within a ``with`` block, restoring
    the training memories after it (evaluation or generation at another batch size).
    ``step(x, segment_length=T)`` decodes one token at a time with the same result as
    forward() over segments of T tokens.

    Args:
        dim: model width. num_heads: heads. batch_size: rows of x (one memory per
            batch element and head).
        head_dim: per-head width (default dim // num_heads).
        capacity: rows each memory holds (FIFO). k, recall_target: of the search.
        scale_init: initial temperature of the normalised dot products.
        max_scale: the bound of the temperature (None: unbounded, exp(log_scale)).
        gate_init: initial gate bias (the memory's share of the output is
            sigmoid(gate_init)); e.g. -inf-like values (-20) keep a pretrained
            model's output while the gate learns to open.
        rotary_base: base of the rotary position embedding of the local attention.
        bias: biases in the qkv and out projections.
        use_memory: False gives the same layer without a memory (a baseline).
        memory: a memory module to use instead of a KNNMemory (e.g.
            knnmem.torch.ShardedKNNMemory) with grid (batch_size, num_heads) and
            key_dim = value_dim = head_dim.
        context: local attention over the previous segment too (above).
        qk_norm: True (default): the local attention uses the normalised queries and
            keys and the learned temperature, like the memory attention. False: it is
            standard attention, softmax(q k^T / sqrt(head_dim)) on the raw projections
            (a pretrained layer's; see from_multihead_attention / from_projections);
            the memory attention still uses normalised queries and keys.
        rotary: rotary positions in the local attention (False: none, e.g. a model
            whose positions are in its embeddings).
        device: where the parameters and the memory are created.

    forward(x [B, T, dim], reset=None) -> [B, T, dim]; reset: bool [B], True
    where a new document starts with this segment (its memories are cleared
    before the search).
    """

    # Memory logits from the search's scores (no second q.k, no keys returned); False
    # restores the earlier formulation (keys returned, logits recomputed) for comparisons.
    _lean_search = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        batch_size: int,
        *,
        head_dim: Optional[int] = None,
        capacity: int = 8192,
        k: int = 32,
        recall_target: float = 0.9,
        scale_init: float = 10.0,
        max_scale: Optional[float] = 32.0,
        gate_init: float = 0.0,
        rotary_base: float = 10000.0,
        bias: bool = False,
        use_memory: bool = True,
        memory: Optional[nn.Module] = None,
        context: bool = False,
        qk_norm: bool = True,
        rotary: bool = True,
        device: Any = None,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        if head_dim < 1:
            raise ValueError(
                f"head_dim: expected >= 1, got {head_dim} (dim={dim}, num_heads={num_heads})"
            )
        if not (isinstance(scale_init, (int, float)) and scale_init > 0):
            raise ValueError(f"scale_init: expected a number > 0, got {scale_init!r}")
        if max_scale is not None and not (
            isinstance(max_scale, (int, float)) and max_scale > scale_init
        ):
            raise ValueError(
                f"max_scale: expected None or a number > scale_init={scale_init}, got {max_scale!r}"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.batch_size = batch_size
        self.k, self.recall_target = check_search_args(k, recall_target, capacity)
        self.rotary_base = rotary_base
        self.max_scale = None if max_scale is None else float(max_scale)
        self.qk_norm, self.rotary = bool(qk_norm), bool(rotary)
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias, device=device)
        self.out = nn.Linear(inner, dim, bias=bias, device=device)
        self.log_scale = nn.Parameter(
            torch.full((num_heads,), _log_scale_init(scale_init, self.max_scale), device=device)
        )
        self.gate = nn.Parameter(torch.full((num_heads,), float(gate_init), device=device))
        self.use_memory = use_memory
        if use_memory and memory is None:
            memory = KNNMemory(
                (batch_size, num_heads), capacity, head_dim, head_dim, "ip", device=device
            )
        if memory is not None and tuple(memory.shape) != (batch_size, num_heads):
            raise ValueError(
                f"memory: expected grid shape {(batch_size, num_heads)}, got {tuple(memory.shape)}"
            )
        self.memory = memory if use_memory else None
        self.context = context
        # previous segment: local keys, values [B, H, Tc, d], visible [B]
        self._context: Optional[tuple[Tensor, Tensor, Tensor]] = None
        # step(): the current segment so far: local keys, memory keys, values [B, H, n, d]
        self._cache: Optional[tuple[Tensor, Tensor, Tensor]] = None

    # -- from a pretrained attention layer ----------------------------------------------

    @classmethod
    def from_multihead_attention(
        cls, mha: nn.MultiheadAttention, batch_size: int, *, rotary: bool = False, **kwargs: Any
    ) -> "MemorizingAttention":
        """A MemorizingAttention whose local attention is the causal self-attention of
        ``mha`` (a torch.nn.MultiheadAttention; its weights are copied): with an empty
        memory the output is mha(x, x, x, attn_mask=causal)[0] (batch_first layout
        [B, T, dim]), and with a full one it moves by sigmoid(gate_init) of the
        difference (default gate_init -5 here: 0.7%, a gate Adam can open in
        thousands of steps; -20 closes it for good). The memory
        attention uses the normalised queries and keys of the same projections and a
        new temperature and gate, to be learned by fine-tuning. Other keyword arguments
        go to the constructor (capacity, k, scale_init, context, ...)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(
                f"mha: expected a torch.nn.MultiheadAttention, got {type(mha).__name__}"
            )
        if not mha._qkv_same_embed_dim:
            raise ValueError("mha: expected kdim == vdim == embed_dim (self-attention)")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha: add_bias_kv and add_zero_attn are not supported")
        dim, heads = mha.embed_dim, mha.num_heads
        w = mha.in_proj_weight
        layer = cls(
            dim,
            heads,
            batch_size,
            bias=mha.in_proj_bias is not None,
            qk_norm=False,
            rotary=rotary,
            **{"gate_init": PRETRAINED_GATE_INIT, "device": w.device, **kwargs},
        )
        with torch.no_grad():
            layer.qkv.weight.copy_(w)
            layer.out.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                layer.qkv.bias.copy_(mha.in_proj_bias)
                layer.out.bias.copy_(mha.out_proj.bias)
        return layer.to(w.dtype)

    @classmethod
    def from_projections(
        cls,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        o_proj: nn.Linear,
        num_heads: int,
        batch_size: int,
        *,
        rotary: bool = True,
        **kwargs: Any,
    ) -> "MemorizingAttention":
        """A MemorizingAttention from the q/k/v/o projections (nn.Linear) of a
        pretrained causal self-attention with num_heads heads of q_proj.out_features //
        num_heads (no grouped keys): local attention softmax(q k^T / sqrt(head_dim))
        with, if ``rotary``, rotary positions over half-split pairs (the rotate-half
        convention, base ``rotary_base``). With an empty memory the output is the
        pretrained layer's (with a full one, within sigmoid(gate_init) of it: default
        -5 here, as from_multihead_attention)."""
        projs = {"q_proj": q_proj, "k_proj": k_proj, "v_proj": v_proj, "o_proj": o_proj}
        for name, p in projs.items():
            if not isinstance(p, nn.Linear):
                raise TypeError(f"{name}: expected a torch.nn.Linear, got {type(p).__name__}")
        inner, dim = q_proj.weight.shape
        for name in ("k_proj", "v_proj"):
            if tuple(projs[name].weight.shape) != (inner, dim):
                raise ValueError(
                    f"{name}: expected weight shape {(inner, dim)} (as q_proj), "
                    f"got {tuple(projs[name].weight.shape)}"
                )
        if tuple(o_proj.weight.shape) != (dim, inner):
            raise ValueError(
                f"o_proj: expected weight shape {(dim, inner)}, got {tuple(o_proj.weight.shape)}"
            )
        if num_heads < 1 or inner % num_heads:
            raise ValueError(
                f"num_heads: expected a divisor of q_proj.out_features={inner}, got {num_heads}"
            )
        bias = any(p.bias is not None for p in projs.values())
        w = q_proj.weight
        layer = cls(
            dim,
            num_heads,
            batch_size,
            head_dim=inner // num_heads,
            bias=bias,
            qk_norm=False,
            rotary=rotary,
            **{"gate_init": PRETRAINED_GATE_INIT, "device": w.device, **kwargs},
        )
        with torch.no_grad():
            layer.qkv.weight.copy_(torch.cat([q_proj.weight, k_proj.weight, v_proj.weight]))
            layer.out.weight.copy_(o_proj.weight)
            if bias:
                zeros = torch.zeros(inner, device=w.device, dtype=w.dtype)
                parts = [p.bias if p.bias is not None else zeros for p in (q_proj, k_proj, v_proj)]
                layer.qkv.bias.copy_(torch.cat(parts))
                layer.out.bias.copy_(o_proj.bias if o_proj.bias is not None else 0)
        return layer.to(w.dtype)

    # -- state: memories, context, decoding cache ---------------------------------------

    @property
    def scale(self) -> Tensor:
        """[num_heads]: the temperature of the normalised dot products now."""
        return _temperature(self.log_scale, self.max_scale)

    def reset(self, mask: Optional[Tensor] = None) -> None:
        """Clears the memories (and hides the context) of the batch elements where
        mask [B] is True (all if None). A decoding segment in progress (step) is
        dropped, for all batch elements."""
        if self.memory is not None:
            self.memory.clear(mask)
        self._hide_context(mask)
        self._cache = None

    def resize(self, batch_size: int, memory: Optional[nn.Module] = None) -> None:
        """Fresh, empty memories for batches of batch_size (a KNNMemory like the current
        one, or ``memory`` with grid (batch_size, num_heads)); the context and any
        decoding segment are dropped. See knnmem.torch.at_batch_size to come back."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if self.memory is not None:
            if memory is None:
                old = self.memory
                if not isinstance(old, KNNMemory):
                    raise TypeError(
                        f"memory: expected a memory with grid ({batch_size}, {self.num_heads}) "
                        f"for a layer whose memory is a {type(old).__name__} (only a "
                        "KNNMemory is recreated)"
                    )
                memory = KNNMemory(
                    (batch_size, self.num_heads),
                    old.capacity,
                    old.key_dim,
                    old.value_dim,
                    old.metric,
                    precision=old.precision,
                    device=old.keys.device,
                )
            if tuple(memory.shape) != (batch_size, self.num_heads):
                raise ValueError(
                    f"memory: expected grid shape {(batch_size, self.num_heads)}, "
                    f"got {tuple(memory.shape)}"
                )
            self.memory = memory
        self.batch_size = batch_size
        self._context = None
        self._cache = None

    def _hide_context(self, mask: Optional[Tensor]) -> None:
        if self._context is None:
            return
        keys, values, visible = self._context
        hidden = torch.ones_like(visible) if mask is None else mask.to(visible.device, torch.bool)
        self._context = (keys, values, visible & ~hidden)

    def _rot(self, x: Tensor, start: int = 0) -> Tensor:
        return _rotate(x, self.rotary_base, start) if self.rotary else x

    def _local(self, qs: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Causal attention over the segment, after the previous one's context if kept."""
        if self._context is None:
            return F.scaled_dot_product_attention(
                self._rot(qs), self._rot(k), v, is_causal=True, scale=scale
            )
        ck, cv, visible = self._context
        b, _, t, _ = qs.shape
        tc = ck.shape[-2]
        keys = torch.cat([self._rot(ck.to(k.dtype)), self._rot(k, tc)], -2)
        values = torch.cat([cv.to(v.dtype), v], -2)
        causal = torch.ones(t, t, dtype=torch.bool, device=qs.device).tril()
        allowed = torch.cat(
            [visible.view(b, 1, 1, 1).expand(b, 1, t, tc), causal.expand(b, 1, t, t)], -1
        )
        return F.scaled_dot_product_attention(
            self._rot(qs, tc), keys, values, attn_mask=allowed, scale=scale
        )

    def _check_x(self, x: Tensor) -> None:
        check_dense_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, T, dim={self.dim}), got {shape_str(x.shape)}")
        if x.device != self.gate.device:
            raise ValueError(
                f"x: expected a tensor on {self.gate.device} (as the module), got {x.device}"
            )
        b = x.shape[0]
        if self.memory is not None and b != self.batch_size:
            raise ValueError(
                f"x: expected batch size {self.batch_size} (one memory each; resize() or "
                f"knnmem.torch.at_batch_size for another), got {b}"
            )
        if self._context is not None and self._context[0].shape[0] != b:
            raise ValueError(
                f"x: expected batch size {self._context[0].shape[0]} (the previous segment's "
                f"context), got {b}"
            )

    def _project(self, x: Tensor):
        """(local queries, local keys, sdpa scale, memory queries (normalised, scaled),
        memory keys (normalised), values); the memory is searched with the normalised
        queries (the same ranking as the scaled ones)."""
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, d]
        qn = F.normalize(q, dim=-1)
        kn = F.normalize(k, dim=-1)
        qs = qn * self.scale.to(q.dtype).view(1, h, 1, 1)
        if self.qk_norm:
            return qs, kn, 1.0, qs, kn, v
        return q, k, d**-0.5, qs, kn, v

    def _with_memory(self, local: Tensor, qs: Tensor, v: Tensor) -> Tensor:
        """The gated mix of local with the attention over the memory (searched with qs)."""
        h = self.num_heads
        # (another memory object -- a ShardedKNNMemory, a user's -- is searched as before:
        # its scores need not be differentiable, nor its search take fields)
        if self._lean_search and isinstance(self.memory, KNNMemory):
            # The memory logits are the search's own scores of the normalised queries,
            # times the temperature: q.k is not computed twice, and the retrieved keys
            # are fetched only where the backward pass needs them (queries that
            # require grad), never returned. The same function of qs as below.
            scale = self.scale.to(qs.dtype).view(1, h, 1, 1)
            res = self.memory.search(
                qs / scale,
                k=self.k,
                recall_target=self.recall_target,
                fields=("scores", "values", "mask"),
            )
            # (empty entries score -inf: zeroed before the scale, or -inf * 0 is a NaN
            # gradient of the temperature; the mask below hides them)
            logits = torch.where(res.mask, res.scores, 0.0).to(qs.dtype) * scale
        else:  # the formulation before the lean search (kept to compare, bench/layer_cost.py)
            res = self.memory.search(
                F.normalize(qs.detach(), dim=-1), k=self.k, recall_target=self.recall_target
            )
            logits = torch.einsum("bhtd,bhtkd->bhtk", qs, res.keys.to(qs.dtype))
        mem_v = res.values.to(v.dtype)
        logits = logits.masked_fill(~res.mask, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1) * res.mask
        mem = torch.einsum("bhtk,bhtkd->bhtd", weights, mem_v)
        g = torch.sigmoid(self.gate).to(qs.dtype).view(1, h, 1, 1) * res.mask[..., :1]
        return g * mem + (1 - g) * local

    def forward(self, x: Tensor, reset: Optional[Tensor] = None) -> Tensor:
        self._check_x(x)
        if self._cache is not None:
            raise ValueError(
                "x: a segment is being decoded with step(); finish it (segment_length tokens) "
                "or reset() before forward()"
            )
        b, t, _ = x.shape
        ql, kl, sdpa_scale, qs, kn, v = self._project(x)
        if reset is not None:
            self._hide_context(reset)
        local = self._local(ql, kl, v, sdpa_scale)
        if self.context:
            self._context = (
                kl.detach(),
                v.detach(),
                torch.ones(b, dtype=torch.bool, device=x.device),
            )
        out = local
        if self.memory is not None:
            if reset is not None:
                self.memory.clear(reset)
            out = self._with_memory(local, qs, v)
            self.memory.add(kn.detach(), v.detach())
        return self.out(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def step(self, x: Tensor, *, segment_length: int, reset: Optional[Tensor] = None) -> Tensor:
        """Decodes one token: x [B, 1, dim] -> [B, 1, dim], the output forward() gives
        that token when the stream is cut into segments of segment_length tokens. The
        segment so far is kept (detached) in the layer; when it is complete it goes to
        the memory (and becomes the context, with context=True). reset (bool [B]) may
        be given only at the first token of a segment (documents start there)."""
        self._check_x(x)
        if x.shape[1] != 1:
            raise ValueError(
                f"x: expected one token, shape (B, 1, {self.dim}), got {shape_str(x.shape)}"
            )
        if not isinstance(segment_length, int) or segment_length < 1:
            raise ValueError(f"segment_length: expected an int >= 1, got {segment_length!r}")
        n = 0 if self._cache is None else self._cache[0].shape[-2]
        if n >= segment_length:
            raise ValueError(
                f"segment_length: expected more than the {n} tokens decoded in this segment, "
                f"got {segment_length}"
            )
        if reset is not None:
            if n:
                raise ValueError(
                    f"reset: expected only at the first token of a segment, {n} decoded so far"
                )
            self._hide_context(reset)
            if self.memory is not None:
                self.memory.clear(reset)
        b = x.shape[0]
        ql, kl, sdpa_scale, qs, kn, v = self._project(x)
        new = (kl.detach(), kn.detach(), v.detach())
        cache = (
            new if self._cache is None else tuple(torch.cat(p, -2) for p in zip(self._cache, new))
        )
        ck_seg, cv_seg = cache[0][..., :-1, :], cache[2][..., :-1, :]
        # local attention: the context (positions 0..tc-1), then the segment up to this token
        seg_k = torch.cat([ck_seg.to(kl.dtype), kl], -2)
        seg_v = torch.cat([cv_seg.to(v.dtype), v], -2)
        tc = 0
        keys, values = self._rot(seg_k), seg_v
        mask = torch.ones(b, 1, 1, n + 1, dtype=torch.bool, device=x.device)
        if self._context is not None:
            ctx_k, ctx_v, visible = self._context
            tc = ctx_k.shape[-2]
            keys = torch.cat([self._rot(ctx_k.to(kl.dtype)), self._rot(seg_k, tc)], -2)
            values = torch.cat([ctx_v.to(v.dtype), seg_v], -2)
            mask = torch.cat([visible.view(b, 1, 1, 1).expand(b, 1, 1, tc), mask], -1)
        local = F.scaled_dot_product_attention(
            self._rot(ql, tc + n), keys, values, attn_mask=mask, scale=sdpa_scale
        )
        out = local if self.memory is None else self._with_memory(local, qs, v)
        if n + 1 == segment_length:  # the segment is complete
            if self.memory is not None:
                self.memory.add(cache[1], cache[2])
            if self.context:
                self._context = (
                    cache[0],
                    cache[2],
                    torch.ones(b, dtype=torch.bool, device=x.device),
                )
            self._cache = None
        else:
            self._cache = cache
        return self.out(out.transpose(1, 2).reshape(b, 1, self.num_heads * self.head_dim))


@contextlib.contextmanager
def at_batch_size(model: nn.Module, batch_size: int) -> Iterator[None]:
    """Within the block, every MemorizingAttention of model (or model itself) has fresh,
    empty memories for batches of batch_size (resize); after it, the memories, contexts
    and decoding state it had before are back (e.g. evaluation or generation at another
    batch size in the middle of training)."""
    layers = [m for m in model.modules() if isinstance(m, MemorizingAttention)]
    saved = [(m.memory, m.batch_size, m._context, m._cache) for m in layers]
    try:
        for m in layers:
            m.resize(batch_size)
        yield
    finally:
        for m, (memory, size, context, cache) in zip(layers, saved):
            m.memory, m.batch_size, m._context, m._cache = memory, size, context, cache
