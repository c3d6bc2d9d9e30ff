"""decay_decode_: the state advanced in place equals the op's final state, and the outputs its outputs."""

from __future__ import annotations

import pytest
import torch

from linattn import ops
from tests.ops.tolerance import assert_same_result

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def draw(gate: str, T: int, dtype=torch.float32, B: int = 2, N: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    H, K, V = 2, 16, 24
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(dtype) for D in (K, K, V))
    g = {
        "none": None,
        "head": -torch.rand(B, T, H, generator=gen),
        "key": -torch.rand(B, T, H, K, generator=gen),
    }[gate]
    state = torch.randn(N or B, H, K, V, generator=gen)
    move = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return [move(x) for x in (q, k, v, g)], state.to(DEVICE)


def reference(q, k, v, g, state, cu_seqlens=None):
    kw = dict(initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens, impl="naive")
    if g is None:
        return ops.linear_attn(q, k, v, **kw)
    return (ops.gla if g.ndim == 4 else ops.simple_gla)(q, k, v, g, **kw)


@pytest.mark.parametrize("gate", ["none", "head", "key"])
@pytest.mark.parametrize("T", [1, 3])
def test_in_place_equals_the_op(gate, T):
    (q, k, v, g), state = draw(gate, T, seed=T)
    o_ref, s_ref = reference(q, k, v, g, state)
    buffer = state.clone()
    address = buffer.data_ptr()
    with torch.no_grad():
        o = ops.decay_decode_(q, k, v, g, buffer)
    assert buffer.data_ptr() == address
    assert_same_result("o", o, o_ref)
    assert_same_result("state", buffer, s_ref)


def test_in_place_varlen_and_bfloat16():
    (q, k, v, g), state = draw("head", 5, dtype=torch.bfloat16, B=1, N=3)
    cu = torch.tensor([0, 2, 2, 5], device=DEVICE)
    o_ref, s_ref = reference(q, k, v, g, state, cu)
    with torch.no_grad():
        o = ops.decay_decode_(q, k, v, g, state, cu_seqlens=cu)
    assert o.dtype == torch.bfloat16
    assert_same_result("o", o.float(), o_ref.float(), terms=256)  # both bf16-rounded from float32 sums
    assert_same_result("state", state, s_ref)


def test_bad_state_raises():
    (q, k, v, g), state = draw("head", 1)
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        ops.decay_decode_(q, k, v, g, state.half())
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        ops.decay_decode_(q, k, v, g, state.transpose(-1, -2).contiguous().transpose(-1, -2))
    with pytest.raises(TypeError, match="state must be a torch.Tensor"):
        ops.decay_decode_(q, k, v, g, None)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V\] = \[2, 2, 16, 24\], got \[1"):
        ops.decay_decode_(q, k, v, g, state[:1])
    with pytest.raises(ValueError, match="for inference"):
        ops.decay_decode_(q.requires_grad_(), k, v, g, state)


def test_without_triton_the_recurrence_updates_in_place(monkeypatch):
    import linattn.ops.decode as decode

    monkeypatch.setattr(decode, "triton_unsupported", lambda q, v: "pretend there is no Triton")
    (q, k, v, g), state = draw("key", 2, seed=7)
    o_ref, s_ref = reference(q, k, v, g, state)
    address = state.data_ptr()
    with torch.no_grad():
        o = ops.decay_decode_(q, k, v, g, state)
    assert state.data_ptr() == address
    assert_same_result("o", o, o_ref)
    assert_same_result("state", state, s_ref)
