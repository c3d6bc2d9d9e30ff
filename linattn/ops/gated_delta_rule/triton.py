"""Triton kernels for the gated delta rule (the delta rule is g = None): launchers and registration.

The chunked form of ``chunk.py`` (chunk length 64), in the kernels of ``triton_kernels.py``:

    prepare          per chunk      Tinv = (I + A)^-1 by blocked forward substitution, W = Tinv (beta exp(b) K),
                                    U0 = Tinv (beta V), with A_ts = beta_t exp(b_t - b_s) k_t . k_s (s < t)
    forward          per sequence   the state S [K, BV] in registers, chunk after chunk:
                                    U = U0 - W S,  o = scale (exp(b) q S + tril(q k^T exp(b_t - b_s)) U),
                                    S <- exp(b_C) S + (exp(b_C - b) k)^T U
    backward_state   per sequence   the same loop in reverse on dS, storing the gradient dS' of each chunk's
                                    exit state: dU = scale P^T dO + (exp(b_C - b) k) dS',
                                    dS <- exp(b_C) dS' + scale (exp(b) q)^T dO - W^T dU
    backward_chunk   per chunk      dq, dk, dv, dbeta and dg from the chunk's entering state S and dS',
                                    through dX = Tinv^T dY and dA = -(dX_w W^T + dX_u U0^T) (strictly lower)
    recurrent        per sequence   token by token, for decoding

When a gradient is needed the forward keeps Tinv [B, T, H, 64] (float32); the backward recomputes W
and U0 from it and runs the forward loop again to store each chunk's entering state.

Gates stay in log space: b is the chunk-local cumulative sum (float64, split into a float32 pair by
``chunk_log_decay``) and every exponent used, b_t - b_s for s <= t, b and b_C - b, is <= 0, so gates
of 0 and of -1e4 neither overflow nor produce NaN. dg is a float64 reverse cumulative sum, within the
chunk, of the gradient with respect to b; each token's own +x - x terms are left out rather than cancelled.

qk_l2norm and beta_is_logit are applied as the kernels load q, k and beta, and their backward chains
are applied in the per-chunk kernel, so the options cost no extra pass. Few tokens and no gradient
run the token recurrence instead (decoding).
"""

from __future__ import annotations

import torch
import triton

from linattn.ops._contract import RECURRENT_MAX_T
from linattn.ops.common.triton_ops import fake_state
from linattn.ops.common.triton_recurrent import recurrent as common_recurrent
from linattn.ops.common.triton_utils import (
    ChunkTable,
    kernel_flags,
    needs_grad,
    precise_exp,
    short_for_recurrent,
    store_dtype,
    triton_unsupported,
)
from linattn.ops.gated_delta_rule.triton_kernels import (
    _backward_chunk_kernel,
    _backward_state_kernel,
    _forward_kernel,
    _prepare_kernel,
)

BT = 64  # chunk length
BV_MAX = 32


def _blocks(K: int, V: int) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(BV_MAX if BK <= 128 else BV_MAX // 2, triton.next_power_of_2(V)))
    return BK, BV


MAX_KEY_DIM = 128  # the per-chunk backward holds several [64, K] float32 tiles: K = 256 needs ~280 KB of shared memory


def delta_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if these kernels can serve q, v; else why not (the shared checks, and K <= 128)."""
    if q.shape[-1] > MAX_KEY_DIM:
        return f"key dim K={q.shape[-1]} exceeds {MAX_KEY_DIM} (the delta-rule kernels' shared memory bound)"
    return triton_unsupported(q, v)


def _flags(dtype: torch.dtype, gated: bool, qk_l2norm: bool, gpu: bool | None = None) -> dict:
    """The constexprs every chunk kernel takes, for inputs of ``dtype``, and the num_stages launch option."""
    flags = kernel_flags(dtype, long_sums=True, gpu=gpu)  # the chains through the WY inverse (dbeta)
    del flags["UPCAST_QK"]  # these kernels take every operand to float32 as they load it
    # Launch option, not a constexpr: float32 tiles with Triton's default 3 stages overflow shared memory.
    stages = 1 if dtype == torch.float32 else 2
    exact_exp = precise_exp(dtype, gpu)
    return dict(HAS_G=gated, L2NORM=qk_l2norm, PRECISE_EXP=exact_exp, num_stages=stages, **flags)


def prepare(k, v, g, beta, lay: ChunkTable, qk_l2norm: bool, beta_is_logit: bool, tinv=None, store_t: bool = False):
    """W [B, T, H, K], U0 [B, T, H, V] and Tinv [B, T, H, BT], all float32.

    Tinv is solved for unless given (as the forward stored it); it is returned only when given or store_t.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    w = torch.empty(B, T, H, K, dtype=torch.float32, device=k.device)
    u0 = torch.empty(B, T, H, V, dtype=torch.float32, device=k.device)
    solve = tinv is None
    store_t = store_t and solve
    if store_t:
        tinv = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)
    _prepare_kernel[(lay.NC, H)](
        k,
        v,
        g if g is not None else w,
        beta,
        lay.chunks,
        w,
        u0,
        tinv if tinv is not None else w,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=BK,
        BV=BV,
        BETA_LOGIT=beta_is_logit,
        SOLVE=solve,
        STORE_T=store_t,
        **_flags(k.dtype, g is not None, qk_l2norm),
    )
    return w, u0, tinv


