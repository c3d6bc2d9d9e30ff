"""Properties every causal mechanism must have, in every impl, as hypothesis tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.ops.mechanisms import CASES, CAUSAL_CASES, CHUNK_CASES, Case
from tests.ops.tolerance import assert_same_result, check_against_naive

IMPLS = ["naive", "chunk"]
H, K, V = 2, 8, 12


def cases(which):
    return pytest.mark.parametrize("case", which, ids=lambda c: c.id)


def run(case: Case, tensors, state, impl, **kw):
    return case(tensors, initial_state=state, output_final_state=True, impl=impl, **kw)


@cases(CAUSAL_CASES)
@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.data())
def test_future_tokens_do_not_change_the_past(case, impl, data):
    T = data.draw(st.integers(2, 150), label="T")
    t = data.draw(st.integers(0, T - 2), label="t")
    tensors, state = case.draw(1, T, H, K, V, seed=T)
    changed, _ = case.draw(1, T, H, K, V, seed=T + 1000)
    mixed = [torch.cat([a[:, : t + 1], b[:, t + 1 :]], dim=1) for a, b in zip(tensors, changed)]
    o, _ = run(case, tensors, state, impl)
    o2, _ = run(case, mixed, state, impl)
    assert_same_result("outputs up to t", o2[:, : t + 1], o[:, : t + 1])
    assert not torch.allclose(o2[:, t + 1 :], o[:, t + 1 :])  # the change did reach the later tokens


@cases(CAUSAL_CASES)
@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.data())
def test_split_and_pass_the_state(case, impl, data):
    T = data.draw(st.integers(1, 150), label="T")
    s = data.draw(st.integers(0, T), label="s")
    tensors, state = case.draw(2, T, H, K, V, seed=T)
    o, final = run(case, tensors, state, impl)
    o1, mid = run(case, [x[:, :s] for x in tensors], state, impl)
    o2, final2 = run(case, [x[:, s:] for x in tensors], mid, impl)
    assert_same_result("o", torch.cat([o1, o2], dim=1), o)
    assert_same_result("final_state", final2, final)


@cases(CASES)
@pytest.mark.parametrize("impl", IMPLS)
@given(lengths=st.lists(st.integers(0, 90), min_size=1, max_size=4))
def test_packed_equals_separate(case, impl, lengths):
    T = sum(lengths)
    tensors, state = case.draw(1, T, H, K, V, seed=T, N=len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    o, final = run(case, tensors, state, impl, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, final_n = run(case, [x[:, a:b] for x in tensors], state[n : n + 1], impl)
        assert_same_result(f"o of sequence {n}", o[:, a:b], o_n)
        assert_same_result(f"final_state of sequence {n}", final[n : n + 1], final_n)


GATED = [c for c in CASES if c.gate is not None]


@cases(GATED)
@pytest.mark.parametrize("impl", IMPLS)
@given(data=st.data())
def test_extreme_gates_stay_finite(case, impl, data):
    """Gates exactly 0 (no decay), and very negative gates (a full reset: -1e4, -1e30 whose sums would overflow,
    -inf as log 0 gives; see GATE_FLOOR), in any mix."""
    T = data.draw(st.integers(1, 140), label="T")
    resets = [0.0, -1e-7, -30.0, -1e4, -1e30, float("-inf")]
    choices = data.draw(st.lists(st.sampled_from(resets), min_size=1, max_size=4), label="gates")
    tensors, state = case.draw(1, T, H, K, V, seed=T)
    pick = torch.randint(len(choices), tensors[3].shape, generator=torch.Generator().manual_seed(T))
    tensors[3] = torch.tensor(choices)[pick]
    leaves = [x.clone().requires_grad_() for x in tensors]
    o, final = run(case, leaves, state, impl)
    (o.sum() + final.sum()).backward()
    for name, x in [("o", o), ("final_state", final)] + [(f"grad {i}", x.grad) for i, x in enumerate(leaves)]:
        assert torch.isfinite(x).all(), f"{case.id} {impl}: {name} is not finite"
    if impl == "chunk":
        check_against_naive(case, tensors, state, "chunk")


@cases(CHUNK_CASES)
@given(T=st.integers(1, 200), chunk_size=st.sampled_from([8, 16, 32, 128]))
def test_chunk_size_does_not_change_the_result(case, T, chunk_size):
    tensors, state = case.draw(2, T, H, K, V, seed=T)
    o, final = case.chunk_call(tensors, 64, initial_state=state)
    o2, final2 = case.chunk_call(tensors, chunk_size, initial_state=state)
    assert_same_result("o", o2, o)
    assert_same_result("final_state", final2, final)
