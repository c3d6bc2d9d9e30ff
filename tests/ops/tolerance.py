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

import contextlib

import torch
from torch.overrides import TorchFunctionMode


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


def run_with_grads(fn, tensors, state, grad_seed=1, state_grad=True, cotangent_dtype=None):
    """Call fn(leaves, initial_state) -> (o, S), back-propagate fixed random cotangents (S's only if state_grad).

    The cotangents are drawn once and rounded to ``cotangent_dtype`` (the dtype of the low-precision
    run being judged; float32 for the state), so that every run compared sees exactly the same ones.
    Returns [o, S, grad of each tensor..., grad of the state] (the state grad only when a state is given).
    """
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    s0 = None if state is None else state.detach().clone().requires_grad_()
    o, S = fn(leaves, s0)
    gen = torch.Generator().manual_seed(grad_seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(cotangent_dtype or o.dtype)
    loss = (o.double() * do.to(o.device, torch.float64)).sum()
    if S is not None and state_grad:
        dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).float()
        loss = loss + (S.double() * dS.to(S.device, torch.float64)).sum()
    inputs = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach(), None if S is None else S.detach(), *grads]


# On a GPU the Triton kernels feed tensor cores: judge them against the chunked path with its matmul operands
# rounded to the inputs' dtype (LowPrecisionMatmuls), not against the float32-internal token loop.
ON_DEVICE = dict(reference="chunk", plain_in_dtype=True) if torch.cuda.is_available() else {}


def check_against_naive(
    case,
    tensors,
    state,
    impl,
    cu_seqlens=None,
    reference: str = "naive",
    state_grad: bool = True,
    plain_in_dtype: bool = False,
    only: tuple[str, ...] | None = None,
    grads: bool = True,
):
    """impl against the token recurrence, outputs, final state and every gradient, by the rule above.

    ``impl``: an impl name, or a function (tensors, initial_state) -> (o, final state) to judge (a compiled
    call, say). ``reference="chunk"`` takes the chunked path (itself tested against naive) as the float64
    reference and as the plain same-dtype run, for long sequences on a GPU. ``plain_in_dtype`` runs
    that plain computation with its matmul operands in the inputs' dtype (LowPrecisionMatmuls): the
    comparator for tensor-core kernels in bf16 / fp16. ``grads=False``: every run under torch.no_grad, judging
    o and the final state alone (the inference path, which may run other kernels).
    """

    def call(impl_name):
        return lambda ts, s0: case(ts, initial_state=s0, output_final_state=True, impl=impl_name, cu_seqlens=cu_seqlens)

    extra = ["dg"] * (case.gate is not None) + ["dbeta"] * case.beta
    names = ["o", "final_state", "dq", "dk", "dv", *extra, "dinitial_state"]
    kw = dict(state_grad=state_grad, cotangent_dtype=tensors[0].dtype)
    run = run_with_grads if grads else _run_without_grads
    state64 = None if state is None else state.double()
    ref = run(call(reference), [t.double() for t in tensors], state64, **kw)
    low = tensors[0].dtype in (torch.bfloat16, torch.float16) and plain_in_dtype
    with LowPrecisionMatmuls(tensors[0].dtype) if low else contextlib.nullcontext():
        plain = run(call(reference), tensors, state, **kw)
    fast = run(call(impl) if isinstance(impl, str) else impl, tensors, state, **kw)
    label = (impl if isinstance(impl, str) else getattr(impl, "__name__", "function")) + ("" if grads else ", no grad")
    for name, f, p, r in zip(names, fast, plain, ref):
        if only is None or name in only:
            assert_dtype_close(f"{case.id} {label} {name}", f, p, r)


def _run_without_grads(fn, tensors, state, **_):
    """[o, S] of fn(tensors, initial_state) under torch.no_grad (run_with_grads' counterpart)."""
    with torch.no_grad():
        return list(fn(tensors, state))


class _RoundedMatmul(torch.autograd.Function):
    """A matmul whose operands are rounded to a low-precision dtype, accumulated in float32: tensor-core arithmetic."""

    @staticmethod
    def forward(ctx, a, b, dtype):
        ctx.save_for_backward(a, b)
        ctx.dtype = dtype
        return torch.matmul(a.to(dtype).to(a.dtype), b.to(dtype).to(b.dtype))

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        r = lambda x: x.to(ctx.dtype).to(x.dtype)
        ga = torch.matmul(r(grad), r(b).transpose(-1, -2)).sum_to_size(a.shape)
        gb = torch.matmul(r(a).transpose(-1, -2), r(grad)).sum_to_size(b.shape)
        return ga, gb, None


class LowPrecisionMatmuls(TorchFunctionMode):
    """Inside this mode every matmul rounds its operands to ``dtype`` (forward and backward).

    Under it, the chunked PyTorch path becomes the plain same-dtype computation that a bf16/fp16
    tensor-core kernel is judged against (as flash-attn judges its kernels against attention computed
    in the same dtype): operands in the input dtype, accumulation in float32.
    """

    MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS and not kwargs:
            return _RoundedMatmul.apply(args[0], args[1], self.dtype)
        return func(*args, **(kwargs or {}))
