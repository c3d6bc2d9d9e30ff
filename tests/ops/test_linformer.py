"""Linformer: identity projections give exact softmax attention; SDPA against the float32 reference; slicing,
padding, per-head projections, the refusal of causal use, bad input; and the layer's parameter sharing."""

from __future__ import annotations

import pytest
import torch

from linattn import ops
from linattn.layers.linformer import LinformerAttention
from tests.ops.tolerance import assert_dtype_close, assert_same_result

B, T, H, K, V = 2, 63, 3, 16, 24


def _qkv(dtype=torch.float32, seed=0, T=T):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=gen).to(dtype) for D in (K, K, V)]


def _explicit(q, k, v, E, F, keep=None, dtype=torch.float64):
    """Linformer written with one einsum per step, in ``dtype``."""
    q, k, v, E, F = (x.to(dtype) for x in (q, k, v, E, F))
    if keep is not None:
        k, v = k * keep[:, :, None, None].to(dtype), v * keep[:, :, None, None].to(dtype)
    eq = "rt,bthd->brhd" if E.ndim == 2 else "hrt,bthd->brhd"
    kp, vp = torch.einsum(eq, E, k), torch.einsum(eq, F, v)
    p = (torch.einsum("bthd,brhd->bhtr", q, kp) * q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("bhtr,brhv->bthv", p, vp)


@pytest.mark.parametrize("impl", ["sdpa", "naive"])
def test_identity_projection_is_exact_softmax(impl):
    q, k, v = _qkv()
    eye = torch.eye(T)
    o, state = ops.linformer(q, k, v, eye, eye, impl=impl)
    assert state is None
    ref, _ = ops.softmax_attn(q.double(), k.double(), v.double(), causal=False, impl="naive")
    plain, _ = ops.softmax_attn(q, k, v, causal=False, impl="naive")
    assert_dtype_close(f"linformer {impl} k=n identity", o, plain, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_sdpa_matches_reference(dtype, per_head):
    q, k, v = _qkv(dtype)
    gen = torch.Generator().manual_seed(1)
    shape = (H, 20, 80) if per_head else (20, 80)  # n = 80 > T: the first T columns are used
    E, F = (torch.randn(*shape, generator=gen) / 20**0.5 for _ in range(2))
    o, _ = ops.linformer(q, k, v, E, F, impl="sdpa")
    plain = _explicit(q, k, v, E[..., :T], F[..., :T], dtype=dtype)  # the same formula, plainly, in the dtype
    ref = _explicit(q, k, v, E[..., :T], F[..., :T])
    assert o.dtype == dtype
    assert_dtype_close(f"linformer sdpa {dtype}", o, plain, ref, terms=T)
    naive64, _ = ops.linformer(q.double(), k.double(), v.double(), E.double(), F.double(), impl="naive")
    torch.testing.assert_close(naive64, ref, rtol=1e-12, atol=1e-12)


def test_per_head_projection_equal_to_shared():
    """The same projection given once or per head: the same result up to the rounding of a reordered sum.
    (It drew unseeded, unscaled projections before, whose large logits amplified that rounding past
    assert_close's float32 default now and then; scaled by 1/sqrt(n), as the layer's are, the worst of 200
    seeds came to 0.39 of the bound, against 0.98 unscaled.)"""
    q, k, v = _qkv()
    gen = torch.Generator().manual_seed(3)
    E, F = (torch.randn(10, T, generator=gen) / 10**0.5 for _ in range(2))
    a, _ = ops.linformer(q, k, v, E, F)
    b, _ = ops.linformer(q, k, v, E.expand(H, -1, -1), F.expand(H, -1, -1))
    assert_same_result("per-head projection", a, b, terms=T)


def test_padding_mask_zeroes_padded_keys_and_values():
    q, k, v = _qkv()
    E, F = torch.randn(12, 90), torch.randn(12, 90)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 50:], pad[1, 10:20] = True, True
    o, _ = ops.linformer(q, k, v, E, F, pad)
    keep = (~pad).double()
    ref = _explicit(q, k, v, E[:, :T], F[:, :T], keep)
    plain = _explicit(q, k, v, E[:, :T], F[:, :T], keep, dtype=torch.float32)
    assert_dtype_close("linformer padded", o, plain, ref, terms=T)
    k2, v2 = k.clone(), v.clone()
    k2[pad], v2[pad] = 1e3, -1e3  # what padded tokens hold does not matter
    o2, _ = ops.linformer(q, k2, v2, E, F, pad)
    torch.testing.assert_close(o2, o)


def test_causal_is_refused_with_the_reason():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="future"):
        ops.linformer(q, k, v, torch.eye(T), torch.eye(T), causal=True)
    with pytest.raises(ValueError, match="future"):
        LinformerAttention(32, 2, 64, 8, causal=True)


