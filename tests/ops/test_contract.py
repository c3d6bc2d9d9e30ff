"""Bad input gets a ValueError or TypeError that names the argument and what it got."""

from __future__ import annotations

import pytest
import torch

from linattn import ops
from linattn.ops._contract import check_cu_seqlens

B, T, H, K, V = 2, 10, 3, 4, 5


def good(**over):
    t = dict(
        q=torch.randn(B, T, H, K),
        k=torch.randn(B, T, H, K),
        v=torch.randn(B, T, H, V),
        g=-torch.rand(B, T, H),
        gk=-torch.rand(B, T, H, K),
        beta=torch.rand(B, T, H),
    )
    t.update(over)
    return t


def call(op, t, **kw):
    q, k, v = t["q"], t["k"], t["v"]
    if op is ops.simple_gla:
        return op(q, k, v, t["g"], **kw)
    if op is ops.gla:
        return op(q, k, v, t["gk"], **kw)
    if op is ops.delta_rule:
        return op(q, k, v, t["beta"], **kw)
    if op is ops.gated_delta_rule:
        return op(q, k, v, t["g"], t["beta"], **kw)
    return op(q, k, v, **kw)


RECURRENT = [ops.linear_attn, ops.retention, ops.simple_gla, ops.gla, ops.delta_rule, ops.gated_delta_rule]
ALL = RECURRENT + [ops.softmax_attn]
op_ids = lambda op: op.__name__  # noqa: E731


@pytest.mark.parametrize("op", ALL, ids=op_ids)
@pytest.mark.parametrize(
    "over, err, words",
    [
        (dict(k=torch.randn(B, T, H, K + 1)), ValueError, ["k", f"[{B}, {T}, {H}, {K + 1}]"]),
        (dict(k=torch.randn(B, T + 1, H, K)), ValueError, ["k", f"[{B}, {T + 1}, {H}, {K}]"]),
        (dict(v=torch.randn(B + 1, T, H, V)), ValueError, ["v", f"[{B + 1}, {T}, {H}, {V}]"]),
        (dict(v=torch.randn(B, T, H + 1, V)), ValueError, ["v", f"[{B}, {T}, {H + 1}, {V}]"]),
        (dict(q=torch.randn(B, T, K)), ValueError, ["q", f"[{B}, {T}, {K}]"]),
        (dict(q=torch.ones(B, T, H, K, dtype=torch.long)), TypeError, ["q", "torch.int64"]),
        (dict(v=torch.randn(B, T, H, V, dtype=torch.float64)), TypeError, ["torch.float64"]),
        (dict(q=[[1.0]]), TypeError, ["q", "list"]),
    ],
    ids=["K", "T", "B", "H", "ndim", "int-dtype", "mixed-dtype", "not-a-tensor"],
)
def test_bad_qkv(op, over, err, words):
    with pytest.raises(err) as info:
        call(op, good(**over))
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "op, name, bad, words",
    [
        (ops.simple_gla, "g", torch.randn(B, T, H, K), ["g", "[B, T, H]", f"[{B}, {T}, {H}, {K}]"]),
        (ops.gla, "gk", torch.randn(B, T, H), ["g", "[B, T, H, K]", f"[{B}, {T}, {H}]"]),
        (ops.delta_rule, "beta", torch.randn(B, T), ["beta", f"[{B}, {T}]"]),
        (ops.gated_delta_rule, "beta", torch.randn(B, T, H + 2), ["beta", f"[{B}, {T}, {H + 2}]"]),
        (ops.gated_delta_rule, "g", torch.randn(B, T - 1, H), ["g", f"[{B}, {T - 1}, {H}]"]),
        (ops.simple_gla, "g", torch.ones(B, T, H, dtype=torch.int32), ["g", "torch.int32"]),
    ],
)
def test_bad_gate_or_beta(op, name, bad, words):
    with pytest.raises((ValueError, TypeError)) as info:
        call(op, good(**{name: bad}))
    for w in words:
        assert w in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
@pytest.mark.parametrize("op", RECURRENT, ids=op_ids)
def test_tensors_on_different_devices(op):
    with pytest.raises(ValueError, match="device"):
        call(op, good(v=torch.randn(B, T, H, V, device="cuda")))


@pytest.mark.parametrize("op", [ops.simple_gla, ops.gated_delta_rule], ids=op_ids)
def test_gate_on_another_device(op):
    g = torch.empty(B, T, H, device="meta")
    with pytest.raises(ValueError, match="g is on meta"):
        call(op, good(g=g))


@pytest.mark.parametrize("op", ALL, ids=op_ids)
@pytest.mark.parametrize(
    "B_, cu, words",
    [
        (2, [0, 4, 10], ["B must be 1", "B=2"]),
        (1, [1, 4, 10], ["start at 0", "[1, 4, 10]"]),
        (1, [0, 4, 9], ["end at T=10", "[0, 4, 9]"]),
        (1, [0, 6, 4, 10], ["non-decreasing", "[0, 6, 4, 10]"]),
        (1, [[0, 10]], ["1-D", "[1, 2]"]),
    ],
    ids=["batched", "not-from-0", "not-to-T", "decreasing", "2-D"],
)
def test_bad_cu_seqlens(op, B_, cu, words):
    t = good(
        q=torch.randn(B_, T, H, K),
        k=torch.randn(B_, T, H, K),
        v=torch.randn(B_, T, H, V),
        g=-torch.rand(B_, T, H),
        gk=-torch.rand(B_, T, H, K),
        beta=torch.rand(B_, T, H),
    )
    with pytest.raises(ValueError) as info:
        call(op, t, cu_seqlens=torch.tensor(cu))
    for w in words:
        assert w in str(info.value)


