"""The properties of tests/ops/test_properties.py, for every op's Triton kernels (in the interpreter on CPU).

Fewer examples than for naive and chunk: each kernel call in the interpreter costs about a second.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ops.mechanisms import CAUSAL_CASES
from tests.ops.tolerance import assert_same_result

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V = 2, 8, 12
FEW = settings(max_examples=4)


def draw(case, B, T, seed, N=None):
    tensors, state = case.draw(B, T, H, K, V, seed=seed, N=N)
    return [x.to(DEVICE) for x in tensors], state.to(DEVICE)


def has_triton(case) -> bool:
    """Whether the op offers impl="triton" (it says "not available" otherwise)."""
    tensors, state = draw(case, 1, 1, seed=0)
    try:
        case(tensors, initial_state=state, impl="triton")
    except ValueError as err:
        if "not available" in str(err):
            return False
        raise
    return True


TRITON_CASES = [c for c in CAUSAL_CASES if has_triton(c)]
cases = pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)


def run(case, tensors, state, **kw):
    return case(tensors, initial_state=state, output_final_state=True, impl="triton", **kw)


def test_every_recurrent_op_has_triton_kernels():
    assert {c.op.__name__ for c in TRITON_CASES} >= {
        "linear_attn",
        "retention",
        "simple_gla",
        "gla",
        "delta_rule",
        "gated_delta_rule",
    }


@cases
@FEW
@given(data=st.data())
def test_future_tokens_do_not_change_the_past(case, data):
    T = data.draw(st.integers(2, 100), label="T")
    t = data.draw(st.integers(0, T - 2), label="t")
    tensors, state = draw(case, 1, T, seed=T)
    changed, _ = draw(case, 1, T, seed=T + 1000)
    mixed = [torch.cat([a[:, : t + 1], b[:, t + 1 :]], dim=1) for a, b in zip(tensors, changed)]
    o, _ = run(case, tensors, state)
    o2, _ = run(case, mixed, state)
    assert_same_result("outputs up to t", o2[:, : t + 1], o[:, : t + 1])
    assert not torch.allclose(o2[:, t + 1 :], o[:, t + 1 :])


@cases
@FEW
@given(data=st.data())
def test_split_and_pass_the_state(case, data):
    T = data.draw(st.integers(1, 100), label="T")
    s = data.draw(st.integers(0, T), label="s")
    tensors, state = draw(case, 2, T, seed=T)
    o, final = run(case, tensors, state)
    o1, mid = run(case, [x[:, :s] for x in tensors], state)
    o2, final2 = run(case, [x[:, s:] for x in tensors], mid)
    assert_same_result("o", torch.cat([o1, o2], dim=1), o)
    assert_same_result("final_state", final2, final)


@cases
@FEW
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4))
def test_packed_equals_separate(case, lengths):
    T = sum(lengths)
    tensors, state = draw(case, 1, T, seed=T, N=len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    o, final = run(case, tensors, state, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, final_n = run(case, [x[:, a:b] for x in tensors], state[n : n + 1])
        assert_same_result(f"o of sequence {n}", o[:, a:b], o_n)
        assert_same_result(f"final_state of sequence {n}", final[n : n + 1], final_n)
