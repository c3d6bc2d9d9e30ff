"""The token-by-token Triton kernel, for decoding: linear attention, simple GLA, GLA and the delta rules.

S_t = decay_t * S_{t-1} + k_t u_t^T and o_t = scale S_t^T q_t, with no decay (GATE = 0), one log-decay per
head and token (GATE = 1, g [.., T, H]) or one per key channel (GATE = 2, g [.., T, H, K]); u_t = v_t, or
with DELTA the delta rule's u_t = beta_t (v_t - S'^T k_t) (S' the decayed state). The [K, BV] state tile
stays in registers across the few tokens of a decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linattn.ops.common.triton_utils import exp32, precise_exp, sequence_bounds, store_dtype


@triton.jit
def _recurrent_kernel(
    q,
    k,
    v,
    g,
    beta,
    h0,
    o,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    L2NORM: tl.constexpr,
    BETA_LOGIT: tl.constexpr,
    HAS_H0: tl.constexpr,
    VARLEN: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    state_off = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + state_off, mask=m_kv, other=0.0)
    for t in range(bos, eos):
        tok = t * H + i_h
        b_q = tl.load(q + tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, axis=0) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, axis=0) + 1e-6)
        if GATE == 1:
            S = S * exp32(tl.load(g + tok).to(tl.float32), PRECISE_EXP)
        elif GATE == 2:
            b_g = tl.load(g + tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            S = S * exp32(b_g, PRECISE_EXP)[:, None]
        if DELTA:
            b_beta = tl.load(beta + tok).to(tl.float32)
            if BETA_LOGIT:
                b_beta = tl.sigmoid(b_beta)
            b_v = b_beta * (b_v - tl.sum(S * b_k[:, None], axis=0))
        S += b_k[:, None] * b_v[None, :]
        tl.store(o + tok * V + o_v, (tl.sum(S * b_q[:, None], axis=0) * scale).to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + state_off, S, mask=m_kv)


def recurrent(
    q, k, v, g, h0, scale: float, cu_seqlens, out_state=None, beta=None, qk_l2norm=False, beta_is_logit=False
):
    """Token-by-token forward: o [B, T, H, V] and the final state [N, H, K, V] float32.

    q, k [B, T, H, K]; v [B, T, H, V]; g None, [B, T, H] or [B, T, H, K] float32; h0 [N, H, K, V] float32 or None.
    With beta [B, T, H] float32 the delta rule's update (qk_l2norm and beta_is_logit as in the delta-rule ops).
    The final state is written to out_state when given, which may be h0 itself: each program reads its own
    state tile before it writes the same tile, so updating in place is safe.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(32, triton.next_power_of_2(V)))
    o = torch.empty(v.shape, dtype=store_dtype(v.dtype), device=v.device)
    ht = out_state if out_state is not None else torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    dummy = ht  # stands in for absent optional pointers; never read
    _recurrent_kernel[(triton.cdiv(V, BV), N * H)](
        q,
        k,
        v,
        g if g is not None else dummy,
        beta if beta is not None else dummy,
        h0 if h0 is not None else dummy,
        o,
        ht,
        cu_seqlens if cu_seqlens is not None else dummy,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        GATE=0 if g is None else (1 if g.dim() == 3 else 2),
        DELTA=beta is not None,
        L2NORM=qk_l2norm,
        BETA_LOGIT=beta_is_logit,
        HAS_H0=h0 is not None,
        VARLEN=cu_seqlens is not None,
        PRECISE_EXP=precise_exp(q.dtype),
    )
    return o.to(v.dtype), ht


def compile_variants():
    """For tests/ops/compile_kernels.py: the decode kernel with each kind of gate, and the delta rule, bf16."""
    ptrs = dict(q="bf16", k="bf16", v="bf16", o="bf16", cu_seqlens="i32")
    for gate, delta in ((0, False), (1, False), (2, False), (1, True)):
        const = dict(H=16, K=128, V=128, BK=128, BV=32, GATE=gate, DELTA=delta, L2NORM=delta, BETA_LOGIT=delta)
        const |= dict(HAS_H0=True, VARLEN=True, PRECISE_EXP=False)
        opts = dict(scalars=dict(scale="fp32", T="i32"))
        yield f"recurrent bf16 gate={gate} delta={delta}", _recurrent_kernel, ptrs, const, opts
        if gate:  # an eager decode passes g (and the delta rules' beta) as given (triton_ops.DECODE_DIRECT)
            given = ptrs | dict(g="bf16", beta="bf16" if delta else "fp32")
            yield f"recurrent bf16 gate={gate} delta={delta} g, beta as given", _recurrent_kernel, given, const, opts
