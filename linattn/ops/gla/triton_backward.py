"""GLA's per-chunk backward kernels; ``triton.py`` launches them. The decay factors are those of triton_kernels.py.

dv and dqkg read, per chunk, the state S entering it and the gradient dS of the state leaving it ([NC, H, K, V]
float32, from _state_kernel), and from _intra_kernel the log-decay pair hi, lo (dqkg), or the scores A and
kd = k exp(b_C - b) (dv). dqkg reads dA = scale (dO V^T) masked to s <= t from _dA_kernel, and:

    dv = scale A^T dO + kd dS
    dq = scale exp(b) (dO S^T) + intra(dA, k)          dk = exp(b_C - b) (V dS^T) + intra^T(dA, q)

and dg, chunk by chunk, as the reverse cumulative sum over the chunk of the gradient with respect to b:

    db_t = q_t dq_t - k_t dk_t   (every gated term; the plain s = t pair has none)
    db_C += sum_s k_s dk_s^state + exp(b_C) sum_v S dS        (b_C also carries the state on)

summed in float32. The state's share through the keys is summed forward (below), not added at the last row and
taken off row by row, so nothing cancels. Sums in float64 took GLA fwd+bwd 10.25 ms against 9.94 in float32 (H200,
session 11, one call, bf16, T = 4096, B = 16, dqkg key blocks of 32), and the GLA tests pass with float32 on the
card and in the interpreter (extreme gates included).
"""

from __future__ import annotations

import triton
import triton.language as tl

from linattn.ops.common.triton_utils import chunk_and_block, chunk_bounds, dot_operand, exp32
from linattn.ops.gla.triton_kernels import _bridge, _from_middle, _sub_chunk_factors


@triton.jit
def _sum_before(s_a, e_a, s_b, e_b):
    """Combine of a scan over pairs (sum, sum of all but the last), from (x_t, 0): the second is the
    exclusive prefix sum, formed by additions only."""
    return s_a + s_b, s_a + e_b


