"""GLA's forward Triton kernels and the in-chunk decay factors that the backward kernels share.

Chunks of BT = 64 tokens, cut into NS sub-chunks of BC = 16. b is the chunk-local cumulative log-decay
(per key channel), b_C its value at the chunk's last token, rho_i its value just before sub-chunk i
(0 for i = 0), and e_i its value at sub-chunk i's last token. Every exponent is a sum of gates, <= 0:

* rows t of sub-chunk i against sources s of an earlier sub-chunk j: exp(b_t - b_s) =
  exp(b_t - rho_i) exp(e_j - b_s) exp(rho_i - e_j), three factors <= 1, the last one a [NS, K] bridge;
  so the pair of sub-chunks is one tl.dot of q exp(b - rho) and k exp(e - b) exp(rho_i - e_j);
* pairs inside a sub-chunk: exactly, in _diag_kernel, one source row s at a time (loaded on its own)
  against the rows t > s of its sub-chunk, and the plain q_t . k_t for s = t (no decay: that keeps dg from
  cancelling its own terms);
* the state: exp(b) for rows reading it, exp(b_C - b) for keys writing it, exp(b_C) for carrying it on.

b is summed in float64 once per chunk (_intra_kernel) and kept as a float32 pair hi + lo: hi_t - hi_s
is exact or carries only its own rounding, so (hi_t - hi_s) + (lo_t - lo_s) keeps a gate of -1e-7
next to gates of -1e4. The other kernels read hi and lo, [.., T, H, K] float32 each.

Nothing loops over single rows held in registers: where one row s meets every row t (inside a sub-chunk)
the kernels load row s from memory, as a masked sum over a register tile to pick it out would cost a
reduction across threads per row (the first version did so, and spent 16 ms per launch there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from linattn.ops.common.triton_segments import scan_order
from linattn.ops.common.triton_utils import (
    chunk_bounds,
    chunk_log_decay,
    dot_operand,
    exp32,
    load_gates,
    sequence_bounds,
)


@triton.jit
def _sub_chunk_factors(b_hi, b_lo, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """From the chunk's log-decay pair [BT, BK]: exp(b - rho) [BT, BK] (rows against their sub-chunk's start),
    exp(e - b) [BT, BK] (sources to their sub-chunk's end), the pair e [NS, BK] of sub-chunk ends, and b - rho
    [BT, BK] itself (for the rebased products inside sub-chunks)."""
    NS: tl.constexpr = BT // BC
    o_c = tl.arange(0, BC)
    o_n = tl.arange(0, NS)
    hi3 = tl.reshape(b_hi, [NS, BC, BK])
    lo3 = tl.reshape(b_lo, [NS, BC, BK])
    at_end = (o_c == BC - 1)[None, :, None]
    e_hi = tl.sum(tl.where(at_end, hi3, 0.0), 1)  # [NS, BK]
    e_lo = tl.sum(tl.where(at_end, lo3, 0.0), 1)
    prev = (o_n[:, None] - 1) == o_n[None, :]  # [NS, NS]: sub-chunk j ends just before sub-chunk i
    r_hi = tl.sum(tl.where(prev[:, :, None], e_hi[None, :, :], 0.0), 1)  # [NS, BK], 0 for i = 0
    r_lo = tl.sum(tl.where(prev[:, :, None], e_lo[None, :, :], 0.0), 1)
    d_row = (hi3 - r_hi[:, None, :]) + (lo3 - r_lo[:, None, :])
    w_row = exp32(d_row, PRECISE_EXP)
    w_src = exp32((e_hi[:, None, :] - hi3) + (e_lo[:, None, :] - lo3), PRECISE_EXP)
    return tl.reshape(w_row, [BT, BK]), tl.reshape(w_src, [BT, BK]), e_hi, e_lo, tl.reshape(d_row, [BT, BK])


@triton.jit
def _bridge(e_hi, e_lo, i, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """[BT, BK]: exp(rho_i - e_j) on the rows of every sub-chunk j < i (rho_i = e_{i-1}), 0 on the others."""
    NS: tl.constexpr = BT // BC
    o_n = tl.arange(0, NS)
    sel = (o_n == i - 1)[:, None]
    r_hi = tl.sum(tl.where(sel, e_hi, 0.0), 0)
    r_lo = tl.sum(tl.where(sel, e_lo, 0.0), 0)
    diff = (r_hi[None, :] - e_hi) + (r_lo[None, :] - e_lo)
    f = exp32(tl.where((o_n < i)[:, None], diff, float("-inf")), PRECISE_EXP)  # [NS, BK]
    return tl.reshape(tl.broadcast_to(f[:, None, :], [NS, BC, BK]), [BT, BK])


@triton.jit
def _from_middle(b_hi, b_lo, m_tk):
    """b - m [BT, BK] on the rows and columns of m_tk (0 elsewhere), m the middle of each column's range of b
    (the log-decay pair b_hi + b_lo) over those rows: |b - m| is at most half the range."""
    b = b_hi + b_lo
    top = tl.max(tl.where(m_tk, b, float("-inf")), 0)
    bottom = tl.min(tl.where(m_tk, b, float("inf")), 0)
    some = top >= bottom  # a column without rows (past K) takes m = 0, with no inf - inf on the way
    m = 0.5 * tl.where(some, top, 0.0) + 0.5 * tl.where(some, bottom, 0.0)
    return tl.where(m_tk, (b_hi - m[None, :]) + b_lo, 0.0)


@triton.jit
def _intra_kernel(
    q,
    k,
    g,
    chunks,
    hi,
    lo,
    A,
    qg,
    kd,
    bc,
    whole,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    STORE_A: tl.constexpr,
    STORE_DECAY: tl.constexpr,
    CHUNK_LIMIT: tl.constexpr,
):
    # Per chunk and head: the scores A [.., T, H, BT] between sub-chunks, A_ts = sum_k q_tk k_sk exp(b_tk - b_sk)
    # for s in an earlier sub-chunk than t, 0 elsewhere (_diag_kernel then writes the diagonal blocks); the
    # operands of the state kernels qg = q exp(b) and kd = k exp(b_C - b) [.., T, H, K] (A, qg, kd in their
    # pointers' dtype: that of the dots that take them); b_C into bc [NC, H, K] float32; and the log-decay
    # pair hi, lo [.., T, H, K] float32 with STORE_DECAY (the backward; diag sums its own). Without STORE_A (the
    # backward, given the forward's A) no scores.
    # Where every key channel's log-decays b over the chunk span at most 2 CHUNK_LIMIT (a first pass bounds the
    # span by sum_t |g_t|), A is the whole chunk's scores at once, one product per key block rebased on the middle
    # m of each channel's span: (q exp(b - m)) (k exp(m - b))^T, below the diagonal, whose factors stay within
    # exp(+-CHUNK_LIMIT); and q_t . k_t on it. whole [NC, H] (int8) then says so, and _diag_kernel leaves the
    # chunk alone. Elsewhere the sub-chunk form: the scores between sub-chunks here, diag's inside them.
    NS: tl.constexpr = BT // BC
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t_lo, t_hi = chunk_bounds(chunks, i_c)
    if t_hi <= t_lo:  # past the last chunk (varlen allots a bound on the count)
        return
    o_t = tl.arange(0, BT)
    m_t = t_lo + o_t < t_hi
    row0 = t_lo * H + i_h  # the chunk's first token and head; tiles take int32 offsets from it
    q, k, g, hi, lo = q + row0 * K, k + row0 * K, g + row0 * K, hi + row0 * K, lo + row0 * K
    qg, kd = qg + row0 * K, kd + row0 * K
    is_last = (o_t == t_hi - t_lo - 1)[:, None]
    sub = o_t // BC

    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    own = tl.zeros([BT], dtype=tl.float32)  # q_t . k_t
    is_whole = False
    if STORE_A:
        span = 0.0  # the largest sum_t |g_t| of a key channel over the chunk
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            # (unfloored: -inf only makes the span infinite, which takes the sub-chunk form, as -1e4 does)
            g_abs = tl.abs(tl.load(g + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32))
            span = tl.maximum(span, tl.max(tl.sum(g_abs, 0)))
        is_whole = span <= 2.0 * CHUNK_LIMIT
        tl.store(whole + i_c * H + i_h, is_whole.to(tl.int8))
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        ptr = o_t[:, None] * (H * K) + o_k[None, :]
        _, b_hi, b_lo, _ = chunk_log_decay(load_gates(g + ptr, m_tk))
        if STORE_DECAY:
            tl.store(hi + ptr, b_hi, mask=m_tk)
            tl.store(lo + ptr, b_lo, mask=m_tk)
        b_q = tl.load(q + ptr, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + ptr, mask=m_tk, other=0.0).to(tl.float32)
        c_hi = tl.sum(tl.where(is_last, b_hi, 0.0), 0)
        c_lo = tl.sum(tl.where(is_last, b_lo, 0.0), 0)
        tl.store(bc + (i_c * H + i_h).to(tl.int64) * K + o_k, c_hi, mask=o_k < K)
        tl.store(qg + ptr, (b_q * exp32(b_hi, PRECISE_EXP)).to(qg.dtype.element_ty), mask=m_tk)
        w_end = exp32((c_hi[None, :] - b_hi) + (c_lo[None, :] - b_lo), PRECISE_EXP)
        tl.store(kd + ptr, (b_k * w_end).to(kd.dtype.element_ty), mask=m_tk)

        if STORE_A:
            if is_whole:
                d = _from_middle(b_hi, b_lo, m_tk)
                q_w = dot_operand(b_q * exp32(d, PRECISE_EXP), ROUND, False, tl.float32)
                k_w = dot_operand(b_k * exp32(-d, PRECISE_EXP), ROUND, False, tl.float32)
                b_A += tl.dot(q_w, tl.trans(k_w), input_precision=DOT_PREC)
                own += tl.sum(b_q * b_k, 1)
            else:
                # not `_`: the compiler types a name across both branches, and `_` holds a float64 sum above
                w_row, w_src, e_hi, e_lo, _rel = _sub_chunk_factors(b_hi, b_lo, BT, BC, BK, PRECISE_EXP)
                b_qr = b_q * w_row
                b_ks = b_k * w_src
                for i in tl.static_range(1, NS):
                    q_i = dot_operand(tl.where((sub == i)[:, None], b_qr, 0.0), ROUND, False, tl.float32)
                    k_i = _bridge(e_hi, e_lo, i, BT, BC, BK, PRECISE_EXP)
                    k_i = dot_operand(b_ks * k_i, ROUND, False, tl.float32)
                    b_A += tl.dot(q_i, tl.trans(k_i), input_precision=DOT_PREC)
    if STORE_A:
        if is_whole:  # strictly below the diagonal (above it the factors may overflow), q_t . k_t on it
            below = o_t[:, None] > o_t[None, :]
            b_A = tl.where(below, b_A, tl.where(o_t[:, None] == o_t[None, :], own[:, None], 0.0))
        A_ptr = A + row0 * BT + o_t[:, None] * (H * BT) + o_t[None, :]
        tl.store(A_ptr, b_A.to(A.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _diag_kernel(
    q,
    k,
    g,
    chunks,
    A,
    whole,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    J_STAGES: tl.constexpr,
    J_UNROLL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    REBASE_LIMIT: tl.constexpr,
):
    # Per chunk, sub-chunk and head: the diagonal [BC, BC] block of the scores A (after _intra_kernel, which
    # leaves it 0): A_ts = sum_k q_tk k_sk exp(b_tk - b_sk) for s < t, q_t . k_t for s = t (no decay), 0 for
    # s > t. Per key block, where |b_t - b_0| <= REBASE_LIMIT over the sub-chunk (b_0: its first row), as one
    # product rebased on row 0, (q exp(b - b_0)) (k exp(b_0 - b))^T, whose factors then stay within
    # exp(+-REBASE_LIMIT), finite and normal in float32; elsewhere (strong decays) exactly, source row s from
    # memory, one at a time, against the sub-chunk's rows (J_STAGES, J_UNROLL: pipelining and unrolling of
    # that loop, as in _dqkg_kernel). b_t - b_s inside one sub-chunk is a sum of its own gates: from their
    # float64 cumulative sum c (rows t) and the same sum run row by row (source s), so that nothing of the
    # chunk's earlier gates, nor hi and lo, is needed (the forward does not store them). Chunks that
    # _intra_kernel formed whole (``whole``) are left as they are.
    i_c, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_lo, t_hi = chunk_bounds(chunks, i_c)
    s_lo = t_lo + i_s * BC
    if s_lo >= t_hi:  # past the chunk's end (or past the last chunk)
        return
    if tl.load(whole + i_c * H + i_h) != 0:
        return
    n_src = tl.minimum(t_hi - s_lo, BC)
    o_c = tl.arange(0, BC)
    m_c = o_c < n_src
    row0 = s_lo * H + i_h  # the sub-chunk's first token and head; tiles take int32 offsets from it
    q, k, g = q + row0 * K, k + row0 * K, g + row0 * K
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_ck = m_c[:, None] & m_k[None, :]
        ptr = o_c[:, None] * (H * K) + o_k[None, :]
        b_q = tl.load(q + ptr, mask=m_ck, other=0.0).to(tl.float32)
        c = tl.cumsum(load_gates(g + ptr, m_ck).to(tl.float64), axis=0)  # [BC, BK]
        c_0 = load_gates(g + o_k, m_k).to(tl.float64)  # row 0's sum: its own gate
        d = tl.where(m_ck, (c - c_0[None, :]).to(tl.float32), 0.0)  # b_t - b_0
        if tl.max(tl.abs(d)) <= REBASE_LIMIT:
            b_k = tl.load(k + ptr, mask=m_ck, other=0.0).to(tl.float32)
            q_r = dot_operand(b_q * exp32(d, PRECISE_EXP), ROUND, False, tl.float32)
            k_r = dot_operand(b_k * exp32(-d, PRECISE_EXP), ROUND, False, tl.float32)
            scores = tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PREC)
            own = tl.sum(b_q * b_k, 1)  # s = t: q_t . k_t, exactly
            diagonal = o_c[:, None] == o_c[None, :]
            b_A += tl.where(o_c[:, None] > o_c[None, :], scores, tl.where(diagonal, own[:, None], 0.0))
        else:
            c_j = tl.zeros([BK], dtype=tl.float64)
            for j in tl.range(0, n_src, num_stages=J_STAGES, loop_unroll_factor=J_UNROLL):
                k_j = tl.load(k + j * (H * K) + o_k, mask=m_k, other=0.0).to(tl.float32)
                c_j += load_gates(g + j * (H * K) + o_k, m_k).to(tl.float64)
                diff = (c - c_j[None, :]).to(tl.float32)
                # exponent b_t - b_s <= 0 for rows t > s, 0 (no decay) for t = s, -inf above and past the end
                after = (o_c > j) & m_c
                diff = tl.where(after[:, None], diff, tl.where((o_c == j)[:, None], 0.0, float("-inf")))
                col = tl.sum(b_q * k_j[None, :] * exp32(diff, PRECISE_EXP), 1)  # [BC]: A[t, s = j]
                b_A += tl.where(o_c[None, :] == j, col[:, None], 0.0)
    t_a = o_c[:, None] * (H * BT) + i_s * BC + o_c[None, :]
    tl.store(A + row0 * BT + t_a, b_A.to(A.dtype.element_ty), mask=m_c[:, None])


@triton.jit
def _state_kernel(
    x,
    y,
    bc,
    qg,
    A,
    h0,
    cu_seqlens,
    chunk_start,
    o,
    states,
    ht,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_O: tl.constexpr,
    STORE_STATES: tl.constexpr,
    STORE_HT: tl.constexpr,
    LOWP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    # One sequence, one [BK, BV] block of the state, chunk after chunk; rows (keys) decay independently.
    # x, qg [.., T, H, K] and A [.., T, H, BT] come from _intra_kernel, bc [NC, H, K] is b_C.
    #   forward (x = kd, y = v):  S <- exp(b_C) S + x^T y, from h0; with STORE_O (BK >= K) also
    #                             o = scale (qg S + A v)
    #   reverse (x = qg, y = dO): dS <- exp(b_C) dS + scale x^T y, from dht, chunks in reverse
    # STORE_STATES: the state before each chunk's update (entering it forward, the gradient of the state
    # leaving it in reverse) into states [NC, H, K, V], in its dtype (bfloat16 with STATES_LOWP; the carried S stays
    # float32); STORE_HT: the last one into ht [N, H, K, V].
    LOWP_TY: tl.constexpr = y.dtype.element_ty
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, 0, True)  # cu_seqlens: the ChunkTable's, always given
    c0 = tl.load(chunk_start + i_n).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    t_k = o_t[:, None] * (H * K) + o_k[None, :]
    t_v = o_t[:, None] * (H * V) + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + kv, mask=m_kv, other=0.0)
    for j in range(0, n_chunks):
        i = scan_order(j, n_chunks, REVERSE)
        if STORE_STATES:
            tl.store(states + ((c0 + i) * H + i_h) * K * V + kv, S.to(states.dtype.element_ty), mask=m_kv)
        t0 = bos + i * BT
        row0 = t0 * H + i_h  # the chunk's first token and head; tiles take int32 offsets from it
        m_t = t0 + o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        w_c = exp32(tl.load(bc + ((c0 + i) * H + i_h) * K + o_k, mask=m_k, other=0.0), PRECISE_EXP)
        b_x = dot_operand(tl.load(x + row0 * K + t_k, mask=m_tk, other=0.0), ROUND, LOWP, LOWP_TY)
        b_y = dot_operand(tl.load(y + row0 * V + t_v, mask=m_tv, other=0.0), ROUND, LOWP, LOWP_TY)
        if STORE_O:
            b_q = dot_operand(tl.load(qg + row0 * K + t_k, mask=m_tk, other=0.0), ROUND, LOWP, LOWP_TY)
            t_a = o_t[:, None] * (H * BT) + o_t[None, :]
            b_A = dot_operand(tl.load(A + row0 * BT + t_a, mask=m_t[:, None], other=0.0), ROUND, LOWP, LOWP_TY)
            b_o = tl.dot(b_q, dot_operand(S, ROUND, LOWP, LOWP_TY), input_precision=DOT_PREC)
            b_o += tl.dot(b_A, b_y, input_precision=DOT_PREC)
            tl.store(o + row0 * V + t_v, (scale * b_o).to(o.dtype.element_ty), mask=m_tv)
        U = tl.dot(tl.trans(b_x), b_y, input_precision=DOT_PREC)
        if REVERSE:
            U *= scale
        S = S * w_c[:, None] + U
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + kv, S, mask=m_kv)
