"""The Triton kernels of the decay family (linear_attn, retention, simple_gla) against the token recurrence.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at
small odd shapes; the GPU-only cases at the end need CUDA and skip elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from linattn import ops
from tests.ops.mechanisms import by_id
from tests.ops.tolerance import ON_DEVICE, assert_same_result, check_against_naive
from tests.ops.triton_checks import assert_compiles_fullgraph, extreme, triton_calls

triton = pytest.importorskip("triton")
from linattn.ops.simple_gla import triton as tri  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DECAY = [by_id[i] for i in ("linear_attn", "linear_attn_elu1_normalized", "retention", "simple_gla")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
cases = pytest.mark.parametrize("case", DECAY, ids=lambda c: c.id)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def to(tensors, state, device=DEVICE):
    return [t.to(device) for t in tensors], (None if state is None else state.to(device))


@cases
@dtypes
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_triton_matches_naive(case, dtype, T):
    tensors, state = case.draw(B=2, T=T, H=2, K=16, V=24, dtype=dtype, seed=T)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


@cases
def test_triton_varlen(case):
    cu_seqlens = torch.tensor([0, 0, 1, 131, 131, 195, 200])  # empty, one token, several chunks, empty, ...
    tensors, state = case.draw(B=1, T=200, H=2, K=16, V=24, seed=5, N=6)
    check_against_naive(case, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


@pytest.mark.parametrize("state_grad", [False, True], ids=["no_dS", "with_dS"])
@pytest.mark.parametrize("gates", [0.0, -30.0, -1e4, "mixed"])
def test_triton_extreme_gates(gates, state_grad):
    """No decay, and decay so strong that the state resets every token; with and without a final-state gradient
    (whose share of dg is kept out of the telescoped sum, so dg stays exact where it is ~0)."""
    case = by_id["simple_gla"]
    tensors, state = case.draw(B=1, T=100, H=2, K=16, V=24, seed=2)
    check_against_naive(case, *to(extreme(tensors, gates), state), "triton", state_grad=state_grad, **ON_DEVICE)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_segmented_sweep_equals_one_pass(gated, reverse):
    """The two-level scheme (segment states, a scan, then outputs) computes what one pass computes."""
    tensors, state = to(*by_id["simple_gla"].draw(B=2, T=300, H=2, K=16, V=24, seed=9))
    q, k, v, g = tensors
    g = g if gated else None
    o1, s1, w1 = tri.sweep(
        q, k, v, g, state, 0.5, None, reverse=reverse, w=q[..., :1].expand_as(v).contiguous(), segments=1
    )
    o3, s3, w3 = tri.sweep(
        q, k, v, g, state, 0.5, None, reverse=reverse, w=q[..., :1].expand_as(v).contiguous(), segments=3
    )
    for name, a, b in (("o", o3, o1), ("state", s3, s1), ("o.w", w3, w1)):
        assert_same_result(name, a, b)


def test_segmented_backward_equals_one_pass():
    tensors, state = to(*by_id["simple_gla"].draw(B=1, T=400, H=2, K=16, V=24, seed=4))
    q, k, v, g = tensors
    do, dht = torch.randn_like(v), torch.randn_like(state)
    _, ht, _ = tri.sweep(q, k, v, g, state, 0.25, None)
    one = tri.backward(do, dht, q, k, v, g, state, ht, 0.25, None, segments=1)
    many = tri.backward(do, dht, q, k, v, g, state, ht, 0.25, None, segments=4)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), many, one):
        assert_same_result(name, a, b)


@cases
@pytest.mark.parametrize("T", [1, 5])
def test_recurrent_decode_path(case, T):
    """Without gradients and with few tokens, the token-by-token kernel runs; it must agree with naive."""
    tensors, state = case.draw(B=3, T=T, H=2, K=16, V=24, seed=T)
    tensors, state = to(tensors, state)
    with torch.no_grad():
        o, S = case(tensors, initial_state=state, output_final_state=True, impl="triton")
        o_ref, S_ref = case(tensors, initial_state=state, output_final_state=True, impl="naive")
    assert_same_result("o", o.float(), o_ref.float())
    assert_same_result("final_state", S, S_ref)


@pytest.mark.parametrize("name", ["simple_gla", "gla"])
def test_decode_launches_directly_when_eager(name, monkeypatch):
    """DECODE_DIRECT: an eager decoding call (no gradient, one token, g in bfloat16 as given) launches the
    token-by-token kernel without the op's custom op; under torch.compile(fullgraph=True) it goes through it. Either
    way, the numbers of the custom op called with g cast to float32 first (as before the switch)."""
    from linattn.ops.common import triton_ops

    case = by_id[name]
    tensors, state = to(*case.draw(B=3, T=1, H=2, K=16, V=24, dtype=torch.bfloat16, seed=6))
    tensors[3] = tensors[3].to(torch.bfloat16)  # the gates too

    def step(*tensors):
        return case(list(tensors[:4]), initial_state=tensors[4], output_final_state=True, impl="triton")

    def custom_op_calls(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn()
        return out, [e.name for e in prof.events() if f"recurrent_{name}" in e.name]

    with torch.no_grad():
        (o, S), calls = custom_op_calls(lambda: step(*tensors, state))
        assert not calls, calls
        monkeypatch.setattr(triton_ops, "DECODE_DIRECT", False)
        (o_ref, S_ref), calls = custom_op_calls(lambda: step(*tensors[:3], tensors[3].float(), state))
        assert calls, "the custom op did not run with DECODE_DIRECT off"
        monkeypatch.setattr(triton_ops, "DECODE_DIRECT", True)
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
        torch.testing.assert_close(S, S_ref, rtol=0, atol=0)
        compiled = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
        o_c, S_c = compiled(*tensors, state)
    torch.testing.assert_close(o_c, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(S_c, S_ref, rtol=0, atol=0)


def test_recurrent_decode_varlen():
    case = by_id["simple_gla"]
    tensors, state = to(*case.draw(B=1, T=6, H=2, K=16, V=24, seed=1, N=4))
    cu = torch.tensor([0, 1, 1, 4, 6], device=DEVICE)
    with torch.no_grad():
        o, S = case(tensors, initial_state=state, output_final_state=True, impl="triton", cu_seqlens=cu)
        o_ref, S_ref = case(tensors, initial_state=state, output_final_state=True, impl="naive", cu_seqlens=cu)
    assert_same_result("o", o, o_ref)
    assert_same_result("final_state", S, S_ref)


def test_unused_final_state_gets_no_gradient_pass(monkeypatch):
    """Without the final state in the loss, dS_T arrives as None (not zeros) and its dk pass is skipped."""
    calls = []
    original = tri.sweep

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    q, k, v, g = (x.requires_grad_() for x in to(*by_id["simple_gla"].draw(B=1, T=70, H=2, K=16, V=24))[0])
    o, _ = ops.simple_gla(q, k, v, g, impl="triton")
    monkeypatch.setattr(tri, "sweep", spy)
    o.sum().backward()
    unused = len(calls)
    monkeypatch.setattr(tri, "sweep", original)
    o, s = ops.simple_gla(q, k, v, g, impl="triton", output_final_state=True)
    monkeypatch.setattr(tri, "sweep", spy)
    (o.sum() + s.sum()).backward()
    assert (unused, len(calls) - unused) == (3, 4)  # dq, dk, dv; and dS_T's share of dk on its own


def test_auto_picks_triton_only_on_cuda():
    q = torch.randn(1, 40, 2, 16, device=DEVICE)
    g = -torch.rand(1, 40, 2, device=DEVICE)
    assert bool(triton_calls(ops.simple_gla, lambda: ops.simple_gla(q, q, q, g))) == CUDA


def test_torch_compile_fullgraph():
    """The ops are opaque custom ops with fake tensors and autograd: no graph break, same numbers."""
    case = by_id["simple_gla"]
    tensors, state = case.draw(B=2, T=70, H=2, K=16, V=24, seed=3)
    tensors, state = to(tensors, state)

    def f(q, k, v, g, h0):
        o, s = ops.simple_gla(q, k, v, g, initial_state=h0, output_final_state=True, impl="triton")
        return (o * o).sum() + s.sum()

    assert_compiles_fullgraph(f, [*tensors, state])


# ----------------------------------------------------------------------------------------------------------------
# On the GPU: real shapes, every dtype
# ----------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA: the kernels' compiled form runs only on a GPU")


@gpu
@cases
@dtypes
@pytest.mark.parametrize("T", [1, 300])
def test_gpu_triton_matches_reference(case, dtype, T):
    tensors, state = case.draw(B=2, T=T, H=2, K=128, V=128, dtype=dtype, seed=T)
    check_against_naive(case, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)


@gpu
@cases
def test_gpu_varlen_with_empty_and_single_token(case):
    cu = torch.tensor([0, 0, 1, 300, 300, 600], device="cuda")
    tensors, state = case.draw(B=1, T=600, H=2, K=64, V=64, dtype=torch.bfloat16, seed=1, N=5)
    check_against_naive(case, *to(tensors, state), "triton", cu_seqlens=cu, reference="chunk", plain_in_dtype=True)


@gpu
@pytest.mark.parametrize("gates", [0.0, -30.0, -1e4])
def test_gpu_extreme_gates(gates):
    case = by_id["simple_gla"]
    tensors, state = case.draw(B=2, T=300, H=2, K=128, V=128, dtype=torch.bfloat16, seed=3)
    tensors[3] = torch.full_like(tensors[3], gates)
    check_against_naive(case, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)


@gpu
def test_gpu_long_sequence_uses_segments():
    """B * H small and T long: the two-level path runs, and agrees with one pass."""
    q, k, v = (torch.randn(1, 8192, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = -torch.rand(1, 8192, 2, device="cuda") * 0.05
    o1, s1, _ = tri.sweep(q, k, v, g, None, 0.125, None, segments=1)
    o8, s8, _ = tri.sweep(q, k, v, g, None, 0.125, None)
    assert tri._num_segments(2 * 1, 8192, None) > 1
    assert_same_result("o", o8.float(), o1.float(), terms=8192)
    assert_same_result("state", s8, s1, terms=8192)
