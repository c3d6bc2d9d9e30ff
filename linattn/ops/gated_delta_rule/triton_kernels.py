"""Triton kernels of the gated delta rule; ``triton.py`` launches them. See there for the whole scheme.

Every kernel reads the packed layout: q, k [.., T, H, K], v [.., T, H, V], g, beta [.., T, H], with
token-and-head index tok = token * H + head over the flattened batch, so batches and ``cu_seqlens``
are one case (a batch of B rows is B sequences of T tokens). Per-chunk kernels get each chunk's
token range [lo, hi) from a table; per-sequence kernels walk their sequence's chunks and address
per-chunk states by the sequence's first chunk plus the chunk's rank.
"""

from __future__ import annotations

import triton
import triton.language as tl

from linattn.ops.common.triton_delta_utils import (
    chunk_decays_or_none,
    chunk_decays_summed_or_read,
    inverse_row_norms,
    l2norm_backward,
    load_beta,
    load_rows,
    mm,
    mm_lowp,
    row_sums_in_place,
    row_sums_kept,
    unit_lower_inverse,
)
from linattn.ops.common.triton_segments import scan_order
from linattn.ops.common.triton_utils import chunk_and_block, chunk_bounds, chunk_log_decay, sequence_bounds


@triton.jit
def _prepare_kernel(
    k,
    v,
    g,
    beta,
    chunks,
    w,
    u0,
    tinv,
    rn,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKP: tl.constexpr,
    HAS_G: tl.constexpr,
    L2NORM: tl.constexpr,
    R_IN: tl.constexpr,
    BETA_LOGIT: tl.constexpr,
    SOLVE: tl.constexpr,
    STORE_T: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    LOWP: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    DIAG_DOUBLING: tl.constexpr,
    SOLVE_PREC: tl.constexpr,
    KKT_LOWP: tl.constexpr,
    WU_LOWP: tl.constexpr,
):
    # Per chunk: Tinv = (I + A)^-1 (solved, or loaded as the forward stored it), W = Tinv (beta exp(b) K)
    # [BT, K] (stored in w's dtype), U0 = Tinv (beta V) [BT, V], formed in float32. K is gone through in blocks of
    # BKP columns (k k^T summed over them, W formed block by block), so that no [BT, K] float32 tile is live.
    # SOLVE_PREC: the solve's products (unit_lower_inverse). KKT_LOWP: k k^T from the bfloat16 keys as they are
    # (the same products as tf32's, for keys not normalised here). WU_LOWP: W's and U0's products take bfloat16
    # operands (Tinv rounded to bfloat16), as fla's do. U0 and Tinv are stored in their pointers' dtypes (float32, or
    # bfloat16: PREPARE_LOWP's tinv and u0_backward).
    LOWP_TY: tl.constexpr = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    lo, hi = chunk_bounds(chunks, i_c)
    if hi <= lo:  # past the last chunk (varlen allots a bound on the count)
        return
    o_t = tl.arange(0, BT)
    m_t = lo + o_t < hi
    tok = (lo + o_t) * H + i_h
    r_k = inverse_row_norms(k, tok, m_t, K, BKP, L2NORM, rn + 1, R_IN)
    b_beta = load_beta(beta, tok, m_t, BETA_LOGIT)
    gamma, e_b, _, _ = chunk_decays_or_none(g, tok, m_t, HAS_G, BT, PRECISE_EXP)

    if SOLVE:
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BKP)):
            o_k = i_k * BKP + tl.arange(0, BKP)
            b_k = load_rows(k, tok, m_t, o_k, K, False)[0] * r_k[:, None]
            A += mm_lowp(b_k, tl.trans(b_k), DOT_PREC, ROUND, KKT_LOWP, LOWP_TY)
        A = A * gamma * b_beta[:, None]
        A = tl.where(o_t[:, None] > o_t[None, :], A, 0.0)
        Ti = unit_lower_inverse(A, BT, 16, SOLVE_PREC, DIAG_DOUBLING)
    else:
        Ti = tl.load(tinv + tok[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.0).to(tl.float32)
    for i_k in range(0, tl.cdiv(K, BKP)):
        o_k = i_k * BKP + tl.arange(0, BKP)
        b_k = load_rows(k, tok, m_t, o_k, K, False)[0]
        b_w = mm_lowp(Ti, b_k * (r_k * b_beta * e_b)[:, None], DOT_PREC, ROUND, WU_LOWP, LOWP_TY)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        tl.store(w + tok[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_u = mm_lowp(Ti, b_v * b_beta[:, None], DOT_PREC, ROUND, WU_LOWP, LOWP_TY)
        tl.store(u0 + tok[:, None] * V + o_v[None, :], b_u.to(u0.dtype.element_ty), mask=m_tv)
    if STORE_T:
        tl.store(tinv + tok[:, None] * BT + o_t[None, :], Ti.to(tinv.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _forward_kernel(
    q,
    k,
    g,
    w,
    u0,
    h0,
    cu_seqlens,
    chunk_start,
    o,
    ht,
    states,
    u,
    scale,
    rn,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_U0: tl.constexpr,
    L2NORM: tl.constexpr,
    R_IN: tl.constexpr,
    STORE_O: tl.constexpr,
    STORE_HT: tl.constexpr,
    STORE_STATES: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    LOWP: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    NARROW_DECAYS: tl.constexpr = False,
):
    # One sequence, one V block: the state S [K, BV] stays in registers while the chunks go by.
    #   U = U0 - W S;  o = scale (exp(b) q S + tril(q k^T exp(b_t - b_s)) U);  S = exp(b_C) S + (exp(b_C - b) k)^T U
    # STORE_STATES (for the backward): the state entering each chunk and U, in their pointers' dtype (float32, or
    # bfloat16 with STATES_LOWP: the carried S and U stay float32).
    # Without HAS_U0, U0 = 0: the loop then carries h0's columns through the chunks' transitions alone
    # (S <- exp(b_C) S - (exp(b_C - b) k)^T W S), which, from identity columns, is the transition of the
    # whole sequence (a segment, in triton.py).
    # NARROW_DECAYS: the decays scale U's rows and o's rows rather than the [BT, K] tiles of k and q, so that those
    # go to their products as loaded (see triton.py).
    LOWP_TY: tl.constexpr = k.dtype.element_ty
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, 0, True)  # cu_seqlens: the ChunkTable's, always given
    c0 = tl.load(chunk_start + i_n).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + kv, mask=m_kv, other=0.0)
    for i in range(0, tl.cdiv(eos - bos, BT)):
        if STORE_STATES:
            tl.store(states + ((c0 + i) * H + i_h) * K * V + kv, S.to(states.dtype.element_ty), mask=m_kv)
        rows = bos + i * BT + o_t
        m_t = rows < eos
        tok = rows * H + i_h
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        gamma, e_b, e_end, e_last = chunk_decays_or_none(g, tok, m_t, HAS_G, BT, PRECISE_EXP)
        # each tile loaded just before its product, so that few are live at once
        b_w = tl.load(w + tok[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_u = -mm_lowp(b_w, S, DOT_PREC, ROUND, LOWP, LOWP_TY)
        if HAS_U0:
            b_u += tl.load(u0 + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        if STORE_STATES:
            tl.store(u + tok[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m_tv)
        b_kT, _ = load_rows(k, tok, m_t, o_k, K, L2NORM, True, rn + 1, R_IN)  # k^T [BK, BT]
        if STORE_O:
            b_q, _ = load_rows(q, tok, m_t, o_k, K, L2NORM, False, rn, R_IN)
            P = mm_lowp(b_q, b_kT, DOT_PREC, ROUND, LOWP, LOWP_TY) * gamma
            if NARROW_DECAYS:
                b_o = mm_lowp(b_q, S, DOT_PREC, ROUND, LOWP, LOWP_TY) * e_b[:, None]
            else:
                b_o = mm_lowp(b_q * e_b[:, None], S, DOT_PREC, ROUND, LOWP, LOWP_TY)
            b_o += mm_lowp(P, b_u, DOT_PREC, ROUND, LOWP, LOWP_TY)
            tl.store(o + tok[:, None] * V + o_v[None, :], (scale * b_o).to(o.dtype.element_ty), mask=m_tv)
        if NARROW_DECAYS:
            S = S * e_last + mm_lowp(b_kT, b_u * e_end[:, None], DOT_PREC, ROUND, LOWP, LOWP_TY)
        else:
            S = S * e_last + mm_lowp(b_kT * e_end[None, :], b_u, DOT_PREC, ROUND, LOWP, LOWP_TY)
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + kv, S, mask=m_kv)


@triton.jit
def _output_kernel(
    q,
    k,
    g,
    states,
    u,
    chunks,
    o,
    scores,
    scale,
    rn,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G: tl.constexpr,
    L2NORM: tl.constexpr,
    R_IN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    LOWP: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    NARROW_DECAYS: tl.constexpr = False,
    DECAYS_IN: tl.constexpr = False,
    STORE_SCORES: tl.constexpr = False,
):
    # Per chunk, from the state entering it (S) and U, both stored by _forward_kernel (STORE_STATES):
    # o = scale (exp(b) q S + tril(q k^T exp(b_t - b_s)) U), off the sequential path, every V block in turn
    # with q k^T formed once for them all. DECAYS_IN (with HAS_G): g holds the chunks' log-decay sums per token.
    # STORE_SCORES: P = tril(q k^T exp(b_t - b_s)) (unscaled) stored for the backward transposed, [.., T, H, BT] in
    # scores' dtype with row s holding P's column s, so that _backward_state_kernel reads P^T as rows (SCORES_IN).
    LOWP_TY: tl.constexpr = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    lo, hi = chunk_bounds(chunks, i_c)
    if hi <= lo:  # past the last chunk (varlen allots a bound on the count)
        return
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t = lo + o_t < hi
    tok = (lo + o_t) * H + i_h
    state = (i_c * H + i_h).to(tl.int64) * K * V
    b_q, _ = load_rows(q, tok, m_t, o_k, K, L2NORM, False, rn, R_IN)
    b_kT, _ = load_rows(k, tok, m_t, o_k, K, L2NORM, True, rn + 1, R_IN)
    gamma, e_b, _, _ = chunk_decays_summed_or_read(g, tok, m_t, (hi - 1) * H + i_h, HAS_G, DECAYS_IN, BT, PRECISE_EXP)
    P = mm_lowp(b_q, b_kT, DOT_PREC, ROUND, LOWP, LOWP_TY) * gamma
    if STORE_SCORES:  # P [t, s] at row s, column t
        tl.store(scores + tok[None, :] * BT + o_t[:, None], P.to(scores.dtype.element_ty), mask=m_t[None, :])
    if not NARROW_DECAYS:  # (else exp(b) scales the rows of q S)
        b_qs = b_q * e_b[:, None]
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        kv = o_k[:, None] * V + o_v[None, :]
        # (float32, or bfloat16 where the forward keeps them for the backward in the backward's own dtypes)
        S = tl.load(states + state + kv, mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0).to(tl.float32)
        b_u = tl.load(u + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        if NARROW_DECAYS:
            b_o = mm_lowp(b_q, S, DOT_PREC, ROUND, LOWP, LOWP_TY) * e_b[:, None]
        else:
            b_o = mm_lowp(b_qs, S, DOT_PREC, ROUND, LOWP, LOWP_TY)
        b_o += mm_lowp(P, b_u, DOT_PREC, ROUND, LOWP, LOWP_TY)
        tl.store(o + tok[:, None] * V + o_v[None, :], (scale * b_o).to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _local_du_kernel(
    q,
    k,
    g,
    do,
    chunks,
    du,
    scale,
    rn,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G: tl.constexpr,
    L2NORM: tl.constexpr,
    R_IN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    LOWP: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    DECAYS_IN: tl.constexpr = False,
):
    # Per chunk: du = scale P^T dO (float32, or bfloat16: STATES_LOWP's du in triton.py), the share of dU within the
    # chunk, for _backward_state_kernel to complete with the states' share. DECAYS_IN: as _output_kernel's.
    LOWP_TY: tl.constexpr = k.dtype.element_ty
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    lo, hi = chunk_bounds(chunks, i_c)
    if hi <= lo:  # past the last chunk (varlen allots a bound on the count)
        return
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t = lo + o_t < hi
    tok = (lo + o_t) * H + i_h
    b_k, _ = load_rows(k, tok, m_t, o_k, K, L2NORM, False, rn + 1, R_IN)
    b_qT, _ = load_rows(q, tok, m_t, o_k, K, L2NORM, True, rn, R_IN)
    gamma, _, _, _ = chunk_decays_summed_or_read(g, tok, m_t, (hi - 1) * H + i_h, HAS_G, DECAYS_IN, BT, PRECISE_EXP)
    PT = mm_lowp(b_k, b_qT, DOT_PREC, ROUND, LOWP, LOWP_TY) * tl.trans(gamma)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        if not LOWP:
            b_do = b_do.to(tl.float32)
        b_du = scale * mm_lowp(PT, b_do, DOT_PREC, ROUND, LOWP, LOWP_TY)
        tl.store(du + tok[:, None] * V + o_v[None, :], b_du.to(du.dtype.element_ty), mask=m_tv)


@triton.jit
def _backward_state_kernel(
    q,
    k,
    g,
    w,
    do,
    dht,
    cu_seqlens,
    chunk_start,
    dstates,
    du,
    dx,
    dh0,
    tinv,
    scores,
    scale,
    rn,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    STORE_GRADS: tl.constexpr,
    L2NORM: tl.constexpr,
    R_IN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    LOWP: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    LOCAL_DU: tl.constexpr,
    NARROW_DECAYS: tl.constexpr = False,
    SCORES_IN: tl.constexpr = False,
    SCORES_PIPELINED: tl.constexpr = False,
):
    # The forward's chunk loop run backwards on the state gradient dS [K, BV]; stores the gradient of the
    # state leaving each chunk and dX (below).  dU = scale P^T dO + (exp(b_C - b) k) dS;
    # dS <- exp(b_C) dS + scale (exp(b) q)^T dO - W^T dU.  du holds scale P^T dO on entry (_local_du_kernel,
    # parallel over chunks), so the sequential loop forms neither P nor P^T dO. dx gets dX = Tinv^T dU (in its
    # dtype; dx may be du itself, dX taking dU's place), the one form in which backward_chunk needs it, formed once
    # here as each chunk's dU is final.
    # Without STORE_GRADS nothing is stored but dh0 (a segment's own share of its entering gradient, triton.py).
    # LOCAL_DU: the loop forms scale P^T dO itself (SPLIT_BACKWARD in triton.py), and du is not read (dx may still
    # be du's tensor, then written).
    # SCORES_IN: the loop forms scale P^T dO from the P that _output_kernel stored (STORE_SCORES: P^T's rows at
    # scores), not from q and k, and du is not read (as with LOCAL_DU); SCORES_PIPELINED: their load masked by rows
    # only (see triton.py's SCORES_PIPELINED).
    # NARROW_DECAYS: the decays scale (k dS)'s rows and dO's rather than the tiles of k and q^T (see _forward_kernel).
    LOWP_TY: tl.constexpr = k.dtype.element_ty
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, 0, True)  # cu_seqlens: the ChunkTable's, always given
    c0 = tl.load(chunk_start + i_n).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    n_chunks = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + (i_n * H + i_h).to(tl.int64) * K * V + kv, mask=m_kv, other=0.0)
    for j in range(0, n_chunks):
        i = n_chunks - 1 - j
        if STORE_GRADS:
            tl.store(dstates + ((c0 + i) * H + i_h) * K * V + kv, dS.to(dstates.dtype.element_ty), mask=m_kv)
        rows = bos + i * BT + o_t
        m_t = rows < eos
        tok = rows * H + i_h
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        gamma, e_b, e_end, e_last = chunk_decays_or_none(g, tok, m_t, HAS_G, BT, PRECISE_EXP)
        # each tile loaded just before its product, so that few are live at once; q^T and W^T loaded as such
        b_k, _ = load_rows(k, tok, m_t, o_k, K, L2NORM, False, rn + 1, R_IN)
        if SCORES_IN or LOCAL_DU:  # scale P^T dO: P^T stored (SCORES_IN), or formed as _local_du_kernel does
            if SCORES_IN:
                # SCORES_PIPELINED: rows masked only (a stored row holds zeros past the chunk's end: q's rows there
                # load as 0); a mask that varies along the row leaves the load unvectorised, and Triton (3.6, 3.9)
                # then does not copy it asynchronously (pipeline it)
                m_s = m_t[:, None] if SCORES_PIPELINED else m_t[:, None] & m_t[None, :]
                PT = tl.load(scores + tok[:, None] * BT + o_t[None, :], mask=m_s, other=0.0)
                if not LOWP:
                    PT = PT.to(tl.float32)
            else:
                b_qT, _ = load_rows(q, tok, m_t, o_k, K, L2NORM, True, rn, R_IN)
                PT = mm_lowp(b_k, b_qT, DOT_PREC, ROUND, LOWP, LOWP_TY) * tl.trans(gamma)
            b_do = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            if not LOWP:
                b_do = b_do.to(tl.float32)
            b_du = scale * mm_lowp(PT, b_do, DOT_PREC, ROUND, LOWP, LOWP_TY)
        else:
            b_du = tl.load(du + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        if NARROW_DECAYS:
            b_du += mm_lowp(b_k, dS, DOT_PREC, ROUND, LOWP, LOWP_TY) * e_end[:, None]
        else:
            b_du += mm_lowp(b_k * e_end[:, None], dS, DOT_PREC, ROUND, LOWP, LOWP_TY)
        TiT = tl.load(tinv + tok[None, :] * BT + o_t[:, None], mask=m_t[None, :], other=0.0).to(tl.float32)
        if STORE_GRADS:
            b_dx = mm(TiT, b_du, DOT_PREC, ROUND)
            tl.store(dx + tok[:, None] * V + o_v[None, :], b_dx.to(dx.dtype.element_ty), mask=m_tv)
        if not LOCAL_DU:
            b_qT, _ = load_rows(q, tok, m_t, o_k, K, L2NORM, True, rn, R_IN)
            if not SCORES_IN:  # (nested: Triton 3.6 makes `not (A or B)` of constexprs a runtime branch)
                b_do = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
                if not LOWP:
                    b_do = b_do.to(tl.float32)
        if NARROW_DECAYS:
            dS = dS * e_last + scale * mm_lowp(b_qT, b_do * e_b[:, None], DOT_PREC, ROUND, LOWP, LOWP_TY)
        else:
            dS = dS * e_last + scale * mm_lowp(b_qT * e_b[None, :], b_do, DOT_PREC, ROUND, LOWP, LOWP_TY)
        b_wT = tl.load(w + tok[None, :] * K + o_k[:, None], mask=m_t[None, :] & (o_k < K)[:, None], other=0.0)
        dS -= mm_lowp(b_wT, b_du, DOT_PREC, ROUND, LOWP, LOWP_TY)
    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * K * V + kv, dS, mask=m_kv)


@triton.jit
def _value_mask(m_t, o_v, i_k, V: tl.constexpr):
    """The mask of one V block's tile of v and dv in backward_chunk: rows in the chunk, and only in the first key
    block's program (i_k = 0), which alone stores dv and dbeta's share through v."""
    return m_t[:, None] & (o_v + i_k * V < V)[None, :]


@triton.jit
def _chunk_value_terms(
    v, dv, b_u, b_do, d_x, b_beta, dP, dA, d_bv, tok, m_t, o_v, i_k, V: tl.constexpr,
    DOT_PREC: tl.constexpr, ROUND: tl.constexpr, LOWP: tl.constexpr, DX_LOWP: tl.constexpr, LOWP_TY: tl.constexpr,
    b_v=None,
):  # fmt: skip
    """backward_chunk's second-pass terms of one V block, from its U, dO and dX (d_x, float32): dv stored and
    dbeta's share through v added to d_bv (both from the first key block's program alone), U's products with dO and
    dX added to dP and dA. Returns (dP, dA, d_bv)."""
    m_dv = _value_mask(m_t, o_v, i_k, V)
    if b_v is None:  # (else loaded by the caller, earlier: V_EARLY)
        b_v = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_dv, other=0.0)
    b_v = b_v.to(tl.float32)
    tl.store(dv + tok[:, None] * V + o_v[None, :], (d_x * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_dv)
    d_bv += tl.sum(d_x * b_v, axis=1)
    dP += mm_lowp(b_do, tl.trans(b_u), DOT_PREC, ROUND, LOWP, LOWP_TY)
    dA += mm_lowp(d_x, tl.trans(b_u.to(tl.float32)), DOT_PREC, ROUND, DX_LOWP, LOWP_TY)
    return dP, dA, d_bv


@triton.jit
def _backward_chunk_kernel(
    q,
    k,
    v,
    g,
    beta,
    u,
    du,
    do,
    chunks,
    states,
    dstates,
    dq,
    dk,
    dv,
    dg,
    dbeta,
    scale,
    part,
    rn,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G: tl.constexpr,
    L2NORM: tl.constexpr,
    R_IN: tl.constexpr,
    BETA_LOGIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    LOWP: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
    DX_LOWP: tl.constexpr,
    DB_FROM_PRODUCTS: tl.constexpr,
    SUMS_IN_PLACE: tl.constexpr,
    UNCHAINED: tl.constexpr = False,
    ONE_PASS: tl.constexpr = False,
    DECAYS_IN: tl.constexpr = False,
    V_EARLY: tl.constexpr = False,
):
    # Per chunk, from the state entering it (S), the gradient of the state leaving it (dS'), U and dX (which
    # _backward_state_kernel stores in du): every input gradient. U = Tinv R with R = beta (v - exp(b) k S) and
    # Tinv = (I + A)^-1, so with dX = Tinv^T dU: dR = dX, dA = -dX U^T (strictly lower), and R's share of dk is
    # -beta exp(b) dX S^T.
    # Two passes over the V blocks keep few [BT, K] tiles live: the first gathers what needs the states
    # (dq, dk of S's products), the second the [BT, BT] gradients dP, dA and dv (with ONE_PASS, below, one loop
    # does both).
    # Each program takes the key columns i_k BK .. (i_k + 1) BK (all of them when BK >= K; L2NORM needs whole
    # rows). dq and dk are per column; dv and dP, dA (sums over V) are whole in each program, which stores dv
    # if i_k = 0; dg and dbeta are sums over the columns, so each program stores its share at dg + i_k part,
    # and the launcher adds the shares.
    # S, dS' and U may be stored in bfloat16 (STATES_LOWP in triton.py); they are taken to float32 where they are
    # not dot operands. DX_LOWP: dX's products with S and U take bfloat16 operands (dX rounded), else tf32.
    # DB_FROM_PRODUCTS: db and dbeta come from the gradients that dq and dk take anyway, as three row sums (q . dq
    # and k . dk over the terms that hold b with each sign: see below), instead of forming q k^T and k k^T and the
    # [BT, BT] gradient-times-score tiles (dP P and dA A) with their row and column sums.
    # SUMS_IN_PLACE: the row sums of the first pass's products reduced where those lie (row_sums_in_place).
    # UNCHAINED (with DB_FROM_PRODUCTS): no product's result is the accumulator of another product, and P's diagonal
    # goes into dq and dk through products of its own (see triton.py's UNCHAINED_DOTS): scale multiplies the
    # products of P's tiles after them, which keeps the compiler from folding their sums into one chain.
    # ONE_PASS: the two passes' work in one loop over the V blocks, which loads U, dO and dX once (see triton.py's
    # ONE_PASS_CHUNK, on for bfloat16 at two stages), with dP and dA live beside the first pass's tiles.
    # DECAYS_IN (with HAS_G): g holds the chunks' log-decay sums per token (_log_decay_kernel), read rather than
    # summed from the gates, twice, here.
    # V_EARLY (with ONE_PASS): v's tile loaded at the top of the loop body, before the products, rather than after
    # them in _chunk_value_terms: Triton pipelines only loads that feed products, and v's feeds a row sum alone, so
    # its load is synchronous either way (see triton.py's V_EARLY).
    LOWP_TY: tl.constexpr = k.dtype.element_ty
    i_c, i_k = chunk_and_block((K + BK - 1) // BK)
    i_h = tl.program_id(1)
    lo, hi = chunk_bounds(chunks, i_c)
    if hi <= lo:  # past the last chunk (varlen allots a bound on the count)
        return
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = lo + o_t < hi
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    tok = (lo + o_t) * H + i_h
    strict = o_t[:, None] > o_t[None, :]
    state = (i_c * H + i_h).to(tl.int64) * K * V

    # 1. The products with the states, over the V blocks.
    d_qs = tl.zeros([BT, BK], dtype=tl.float32)  # gradient of exp(b) q, over scale
    d_kend = tl.zeros([BT, BK], dtype=tl.float32)  # gradient of exp(b_C - b) k
    d_xw = tl.zeros([BT, BK], dtype=tl.float32)  # gradient of beta exp(b) k
    d_last = tl.zeros([BK], dtype=tl.float32)  # <dS', S> by rows
    if ONE_PASS:
        b_beta = load_beta(beta, tok, m_t, BETA_LOGIT)
        dP = tl.zeros([BT, BT], dtype=tl.float32)  # over scale
        dA = tl.zeros([BT, BT], dtype=tl.float32)  # negated
        d_bv = tl.zeros([BT], dtype=tl.float32)  # dbeta's share through v
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
        kv = o_k[:, None] * V + o_v[None, :]
        b_v = None
        if ONE_PASS:
            if V_EARLY:
                b_v = tl.load(v + tok[:, None] * V + o_v[None, :], mask=_value_mask(m_t, o_v, i_k, V), other=0.0)
        S = tl.load(states + state + kv, mask=m_kv, other=0.0)
        dSn = tl.load(dstates + state + kv, mask=m_kv, other=0.0)
        b_u = tl.load(u + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        if not LOWP:
            b_do = b_do.to(tl.float32)
        d_x = tl.load(du + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)  # dX (dx above)
        d_qs += mm_lowp(b_do, tl.trans(S), DOT_PREC, ROUND, LOWP, LOWP_TY)
        d_kend += mm_lowp(b_u, tl.trans(dSn), DOT_PREC, ROUND, LOWP, LOWP_TY)
        d_xw -= mm_lowp(d_x, tl.trans(S.to(tl.float32)), DOT_PREC, ROUND, DX_LOWP, LOWP_TY)
        d_last += tl.sum(dSn.to(tl.float32) * S.to(tl.float32), axis=1)
        if ONE_PASS:
            dP, dA, d_bv = _chunk_value_terms(
                v, dv, b_u, b_do, d_x, b_beta, dP, dA, d_bv, tok, m_t, o_v, i_k, V,
                DOT_PREC, ROUND, LOWP, DX_LOWP, LOWP_TY, b_v,
            )  # fmt: skip
    if not ONE_PASS:
        b_beta = load_beta(beta, tok, m_t, BETA_LOGIT)
    last = (hi - lo - 1).to(tl.int32)  # the chunk's last token: b_C is its b
    tok_last = (lo + last) * H + i_h
    _, e_b, e_end, e_last = chunk_decays_summed_or_read(g, tok, m_t, tok_last, HAS_G, DECAYS_IN, BT, PRECISE_EXP)
    d_qs *= scale
    b_dq = d_qs * e_b[:, None]
    if DB_FROM_PRODUCTS:  # db's and dbeta's sums come after the second pass, from whole gradients
        b_k, _ = load_rows(k, tok, m_t, o_k, K, L2NORM, False, rn + 1, R_IN)
        d_plus = d_xw * e_b[:, None]  # the gradient of beta k (d_xw: of beta exp(b) k) through W; A's rows below
        b_dk = d_kend * e_end[:, None]
        d_beta = tl.zeros([BT], dtype=tl.float32)
        db = tl.zeros([BT], dtype=tl.float32)
    else:
        # db: the gradient of the chunk-local sums b
        b_q, _ = load_rows(q, tok, m_t, o_k, K, L2NORM, False, rn, R_IN)
        if SUMS_IN_PLACE:
            db = row_sums_in_place(d_qs * b_q, e_b)
            b_k, _ = load_rows(k, tok, m_t, o_k, K, L2NORM, False, rn + 1, R_IN)
            d_beta = row_sums_in_place(d_xw * b_k, e_b)
            db += d_beta * b_beta
        else:
            db = tl.sum(d_qs * b_q, axis=1) * e_b
            b_k, _ = load_rows(k, tok, m_t, o_k, K, L2NORM, False, rn + 1, R_IN)
            k_w = tl.sum(d_xw * b_k, axis=1)
            d_beta = k_w * e_b
            db += k_w * (b_beta * e_b)
        b_dk = d_xw * (b_beta * e_b)[:, None] + d_kend * e_end[:, None]
    # keys decayed to the chunk end, and the decay of the entering state
    if SUMS_IN_PLACE:
        E = tl.where(o_t == last, 0.0, row_sums_in_place(d_kend * b_k, e_end))
    else:
        E = tl.where(o_t == last, 0.0, tl.sum(d_kend * b_k, axis=1) * e_end)
    # (with the products, -E_t comes with k's sum below)
    db += tl.where(o_t == last, tl.sum(E, axis=0) + e_last * tl.sum(d_last, axis=0), 0.0 if DB_FROM_PRODUCTS else -E)

    # 2. dv, dP and dA, over the V blocks (in the first loop with ONE_PASS).
    if not ONE_PASS:
        dP = tl.zeros([BT, BT], dtype=tl.float32)  # over scale
        dA = tl.zeros([BT, BT], dtype=tl.float32)  # negated
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            b_u = tl.load(u + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            b_do = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            if not LOWP:
                b_do = b_do.to(tl.float32)
            d_x = tl.load(du + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)  # of beta v
            dP, dA, d_beta = _chunk_value_terms(
                v, dv, b_u, b_do, d_x, b_beta, dP, dA, d_beta, tok, m_t, o_v, i_k, V,
                DOT_PREC, ROUND, LOWP, DX_LOWP, LOWP_TY,
            )  # fmt: skip
    else:
        d_beta += d_bv
    # The decays (reloaded rather than kept live through the loops: registers) go into dP and dA at once, so
    # that gamma, dP and the scores are never live together. On an H200 (session 9, bf16, T = 4096, B = 16),
    # with gates this kernel went 4.42 -> 3.98 ms (the solve's change alongside); without, 2.66 -> 2.67.
    gamma, _, _, _ = chunk_decays_summed_or_read(g, tok, m_t, tok_last, HAS_G, DECAYS_IN, BT, PRECISE_EXP)
    if UNCHAINED and DB_FROM_PRODUCTS:
        dPg = dP * gamma  # scale comes after P's products
    else:
        dPg = dP * (gamma * scale)
    dAg = tl.where(strict, -dA, 0.0) * gamma
    b_q, r_q = load_rows(q, tok, m_t, o_k, K, L2NORM, False, rn, R_IN)
    b_k, r_k = load_rows(k, tok, m_t, o_k, K, L2NORM, False, rn + 1, R_IN)
    # intra-chunk scores P_ts = exp(b_t - b_s) q_t . k_s (the diagonal's b-terms cancel: left out), and
    # dP_ts P_ts = dPg_ts (q_t . k_s); A_ts = beta_t exp(b_t - b_s) k_t . k_s
    if DB_FROM_PRODUCTS:
        # b_t enters as exp(b_t) q_t (the states' products, P's rows), as exp(-b_t) k_t (P's and A's columns, the
        # keys decayed to the chunk end) and as beta_t exp(b_t) k_t (A's rows, W). So db_t = q_t . dq'_t - k_t .
        # dk'_t + beta_t k_t . d_plus_t: dq' is q's gradient over its terms, dk' k's over the exp(-b) ones, and
        # d_plus that of beta k over the rest; three row sums of whole gradients, rather than one per product.
        # P's strictly lower part goes into them: its diagonal (no b in it) would cancel between q's sum and k's
        # only to rounding, and at strong gates the true sums are ~0; it is added to dq and dk apart.
        eye = o_t[:, None] == o_t[None, :]
        if HAS_G:
            if UNCHAINED:
                P_diag = tl.where(eye, dPg, 0.0)
            else:
                d_diag = tl.sum(tl.where(eye, dPg, 0.0), axis=1)
            dPs = tl.where(strict, dPg, 0.0)
        else:
            dPs = dPg
        if UNCHAINED:
            b_dq += mm_lowp(dPs, b_k, DOT_PREC, ROUND, LOWP, LOWP_TY) * scale
        else:
            b_dq += mm_lowp(dPs, b_k, DOT_PREC, ROUND, LOWP, LOWP_TY)
        if HAS_G:
            db += row_sums_kept(b_q * b_dq)
            if UNCHAINED:
                b_dq += mm_lowp(P_diag, b_k, DOT_PREC, ROUND, LOWP, LOWP_TY) * scale
            else:
                b_dq += d_diag[:, None] * b_k
        if L2NORM:
            b_dq = l2norm_backward(b_dq, b_q, r_q)
        tl.store(dq + tok[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        if UNCHAINED:  # A's columns into b_dk as the accumulator, P's after them, scaled
            b_dk += mm_lowp(tl.trans(dAg * b_beta[:, None]), b_k, DOT_PREC, ROUND, LOWP, LOWP_TY)
            b_dk += mm_lowp(tl.trans(dPs), b_q, DOT_PREC, ROUND, LOWP, LOWP_TY) * scale
        else:
            b_dk += mm_lowp(tl.trans(dPs), b_q, DOT_PREC, ROUND, LOWP, LOWP_TY)  # P's columns
            b_dk += mm_lowp(tl.trans(dAg * b_beta[:, None]), b_k, DOT_PREC, ROUND, LOWP, LOWP_TY)  # A's columns
        if HAS_G:  # the last row holds E_last alone (P's and A's last columns are 0), whose b-terms cancel
            db -= tl.where(o_t == last, 0.0, row_sums_kept(b_k * b_dk))
            if UNCHAINED:
                b_dk += mm_lowp(P_diag, b_q, DOT_PREC, ROUND, LOWP, LOWP_TY) * scale
            else:
                b_dk += d_diag[:, None] * b_q
        d_plus += mm_lowp(dAg, b_k, DOT_PREC, ROUND, LOWP, LOWP_TY)  # A's rows
        k_plus = row_sums_kept(b_k * d_plus)
        d_beta += k_plus
        db += b_beta * k_plus
        b_dk += d_plus * b_beta[:, None]
    else:
        M = tl.where(strict, dPg * mm_lowp(b_q, tl.trans(b_k), DOT_PREC, ROUND, LOWP, LOWP_TY), 0.0)
        db += tl.sum(M, axis=1) - tl.sum(M, axis=0)
        b_dq += mm_lowp(dPg, b_k, DOT_PREC, ROUND, LOWP, LOWP_TY)
        b_dk += mm_lowp(tl.trans(dPg), b_q, DOT_PREC, ROUND, LOWP, LOWP_TY)
        if L2NORM:
            b_dq = l2norm_backward(b_dq, b_q, r_q)
        tl.store(dq + tok[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        KK = mm(b_k, tl.trans(b_k), DOT_PREC, ROUND)
        G = dAg * b_beta[:, None]
        b_dk += mm_lowp(G, b_k, DOT_PREC, ROUND, LOWP, LOWP_TY)
        b_dk += mm_lowp(tl.trans(G), b_k, DOT_PREC, ROUND, LOWP, LOWP_TY)
        d_beta += tl.sum(dAg * KK, axis=1)
        M = dAg * KK * b_beta[:, None]  # dA * A
        db += tl.sum(M, axis=1) - tl.sum(M, axis=0)

    if HAS_G:  # b_t = g_1 + ... + g_t within the chunk
        b_dg = tl.cumsum(db.to(tl.float64), axis=0, reverse=True)
        tl.store(dg + i_k * part + tok, b_dg.to(dg.dtype.element_ty), mask=m_t)
    if L2NORM:
        b_dk = l2norm_backward(b_dk, b_k, r_k)
    if BETA_LOGIT:
        d_beta = d_beta * b_beta * (1.0 - b_beta)
    tl.store(dk + tok[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dbeta + i_k * part + tok, d_beta, mask=m_t)


@triton.jit
def _log_decay_kernel(g, gb, chunks, H: tl.constexpr, BT: tl.constexpr):
    """Each chunk's cumulative log-decays (chunk_log_decay's float64 sums, split into float32 hi + lo) stored per
    token as gb[2 tok], gb[2 tok + 1], for the kernels that read them (DECAYS_IN). One program per chunk and head."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    lo, hi = chunk_bounds(chunks, i_c)
    if hi <= lo:  # past the last chunk
        return
    o_t = tl.arange(0, BT)
    m_t = lo + o_t < hi
    tok = (lo + o_t) * H + i_h
    _, b_hi, b_lo, _ = chunk_log_decay(tl.load(g + tok, mask=m_t, other=0.0))
    tl.store(gb + 2 * tok, b_hi, mask=m_t)
    tl.store(gb + 2 * tok + 1, b_lo, mask=m_t)


@triton.jit
def _row_norms_kernel(q, k, rn, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    # NORMS_IN (see triton.py): 1 / sqrt(sum x^2 + 1e-6) of BR rows of q and of k, each [R, D] (R = tokens * heads,
    # the rows that tok indexes), stored interleaved, q's at rn + 2 row and k's at the next: what inverse_row_norms
    # forms inside the kernels, once for the call.
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = rows < R
    tl.store(rn + 2 * rows, inverse_row_norms(q, rows, m_r, D, BD, True), mask=m_r)
    tl.store(rn + 2 * rows + 1, inverse_row_norms(k, rows, m_r, D, BD, True), mask=m_r)


@triton.jit
def _chain_kernel(
    M,
    R,
    start,
    entering,
    last,
    NS,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_START: tl.constexpr,
    REVERSE: tl.constexpr,
):
    # The scan that chains the segments (see triton.py's _chain), in float64, one program per sequence, head and
    # block of BV state columns: X <- M_s X + R_s over s = 0 .. NS - 1 (REVERSE: X <- M_s^T X + R_s from the last),
    # storing the X that enters each segment. M [N, NS, H, K, K], R and entering [N, NS, H, K, V], start and last
    # [N, H, K, V], all float32; X stays float64 in registers, and M and R are taken to float64 as loaded.
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    m_kk = (o_k < K)[:, None] & (o_k < K)[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    if REVERSE:  # M_s^T: element (i, j) is M_s[j, i]
        kk = o_k[:, None] + o_k[None, :] * K
    else:
        kk = o_k[:, None] * K + o_k[None, :]
    X = tl.zeros([BK, BV], dtype=tl.float64)
    if HAS_START:
        X += tl.load(start + i_nh.to(tl.int64) * K * V + kv, mask=m_kv, other=0.0).to(tl.float64)
    for i in range(0, NS):
        seg = ((i_n * NS + scan_order(i, NS, REVERSE)) * H + i_h).to(tl.int64)
        tl.store(entering + seg * K * V + kv, X.to(tl.float32), mask=m_kv)
        b_m = tl.load(M + seg * K * K + kk, mask=m_kk, other=0.0).to(tl.float64)
        b_r = tl.load(R + seg * K * V + kv, mask=m_kv, other=0.0).to(tl.float64)
        X = tl.dot(b_m, X) + b_r
    tl.store(last + i_nh.to(tl.int64) * K * V + kv, X.to(tl.float32), mask=m_kv)