def test_empty_sequence():
    q, k, v = _qkv(T=0)
    o, _ = ops.linformer(q, k, v, torch.randn(4, 10), torch.randn(4, 10))
    assert o.shape == (B, 0, H, V)


@pytest.mark.parametrize(
    "E, F, mask, err, words",
    [
        (torch.randn(8, T - 1), torch.randn(8, T - 1), None, ValueError, ["E", f"n = {T - 1}", f"T = {T}"]),
        (torch.randn(8, T), torch.randn(9, T), None, ValueError, ["E and F", "[8, 63]", "[9, 63]"]),
        (torch.randn(H + 1, 8, T), torch.randn(H + 1, 8, T), None, ValueError, ["E", f"H = {H}", f"[{H + 1}, 8, {T}]"]),
        (torch.randn(2, 2, 8, T), torch.randn(8, T), None, ValueError, ["E", "[2, 2, 8, 63]"]),
        (torch.ones(8, T, dtype=torch.long), torch.randn(8, T), None, TypeError, ["E", "torch.int64"]),
        (torch.randn(8, T), torch.randn(8, T), torch.zeros(B, T), TypeError, ["key_padding_mask", "bool"]),
        (
            torch.randn(8, T),
            torch.randn(8, T),
            torch.zeros(B, T + 1, dtype=torch.bool),
            ValueError,
            ["key_padding_mask", f"[{B}, {T + 1}]"],
        ),
    ],
    ids=["n<T", "E!=F", "heads", "ndim", "dtype", "mask-dtype", "mask-shape"],
)
def test_bad_input(E, F, mask, err, words):
    q, k, v = _qkv()
    with pytest.raises(err) as info:
        ops.linformer(q, k, v, E, F, mask)
    for w in words:
        assert w in str(info.value)


# ----------------------------------------------------------------------------------------------------------- layer


@pytest.mark.parametrize("sharing, n_proj", [("none", 2 * 4), ("headwise", 2), ("kv", 1), ("layerwise", 1)])
def test_layer_sharing(sharing, n_proj):
    D, Hh, n, kk = 32, 4, 40, 6
    layer = LinformerAttention(D, Hh, n, kk, sharing=sharing, seed=0)
    proj = [p for name, p in layer.named_parameters() if name in ("E", "F")]
    assert sum(p.numel() for p in proj) == n_proj * kk * n
    x = torch.randn(2, 33, D, requires_grad=True)
    y, state = layer(x)
    assert y.shape == x.shape and state is None
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad[..., :33].abs().sum() > 0 for p in proj)
    assert all((p.grad[..., 33:] == 0).all() for p in proj)  # columns beyond T are unused


def test_layerwise_sharing_across_layers_and_padding():
    first = LinformerAttention(32, 4, 40, 6, sharing="layerwise", seed=0)
    second = LinformerAttention(32, 4, 40, 6, sharing="layerwise", shared=first.E, seed=1)
    model = torch.nn.Sequential(first, second)
    assert second.E is first.E and second.F is first.E
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 2 * (32 * 3 * 32 + 32 * 32) + 6 * 40
    x = torch.randn(2, 30, 32)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 20:] = True
    y, _ = first(x, key_padding_mask=pad)
    x2 = x.clone()
    x2[1, 20:] = 5.0
    y2, _ = first(x2, key_padding_mask=pad)
    torch.testing.assert_close(y2[1, :20], y[1, :20])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(sharing="all"), ["sharing", "all"]),
        (dict(proj_len=0), ["proj_len"]),
        (dict(shared=torch.nn.Parameter(torch.randn(6, 40))), ["shared", "layerwise"]),
        (dict(sharing="layerwise", shared=torch.nn.Parameter(torch.randn(5, 40))), ["shared", "[6, 40]"]),
    ],
    ids=["sharing", "proj_len", "shared-without-layerwise", "shared-shape"],
)
def test_layer_bad_arguments(kwargs, words):
    args = dict(d_model=32, n_heads=4, seq_len=40, proj_len=6) | kwargs
    with pytest.raises(ValueError) as info:
        LinformerAttention(**args)
    for w in words:
        assert w in str(info.value)


def test_layer_refuses_state_and_cu_seqlens():
    layer = LinformerAttention(32, 4, 40, 6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(1, 10, 32), cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="state"):
        layer(torch.randn(1, 10, 32), state=object())
