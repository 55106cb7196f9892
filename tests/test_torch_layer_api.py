"""MemorizingAttention: the bounded temperature, construction from a pretrained
attention layer (torch.nn.MultiheadAttention, q/k/v/o projections), evaluation at
another batch size (resize, at_batch_size) and one-token decoding (step)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import knnmem.torch as kt  # noqa: E402


def causal_mask(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


# -- temperature ------------------------------------------------------------------------


def test_temperature_starts_at_scale_init_and_is_bounded() -> None:
    layer = kt.MemorizingAttention(32, 4, batch_size=1, use_memory=False, scale_init=10.0)
    torch.testing.assert_close(layer.scale, torch.full((4,), 10.0))  # max_scale 32 default
    with torch.no_grad():
        layer.log_scale.copy_(torch.tensor([0.0, 5.0, 20.0, 80.0]))
    s = layer.scale.detach()
    # exp(log_scale) while small against the bound, never above it
    assert abs(float(s[0]) - 1 / (1 + 1 / 32)) < 1e-6
    assert torch.all(s <= 32.0) and float(s[3]) == pytest.approx(32.0, rel=1e-6)
    assert torch.all(s[1:] <= torch.exp(layer.log_scale[1:]))
    layer.scale.sum().backward()
    assert torch.all(layer.log_scale.grad >= 0) and float(layer.log_scale.grad[3]) < 1e-6
    free = kt.MemorizingAttention(32, 4, batch_size=1, use_memory=False, max_scale=None)
    torch.testing.assert_close(free.log_scale, torch.full((4,), math.log(10.0)))
    with torch.no_grad():
        free.log_scale.fill_(5.0)
    torch.testing.assert_close(free.scale, torch.full((4,), math.exp(5.0)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale_init": 0.0}, "scale_init: expected a number > 0, got 0.0"),
        ({"scale_init": 40.0}, "max_scale: expected None or a number > scale_init=40.0"),
        ({"max_scale": 5.0}, "max_scale: expected None or a number > scale_init=10.0, got 5.0"),
    ],
)
def test_temperature_arguments_are_checked(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kt.MemorizingAttention(32, 4, batch_size=1, use_memory=False, **kwargs)


# -- from a pretrained layer ---------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_from_multihead_attention_equals_the_pretrained_layer(bias: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, bias=bias, batch_first=True).eval()
    layer = kt.MemorizingAttention.from_multihead_attention(
        mha, batch_size=2, capacity=64, k=4, gate_init=-20.0
    )
    default = kt.MemorizingAttention.from_multihead_attention(mha, batch_size=2)
    torch.testing.assert_close(torch.sigmoid(default.gate), torch.full((4,), 1 / (1 + math.e**5)))
    assert layer.qkv.bias is not None if bias else layer.qkv.bias is None
    segs = [torch.randn(2, 8, 32) for _ in range(3)]
    mask = ~causal_mask(8)  # True: not allowed (nn.MultiheadAttention's convention)
    for i, x in enumerate(segs):
        want = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
        got = layer(x)
        # empty memory (i == 0): the same layer; then the gate closed at -20: within 1e-6
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        if i:
            assert int(layer.memory.count.min()) == 8 * (i + 1)
    with torch.no_grad():
        layer.gate.zero_()  # the memory's half now: the output moves
    x = segs[0]
    assert (layer(x) - mha(x, x, x, attn_mask=mask)[0]).abs().max() > 1e-2


def rotate_half_reference(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding as pretrained decoders write it: x * cos + rotate_half(x) * sin."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def test_from_projections_equals_a_rotary_decoder_attention() -> None:
    torch.manual_seed(1)
    dim, h, d = 32, 2, 16
    q, k, v = (nn.Linear(dim, h * d, bias=True) for _ in range(3))
    o = nn.Linear(h * d, dim, bias=False)
    layer = kt.MemorizingAttention.from_projections(
        q, k, v, o, h, batch_size=2, capacity=64, k=4, gate_init=-20.0
    )

    def pretrained(x):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, h, d).transpose(1, 2)  # noqa: E731
        qq, kk, vv = split(q(x)), split(k(x)), split(v(x))
        qq, kk = rotate_half_reference(qq), rotate_half_reference(kk)
        w = (qq @ kk.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal_mask(t), -math.inf)
        return o((w.softmax(-1) @ vv).transpose(1, 2).reshape(b, t, h * d))

    for _ in range(2):
        x = torch.randn(2, 8, dim)
        torch.testing.assert_close(layer(x), pretrained(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(
        ValueError, match=r"num_heads: expected a divisor of q_proj.out_features=32"
    ):
        kt.MemorizingAttention.from_projections(q, k, v, o, 3, batch_size=2)
    with pytest.raises(TypeError, match="mha: expected a torch.nn.MultiheadAttention, got Linear"):
        kt.MemorizingAttention.from_multihead_attention(q, batch_size=2)


# -- batch size ---------------------------------------------------------------------------


def test_at_batch_size_evaluates_with_fresh_memories_and_restores_training() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        kt.MemorizingAttention(32, 4, batch_size=2, capacity=64, k=4, context=True),
        kt.MemorizingAttention(32, 4, batch_size=2, capacity=64, k=4),
    )
    twin = nn.Sequential(
        *(kt.MemorizingAttention(32, 4, batch_size=2, capacity=64, k=4, context=c) for c in (1, 0))
    )
    twin.load_state_dict(model.state_dict())
    x1, x2 = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    model(x1), twin(x1)
    probe = torch.randn(5, 8, 32)
    fresh = nn.Sequential(
        *(kt.MemorizingAttention(32, 4, batch_size=5, capacity=64, k=4, context=c) for c in (1, 0))
    )
    fresh.load_state_dict(
        {n: p for n, p in model.state_dict().items() if "memory" not in n}, strict=False
    )
    with kt.at_batch_size(model, 5):
        assert model[0].memory.shape == (5, 4) and int(model[0].memory.count.sum()) == 0
        torch.testing.assert_close(model(probe), fresh(probe))
        torch.testing.assert_close(model(probe), fresh(probe))  # memories fill as usual
    assert model[0].batch_size == 2 and model[1].memory.shape == (2, 4)
    torch.testing.assert_close(model(x2), twin(x2))  # training memories and context are back
    with pytest.raises(ValueError, match=r"x: expected batch size 2 \(one memory each; resize"):
        model(probe)
    model[1].resize(5)
    assert model[1].memory.shape == (5, 4) and model[1].batch_size == 5
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        model[1].resize(0)


# -- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("context, qk_norm", [(True, True), (False, True), (True, False)])
def test_step_decodes_like_forward_over_segments(context: bool, qk_norm: bool) -> None:
    torch.manual_seed(3)
    kwargs = dict(capacity=64, k=4, recall_target=1.0, context=context, qk_norm=qk_norm)
    a = kt.MemorizingAttention(32, 4, batch_size=2, **kwargs)
    b = kt.MemorizingAttention(32, 4, batch_size=2, **kwargs)
    b.load_state_dict(a.state_dict())
    seg = 6
    xs = torch.randn(2, 4 * seg, 32)
    resets = {2: torch.tensor([True, False])}  # element 0 starts a new document at segment 2
    want = torch.cat([a(xs[:, i * seg : (i + 1) * seg], reset=resets.get(i)) for i in range(4)], 1)
    got = []
    with torch.no_grad():
        for p in range(4 * seg):
            r = resets.get(p // seg) if p % seg == 0 else None
            got.append(b.step(xs[:, p : p + 1], segment_length=seg, reset=r))
    torch.testing.assert_close(torch.cat(got, 1), want.detach(), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(b.memory.written.numpy(), a.memory.written.numpy())


def test_step_bad_input() -> None:
    layer = kt.MemorizingAttention(32, 4, batch_size=2, capacity=64, k=4)
    with pytest.raises(ValueError, match=r"x: expected one token, shape \(B, 1, 32\), got"):
        layer.step(torch.randn(2, 3, 32), segment_length=4)
    layer.step(torch.randn(2, 1, 32), segment_length=4)
    with pytest.raises(ValueError, match="reset: expected only at the first token of a segment"):
        layer.step(torch.randn(2, 1, 32), segment_length=4, reset=torch.tensor([True, True]))
    with pytest.raises(ValueError, match="x: a segment is being decoded with step"):
        layer(torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="segment_length: expected more than the 1 tokens"):
        layer.step(torch.randn(2, 1, 32), segment_length=1)
    layer.reset()
    assert layer(torch.randn(2, 4, 32)).shape == (2, 4, 32)
    assert F is not None
