"""Each op computes the formula its docstring states, checked against a closed form in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from linattn import ops
from tests.ops.mechanisms import CASES

IMPLS = ["naive", "chunk"]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("impl", IMPLS)
def test_identity_linear_attention_is_the_masked_product(impl):
    q, k, v = rand(2, 70, 3, 5, seed=1), rand(2, 70, 3, 5, seed=2), rand(2, 70, 3, 7, seed=3)
    o, _ = ops.linear_attn(q, k, v, "identity", False, scale=1.0, impl=impl)
    A = torch.einsum("bthk,bshk->bhts", q, k).tril()
    assert_close(o, torch.einsum("bhts,bshv->bthv", A, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_noncausal_linear_attention_reads_every_key(impl):
    q, k, v = rand(2, 70, 3, 5, seed=1), rand(2, 70, 3, 5, seed=2), rand(2, 70, 3, 7, seed=3)
    o, S = ops.linear_attn(q, k, v, causal=False, scale=0.5, impl=impl, output_final_state=True)
    kv = torch.einsum("bshk,bshv->bhkv", k, v)
    assert_close(o, 0.5 * torch.einsum("bthk,bhkv->bthv", q, kv))
    assert_close(S, kv)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_normalized_linear_attention(impl, causal):
    q, k, v = rand(1, 90, 2, 6, seed=1), rand(1, 90, 2, 6, seed=2), rand(1, 90, 2, 4, seed=3)
    o, S = ops.linear_attn(q, k, v, "elu1", True, causal, eps=0.0, impl=impl, output_final_state=True)
    A = torch.einsum("bthk,bshk->bhts", F.elu(q) + 1, F.elu(k) + 1)
    A = A.tril() if causal else A
    assert_close(o, torch.einsum("bhts,bshv->bthv", A / A.sum(-1, keepdim=True), v))
    assert S.shape == (1, 2, 6, 5)
    assert_close(S[..., -1], (F.elu(k) + 1).sum(1))  # the normaliser z rides in the last column


@pytest.mark.parametrize("impl", IMPLS)
def test_retention_uses_retnets_decays(impl):
    H = 4
    q, k, v = rand(1, 80, H, 4, seed=1), rand(1, 80, H, 4, seed=2), rand(1, 80, H, 3, seed=3)
    o, _ = ops.retention(q, k, v, impl=impl)
    t = torch.arange(80, dtype=torch.float64)
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))  # [H]
    D = (gamma[:, None, None] ** (t[:, None] - t[None, :]).clamp(min=0)).tril()  # [H, T, S]
    A = torch.einsum("bthk,bshk->bhts", q, k) * D / math.sqrt(4)
    assert_close(o, torch.einsum("bhts,bshv->bthv", A, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_rule_with_beta_one_overwrites_the_memory(impl):
    """With beta = 1 and a unit key, reading that key right after writing returns the value written."""
    k = F.normalize(rand(1, 40, 2, 8, seed=1), dim=-1)
    v = rand(1, 40, 2, 3, seed=2)
    beta = torch.ones(1, 40, 2, dtype=torch.float64)
    o, _ = ops.delta_rule(k, k, v, beta, scale=1.0, impl=impl)
    assert_close(o, v)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("with_state", [False, True])
def test_empty_sequence_returns_the_initial_state(case, with_state):
    tensors, state = case.draw(2, 0, 3, 4, 5, dtype=torch.bfloat16)
    state = state if with_state else None
    o, S = case(tensors, initial_state=state, output_final_state=True)
    assert o.shape == (2, 0, 3, 5) and o.dtype == torch.bfloat16
    assert S.dtype == torch.float32 and S.shape == (2, 3, 4, 5 + case.state_extra)
    assert torch.equal(S, state) if with_state else not S.any()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("impl", ["naive", "chunk", "triton", "auto"])
@pytest.mark.parametrize("with_state", [False, True])
def test_empty_batch(case, impl, with_state):
    """B = 0 (an empty slice of a batch) gives empty results of the right shapes, by every impl the op has (Triton's
    under the interpreter), the initial state passed through."""
    tensors, state = case.draw(0, 70, 3, 4, 5)
    state = state if with_state else None
    try:
        o, S = case(tensors, initial_state=state, output_final_state=True, impl=impl)
    except ValueError as err:
        if "is not available for this op" in str(err) or "cannot serve this call" in str(err):
            pytest.skip(str(err))
        raise
    assert o.shape == (0, 70, 3, 5) and S.shape == (0, 3, 4, 5 + case.state_extra) and S.dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dtypes_of_the_results(case):
    tensors, state = case.draw(1, 20, 2, 4, 6, dtype=torch.bfloat16)
    o, S = case(tensors, initial_state=state, output_final_state=True, impl="chunk")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o, S = case(tensors, initial_state=state)
    assert S is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("T", [3, 40])
def test_auto_agrees_with_naive(case, T):
    tensors, state = case.draw(1, T, 2, 4, 6)
    o, S = case(tensors, initial_state=state, output_final_state=True)
    o_ref, S_ref = case(tensors, initial_state=state, output_final_state=True, impl="naive")
    assert_close(o, o_ref)
    assert_close(S, S_ref)


def explicit_softmax(q, k, v, mask, scale):
    s = torch.einsum("bthk,bshk->bhts", q, k) * scale
    return torch.einsum("bhts,bshv->bthv", s.masked_fill(~mask, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 5), (False, 3)])
def test_softmax_attention(impl, causal, window):
    T = 33
    q, k, v = rand(2, T, 3, 8, seed=1), rand(2, T, 3, 8, seed=2), rand(2, T, 3, 6, seed=3)
    t = torch.arange(T)
    d = t[:, None] - t[None, :]
    mask = torch.ones(T, T, dtype=torch.bool)
    if causal:
        mask &= d >= 0
    if window:
        mask &= d.abs() < window
    o, state = ops.softmax_attn(q, k, v, causal, window, impl=impl)
    assert state is None
    assert_close(o, explicit_softmax(q, k, v, mask, 8**-0.5))


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
def test_softmax_attention_varlen(impl):
    cu = torch.tensor([0, 5, 5, 6, 30])
    q, k, v = rand(1, 30, 2, 4, seed=1), rand(1, 30, 2, 4, seed=2), rand(1, 30, 2, 4, seed=3)
    o, _ = ops.softmax_attn(q, k, v, cu_seqlens=cu, impl=impl)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o_n, _ = ops.softmax_attn(q[:, a:b], k[:, a:b], v[:, a:b], impl="naive")
        assert_close(o[:, a:b], o_n)
