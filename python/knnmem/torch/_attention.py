"""MemorizingAttention: local causal attention plus attention over the top-k of a
kNN memory of past segments, mixed by a learned per-head gate (Wu et al.,
Memorizing Transformers, ICLR 2022)."""

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._arrays import check_dense_tensor
from .._contract import check_search_args
from ._checks import shape_str
from ._memory import KNNMemory

__all__ = ["MemorizingAttention"]


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


class MemorizingAttention(nn.Module):
    """Multi-head attention over the current segment plus a kNN memory of past ones.

    Per head (Wu et al. 2022): queries and keys are L2-normalised and scaled by a
    learned per-head temperature; local attention is causal over the segment
    (rotary positions); memory attention retrieves the top-k keys of each query
    from that (batch element, head)'s memory of *past* segments (searched before
    the segment is added, so a query never sees its own segment), attends over
    them with a softmax over the k entries (no position information), and the
    two are mixed by a learned gate g = sigmoid(b) per head:

        out = g * memory_attention + (1 - g) * local_attention

    (where a memory is still empty, e.g. the first segment of a document, out is
    the local attention alone). The retrieved keys and values are constants;
    gradients flow into the queries (and the temperature and gate). After the
    attention the segment's keys and values are appended (detached).

    With ``context=True`` the local attention also sees the previous segment, as
    in the paper (a Transformer-XL cache): its keys and values, kept detached in
    the module after each call (not in the state_dict), come before the segment's
    with the rotary positions running on, so a query attends to the previous T
    rows and the causal part of its own segment. A reset of a batch element (the
    ``reset`` argument or ``reset()``) hides its context; a batch of another size
    than the context's raises.

    Args:
        dim: model width. num_heads: heads. batch_size: rows of x (one memory per
            batch element and head).
        head_dim: per-head width (default dim // num_heads).
        capacity: rows each memory holds (FIFO). k, recall_target: of the search.
        scale_init: initial temperature of the normalised dot products.
        rotary_base: base of the rotary position embedding of the local attention.
        bias: biases in the qkv and out projections.
        use_memory: False gives the same layer without a memory (a baseline).
        memory: a memory module to use instead of a KNNMemory (e.g.
            knnmem.torch.ShardedKNNMemory) with grid (batch_size, num_heads) and
            key_dim = value_dim = head_dim.
        context: local attention over the previous segment too (above).
        device: where the parameters and the memory are created.

    forward(x [B, T, dim], reset=None) -> [B, T, dim]; reset: bool [B], True
    where a new document starts with this segment (its memories are cleared
    before the search).
    """

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
        rotary_base: float = 10000.0,
        bias: bool = False,
        use_memory: bool = True,
        memory: Optional[nn.Module] = None,
        context: bool = False,
        device: Any = None,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        if head_dim < 1:
            raise ValueError(
                f"head_dim: expected >= 1, got {head_dim} (dim={dim}, num_heads={num_heads})"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.batch_size = batch_size
        self.k, self.recall_target = check_search_args(k, recall_target, capacity)
        self.rotary_base = rotary_base
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias, device=device)
        self.out = nn.Linear(inner, dim, bias=bias, device=device)
        self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(scale_init), device=device))
        self.gate = nn.Parameter(torch.zeros(num_heads, device=device))
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
        # previous segment: normalised keys, values [B, H, Tc, d], visible [B]
        self._context: Optional[tuple[Tensor, Tensor, Tensor]] = None

    def reset(self, mask: Optional[Tensor] = None) -> None:
        """Clears the memories (and hides the context) of the batch elements where
        mask [B] is True (all if None)."""
        if self.memory is not None:
            self.memory.clear(mask)
        self._hide_context(mask)

    def _hide_context(self, mask: Optional[Tensor]) -> None:
        if self._context is None:
            return
        keys, values, visible = self._context
        hidden = torch.ones_like(visible) if mask is None else mask.to(visible.device, torch.bool)
        self._context = (keys, values, visible & ~hidden)

    def _local(self, qs: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention over the segment, after the previous one's context if kept."""
        base = self.rotary_base
        if self._context is None:
            return F.scaled_dot_product_attention(
                _rotate(qs, base), _rotate(k, base), v, is_causal=True, scale=1.0
            )
        ck, cv, visible = self._context
        b, _, t, _ = qs.shape
        tc = ck.shape[-2]
        keys = torch.cat([_rotate(ck.to(k.dtype), base), _rotate(k, base, tc)], -2)
        values = torch.cat([cv.to(v.dtype), v], -2)
        causal = torch.ones(t, t, dtype=torch.bool, device=qs.device).tril()
        allowed = torch.cat(
            [visible.view(b, 1, 1, 1).expand(b, 1, t, tc), causal.expand(b, 1, t, t)], -1
        )
        return F.scaled_dot_product_attention(
            _rotate(qs, base, tc), keys, values, attn_mask=allowed, scale=1.0
        )

    def forward(self, x: Tensor, reset: Optional[Tensor] = None) -> Tensor:
        check_dense_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, T, dim={self.dim}), got {shape_str(x.shape)}")
        if x.device != self.gate.device:
            raise ValueError(
                f"x: expected a tensor on {self.gate.device} (as the module), got {x.device}"
            )
        b, t, _ = x.shape
        if self.memory is not None and b != self.batch_size:
            raise ValueError(f"x: expected batch size {self.batch_size} (one memory each), got {b}")
        if self._context is not None and self._context[0].shape[0] != b:
            raise ValueError(
                f"x: expected batch size {self._context[0].shape[0]} (the previous segment's "
                f"context), got {b}"
            )
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, d]
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        scale = self.log_scale.exp().to(q.dtype).view(1, h, 1, 1)
        qs = q * scale
        if reset is not None:
            self._hide_context(reset)
        local = self._local(qs, k, v)
        if self.context:
            self._context = (
                k.detach(),
                v.detach(),
                torch.ones(b, dtype=torch.bool, device=x.device),
            )
        out = local
        if self.memory is not None:
            if reset is not None:
                self.memory.clear(reset)
            res = self.memory.search(q.detach(), k=self.k, recall_target=self.recall_target)
            mem_k = res.keys.to(q.dtype)
            mem_v = res.values.to(v.dtype)
            logits = torch.einsum("bhtd,bhtkd->bhtk", qs, mem_k)
            logits = logits.masked_fill(~res.mask, torch.finfo(logits.dtype).min)
            weights = torch.softmax(logits, dim=-1) * res.mask
            mem = torch.einsum("bhtk,bhtkd->bhtd", weights, mem_v)
            g = torch.sigmoid(self.gate).to(q.dtype).view(1, h, 1, 1) * res.mask[..., :1]
            out = g * mem + (1 - g) * local
            self.memory.add(k.detach(), v.detach())
        return self.out(out.transpose(1, 2).reshape(b, t, h * d))
