"""The chunked path against the token recurrence: outputs, final states and every gradient."""

from __future__ import annotations

import pytest
import torch

from tests.ops.mechanisms import CASES
from tests.ops.tolerance import check_against_naive

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunk_matches_naive(case, dtype, T):
    tensors, state = case.draw(B=2, T=T, H=2, K=16, V=24, dtype=dtype, seed=T)
    check_against_naive(case, tensors, state, "chunk")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunk_matches_naive_varlen(case):
    # an empty sequence, a one-token sequence, one spanning several chunks, one exactly a chunk long
    cu_seqlens = torch.tensor([0, 0, 1, 131, 131, 195, 200])
    tensors, state = case.draw(B=1, T=200, H=2, K=16, V=24, seed=7, N=6)
    check_against_naive(case, tensors, state, "chunk", cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradcheck_float64(case):
    tensors, state = case.draw(B=1, T=5, H=1, K=3, V=2, dtype=torch.float64, seed=3)
    state = state.double()
    if case.chunk is not None:
        impls = {"chunk(C=2)": lambda ts, s0: case.chunk_call(ts, 2, initial_state=s0), "naive": None}
    else:
        impls = {"chunk": None, "naive": None}
    for label, fn in impls.items():
        if fn is None:
            impl = label.split("(")[0]
            fn = lambda ts, s0, impl=impl: case(ts, initial_state=s0, output_final_state=True, impl=impl)  # noqa: E731

        def f(*args, fn=fn):
            o, S = fn(list(args[:-1]), args[-1])
            return o, S

        leaves = [t.detach().clone().requires_grad_() for t in [*tensors, state]]
        assert torch.autograd.gradcheck(f, leaves), f"{case.id} {label}"


def test_running_states_equal_cumsum():
    """The CPU running-sum states (one add per chunk) match the cumsum form, values and gradients."""
    from linattn.ops.simple_gla.chunk import _RunningStates

    S0 = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    dS = torch.randn(2, 3, 7, 4, 5, dtype=torch.float64, requires_grad=True)
    states, final = _RunningStates.apply(S0, dS)
    ends = S0.unsqueeze(2) + dS.cumsum(2)
    ref_states, ref_final = torch.cat([S0.unsqueeze(2), ends[:, :, :-1]], dim=2), ends[:, :, -1]
    torch.testing.assert_close(states, ref_states)
    torch.testing.assert_close(final, ref_final)
    w, u = torch.randn_like(states), torch.randn_like(final)
    grads = torch.autograd.grad((states * w).sum() + (final * u).sum(), (S0, dS))
    ref = torch.autograd.grad((ref_states * w).sum() + (ref_final * u).sum(), (S0, dS))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gate_scale, sub_chunk", [(1.0, 32), (8.0, 8), (30.0, 4), (200.0, 1)])
def test_gla_chunk_at_every_sub_chunk_split(gate_scale, sub_chunk):
    """GLA's chunk (32 tokens) splits into sub-chunks by the gates' size; each split, from one sub-chunk to one
    per token, against naive, in float32 and bfloat16."""
    from linattn.ops.gla.chunk import sub_chunk_size

    case = next(c for c in CASES if c.id == "gla")
    for dtype in (torch.float32, torch.bfloat16):
        tensors, state = case.draw(B=1, T=100, H=2, K=16, V=24, dtype=dtype, seed=5, gate_scale=gate_scale)
        assert sub_chunk_size(tensors[3], 32) == sub_chunk
        check_against_naive(case, tensors, state, "chunk")


COMPILE_CASES = [(c, 1.0) for c in CASES] + [(c, 200.0) for c in CASES if c.id == "gla"]


@pytest.mark.parametrize("case, gate_scale", COMPILE_CASES, ids=[f"{c.id}-gates x{s:g}" for c, s in COMPILE_CASES])
def test_chunk_compiles_fullgraph(case, gate_scale):
    """Every chunked path under torch.compile(fullgraph=True): no graph break, and outputs, final state and every
    gradient against naive by the dtype rule. GLA's sub_chunk_size cannot read the gates there: it takes fixed
    sub-chunks with their scores formed exactly per key channel, also for gates of -200 a token (which eager
    splits into single tokens)."""
    tensors, state = case.draw(B=1, T=100, H=2, K=16, V=24, seed=5, gate_scale=gate_scale)

    def chunk(ts, s0):
        return case(ts, initial_state=s0, output_final_state=True, impl="chunk")

    check_against_naive(case, tensors, state, torch.compile(chunk, fullgraph=True, backend="aot_eager"))


def test_gla_gate_sums_are_the_segment_sums():
    """gate_sums' one product against the sums it replaces, at a chunk of four sub-chunks."""
    from linattn.ops.gla.chunk import gate_sums

    g = -torch.rand(3, 16, 5, dtype=torch.float64)
    sums = gate_sums(g, 4)
    b = g.cumsum(-2)
    torch.testing.assert_close(sums["b"], b)
    torch.testing.assert_close(sums["to_end"], b[..., -1:, :] - b)
    sub_b = g.reshape(3, 4, 4, 5).cumsum(-2)
    torch.testing.assert_close(sums["sub_b"], sub_b.reshape(3, 16, 5))
    torch.testing.assert_close(sums["from_first"], (sub_b - g.reshape(3, 4, 4, 5)[..., :1, :]).reshape(3, 16, 5))
    torch.testing.assert_close(sums["sub_to_end"], (sub_b[..., -1:, :] - sub_b).reshape(3, 16, 5))
    assert set(gate_sums(g, 16)) == {"b", "to_end", "from_first"}


def test_gla_gate_sums_keep_float32_under_a_lower_matmul_precision():
    """Where float32 matmuls may drop bits (TF32 / bfloat16 allowed), the sums are formed in float64 instead."""
    from linattn.ops.gla.chunk import gate_sums

    g = -torch.rand(3, 32, 5) * 3
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        sums = gate_sums(g, 32)
    finally:
        torch.set_float32_matmul_precision(before)
    assert sums["b"].dtype == torch.float32
    torch.testing.assert_close(sums["b"], g.double().cumsum(-2).float(), rtol=0, atol=2e-6)