def forward(q, k, v, g, beta, h0, scale: float, cu_seqlens, qk_l2norm: bool, beta_is_logit: bool, save: bool = False):
    """The chunked forward: o [B, T, H, V] in v's dtype, the final state [N, H, K, V] float32 and, with
    save, Tinv [B, T, H, BT] float32 for the backward (else None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = ChunkTable(B, T, cu_seqlens, BT, q.device)
    w, u0, tinv = prepare(k, v, g, beta, lay, qk_l2norm, beta_is_logit, store_t=save)
    BK, BV = _blocks(K, V)
    o = torch.empty(B, T, H, V, dtype=store_dtype(v.dtype), device=q.device)
    ht = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device)
    _forward_kernel[(triton.cdiv(V, BV), lay.N * H)](
        q,
        k,
        g if g is not None else ht,
        w,
        u0,
        h0 if h0 is not None else ht,
        lay.cu,
        lay.first,
        o,
        ht,
        ht,
        scale,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=BK,
        BV=BV,
        HAS_H0=h0 is not None,
        STORE_O=True,
        STORE_HT=True,
        STORE_STATES=False,
        **_flags(q.dtype, g is not None, qk_l2norm),
    )
    return o.to(v.dtype), ht, tinv


def backward(do, dht, q, k, v, g, beta, h0, tinv, scale: float, cu_seqlens, qk_l2norm: bool, beta_is_logit: bool):
    """Gradients (dq, dk, dv, dg or None, dbeta, dh0 or None).

    Recomputes W, U0 (from the forward's Tinv when given) and the state entering every chunk."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    lay = ChunkTable(B, T, cu_seqlens, BT, q.device)
    flags = _flags(q.dtype, g is not None, qk_l2norm)
    common = dict(H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, **flags)
    w, u0, tinv = prepare(k, v, g, beta, lay, qk_l2norm, beta_is_logit, tinv=tinv, store_t=True)
    states = torch.empty(lay.NC, H, K, V, dtype=torch.float32, device=q.device)
    dummy = states
    g_ = g if g is not None else dummy
    _forward_kernel[(NV, lay.N * H)](
        q, k, g_, w, u0, h0 if h0 is not None else dummy, lay.cu, lay.first, dummy, dummy, states, scale,
        HAS_H0=h0 is not None, STORE_O=False, STORE_HT=False, STORE_STATES=True, **common,
    )  # fmt: skip
    dstates = torch.empty_like(states)
    dh0 = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
    _backward_state_kernel[(NV, lay.N * H)](
        q, k, g_, w, do, dht if dht is not None else dummy, lay.cu, lay.first, dstates,
        dh0 if dh0 is not None else dummy, scale,
        HAS_DHT=dht is not None, STORE_DH0=h0 is not None, **common,
    )  # fmt: skip
    dq = torch.empty(q.shape, dtype=store_dtype(q.dtype), device=q.device)
    dk = torch.empty(k.shape, dtype=store_dtype(k.dtype), device=q.device)
    dv = torch.empty(v.shape, dtype=store_dtype(v.dtype), device=q.device)
    dg = torch.empty(B, T, H, dtype=torch.float32, device=q.device) if g is not None else None
    dbeta = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    _backward_chunk_kernel[(lay.NC, H)](
        q, k, v, g_, beta, w, u0, tinv, do, lay.chunks, states, dstates,
        dq, dk, dv, dg if dg is not None else dummy, dbeta, scale,
        BETA_LOGIT=beta_is_logit, **common,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dbeta, dh0


def recurrent(q, k, v, g, beta, h0, scale: float, cu_seqlens, qk_l2norm: bool, beta_is_logit: bool):
    """Token-by-token forward (decoding): o [B, T, H, V] and the final state [N, H, K, V] float32."""
    opts = dict(beta=beta, qk_l2norm=qk_l2norm, beta_is_logit=beta_is_logit)
    return common_recurrent(q, k, v, g, h0, scale, cu_seqlens, **opts)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake tensors and autograd
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("linattn::chunk_gated_delta_rule", mutates_args=())
def _chunk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    qk_l2norm: bool,
    beta_is_logit: bool,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final state, Tinv for the backward: empty unless save)."""
    o, ht, tinv = forward(q, k, v, g, beta, h0, scale, cu_seqlens, qk_l2norm, beta_is_logit, save)
    return o, ht, (tinv if tinv is not None else q.new_empty(0, dtype=torch.float32))


@_chunk_op.register_fake
def _(q, k, v, g, beta, h0, cu_seqlens, scale, qk_l2norm, beta_is_logit, save):
    tinv = q.new_empty(*q.shape[:3], BT, dtype=torch.float32) if save else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(v), fake_state(q, v, cu_seqlens), tinv


@torch.library.custom_op("linattn::chunk_gated_delta_rule_backward", mutates_args=())
def _chunk_backward_op(
    do: torch.Tensor,
    dht: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    tinv: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    qk_l2norm: bool,
    beta_is_logit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tinv = tinv if tinv.numel() else None
    grads = backward(do, dht, q, k, v, g, beta, h0, tinv, scale, cu_seqlens, qk_l2norm, beta_is_logit)
    dq, dk, dv, dg, dbeta, dh0 = grads
    empty = q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, (dg if dg is not None else empty), dbeta, (dh0 if dh0 is not None else empty.clone())


@_chunk_backward_op.register_fake
def _(do, dht, q, k, v, g, beta, h0, tinv, cu_seqlens, scale, qk_l2norm, beta_is_logit):
    empty = q.new_empty(0, dtype=torch.float32)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(g) if g is not None else empty,
        torch.empty_like(beta),
        torch.empty_like(h0) if h0 is not None else empty.clone(),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, h0, cu_seqlens, scale, qk_l2norm, beta_is_logit, _ = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, output[2], cu_seqlens)
    ctx.options = (scale, qk_l2norm, beta_is_logit)
    ctx.set_materialize_grads(False)  # an unused final state's gradient arrives as None, not as zeros


def _backward(ctx, do, dht, _):
    q, k, v, g, beta, h0, tinv, cu_seqlens = ctx.saved_tensors
    scale, qk_l2norm, beta_is_logit = ctx.options
    dht = dht.contiguous() if dht is not None else None
    do = do if do is not None else torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, dh0 = _chunk_backward_op(
        do.contiguous(), dht, q, k, v, g, beta, h0, tinv, cu_seqlens, scale, qk_l2norm, beta_is_logit
    )
    dg = dg if g is not None else None
    dh0 = dh0 if h0 is not None else None
    return dq, dk, dv, dg, dbeta, dh0, None, None, None, None, None


_chunk_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("linattn::recurrent_gated_delta_rule", mutates_args=())
def _recurrent_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    qk_l2norm: bool,
    beta_is_logit: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return recurrent(q, k, v, g, beta, h0, scale, cu_seqlens, qk_l2norm, beta_is_logit)


@_recurrent_op.register_fake
def _(q, k, v, g, beta, h0, cu_seqlens, scale, qk_l2norm, beta_is_logit):
    return torch.empty_like(v), fake_state(q, v, cu_seqlens)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def triton_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    qk_l2norm: bool = False,
    beta_is_logit: bool = False,
):
    """Same contract as ``naive_gated_delta_rule``; g may be None (the delta rule)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = g.float().contiguous() if g is not None else None
    beta = beta.float().contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    grad = needs_grad(q, k, v, g, beta, h0)
    args = (q, k, v, g, beta, h0, cu_seqlens, float(scale), bool(qk_l2norm), bool(beta_is_logit))
    if not grad and short_for_recurrent(q, cu_seqlens, RECURRENT_MAX_T):
        o, ht = _recurrent_op(*args)
    else:
        o, ht, _ = _chunk_op(*args, grad)
    return o, (ht if output_final_state else None)


__all__ = ["triton_gated_delta_rule", "triton_unsupported", "forward", "backward", "recurrent", "BT"]


def compile_variants():
    """The kernel variants that tests/ops/compile_kernels.py compiles for sm_90 (in CI, without a GPU)."""
    # Compiling is slow (minutes per float32 variant on a CI core): bfloat16 with every option, and
    # float16 without gates, catch what the interpreter lets through.
    for dt, gated, opt in (("bf16", True, True), ("fp16", False, False)):
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        ptrs = {n: dt for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}
        ptrs |= dict(chunks="i32", cu_seqlens="i32", chunk_start="i32")
        BK, BV = _blocks(128, 128)
        flags = _flags(torch_dtype, gated, opt, gpu=True)
        stages = flags.pop("num_stages")
        common = dict(H=16, K=128, V=128, BT=BT, BK=BK, BV=BV, **flags)
        label = f"{dt} gated={gated} l2norm/logit={opt}"
        solve = dict(SOLVE=True, STORE_T=True, BETA_LOGIT=opt)
        opts = dict(num_stages=stages)
        yield f"prepare {label}", _prepare_kernel, ptrs, common | solve, opts
        stores = dict(HAS_H0=True, STORE_O=True, STORE_HT=True, STORE_STATES=True)
        yield f"forward {label}", _forward_kernel, ptrs, common | stores, opts
        state = dict(HAS_DHT=True, STORE_DH0=True)
        yield f"backward state {label}", _backward_state_kernel, ptrs, common | state, opts
        yield f"backward chunk {label}", _backward_chunk_kernel, ptrs, common | dict(BETA_LOGIT=opt), opts
    # The decode kernel, with the delta rule's update, compiles in the "recurrent" group.
