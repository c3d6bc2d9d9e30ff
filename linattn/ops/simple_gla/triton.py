"""Triton kernels for the decay family (simple GLA; linear attention and retention are special cases).

One chunk kernel serves the forward pass and all three backward passes:

    forward   o  = scale (q S^T-read + intra-chunk)       q' = q,  k' = k,  v' = v,  state S0
    dq        dq = scale S_t do_t                          q' = do, k' = v,  v' = k,  state S0^T
    dk        dk = dS_t v_t      (time reversed)           q' = v,  k' = do, v' = q,  state dS_T^T / scale
    dv        dv = dS_t^T k_t    (time reversed)           q' = k,  k' = q,  v' = do, state dS_T / scale

dg is formed chunk by chunk, never as a sum over the whole sequence. With b the log-decay summed from
the chunk's start and b_C its total, the gradient with respect to b_t is q_t . dq_t - k_t . dk_t (each
without the token's pair with itself: the two self terms are equal and would only cancel up to
rounding), and the chunk's total b_C also gets exp(b_C) <S_in, dS_out> + sum_t k_t . dk_t^state, where
S_in is the state entering the chunk, dS_out the gradient of the state leaving it, and dk^state the
share of dk that dS_out carries. dg_t is then the sum of those over t's chunk from t on. The dq pass,
whose state is S^T, stores S_in for each chunk; the dk pass, whose state is then dS_out^T / scale,
reads it back. An initial state and a final-state gradient enter as the first chunk's S_in and the
last chunk's dS_out: no pass of their own. Every term is summed over one chunk only, so rounding does not
pile up over the sequence, and bf16 operands serve the dq and dk passes as they serve the others.

In bfloat16, the forward and dv passes feed bfloat16 operands to the tensor cores (float32 accumulation),
as a plain bf16 computation does. The dq and dk passes of a gated op keep tf32 operands (LOWP_DG): their
products with q and k make dg, and with bf16 operands dg measured just over twice the plain bf16 error.

The state [K, BV] lives in registers while a program walks its chunks. Only a gated backward writes a
state per chunk (float32, [chunks, H, V, K]); nothing else does. When B * H alone would leave the GPU
idle (long T, small batch), each sequence is cut into segments: a first launch computes every segment's
own state change, a scan kernel chains them, and a second launch computes the outputs from each
segment's entering state.

Gates: the chunk-local cumulative sum is formed in float64 and split into a float32 pair, so that every
exponent b_t - b_s keeps float32 precision relative to itself, and is <= 0 for g <= 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linattn.ops.common.triton_ops import register_decay_ops
from linattn.ops.common.triton_recurrent import recurrent
from linattn.ops.common.triton_utils import (
    ChunkIndex,
    chunk_log_decay,
    dot_operand,
    exp32,
    kernel_flags,
    lowp_dots,
    precise_exp,
    sequence_bounds,
    store_dtype,
    triton_unsupported,
)

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_kernel(
    q,
    k,
    v,
    g,
    h0,
    o,
    ht,
    w,
    wo,
    states,
    cdot,
    chunk_first,
    cu_seqlens,
    scale,
    T,
    NS,
    NTH,
    NCH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SEG: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_O: tl.constexpr,
    STORE_HT: tl.constexpr,
    HAS_W: tl.constexpr,
    STORE_STATES: tl.constexpr,
    DOT_STATES: tl.constexpr,
    REVERSE: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_QK: tl.constexpr,
    ROUND: tl.constexpr,
    LOWP: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    # q, k: [.., T, H, K]; v, o, w: [.., T, H, V]; g: [.., T, H]; h0, ht: [N, NS, H, K, V] fp32;
    # wo: [NV, NTH] fp32 (NTH = tokens x heads), the per-token dot of o with w, without the t = s term.
    # STORE_STATES (the dq pass): states [NCH, H, K, V] fp32 gets the state entering each chunk (NCH chunks
    # over all sequences; chunk_first [N] int32 is each sequence's first with VARLEN, else T / BT apart).
    # DOT_STATES (the dk pass, whose own state is then the gradient of the state leaving the chunk): cdot
    # [NV, NCH, H] fp32 gets, per chunk, the gradient of its total log-decay that its state terms carry:
    # exp(b_C) <states, S> + sum_t w_t . (the state's share of o_t), both times scale.
    tl.static_assert(not DOT_STATES or HAS_W)
    i_v, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    lo = bos + i_s * SEG  # this program's segment [lo, hi), aligned to chunks
    hi = tl.minimum(lo + SEG, eos)
    n_chunks = tl.cdiv(hi - lo, BT)
    LOWP_TY: tl.constexpr = q.dtype.element_ty

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    if REVERSE:
        causal = o_t[:, None] <= o_t[None, :]  # output t reads sources s >= t
    else:
        causal = o_t[:, None] >= o_t[None, :]

    state_off = ((i_n * NS + i_s) * H + i_h).to(tl.int64) * K * V
    if STORE_STATES or DOT_STATES:
        if VARLEN:
            c_first = tl.load(chunk_first + i_n).to(tl.int64)
        else:
            c_first = i_n.to(tl.int64) * tl.cdiv(T, BT)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + state_off + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)

    for i in range(0, n_chunks):
        if REVERSE:
            t0 = lo + (n_chunks - 1 - i) * BT
        else:
            t0 = lo + i * BT
        rows = t0 + o_t
        m_t = rows < hi
        tok = rows * H + i_h  # token-and-head index
        b_q = tl.load(q + tok[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + tok[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)

        if UPCAST_QK:  # Triton's interpreter multiplies bfloat16 dot operands as raw integers
            A = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision=DOT_PREC)
        else:
            A = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)  # [BT, BT]
        if HAS_G:
            b_b, b_hi, b_lo, b_last = chunk_log_decay(tl.load(g + tok, mask=m_t, other=0.0))
            if REVERSE:  # decay from t back to sources s >= t
                diff = (b_hi[None, :] - b_hi[:, None]) + (b_lo[None, :] - b_lo[:, None])
                w_q = exp32((b_last - b_b).to(tl.float32), PRECISE_EXP)
                w_k = exp32(b_hi, PRECISE_EXP)
            else:
                diff = (b_hi[:, None] - b_hi[None, :]) + (b_lo[:, None] - b_lo[None, :])
                w_q = exp32(b_hi, PRECISE_EXP)
                w_k = exp32((b_last - b_b).to(tl.float32), PRECISE_EXP)
            A = tl.where(causal, A * exp32(tl.where(causal, diff, 0.0), PRECISE_EXP), 0.0)
            b_qs = dot_operand(b_q.to(tl.float32) * w_q[:, None], ROUND, LOWP, LOWP_TY)
            b_ks = dot_operand(b_k.to(tl.float32) * w_k[:, None], ROUND, LOWP, LOWP_TY)
        else:
            A = tl.where(causal, A, 0.0)
            b_qs = dot_operand(b_q, ROUND, LOWP, LOWP_TY)  # exact: the inputs' own values
            b_ks = dot_operand(b_k, ROUND, LOWP, LOWP_TY)
        b_vd = dot_operand(b_v, ROUND, LOWP, LOWP_TY)
        if STORE_STATES or DOT_STATES:
            c_idx = c_first + (t0 - bos) // BT
            chunk_state = (c_idx * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        if STORE_STATES:
            tl.store(states + chunk_state, S, mask=m_k[:, None] & m_v[None, :])

        if STORE_O:
            if HAS_W:
                # The dot with w (for dg) must leave out each token's pair with itself: q_t . dq_t and
                # k_t . dk_t hold the same self term, which would cancel only up to rounding.
                diag = o_t[:, None] == o_t[None, :]
                A_self = tl.sum(tl.where(diag, A, 0.0), axis=1)
                A = tl.where(diag, 0.0, A)
            S_op = dot_operand(S, ROUND, LOWP, LOWP_TY)
            b_o = tl.dot(dot_operand(A, ROUND, LOWP, LOWP_TY), b_vd, input_precision=DOT_PREC)
            if DOT_STATES:  # what the state carries in, kept apart
                b_intra = b_o
                b_inter = tl.dot(b_qs, S_op, input_precision=DOT_PREC)
                b_o = b_intra + b_inter
            else:
                b_o += tl.dot(b_qs, S_op, input_precision=DOT_PREC)
            if HAS_W:
                b_w = tl.load(w + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
                b_w = b_w.to(tl.float32)
                b_ow = b_o
                if DOT_STATES:
                    # The chunk's last token meets the leaving state undecayed (exp(b_C - b_C) = 1): its share
                    # would enter both k . dk and the chunk's total and cancel only up to rounding. Left out.
                    is_last = (o_t == tl.minimum(hi - t0, BT) - 1)[:, None]
                    b_inter = tl.where(is_last, 0.0, b_inter)
                    b_ow = b_intra + b_inter
                tl.store(wo + i_v * NTH + tok, scale * tl.sum(b_ow * b_w, axis=1), mask=m_t)
                if DOT_STATES:
                    S_in = tl.load(states + chunk_state, mask=m_k[:, None] & m_v[None, :], other=0.0)
                    d_last = tl.sum(tl.sum(S_in * S, axis=1), axis=0)
                    if HAS_G:
                        d_last *= exp32(b_last.to(tl.float32), PRECISE_EXP)
                    d_last += tl.sum(tl.sum(b_inter * b_w, axis=1), axis=0)
                    tl.store(cdot + (i_v * NCH + c_idx) * H + i_h, scale * d_last)
                b_o += A_self[:, None] * b_v.to(tl.float32)
            b_o *= scale
            o_ptr = o + tok[:, None] * V + o_v[None, :]
            tl.store(o_ptr, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        if HAS_G:
            S = S * exp32(b_last.to(tl.float32), PRECISE_EXP)
        S += tl.dot(tl.trans(b_ks), b_vd, input_precision=DOT_PREC)

    if STORE_HT:
        tl.store(ht + state_off + o_k[:, None] * V + o_v[None, :], S, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _segment_scan_kernel(
    dS,
    gsum,
    h0,
    hin,
    ht,
    NS,
    H: tl.constexpr,
    KV: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_H0: tl.constexpr,
    REVERSE: tl.constexpr,
):
    # dS, hin: [N, NS, H, K*V]; gsum: [N, NS, H] total log-decay of each segment; h0, ht: [N, H, K*V].
    i_b, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    o_e = i_b * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < KV
    S = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + (i_n * H + i_h).to(tl.int64) * KV + o_e, mask=m_e, other=0.0)
    for i in range(0, NS):
        if REVERSE:
            s = NS - 1 - i
        else:
            s = i
        off = ((i_n * NS + s) * H + i_h).to(tl.int64)
        tl.store(hin + off * KV + o_e, S, mask=m_e)
        if HAS_G:
            S = S * tl.exp(tl.load(gsum + off))
        S += tl.load(dS + off * KV + o_e, mask=m_e, other=0.0)
    tl.store(ht + (i_n * H + i_h).to(tl.int64) * KV + o_e, S, mask=m_e)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

BT = 64  # chunk length
# Launch settings of the chunk kernel, measured on an H200 (benchmarks/bench_gpu.py --sweep).
NUM_WARPS = 4
NUM_STAGES = 2
BV_MAX = 32
# bf16 operands in the dq and dk passes of a gated op too. Off: on an H200 that put dg at 2.1-2.3x the plain
# bf16 error (T = 1, 65 and varlen), over the 2x bound, though it cut fwd+bwd from 7.4 to 5.9 ms at T = 4096.
LOWP_DG = False
TARGET_PROGRAMS = 512  # enough programs to fill an H100/H200 several times over


def _blocks(K: int, V: int, lowp: bool) -> tuple[int, int]:
    bv_max = 2 * BV_MAX if lowp else BV_MAX  # 16-bit operand tiles take half the registers and shared memory
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(bv_max if BK <= 128 else bv_max // 2, triton.next_power_of_2(V)))
    return BK, BV


def _num_stages(dtype: torch.dtype) -> int:
    return 1 if dtype == torch.float32 else NUM_STAGES  # float32 tiles: one stage keeps shared memory in bounds


def _num_segments(programs: int, T: int, segments: int | None) -> int:
    """How many segments to cut each sequence into, so that programs x segments fills the GPU."""
    if segments is not None:
        return max(1, min(segments, triton.cdiv(T, BT)))
    if programs >= TARGET_PROGRAMS // 2 or T <= 4 * BT:
        return 1
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), triton.cdiv(T, 16 * BT)))


def sweep(
    q,
    k,
    v,
    g,
    h0,
    scale: float,
    cu_seqlens,
    *,
    reverse: bool = False,
    w=None,
    out_dtype=None,
    segments: int | None = None,
    chunks: ChunkIndex | None = None,
    states=None,
    dot_states: bool = False,
):
    """One pass of the chunk kernel over every sequence.

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] float32 or None; h0 [N, H, K, V] float32 or None.
    Returns o [B, T, H, V] (out_dtype), the state after the pass [N, H, K, V] float32, and, when w
    is given, the per-token dot product of o with w, [B, T, H] float32 (else None).

    With ``states`` ([chunks.NCH, H, K, V] float32) the pass stores the state entering each chunk there;
    with dot_states too it reads them instead and also returns, per chunk [NCH, H] float32, the gradient
    of the chunk's total log-decay through the states (see _chunk_kernel's DOT_STATES).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    lowp = lowp_dots(q.dtype) and (w is None or LOWP_DG)
    flags = kernel_flags(q.dtype, long_sums=w is not None)  # float16: dg sums the w passes' products
    BK, BV = _blocks(K, V, lowp and w is None)  # the w passes hold more tiles: wider V blocks spill
    NV = triton.cdiv(V, BV)
    NS = 1 if cu_seqlens is not None else _num_segments(N * H * NV, T, segments)
    SEG = triton.cdiv(triton.cdiv(T, NS), BT) * BT if NS > 1 else max(T, 1)
    NS = triton.cdiv(T, SEG) if NS > 1 else 1
    out_dtype = out_dtype or v.dtype
    o = torch.empty(B, T, H, V, dtype=store_dtype(out_dtype), device=q.device)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    wo = torch.empty(NV, B, T, H, dtype=torch.float32, device=q.device) if w is not None else None
    store_states = states is not None and not dot_states
    cdot = torch.zeros(NV, chunks.NCH, H, dtype=torch.float32, device=q.device) if dot_states else None
    common = dict(
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=BK,
        BV=BV,
        HAS_G=g is not None,
        REVERSE=reverse,
        VARLEN=cu_seqlens is not None,
        STORE_STATES=False,
        DOT_STATES=False,
        **flags,
        LOWP=lowp,
        PRECISE_EXP=precise_exp(q.dtype),
        num_warps=NUM_WARPS,
        num_stages=_num_stages(q.dtype),
    )
    dummy = ht  # stands in for absent optional pointers; never read
    args = (q, k, v, g if g is not None else dummy)
    NCH = chunks.NCH if chunks is not None else 0
    first = chunks.first if chunks is not None and chunks.first is not None else dummy
    with_states = dict(STORE_STATES=store_states, DOT_STATES=dot_states)  # for the launch that writes o
    if NS == 1:
        _chunk_kernel[(NV, 1, N * H)](
            *args,
            h0 if h0 is not None else dummy,
            o,
            ht,
            w if w is not None else dummy,
            wo if wo is not None else dummy,
            states if states is not None else dummy,
            cdot if cdot is not None else dummy,
            first,
            cu_seqlens if cu_seqlens is not None else dummy,
            scale,
            T,
            1,
            B * T * H,
            NCH,
            SEG=SEG,
            HAS_H0=h0 is not None,
            STORE_O=True,
            STORE_HT=True,
            HAS_W=w is not None,
            **(common | with_states),
        )
    else:
        # 1) each segment's own change of state, 2) chain the segments, 3) outputs from each entering state.
        dS = torch.empty(N, NS, H, K, V, dtype=torch.float32, device=q.device)
        _chunk_kernel[(NV, NS, N * H)](
            *args,
            dummy,
            o,
            dS,
            dummy,
            dummy,
            dummy,
            dummy,
            dummy,
            dummy,
            scale,
            T,
            NS,
            B * T * H,
            NCH,
            SEG=SEG,
            HAS_H0=False,
            STORE_O=False,
            STORE_HT=True,
            HAS_W=False,
            **common,
        )
        gsum = None
        if g is not None:
            pad = NS * SEG - T
            gsum = torch.nn.functional.pad(g, (0, 0, 0, pad)).view(B, NS, SEG, H).sum(2).contiguous()
        hin = torch.empty_like(dS)
        BLOCK = 1024
        _segment_scan_kernel[(triton.cdiv(K * V, BLOCK), N * H)](
            dS,
            gsum if gsum is not None else dummy,
            h0 if h0 is not None else dummy,
            hin,
            ht,
            NS,
            H=H,
            KV=K * V,
            BLOCK=BLOCK,
            HAS_G=g is not None,
            HAS_H0=h0 is not None,
            REVERSE=reverse,
        )
        _chunk_kernel[(NV, NS, N * H)](
            *args,
            hin,
            o,
            dummy,
            w if w is not None else dummy,
            wo if wo is not None else dummy,
            states if states is not None else dummy,
            cdot if cdot is not None else dummy,
            first,
            dummy,
            scale,
            T,
            NS,
            B * T * H,
            NCH,
            SEG=SEG,
            HAS_H0=True,
            STORE_O=True,
            STORE_HT=False,
            HAS_W=w is not None,
            **(common | with_states),
        )
    wo = wo.sum(0) if wo is not None else None
    if dot_states:
        return o.to(out_dtype), ht, wo, cdot.sum(0)
    return o.to(out_dtype), ht, wo


