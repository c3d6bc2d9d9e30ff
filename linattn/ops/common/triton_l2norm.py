"""L2 normalisation of rows as a pass of its own (the delta rules' qk_l2norm): a Triton op with autograd.

``l2norm_rows(x)`` is x / sqrt(sum x^2 + 1e-6) over the last dim, formed in float32 as ``load_rows`` forms it
inside the delta-rule kernels, and stored in x's dtype. Its backward forms y and the norm again from x (nothing
kept but x): dx = (dy - y <y, dy>) / sqrt(sum x^2 + 1e-6), in float32.

Rounding y to a 16-bit dtype is what a plain run does too: it normalises in float32 and its matmuls round their
operands to the inputs' dtype (tests/ops/tolerance.py's comparator), the same rounding of the same values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linattn.ops.common.triton_utils import on_device_of

ROW_ELEMENTS = 4096  # elements a program takes: rows of D, padded to a power of two, this many at a time


@triton.jit
def _l2norm_rows(x, offs, m, EPS: tl.constexpr):
    """Rows [BR, BD] of x at ``offs`` as float32, their 1 / sqrt(sum x^2 + EPS) and the normalised rows."""
    b_x = tl.load(x + offs, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) + EPS)
    return b_x * r[:, None], r


@triton.jit
def _l2norm_kernel(x, y, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    offs = o_r.to(tl.int64)[:, None] * D + o_d[None, :]
    b_y, _ = _l2norm_rows(x, offs, m, EPS)
    tl.store(y + offs, b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _l2norm_backward_kernel(x, dy, dx, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    offs = o_r.to(tl.int64)[:, None] * D + o_d[None, :]
    b_y, r = _l2norm_rows(x, offs, m, EPS)
    b_dy = tl.load(dy + offs, mask=m, other=0.0).to(tl.float32)
    b_dx = (b_dy - b_y * tl.sum(b_y * b_dy, axis=1)[:, None]) * r[:, None]
    tl.store(dx + offs, b_dx.to(dx.dtype.element_ty), mask=m)


def _launch(kernel, *tensors: torch.Tensor) -> torch.Tensor:
    """Run ``kernel`` over the rows of tensors[0] (every tensor contiguous, of its shape); returns the output."""
    x = tensors[0]
    out = torch.empty_like(x)
    D = x.shape[-1]
    R = x.numel() // D if D else 0
    if R == 0:
        return out
    BD = triton.next_power_of_2(D)
    BR = max(1, ROW_ELEMENTS // BD)
    with on_device_of(x):
        kernel[(triton.cdiv(R, BR),)](*tensors, out, R, D=D, BR=BR, BD=BD, EPS=1e-6, num_warps=4)
    return out


@torch.library.custom_op("linattn::l2norm_rows", mutates_args=())
def l2norm_rows(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim, in x's dtype (formed in float32)."""
    return _launch(_l2norm_kernel, x.contiguous())


@l2norm_rows.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("linattn::l2norm_rows_backward", mutates_args=())
def _l2norm_rows_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _launch(_l2norm_backward_kernel, x.contiguous(), dy.contiguous())


@_l2norm_rows_backward.register_fake
def _(dy, x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _l2norm_rows_backward(dy, x)


l2norm_rows.register_autograd(_backward, setup_context=_setup_context)
