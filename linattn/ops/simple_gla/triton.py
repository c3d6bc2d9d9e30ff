"""Triton kernels for the decay family (simple GLA; linear attention and retention are special cases).

One chunk kernel serves the forward pass and all three backward passes:

    forward   o  = scale (q S^T-read + intra-chunk)       q' = q,  k' = k,  v' = v,  state S0
    dq        dq = scale S_t do_t                          q' = do, k' = v,  v' = k,  state S0^T
    dk        dk = dS_t v_t      (time reversed)           q' = v,  k' = do, v' = q,  state dS_T^T / scale
    dv        dv = dS_t^T k_t    (time reversed)           q' = k,  k' = q,  v' = do, state dS_T / scale

and dg_t = sum_{r >= t} (q_r . dq_r - k_r . dk_r) + <dS_T, S_T>, with the dot products taken in
float32 inside the dq and dk passes, each without the token's pair with itself (the two self terms
are equal and would cancel only up to rounding). With a final-state gradient dS_T, its share of dk
runs as a pass of its own (zero do) and stays out of that telescoped sum: there it would cancel
against <dS_T, S_T> only up to rounding, a large error where dg is tiny (strong gates). Its part of
dg_t is the prefix sum over r < t of k_r . dk_r(dS_T), plus exp(sum of g) <dS_T, S_0>.

In bfloat16, the forward and dv passes feed bfloat16 operands to the tensor cores, as a plain bf16
computation does; the dq and dk passes of a gated op keep tf32, because dg telescopes their dot products
over the whole sequence and bf16-rounded terms would add up to errors far above plain.

The state [K, BV] lives in registers while a program walks its chunks, so no per-chunk state is ever
written to memory. When B * H alone would leave the GPU idle (long T, small batch), each sequence is
cut into segments: a first launch computes every segment's own state change, a scan kernel chains
them, and a second launch computes the outputs from each segment's entering state.

Gates: the chunk-local cumulative sum is formed in float64 and split into a float32 pair, so that every
exponent b_t - b_s keeps float32 precision relative to itself, and is <= 0 for g <= 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linattn.ops.common.triton_ops import register_decay_ops
from linattn.ops.common.triton_recurrent import recurrent
from linattn.ops.common.triton_segments import SCAN_BLOCK, chain_segments, segment_scan_kernel
from linattn.ops.common.triton_utils import (
    chunk_log_decay,
    dot_operand,
    exclusive_cumsum_per_sequence,
    exp32,
    kernel_flags,
    lowp_dots,
    precise_exp,
    reverse_cumsum_per_sequence,
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
    cu_seqlens,
    scale,
    T,
    NS,
    NTH,
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

        if STORE_O:
            if HAS_W:
                # The dot with w (for dg) must leave out each token's pair with itself: q_t . dq_t and
                # k_t . dk_t hold the same self term, which would cancel only up to rounding.
                diag = o_t[:, None] == o_t[None, :]
                A_self = tl.sum(tl.where(diag, A, 0.0), axis=1)
                A = tl.where(diag, 0.0, A)
            b_o = tl.dot(dot_operand(A, ROUND, LOWP, LOWP_TY), b_vd, input_precision=DOT_PREC)
            b_o += tl.dot(b_qs, dot_operand(S, ROUND, LOWP, LOWP_TY), input_precision=DOT_PREC)
            if HAS_W:
                b_w = tl.load(w + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
                tl.store(wo + i_v * NTH + tok, scale * tl.sum(b_o * b_w.to(tl.float32), axis=1), mask=m_t)
                b_o += A_self[:, None] * b_v.to(tl.float32)
            b_o *= scale
            o_ptr = o + tok[:, None] * V + o_v[None, :]
            tl.store(o_ptr, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        if HAS_G:
            S = S * exp32(b_last.to(tl.float32), PRECISE_EXP)
        S += tl.dot(tl.trans(b_ks), b_vd, input_precision=DOT_PREC)

    if STORE_HT:
        tl.store(ht + state_off + o_k[:, None] * V + o_v[None, :], S, mask=m_k[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

BT = 64  # chunk length
# Launch settings of the chunk kernel, measured on an H200 (benchmarks/bench_gpu.py --sweep).
NUM_WARPS = 4
NUM_STAGES = 2
BV_MAX = 32
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
):
    """One pass of the chunk kernel over every sequence.

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] float32 or None; h0 [N, H, K, V] float32 or None.
    Returns o [B, T, H, V] (out_dtype), the state after the pass [N, H, K, V] float32, and, when w
    is given, the per-token dot product of o with w, [B, T, H] float32 (else None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    lowp = lowp_dots(q.dtype) and w is None  # dg's telescoped sums (the w passes) need tf32 dq and dk
    flags = kernel_flags(q.dtype, long_sums=w is not None)  # dg telescopes the w passes' products
    BK, BV = _blocks(K, V, lowp)
    NV = triton.cdiv(V, BV)
    NS = 1 if cu_seqlens is not None else _num_segments(N * H * NV, T, segments)
    SEG = triton.cdiv(triton.cdiv(T, NS), BT) * BT if NS > 1 else max(T, 1)
    NS = triton.cdiv(T, SEG) if NS > 1 else 1
    out_dtype = out_dtype or v.dtype
    o = torch.empty(B, T, H, V, dtype=store_dtype(out_dtype), device=q.device)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    wo = torch.empty(NV, B, T, H, dtype=torch.float32, device=q.device) if w is not None else None
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
        **flags,
        LOWP=lowp,
        PRECISE_EXP=precise_exp(q.dtype),
        num_warps=NUM_WARPS,
        num_stages=_num_stages(q.dtype),
    )
    dummy = ht  # stands in for absent optional pointers; never read
    args = (q, k, v, g if g is not None else dummy)
    if NS == 1:
        _chunk_kernel[(NV, 1, N * H)](
            *args,
            h0 if h0 is not None else dummy,
            o,
            ht,
            w if w is not None else dummy,
            wo if wo is not None else dummy,
            cu_seqlens if cu_seqlens is not None else dummy,
            scale,
            T,
            1,
            B * T * H,
            SEG=SEG,
            HAS_H0=h0 is not None,
            STORE_O=True,
            STORE_HT=True,
            HAS_W=w is not None,
            **common,
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
            scale,
            T,
            NS,
            B * T * H,
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
        hin, _ = chain_segments(dS, gsum, h0, reverse, ht=ht)
        _chunk_kernel[(NV, NS, N * H)](
            *args,
            hin,
            o,
            dummy,
            w if w is not None else dummy,
            wo if wo is not None else dummy,
            dummy,
            scale,
            T,
            NS,
            B * T * H,
            SEG=SEG,
            HAS_H0=True,
            STORE_O=True,
            STORE_HT=False,
            HAS_W=w is not None,
            **common,
        )
    return o.to(out_dtype), ht, (wo.sum(0) if wo is not None else None)


def _to_tokens(x: torch.Tensor, cu_seqlens, T: int) -> torch.Tensor:
    """A per-sequence value x [N, H] broadcast to every token of its sequence: [B, T, H]."""
    if cu_seqlens is None:
        return x[:, None, :].expand(-1, T, -1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(x, lengths, dim=0, output_size=T)[None]


def _at_starts(suffix: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """Per-sequence suffix sums [B, T, H] read at each sequence's first token: the sequence totals [N, H]."""
    if cu_seqlens is None:
        return suffix[:, 0]
    padded = torch.cat([suffix[0], suffix.new_zeros(1, suffix.shape[-1])])  # an empty last sequence reads 0
    return padded[cu_seqlens[:-1].long()]


def backward(do, dht, q, k, v, g, h0, ht, scale: float, cu_seqlens, segments: int | None = None):
    """Gradients (dq, dk, dv, dg or None, dh0 or None) of the chunked forward; see the module docstring."""
    gated = g is not None
    h0_t = h0.transpose(-1, -2).contiguous() if h0 is not None else None
    seg = dict(segments=segments)
    dq, _, q_dq = sweep(do, v, k, g, h0_t, scale, cu_seqlens, w=q if gated else None, out_dtype=q.dtype, **seg)
    r_t = (dht.transpose(-1, -2) / scale).contiguous() if dht is not None else None
    if gated and dht is not None:
        # The final-state gradient's share of dk gets its own pass (zero do): summed into the telescoped
        # dg it would cancel against <dS_T, S_T> only up to the passes' rounding, a large error where dg
        # itself is small. Its part of dg is the cancellation-free prefix sum below.
        dk, _, k_dk = sweep(v, do, q, g, None, scale, cu_seqlens, reverse=True, w=k, out_dtype=torch.float32, **seg)
        dk_final, _, e = sweep(
            v, torch.zeros_like(do), q, g, r_t, scale, cu_seqlens, reverse=True, w=k, out_dtype=torch.float32, **seg
        )
        dk = (dk + dk_final).to(k.dtype)
    else:
        w = k if gated else None
        dk, _, k_dk = sweep(v, do, q, g, r_t, scale, cu_seqlens, reverse=True, w=w, out_dtype=k.dtype, **seg)
    r = (dht / scale).contiguous() if dht is not None else None
    dv, dh0, _ = sweep(k, q, do, g, r, scale, cu_seqlens, reverse=True, out_dtype=v.dtype, **seg)
    dg = None
    if gated:
        dg = reverse_cumsum_per_sequence(q_dq - k_dk, cu_seqlens)
        if dht is not None:
            # d<dS_T, S_T>/dg_t: the writes before t, e_r = k_r . (dS_T's share of dk_r), and the initial state.
            dg = dg + exclusive_cumsum_per_sequence(e, cu_seqlens).float()
            if h0 is not None:
                log_decay = _at_starts(reverse_cumsum_per_sequence(g, cu_seqlens, torch.float64), cu_seqlens)  # [N, H]
                initial = torch.exp(log_decay) * (dht.double() * h0.double()).sum((-2, -1))
                dg = dg + _to_tokens(initial, cu_seqlens, dg.shape[1]).float()
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


SCALARS = dict(scale="fp32", T="i32", NS="i32", NTH="i32")  # the chunk kernel's runtime scalars


def compile_variants():
    """The kernel variants that tests/ops/compile_kernels.py compiles for sm_90 (in CI, without a GPU).

    Each is (label, kernel, pointer dtypes, constexprs, launch options), at the standard head size.
    """
    for dt in ("bf16", "fp16", "fp32"):
        ptrs = dict(q=dt, k=dt, v=dt, o=dt, w=dt, g="fp32", h0="fp32", ht="fp32", wo="fp32", cu_seqlens="i32")
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        passes = [(False, False), (True, True)] if dt != "fp32" else [(True, True)]
        for gated in (False, True) if dt != "fp32" else (True,):
            for reverse, has_w in passes:
                lowp = torch_dtype == torch.bfloat16 and not has_w
                flags = kernel_flags(torch_dtype, long_sums=has_w, gpu=True)
                const = dict(H=16, K=128, V=128, BT=BT, BK=128, BV=_blocks(128, 128, lowp)[1], SEG=4096, HAS_G=gated)
                const |= dict(HAS_H0=True, LOWP=lowp, PRECISE_EXP=precise_exp(torch_dtype, gpu=True))
                const |= dict(STORE_O=True, STORE_HT=True, HAS_W=has_w, REVERSE=reverse, VARLEN=dt == "fp16")
                label = f"chunk {dt} gated={gated} reverse={reverse} w={has_w}"
                opts = dict(num_warps=NUM_WARPS, num_stages=_num_stages(torch_dtype), scalars=SCALARS)
                yield label, _chunk_kernel, ptrs, const | flags, opts
    ptrs = dict(dS="fp32", gsum="fp32", h0="fp32", hin="fp32", ht="fp32")
    const = dict(H=16, K=128, V=128, BLOCK=SCAN_BLOCK, HAS_G=True, HAS_H0=True, REVERSE=False)
    for per_key in (False, True):  # GLA's segments take a log-decay per key
        yield (
            f"segment scan per_key={per_key}",
            segment_scan_kernel,
            ptrs,
            const | dict(PER_KEY=per_key),
            dict(scalars=dict(NS="i32")),
        )
