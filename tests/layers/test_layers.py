"""Every layer: shapes and gradients, prefill + decode = one pass, packed = separate, constant state, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from linattn.layers import (
    GLA,
    DeltaNet,
    GatedDeltaNet,
    KVCache,
    LinearAttention,
    Mamba2,
    RecurrentState,
    RetNet,
    ShortConv,
    SoftmaxAttention,
)
from tests.ops.tolerance import assert_dtype_close, assert_same_result

D = 32


class TinyLearnedMap(nn.Module):
    """A feature map with parameters, standing in for any user-supplied module: softmax over a learned projection."""

    def __init__(self, K: int):
        super().__init__()
        self.proj = nn.Linear(K, 2 * K)

    def forward(self, x):
        return self.proj(x).softmax(-1)


# id -> constructor; odd and grouped head counts, value widths != key widths, convs on and off.
LAYERS = {
    "linear_attn": lambda **kw: LinearAttention(D, 2, **kw),
    "linear_attn_relu_conv_gqa": lambda **kw: LinearAttention(
        D, 4, feature_map="relu", normalize=False, conv_size=3, n_kv_heads=2, **kw
    ),
    "linear_attn_learned_map": lambda **kw: LinearAttention(D, 2, feature_map=TinyLearnedMap(16), **kw),
    "linear_attn_hedgehog": lambda **kw: LinearAttention(D, 2, feature_map="hedgehog", **kw),
    "linear_attn_favor": lambda **kw: LinearAttention(D, 2, feature_map="favor+", **kw),
    "retnet": lambda **kw: RetNet(D, 2, **kw),
    "gla": lambda **kw: GLA(D, 2, **kw),
    "gla_conv_gqa": lambda **kw: GLA(D, 4, n_kv_heads=2, conv_size=4, expand_v=1.5, **kw),
    "deltanet": lambda **kw: DeltaNet(D, 2, **kw),
    "gated_deltanet": lambda **kw: GatedDeltaNet(D, 2, expand_v=1.5, **kw),
    "gated_deltanet_gqa": lambda **kw: GatedDeltaNet(D, 4, n_kv_heads=1, conv_size=2, **kw),
    "mamba2": lambda **kw: Mamba2(D, 2, d_state=16, **kw),
    "mamba2_groups": lambda **kw: Mamba2(D, 4, d_state=8, n_groups=2, head_dim=12, **kw),
    "softmax": lambda **kw: SoftmaxAttention(D, 2, **kw),
    "softmax_gqa_window": lambda **kw: SoftmaxAttention(D, 4, n_kv_heads=2, window=9, **kw),
}
RECURRENT = [name for name in LAYERS if not name.startswith("softmax")]


def make(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    layer = LAYERS[name](**kw)
    with torch.no_grad():  # move every parameter off its init (zero biases, identity maps) so all paths matter
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def inputs(B: int, T: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", LAYERS)
def test_shape_and_gradient_flow(name):
    layer = make(name)
    x = inputs(2, 37).requires_grad_()
    y, state = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", LAYERS)
def test_prefill_then_decode_equals_one_pass(name):
    """Prefill 23 tokens (chunked), continue with 20 in one call (chunked, from the state), then decode one by one."""
    layer = make(name)
    x = inputs(2, 58)
    with torch.no_grad():
        ref, ref_state = make(name).double()(x.double())
        full, full_state = layer(x)
        parts, state = [], None
        for a, b in [(0, 23), (23, 43)] + [(t, t + 1) for t in range(43, 58)]:
            y, state = layer(x[:, a:b], state)
            parts.append(y)
    split = torch.cat(parts, dim=1)
    assert_dtype_close(f"{name} prefill+decode", split, full, ref)
    if isinstance(state, RecurrentState):
        assert_dtype_close(f"{name} final state", state.ssm, full_state.ssm, ref_state.ssm)
        if state.conv is not None:  # the last inputs of the conv, projected from x in calls of different sizes
            assert_same_result(f"{name} conv cache", state.conv, full_state.conv)


@pytest.mark.parametrize("name", LAYERS)
def test_packed_equals_separate(name):
    """cu_seqlens: each packed sequence sees only itself (the short conv included), with its own initial state."""
    layer = make(name)
    lengths = [5, 0, 17, 1, 30]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = inputs(1, sum(lengths))
    history = inputs(len(lengths), 6, seed=2)  # each sequence continues its own history
    with torch.no_grad():
        _, states = layer(history)
        separate, finals = [], []
        for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            s_n = None if states is None else _row(states, n)
            y, s = layer(x[:, a:b], s_n) if b > a or s_n is None else (x[:, :0], s_n)
            separate.append(y)
            finals.append(s)
        separate = torch.cat(separate, dim=1)
        if isinstance(states, KVCache):  # a KV cache continues one batch, not packed sequences
            packed, _ = layer(x, None, cu)
            separate = torch.cat([layer(x[:, a:b])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
            assert_same_result(f"{name} packed", packed, separate)
            return
        packed, packed_state = layer(x, states, cu)
    assert_same_result(f"{name} packed", packed, separate)
    for n, s in enumerate(finals):
        assert_same_result(f"{name} state {n}", packed_state.ssm[n], s.ssm[0])
        if s.conv is not None:
            assert_same_result(f"{name} conv cache {n}", packed_state.conv[n], s.conv[0])


def _row(state, n):
    if isinstance(state, KVCache):
        return None
    return RecurrentState(*(None if t is None else t[n : n + 1] for t in (state.ssm, state.conv, state.seen)))


def test_short_conv_does_not_leak_across_sequences():
    conv = ShortConv(6, kernel_size=4)
    x = torch.randn(1, 9, 6)
    cu = torch.tensor([0, 2, 9])
    cache = torch.randn(2, 3, 6)
    with torch.no_grad():
        packed, new = conv(x, cache, cu)
        y0, c0 = conv(x[:, :2], cache[:1])
        y1, c1 = conv(x[:, 2:], cache[1:])
        x_leaky = x.clone()
        x_leaky[:, :2] += 100.0  # the first sequence changes; the second must not notice
        packed_leaky, _ = conv(x_leaky, cache, cu)
    assert torch.equal(packed[:, 2:], packed_leaky[:, 2:])
    torch.testing.assert_close(packed, torch.cat([y0, y1], dim=1))
    torch.testing.assert_close(new, torch.cat([c0, c1]))
    # the first sequence is shorter than the cache: its new cache is the old cache's tail followed by its 2 inputs
    assert torch.equal(new[0], torch.cat([cache[0, 2:], x[0, :2]]))


@pytest.mark.parametrize("W", [2, 4])
def test_short_conv_packed_equals_each_sequence_alone(W):
    """Packed sequences (empty ones, one token, shorter and longer than the cache) give each sequence's own run:
    outputs, new caches and the gradients of inputs, caches and weights."""
    torch.manual_seed(0)
    conv = ShortConv(5, kernel_size=W)
    cu = torch.tensor([0, 0, 1, 3, 3, 20, 21])
    x = torch.randn(1, 21, 5, requires_grad=True)
    cache = torch.randn(6, W - 1, 5, requires_grad=True)
    y, new = conv(x, cache, cu)
    (y.square().sum() + new.sin().sum()).backward()
    packed = [x.grad, cache.grad, conv.weight.grad, conv.bias.grad]
    x.grad = cache.grad = conv.weight.grad = conv.bias.grad = None
    ys, news = [], []
    for n in range(6):
        a, b = cu[n].item(), cu[n + 1].item()
        y_n, c_n = conv(x[:, a:b], cache[n : n + 1])
        ys.append(y_n)
        news.append(c_n)
    y_alone, new_alone = torch.cat(ys, dim=1), torch.cat(news)
    (y_alone.square().sum() + new_alone.sin().sum()).backward()
    torch.testing.assert_close(y, y_alone)
    torch.testing.assert_close(new, new_alone)
    for got, want in zip(packed, [x.grad, cache.grad, conv.weight.grad, conv.bias.grad]):
        torch.testing.assert_close(got, want)
    y0, new0 = conv(x.detach(), None, cu)  # no cache: zeros
    torch.testing.assert_close(new0[0], torch.zeros(W - 1, 5))  # an empty sequence keeps its (zero) cache


@pytest.mark.parametrize("name", RECURRENT)
def test_state_size_is_constant(name):
    layer = make(name)
    sizes = set()
    with torch.no_grad():
        for T in (3, 40, 130):
            _, state = layer(inputs(2, T))
            sizes.add(state.nbytes())
            _, state = layer(inputs(2, 1), state)
            sizes.add(state.nbytes())
    assert len(sizes) == 1, f"{name}: state bytes vary with T: {sorted(sizes)}"


def test_kv_cache_grows_with_the_context_and_stops_at_the_window():
    full, windowed = SoftmaxAttention(D, 4, n_kv_heads=2), SoftmaxAttention(D, 4, n_kv_heads=2, window=8)
    with torch.no_grad():
        for layer, limit in ((full, None), (windowed, 16)):
            _, cache = layer(inputs(1, 5))
            for t in range(60):
                _, cache = layer(inputs(1, 1, seed=t), cache)
                if limit is None:
                    assert cache.length == 6 + t and cache.seen == 6 + t
                else:
                    assert cache.length < limit and cache.seen == 6 + t
    # the filled part: 65 entries of 2 kv heads x 8 channels x 4 bytes, for keys and for values
    assert full_cache_bytes(full) == 2 * 65 * 2 * 8 * 4


def full_cache_bytes(layer):
    with torch.no_grad():
        _, cache = layer(inputs(1, 65))
    return cache.keys.nbytes + cache.values.nbytes


@pytest.mark.parametrize("name", LAYERS)
def test_bidirectional_layers_read_ahead_and_pack(name):
    layer = make(name, causal=False)
    x = inputs(1, 20)
    with torch.no_grad():
        y, state = layer(x)
        x2 = x.clone()
        x2[:, 5] += 1.0  # within every window of the first token
        y2, _ = layer(x2)
        assert state is None
        assert not torch.allclose(y[:, 0], y2[:, 0]), f"{name}: the first output ignores a later token"
        cu = torch.tensor([0, 7, 20])
        packed, _ = layer(x, None, cu)
        separate = torch.cat([layer(x[:, :7])[0], layer(x[:, 7:])[0]], dim=1)
    assert_same_result(f"{name} bidirectional packed", packed, separate)


def test_bad_input_names_the_argument():
    layer = make("gated_deltanet")
    with pytest.raises(ValueError, match=r"x must be a floating \[B, T, D\]"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([1.0, 2.0])
    with pytest.raises(ValueError, match="with cu_seqlens, x must be"):
        layer(inputs(2, 5), None, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="state must be a RecurrentState"):
        layer(inputs(1, 5), torch.zeros(1, 2, 16, 24))
    _, state = layer(inputs(2, 5))
    with pytest.raises(ValueError, match="the state holds 2 rows but x has B = 3"):
        layer(inputs(3, 1), state)  # batch 3 continuing a batch-2 state
    with pytest.raises(ValueError, match="takes no state"):
        make("gated_deltanet", causal=False)(inputs(2, 5), state)
    with pytest.raises(ValueError, match="n_kv_heads must divide"):
        GatedDeltaNet(D, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="window must be a positive int"):
        SoftmaxAttention(D, 2, window=0)
    with pytest.raises(TypeError, match="state must be a KVCache"):
        make("softmax")(inputs(2, 1), state)


@pytest.mark.parametrize("name", LAYERS)
def test_no_tokens_leave_the_state_unchanged(name):
    layer = make(name)
    with torch.no_grad():
        _, state = layer(inputs(2, 7))
        y, after = layer(inputs(2, 0), state)
    assert y.shape == (2, 0, D)
    if isinstance(state, KVCache):
        assert after.length == state.length and after.seen == 7
    else:
        assert torch.equal(after.ssm, state.ssm)
        assert (after.conv is None) == (state.conv is None)
        if state.conv is not None:
            assert torch.equal(after.conv, state.conv)