def backward(do, dht, q, k, v, g, h0, ht, scale: float, cu_seqlens, segments: int | None = None):
    """Gradients (dq, dk, dv, dg or None, dh0 or None) of the chunked forward; see the module docstring."""
    B, T, H, K = q.shape
    h0_t = h0.transpose(-1, -2).contiguous() if h0 is not None else None
    r_t = (dht.transpose(-1, -2) / scale).contiguous() if dht is not None else None
    seg = dict(segments=segments)
    if g is None:
        dq, _, _ = sweep(do, v, k, None, h0_t, scale, cu_seqlens, out_dtype=q.dtype, **seg)
        dk, _, _ = sweep(v, do, q, None, r_t, scale, cu_seqlens, reverse=True, out_dtype=k.dtype, **seg)
        dg = None
    else:
        # dg chunk by chunk: the dq pass stores the state entering each chunk (transposed, as its own state
        # is S^T) and the dk pass, whose state is then the gradient of the state leaving the chunk, forms
        # their product there (see the module docstring).
        chunks = ChunkIndex(B, T, cu_seqlens, BT, q.device)
        states = torch.empty(chunks.NCH, H, v.shape[-1], K, dtype=torch.float32, device=q.device)
        opts = dict(chunks=chunks, states=states, **seg)
        dq, _, q_dq = sweep(do, v, k, g, h0_t, scale, cu_seqlens, w=q, out_dtype=q.dtype, **opts)
        dk, _, k_dk, d_last = sweep(
            v, do, q, g, r_t, scale, cu_seqlens, reverse=True, w=k, out_dtype=k.dtype, dot_states=True, **opts
        )
        dg = chunks.reverse_cumsum(q_dq - k_dk) + chunks.to_tokens(d_last)
        dg = dg.to(torch.float32)
    r = (dht / scale).contiguous() if dht is not None else None
    dv, dh0, _ = sweep(k, q, do, g, r, scale, cu_seqlens, reverse=True, out_dtype=v.dtype, **seg)
    return dq, dk, dv, dg, (dh0 * scale if h0 is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration and the public function
# ----------------------------------------------------------------------------------------------------------------


def _forward(q, k, v, g, h0, scale, cu_seqlens):
    o, ht, _ = sweep(q, k, v, g, h0, scale, cu_seqlens)
    return o, ht


# Same contract as ``naive_simple_gla``, with g [B, T, H] or None (plain linear attention).
triton_simple_gla = register_decay_ops("simple_gla", _forward, backward)

__all__ = ["triton_simple_gla", "triton_unsupported", "sweep", "backward", "recurrent", "BT"]


SCALARS = dict(scale="fp32", T="i32", NS="i32", NTH="i32", NCH="i32")  # the chunk kernel's runtime scalars


def compile_variants():
    """The kernel variants that tests/ops/compile_kernels.py compiles for sm_90 (in CI, without a GPU).

    Each is (label, kernel, pointer dtypes, constexprs, launch options), at the standard head size.
    """
    for dt in ("bf16", "fp16", "fp32"):
        ptrs = dict(q=dt, k=dt, v=dt, o=dt, w=dt, g="fp32", h0="fp32", ht="fp32", wo="fp32", cu_seqlens="i32")
        ptrs |= dict(states="fp32", cdot="fp32", chunk_first="i32")
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        passes = {"bf16": [(False, False), (False, True), (True, True)], "fp16": [(False, False), (True, True)]}
        passes = passes.get(dt, [(True, True)])  # (reverse, has_w): forward, dq, dk
        for gated in (False, True) if dt != "fp32" else (True,):
            for reverse, has_w in passes:
                lowp = torch_dtype == torch.bfloat16 and (not has_w or LOWP_DG)
                flags = kernel_flags(torch_dtype, long_sums=has_w, gpu=True)
                BV = _blocks(128, 128, lowp and not has_w)[1]
                const = dict(H=16, K=128, V=128, BT=BT, BK=128, BV=BV, SEG=4096, HAS_G=gated)
                const |= dict(HAS_H0=True, LOWP=lowp, PRECISE_EXP=precise_exp(torch_dtype, gpu=True))
                const |= dict(STORE_O=True, STORE_HT=True, HAS_W=has_w, REVERSE=reverse, VARLEN=dt == "fp16")
                const |= dict(STORE_STATES=has_w and not reverse, DOT_STATES=has_w and reverse)
                label = f"chunk {dt} gated={gated} reverse={reverse} w={has_w}"
                opts = dict(num_warps=NUM_WARPS, num_stages=_num_stages(torch_dtype), scalars=SCALARS)
                yield label, _chunk_kernel, ptrs, const | flags, opts
    ptrs = dict(dS="fp32", gsum="fp32", h0="fp32", hin="fp32", ht="fp32")
    const = dict(H=16, KV=128 * 128, BLOCK=1024, HAS_G=True, HAS_H0=True, REVERSE=False)
    yield "segment scan", _segment_scan_kernel, ptrs, const, dict(scalars=dict(NS="i32"))