def test_cu_seqlens_read_once_until_changed_in_place(monkeypatch):
    """A valid cu_seqlens is read on the host (for a GPU tensor, a wait for the device) the first time only; an
    in-place change, another T, or a new tensor is checked again, so bad bounds still raise."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    cu = torch.tensor([0, 4, 10])
    assert [check_cu_seqlens("op", cu, 1, 10) for _ in range(3)] == [2, 2, 2] and len(reads) == 1
    with pytest.raises(ValueError, match="end at T=8"):  # the same tensor, another T
        check_cu_seqlens("op", cu, 1, 8)
    cu[1] = 11  # in place: now decreasing
    with pytest.raises(ValueError, match=r"non-decreasing, got \[0, 11, 10\]"):
        check_cu_seqlens("op", cu, 1, 10)
    with pytest.raises(ValueError, match="B must be 1"):  # shapes are checked at every call
        check_cu_seqlens("op", cu, 2, 10)
    with torch.inference_mode():
        bad = torch.tensor([0, 4, 10])
        check_cu_seqlens("op", bad, 1, 10)
        bad[2] = 9  # inference tensors carry no version counter: checked at every call
        with pytest.raises(ValueError, match="end at T=10"):
            check_cu_seqlens("op", bad, 1, 10)
    t = good(q=torch.randn(1, T, H, K), k=torch.randn(1, T, H, K), v=torch.randn(1, T, H, V))
    with pytest.raises(ValueError, match="end at T=10"):  # through an op, after the checks above
        ops.linear_attn(t["q"], t["k"], t["v"], cu_seqlens=torch.tensor([0, 4, 9]))


def test_float_cu_seqlens():
    t = good(q=torch.randn(1, T, H, K), k=torch.randn(1, T, H, K), v=torch.randn(1, T, H, V))
    with pytest.raises(TypeError, match="cu_seqlens must have an integer dtype"):
        ops.linear_attn(t["q"], t["k"], t["v"], cu_seqlens=torch.tensor([0.0, 10.0]))


@pytest.mark.parametrize("op", RECURRENT, ids=op_ids)
def test_bad_initial_state(op):
    with pytest.raises(ValueError) as info:
        call(op, good(), initial_state=torch.zeros(B, H, V, K))
    assert "initial_state" in str(info.value) and f"[{B}, {H}, {V}, {K}]" in str(info.value)


def test_initial_state_rows_follow_cu_seqlens():
    t = good(q=torch.randn(1, T, H, K), k=torch.randn(1, T, H, K), v=torch.randn(1, T, H, V))
    with pytest.raises(ValueError, match=r"\[N \(one per sequence in cu_seqlens\), H, K, V\] = \[3, 3, 4, 5\]"):
        ops.linear_attn(
            t["q"], t["k"], t["v"], cu_seqlens=torch.tensor([0, 2, 5, 10]), initial_state=torch.zeros(1, H, K, V)
        )


def test_normalized_state_has_the_normaliser_column():
    t = good()
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 6\]"):
        ops.linear_attn(t["q"], t["k"], t["v"], "elu1", True, initial_state=torch.zeros(B, H, K, V))


@pytest.mark.parametrize("op", RECURRENT, ids=op_ids)
@pytest.mark.parametrize("impl", ["fast", "sdpa", None])
def test_impl_that_cannot_serve(op, impl):
    with pytest.raises(ValueError, match="impl"):
        call(op, good(), impl=impl)


@pytest.mark.parametrize("op", RECURRENT, ids=op_ids)
def test_triton_refuses_what_it_cannot_serve(op):
    """float64 has no Triton kernel (nor do CPU tensors outside the interpreter): a clear error, no fallback."""
    t = {name: x.double() for name, x in good().items()}
    with pytest.raises(ValueError, match=r"impl='triton'|not available"):
        call(op, t, impl="triton")


def test_triton_refuses_noncausal_linear_attention():
    t = good()
    with pytest.raises(ValueError, match="causal=False"):
        ops.linear_attn(t["q"], t["k"], t["v"], causal=False, impl="triton")


@pytest.mark.parametrize("impl", ["chunk", "triton"])
def test_softmax_impls(impl):
    t = good()
    with pytest.raises(ValueError, match="impl"):
        ops.softmax_attn(t["q"], t["k"], t["v"], impl=impl)


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window(window):
    t = good()
    with pytest.raises(ValueError, match="window"):
        ops.softmax_attn(t["q"], t["k"], t["v"], window=window)


def test_bad_scale_and_feature_map():
    t = good()
    with pytest.raises(TypeError, match="scale"):
        ops.simple_gla(t["q"], t["k"], t["v"], t["g"], scale="1")
    with pytest.raises(ValueError, match="feature_map"):
        ops.linear_attn(t["q"], t["k"], t["v"], feature_map="softmax")
    with pytest.raises(ValueError, match=r"feature_map must map"):
        ops.linear_attn(t["q"], t["k"], t["v"], feature_map=lambda x: x.sum(-1))


@pytest.mark.parametrize("op", RECURRENT, ids=op_ids)
@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_inputs_are_not_modified(op, impl):
    t = good()
    before = {name: x.clone() for name, x in t.items()}
    s0 = torch.randn(B, H, K, V)
    s0_before = s0.clone()
    call(op, t, impl=impl, initial_state=s0, output_final_state=True)
    for name, x in t.items():
        assert torch.equal(x, before[name]), name
    assert torch.equal(s0, s0_before)
