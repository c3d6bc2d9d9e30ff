"""The qk_l2norm pass of its own (common/triton_l2norm.py, the delta rules' L2NORM_PREPASS): values and gradients
against float64, and the ops with it against the token recurrence."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.ops.mechanisms import by_id
from tests.ops.tolerance import ON_DEVICE, assert_dtype_close, check_against_naive
from tests.ops.triton_checks import assert_compiles_fullgraph, launch_kwargs

pytest.importorskip("triton")

from linattn.ops.common.triton_l2norm import l2norm_rows  # noqa: E402
from linattn.ops.gated_delta_rule import triton as tri  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter casts float32 to bfloat16 by truncation (0.99999 -> 0.9961, with fp_downcast_rounding="rtne"
# too; a GPU rounds to nearest), twice the rounding error of a plain run: bfloat16 results are judged on a GPU.
ROUNDS_BF16 = pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter truncates float32 -> bfloat16 casts")
both = pytest.mark.parametrize("case", [by_id["gated_delta_rule"], by_id["delta_rule"]], ids=lambda c: c.id)


def plain_l2norm(x: torch.Tensor) -> torch.Tensor:
    """The op's definition (naive.apply_options'), in float32 (float64 for float64 inputs)."""
    y = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return y / torch.sqrt(y.square().sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=ROUNDS_BF16), torch.float16], ids=str
)
@pytest.mark.parametrize("shape", [(2, 37, 3, 33), (1, 5, 1, 1), (3, 130), (2, 0, 4, 16)], ids=str)
def test_l2norm_rows_against_float64(dtype, shape):
    """Rows of odd lengths (33, 1, 130: a power-of-two block with a masked tail) and counts, none at all, a zero row:
    y and dx by the dtype rule against float64, the plain run being the definition in float32 rounded to dtype."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen) * 3
    if x.numel():
        x.view(-1, shape[-1])[1] = 0  # a zero row: y = 0, finite gradient
    x = x.to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    runs = {}
    for name, fn, xin in (
        ("ref", plain_l2norm, x.double()),
        ("plain", lambda t: plain_l2norm(t).to(dtype), x),
        ("fast", l2norm_rows, x.to(DEVICE)),
    ):
        leaf = xin.clone().requires_grad_()
        y = fn(leaf)
        (y.double() * dy.double().to(y.device)).sum().backward()
        runs[name] = (y.cpu(), leaf.grad.cpu())
    for i, part in enumerate(("y", "dx")):
        fast, plain, ref = (runs[n][i] for n in ("fast", "plain", "ref"))
        assert fast.dtype == dtype
        assert_dtype_close(f"l2norm_rows {part}", fast, plain, ref, terms=shape[-1])


def test_l2norm_rows_registration():
    """The op's schema, fake tensors and autograd registration (torch.library.opcheck)."""
    x = torch.randn(2, 9, 3, 20, device=DEVICE, requires_grad=True)
    checks = torch.library.opcheck(l2norm_rows, (x,), test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks


@both
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=ROUNDS_BF16)], ids=str)
def test_prepass_matches_naive(case, dtype, monkeypatch):
    """L2NORM_PREPASS: qk_l2norm (and beta as logits) through the pass of its own, the kernels then running without
    their in-kernel normalisation: outputs, final state and every gradient against the token recurrence, with
    packed sequences (one of one token) and K = 33. bfloat16 on a GPU only: the pass hands the kernels q and k
    rounded to bfloat16, as their tensor-core products round them, which the GPU's comparator (ON_DEVICE) does too;
    the interpreter's float32-internal kernels and comparator do not (and it truncates the casts)."""
    monkeypatch.setattr(tri, "L2NORM_PREPASS", True)
    prepares = launch_kwargs(monkeypatch, tri, "_prepare_kernel")
    chunks = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    opt = dataclasses.replace(
        case, id=f"{case.id}_prepass", l2_keys=False, options=dict(qk_l2norm=True, beta_is_logit=True)
    )
    tensors, state = opt.draw(B=1, T=150, H=2, K=33, V=24, dtype=dtype, seed=41, N=3)
    tensors[-1] = torch.randn(tensors[-1].shape, generator=torch.Generator().manual_seed(42)) * 2  # logits
    cu = torch.tensor([0, 37, 38, 150], device=DEVICE)
    tensors, state = [t.to(DEVICE) for t in tensors], state.to(DEVICE)
    check_against_naive(opt, tensors, state, "triton", cu_seqlens=cu, **ON_DEVICE)
    assert prepares and chunks and not any(kw["L2NORM"] for kw in prepares + chunks)


def test_prepass_compiles_without_graph_breaks(monkeypatch):
    """The pass is a custom op: torch.compile(fullgraph=True) traces the op with it and gives the same gradients."""
    from linattn import ops

    monkeypatch.setattr(tri, "L2NORM_PREPASS", True)
    tensors, state = by_id["gated_delta_rule"].draw(B=1, T=70, H=2, K=16, V=16, seed=43)

    def f(q, k, v, g, beta, h0):
        o, ht = ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, qk_l2norm=True,
                                     impl="triton")  # fmt: skip
        return o.sum() + ht.sum()

    assert_compiles_fullgraph(f, [t.to(DEVICE) for t in (*tensors, state)])
