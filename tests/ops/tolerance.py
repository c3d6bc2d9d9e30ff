"""Tolerances that follow from the dtype.

flash-attn's rule: a fast path's error against a float64 reference may be at most about twice the
error of a plain PyTorch computation in the same dtype (here the token recurrence run on the same
inputs), plus a floor, so that a plain result that happens to be exact does not demand an exact
fast one.

The floor is the rounding of one sum of ``terms`` products in the accumulation dtype (float32, or
float64 for float64 inputs): sqrt(terms) * eps * max|ref| in the random-walk model. A chunked
path re-orders sums of up to a chunk's worth of terms, so ``terms`` is the chunk size. It is far
below the input dtype's rounding for bf16 and fp16, so there the rule is set by the output rounding.
"""

from __future__ import annotations

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def assert_dtype_close(
    name: str, fast: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, factor: float = 2.0, terms: int = 64
):
    assert fast.shape == ref.shape, f"{name}: shape {list(fast.shape)} != reference {list(ref.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    if not ref.numel():
        return
    err_fast, err_plain = max_err(fast, ref), max_err(plain, ref)
    accum = torch.float64 if fast.dtype == torch.float64 else torch.float32
    floor = terms**0.5 * torch.finfo(accum).eps * ref.abs().max().item()
    assert err_fast <= factor * err_plain + floor, (
        f"{name} ({fast.dtype}): error {err_fast:.3g} against float64 exceeds {factor} x plain error "
        f"{err_plain:.3g} + rounding floor {floor:.3g}"
    )


def assert_same_result(name: str, a: torch.Tensor, b: torch.Tensor, terms: int = 64):
    """Two decompositions of one computation in the same dtype (split runs, packed runs, chunk sizes).

    Each may be off by the floor above, so they may differ by twice it.
    """
    assert a.shape == b.shape, f"{name}: shape {list(a.shape)} != {list(b.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{name}: non-finite values"
    if not b.numel():
        return
    accum = torch.float64 if a.dtype == torch.float64 else torch.float32
    bound = 2 * terms**0.5 * torch.finfo(accum).eps * b.abs().max().item()
    err = max_err(a, b)
    assert err <= bound, f"{name}: differs by {err:.3g}, more than the rounding bound {bound:.3g}"


def run_with_grads(fn, tensors, state, grad_seed=1, state_grad=True):
    """Call fn(leaves, initial_state) -> (o, S), back-propagate fixed random cotangents (S's only if state_grad).

    Returns [o, S, grad of each tensor..., grad of the state] (the state grad only when a state is given).
    """
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    s0 = None if state is None else state.detach().clone().requires_grad_()
    o, S = fn(leaves, s0)
    gen = torch.Generator().manual_seed(grad_seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
    loss = (o * do).sum()
    if S is not None and state_grad:
        dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.device, S.dtype)
        loss = loss.float() + (S.float() * dS.float()).sum() if o.dtype != torch.float64 else loss + (S * dS).sum()
    inputs = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach(), None if S is None else S.detach(), *grads]


def check_against_naive(
    case, tensors, state, impl: str, cu_seqlens=None, reference: str = "naive", state_grad: bool = True
):
    """impl against the token recurrence, outputs, final state and every gradient, by the rule above.

    ``reference="chunk"`` takes the chunked path (itself tested against naive) as the float64
    reference and as the plain same-dtype run, for long sequences on a GPU.
    """

    def call(impl_name):
        return lambda ts, s0: case(ts, initial_state=s0, output_final_state=True, impl=impl_name, cu_seqlens=cu_seqlens)

    extra = ["dg"] * (case.gate is not None) + ["dbeta"] * case.beta
    names = ["o", "final_state", "dq", "dk", "dv", *extra, "dinitial_state"]
    ref = run_with_grads(call(reference), [t.double() for t in tensors], state.double(), state_grad=state_grad)
    plain = run_with_grads(call(reference), tensors, state, state_grad=state_grad)
    fast = run_with_grads(call(impl), tensors, state, state_grad=state_grad)
    for name, f, p, r in zip(names, fast, plain, ref):
        assert_dtype_close(f"{case.id} {impl} {name}", f, p, r)