@triton.jit
def _dv_kernel(
    kd,
    do,
    A,
    chunks,
    dstates,
    dv,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
):
    # Per chunk, head and V block: dv = scale A^T dO + kd dS, with kd = k exp(b_C - b) from _intra_kernel.
    LOWP_TY: tl.constexpr = do.dtype.element_ty
    i_c, i_v = chunk_and_block((V + BV - 1) // BV)
    i_h = tl.program_id(1)
    t_lo, t_hi = chunk_bounds(chunks, i_c)
    if t_hi <= t_lo:
        return
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = t_lo + o_t < t_hi
    row0 = t_lo * H + i_h  # the chunk's first token and head; tiles take int32 offsets from it
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    t_v = o_t[:, None] * (H * V) + o_v[None, :]
    b_A = tl.load(A + row0 * BT + o_t[:, None] * (H * BT) + o_t[None, :], mask=m_t[:, None], other=0.0)
    b_do = dot_operand(tl.load(do + row0 * V + t_v, mask=m_tv, other=0.0), ROUND, LOWP, LOWP_TY)
    b_dv = tl.dot(tl.trans(dot_operand(b_A, ROUND, LOWP, LOWP_TY)), b_do, input_precision=DOT_PREC)
    b_dv *= scale
    state = (i_c * H + i_h).to(tl.int64) * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        t_k = o_t[:, None] * (H * K) + o_k[None, :]
        b_kd = dot_operand(
            tl.load(kd + row0 * K + t_k, mask=m_t[:, None] & m_k[None, :], other=0.0), ROUND, LOWP, LOWP_TY
        )
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        dS = tl.load(dstates + state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
        b_dv += tl.dot(b_kd, dot_operand(dS, ROUND, LOWP, LOWP_TY), input_precision=DOT_PREC)
    tl.store(dv + row0 * V + t_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def _dA_kernel(
    v,
    do,
    chunks,
    dA,
    scale,
    H: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
):
    # Per chunk and head: dA = scale dO V^T [BT, BT] masked to s <= t, into dA [.., T, H, BT] float32 (once,
    # for every key block of _dqkg_kernel).
    LOWP_TY: tl.constexpr = do.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t_lo, t_hi = chunk_bounds(chunks, i_c)
    if t_hi <= t_lo:
        return
    o_t = tl.arange(0, BT)
    m_t = t_lo + o_t < t_hi
    row0 = t_lo * H + i_h  # the chunk's first token and head; tiles take int32 offsets from it
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        t_v = o_t[:, None] * (H * V) + o_v[None, :]
        b_do = dot_operand(tl.load(do + row0 * V + t_v, mask=m_tv, other=0.0), ROUND, LOWP, LOWP_TY)
        b_v = dot_operand(tl.load(v + row0 * V + t_v, mask=m_tv, other=0.0), ROUND, LOWP, LOWP_TY)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], scale * b_dA, 0.0)
    tl.store(dA + row0 * BT + o_t[:, None] * (H * BT) + o_t[None, :], b_dA, mask=m_t[:, None])


@triton.jit
def _state_products(do, v, states, dstates, state, o_t, m_t, o_k, m_k, H: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
                    ROUND: tl.constexpr):  # fmt: skip
    """What needs the whole value dim, for one chunk's key block: dO S^T, V dS^T [BT, BK] and sum_v S dS [BK],
    with do and v offset to the chunk's first row and head, and ``state`` the chunk's offset in states."""
    LOWP_TY: tl.constexpr = do.dtype.element_ty
    d_qs = tl.zeros([BT, BK], dtype=tl.float32)
    d_ks = tl.zeros([BT, BK], dtype=tl.float32)
    d_c = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_kv = m_k[:, None] & (o_v < V)[None, :]
        t_v = o_t[:, None] * (H * V) + o_v[None, :]
        b_do = dot_operand(tl.load(do + t_v, mask=m_tv, other=0.0), ROUND, LOWP, LOWP_TY)
        b_v = dot_operand(tl.load(v + t_v, mask=m_tv, other=0.0), ROUND, LOWP, LOWP_TY)
        S = tl.load(states + state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
        dS = tl.load(dstates + state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
        d_qs += tl.dot(b_do, tl.trans(dot_operand(S, ROUND, LOWP, LOWP_TY)), input_precision=DOT_PREC)
        d_ks += tl.dot(b_v, tl.trans(dot_operand(dS, ROUND, LOWP, LOWP_TY)), input_precision=DOT_PREC)
        d_c += tl.sum(S.to(tl.float32) * dS.to(tl.float32), 1)  # float32 even where they are stored in bfloat16
    return d_qs, d_ks, d_c


@triton.jit
def _dqk_state_kernel(
    v,
    do,
    chunks,
    states,
    dstates,
    dqs,
    dks,
    dc,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
):
    # Per chunk, head and key block (wider than _dqkg_kernel's): _state_products, stored for _dqkg_kernel
    # (STATE_GIVEN) as dqs = dO S^T and dks = V dS^T [.., T, H, K] and dc = sum_v S dS [NC, H, K], float32.
    i_c, i_k = chunk_and_block((K + BK - 1) // BK)
    i_h = tl.program_id(1)
    t_lo, t_hi = chunk_bounds(chunks, i_c)
    if t_hi <= t_lo:
        return
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = t_lo + o_t < t_hi
    m_k = o_k < K
    row0 = t_lo * H + i_h
    state = (i_c * H + i_h).to(tl.int64) * K * V
    d_qs, d_ks, d_c = _state_products(
        do + row0 * V, v + row0 * V, states, dstates, state, o_t, m_t, o_k, m_k,
        H, V, BT, BK, BV, LOWP, DOT_PREC, ROUND,
    )  # fmt: skip
    ptr = row0 * K + o_t[:, None] * (H * K) + o_k[None, :]
    tl.store(dqs + ptr, d_qs, mask=m_t[:, None] & m_k[None, :])
    tl.store(dks + ptr, d_ks, mask=m_t[:, None] & m_k[None, :])
    tl.store(dc + (i_c * H + i_h) * K + o_k, d_c, mask=m_k)


@triton.jit
def _dqkg_kernel(
    q,
    k,
    v,
    do,
    hi,
    lo,
    dA,
    chunks,
    states,
    dstates,
    dqs,
    dks,
    dc,
    dq,
    dk,
    dg,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    J_STAGES: tl.constexpr,
    J_UNROLL: tl.constexpr,
    STATE_GIVEN: tl.constexpr,
    REBASE_LIMIT: tl.constexpr,
    CHUNK_LIMIT: tl.constexpr,
):
    # Per chunk, head and key block: dq, dk and dg (every term is per key channel, given dA).
    # J_STAGES, J_UNROLL: software-pipelining stages and unrolling of the loop over rows j inside sub-chunks,
    # whose small loads (rows of k, q, hi, lo, dA) would otherwise each wait for memory.
    NS: tl.constexpr = BT // BC
    i_c, i_k = chunk_and_block((K + BK - 1) // BK)
    i_h = tl.program_id(1)
    t_lo, t_hi = chunk_bounds(chunks, i_c)
    if t_hi <= t_lo:
        return
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = t_lo + o_t < t_hi
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    row0 = t_lo * H + i_h  # the chunk's first token and head; tiles take int32 offsets from it
    q, k, hi, lo, dA = q + row0 * K, k + row0 * K, hi + row0 * K, lo + row0 * K, dA + row0 * BT
    dq, dk, dg = dq + row0 * K, dk + row0 * K, dg + row0 * K
    v, do = v + row0 * V, do + row0 * V
    ptr = o_t[:, None] * (H * K) + o_k[None, :]
    is_last = o_t == t_hi - t_lo - 1
    last = (t_hi - t_lo - 1) * (H * K)

    # What needs the whole value dim: the state terms dO S^T, V dS^T, sum_v S dS (STATE_GIVEN: from
    # _dqk_state_kernel, which forms them for wider key blocks, so that dO and V are read fewer times).
    if STATE_GIVEN:
        d_qs = tl.load(dqs + row0 * K + ptr, mask=m_tk, other=0.0)
        d_ks = tl.load(dks + row0 * K + ptr, mask=m_tk, other=0.0)
        d_c = tl.load(dc + (i_c * H + i_h) * K + o_k, mask=m_k, other=0.0)
    else:
        state = (i_c * H + i_h).to(tl.int64) * K * V
        d_qs, d_ks, d_c = _state_products(
            do, v, states, dstates, state, o_t, m_t, o_k, m_k, H, V, BT, BK, BV, LOWP, DOT_PREC, ROUND
        )
    b_dA = tl.load(dA + o_t[:, None] * (H * BT) + o_t[None, :], mask=m_t[:, None], other=0.0)

    b_q = tl.load(q + ptr, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + ptr, mask=m_tk, other=0.0).to(tl.float32)
    c_hi = tl.load(hi + last + o_k, mask=m_k, other=0.0)
    c_lo = tl.load(lo + last + o_k, mask=m_k, other=0.0)
    # Rows past the chunk's end hold b_C, as the intra kernel's sums (of zero gates there) did.
    b_hi = tl.where(m_t[:, None], tl.load(hi + ptr, mask=m_tk, other=0.0), c_hi[None, :])
    b_lo = tl.where(m_t[:, None], tl.load(lo + ptr, mask=m_tk, other=0.0), c_lo[None, :])
    b_dq = scale * d_qs * exp32(b_hi, PRECISE_EXP)  # the gated terms of dq
    dk_state = d_ks * exp32((c_hi[None, :] - b_hi) + (c_lo[None, :] - b_lo), PRECISE_EXP)

    # The whole chunk at once where every |b - m| of this program's tile is at most CHUNK_LIMIT (m: the middle of
    # each column's range, as in _intra_kernel): dq_t += exp(b_t - m) sum_s dA_ts k_s exp(m - b_s) and
    # dk_s += exp(m - b_s) sum_t dA_ts q_t exp(b_t - m), over s < t. Elsewhere between and inside sub-chunks.
    d_w = _from_middle(b_hi, b_lo, m_tk)
    if tl.max(tl.abs(d_w)) <= CHUNK_LIMIT:
        dA_w = dot_operand(tl.where(o_t[:, None] > o_t[None, :], b_dA, 0.0), ROUND, False, tl.float32)
        w_in = exp32(d_w, PRECISE_EXP)  # exp(b - m)
        w_out = exp32(-d_w, PRECISE_EXP)  # exp(m - b)
        k_w = dot_operand(b_k * w_out, ROUND, False, tl.float32)
        q_w = dot_operand(b_q * w_in, ROUND, False, tl.float32)
        b_dq += w_in * tl.dot(dA_w, k_w, input_precision=DOT_PREC)
        dk_in = w_out * tl.dot(tl.trans(dA_w), q_w, input_precision=DOT_PREC)
    else:
        # Between sub-chunks, with the forward's factors (triton_kernels.py).
        w_row, w_src, e_hi, e_lo, d_row = _sub_chunk_factors(b_hi, b_lo, BT, BC, BK, PRECISE_EXP)
        b_qr = dot_operand(b_q * w_row, ROUND, False, tl.float32)
        b_ks = b_k * w_src
        sub = o_t // BC
        dq_x = tl.zeros([BT, BK], dtype=tl.float32)
        dk_x = tl.zeros([BT, BK], dtype=tl.float32)
        for i in tl.static_range(1, NS):
            bridge = _bridge(e_hi, e_lo, i, BT, BC, BK, PRECISE_EXP)
            dA_i = dot_operand(tl.where((sub == i)[:, None], b_dA, 0.0), ROUND, False, tl.float32)
            k_i = dot_operand(b_ks * bridge, ROUND, False, tl.float32)
            dq_x += tl.dot(dA_i, k_i, input_precision=DOT_PREC)
            dk_x += bridge * tl.dot(tl.trans(dA_i), b_qr, input_precision=DOT_PREC)
        b_dq += w_row * dq_x
        dk_in = w_src * dk_x  # the gated in-chunk terms of dk

        # Inside sub-chunks. Where |b - rho| <= REBASE_LIMIT over this program's rows (rho: each sub-chunk's
        # start, d_row = b - rho), as products rebased on rho, whose factors then stay within
        # exp(+-REBASE_LIMIT): dq_t += exp(b_t - rho) sum_s dA_ts k_s exp(rho - b_s) and
        # dk_s += exp(rho - b_s) sum_t dA_ts q_t exp(b_t - rho), over s < t of one sub-chunk.
        d = tl.where(m_tk, d_row, 0.0)
        if tl.max(tl.abs(d)) <= REBASE_LIMIT:
            same = (sub[:, None] == sub[None, :]) & (o_t[:, None] > o_t[None, :])
            dA_d = dot_operand(tl.where(same, b_dA, 0.0), ROUND, False, tl.float32)
            w_in = exp32(-d, PRECISE_EXP)  # exp(rho - b)
            k_r = dot_operand(b_k * w_in, ROUND, False, tl.float32)
            b_dq += w_row * tl.dot(dA_d, k_r, input_precision=DOT_PREC)
            dk_in += w_in * tl.dot(tl.trans(dA_d), b_qr, input_precision=DOT_PREC)
        else:
            # Inside sub-chunks, exactly, row j of every sub-chunk (from memory) against that sub-chunk's rows:
            # as the source of rows t > j (dq_t += dA_tj exp(b_t - b_j) k_j) and as the target of rows s < j
            # (dk_s += dA_js exp(b_j - b_s) q_j); no sums across rows, so no reductions.
            hi3 = tl.reshape(b_hi, [NS, BC, BK])
            lo3 = tl.reshape(b_lo, [NS, BC, BK])
            o_n = tl.arange(0, NS)
            n_in = t_hi - t_lo
            dq3 = tl.zeros([NS, BC, BK], dtype=tl.float32)
            dk3 = tl.zeros([NS, BC, BK], dtype=tl.float32)
            for j in tl.range(0, BC, num_stages=J_STAGES, loop_unroll_factor=J_UNROLL):
                r_j = o_n * BC + j  # [NS]: row j of each sub-chunk
                m_j = r_j < n_in
                t_j = r_j[:, None] * (H * K) + o_k[None, :]
                m_jk = m_j[:, None] & m_k[None, :]
                k_j = tl.load(k + t_j, mask=m_jk, other=0.0).to(tl.float32)  # [NS, BK]
                q_j = tl.load(q + t_j, mask=m_jk, other=0.0).to(tl.float32)
                hi_j = tl.load(hi + t_j, mask=m_jk, other=0.0)
                lo_j = tl.load(lo + t_j, mask=m_jk, other=0.0)
                rows = (o_n * BC)[:, None] + o_c[None, :]  # [NS, BC]: the row of each (sub-chunk, position)
                m_rows = m_j[:, None] & (rows < n_in)
                dA_col = tl.load(dA + rows * (H * BT) + r_j[:, None], mask=m_rows, other=0.0)  # dA[t, j]
                dA_row = tl.load(dA + r_j[:, None] * (H * BT) + rows, mask=m_rows, other=0.0)  # dA[j, s]
                diff = (hi3 - hi_j[:, None, :]) + (lo3 - lo_j[:, None, :])  # b_t - b_j: <= 0 for t > j
                after = m_j[:, None, None] & (o_c > j)[None, :, None]
                before = m_j[:, None, None] & (o_c < j)[None, :, None]
                w_after = exp32(tl.where(after, diff, float("-inf")), PRECISE_EXP)
                w_before = exp32(tl.where(before, -diff, float("-inf")), PRECISE_EXP)
                dq3 += dA_col[:, :, None] * k_j[:, None, :] * w_after
                dk3 += dA_row[:, :, None] * q_j[:, None, :] * w_before
            b_dq += tl.reshape(dq3, [BT, BK])
            dk_in += tl.reshape(dk3, [BT, BK])

    # dg: the reverse cumulative sum of db within the chunk (see the module docstring). The state's share
    # through the keys, sum_{s >= t} -x_s + sum_s x_s, is the forward sum of x before t: summed so, not
    # cancelled, since x at the chunk's last row is O(1) even where the sum before it is e^-30.
    x = b_k * dk_state
    db = b_q * b_dq - b_k * dk_in
    db += tl.where(is_last[:, None], (exp32(c_hi, PRECISE_EXP) * d_c)[None, :], 0.0)
    _, before = tl.associative_scan((x, tl.zeros_like(x)), 0, _sum_before)
    b_dg = tl.cumsum(db, axis=0, reverse=True) + tl.where(m_t[:, None], before, 0.0)
    tl.store(dg + ptr, b_dg, mask=m_tk)

    own = tl.sum(tl.where(o_t[:, None] == o_t[None, :], b_dA, 0.0), 1)  # s = t: q_t . k_t, no decay
    b_dq += own[:, None] * b_k
    b_dk = dk_in + dk_state + own[:, None] * b_q
    tl.store(dq + ptr, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + ptr, b_dk.to(dk.dtype.element_ty), mask=m_tk)
