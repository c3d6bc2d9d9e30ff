"""GLA's Triton kernels: the chunk kernel behind every pass, and the token-by-token decode kernel.

The chunk kernel walks a sequence's chunks of BT = 64 tokens with the state [BK, BV] in registers. A
chunk is cut into sub-chunks of BC = 16 tokens, and every exponent is a sum of gates, <= 0:

* state:      output row t reads the state through exp(b_t) (b: the log-decay since the chunk's start);
* i after j:  one tl.dot of q_i exp(b_t - rho_i) and k_j exp(rho_i - b_s), rho_i the log-decay at the
              start of sub-chunk i (gate on the output side: exp(b_t - rho_i) scales the product and
              exp(rho_i - b_s) scales v_j);
* i itself:   exactly, a [BC, BC, D] broadcast of exp(b_t - b_s) masked to s < t, and the plain
              (q_t . k_t) v_t for s = t;
* new state:  S <- exp(b_last) S + (k exp(b_last - b))^T v, accumulated sub-chunk by sub-chunk.

Time-reversed passes read the same layout with "earlier" and "later" swapped. The gates' sums inside a
sub-chunk are formed in float64 (chunk_log_decay), and every exponent is summed in float64 from them
before it is rounded to float32, so that a gate of -1e4 next to one of -1e-7 keeps the small one's
precision, and gates of 0 or -1e4 neither overflow nor give NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from linattn.ops.common.triton_utils import chunk_log_decay, exp32, sequence_bounds, tf32_round


@triton.jit
def _pair_decay(hi, lo, mask, REVERSE: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """exp(b_t - b_s) [BC, BC, D] between output row t and source row s of one sub-chunk, 0 off mask [BC, BC, 1].

    hi + lo [BC, D] are the sub-chunk's cumulative log-decays as a float32 pair (chunk_log_decay).
    """
    diff = (hi[:, None, :] - hi[None, :, :]) + (lo[:, None, :] - lo[None, :, :])
    if REVERSE:
        diff = -diff
    return exp32(tl.where(mask, diff, float("-inf")), PRECISE_EXP)


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
    dst,
    dkt,
    fin,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BKD: tl.constexpr,
    BV: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    GATE_ON_OUT: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_FINAL: tl.constexpr,
    REVERSE: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    # q, k: [.., T, H, K]; v, o, w, wo: [.., T, H, V]; g: [.., T, H, G] float32 (G = V with GATE_ON_OUT, else K);
    # h0, ht: [N, H, K, V] float32. wo (float32) is scale * w * o without each token's pair with itself.
    # HAS_FINAL (the dq pass, where k' = v and v' = k): dst [N, H, K, V] holds dS_T^T, and the kernel
    # writes dkt = exp(B_T - B_t) dS_T v_t, the final-state gradient's share of dk, and fin, the exact
    # final-state term of dg: sum_{r < t} k_r dkt_r + exp(B_T) sum_v dS_T S_0 (B: log-decay from the
    # sequence's start). All float32 [.., T, H, V].
    # Dot operands that are not plain inputs are rounded to tf32 where ROUND says so (guarded at each
    # call: in the interpreter every call of a jitted helper is costly). Every exp of a log-decay goes
    # through exp32: PRECISE_EXP (float32 inputs on a GPU) takes libdevice's exp over tl.exp's approximate one.
    tl.static_assert(GATE_ON_OUT or not HAS_W)
    tl.static_assert((GATE_ON_OUT and not REVERSE) or not HAS_FINAL)
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)

    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    if GATE_ON_OUT:
        o_g, m_g = o_v, m_v
    else:
        o_g, m_g = o_k, m_k
    # Pairs inside a sub-chunk: output t reads sources s < t (s > t when time runs backward). With the
    # gate on the output side the pair s = t is added on its own, after the product with w.
    if REVERSE:
        causal = o_c[:, None] < o_c[None, :]
    else:
        causal = o_c[:, None] > o_c[None, :]
    if not GATE_ON_OUT:
        causal = causal | (o_c[:, None] == o_c[None, :])

    state_off = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + state_off, mask=m_k[:, None] & m_v[None, :], other=0.0)
    if HAS_FINAL:
        R = tl.load(dst + state_off, mask=m_k[:, None] & m_v[None, :], other=0.0)
        total = tl.zeros([BG], dtype=tl.float64)  # B_T, the log-decay of the whole sequence
        for i_p in range(0, n_chunks):
            rows_p = bos + i_p * BT + tl.arange(0, BT)
            m_p = (rows_p < eos)[:, None] & m_g[None, :]
            b_gp = tl.load(g + (rows_p * H + i_h)[:, None] * G + o_g[None, :], mask=m_p, other=0.0)
            total += tl.sum(b_gp.to(tl.float64), 0)
        # [BV]: the running sum_{r < t} k_r dkt_r
        prefix = exp32(total.to(tl.float32), PRECISE_EXP) * tl.sum(R * S, 0)
        B_chunk = tl.zeros([BG], dtype=tl.float64)  # log-decay from the sequence's start to the chunk

    for i in range(0, n_chunks):
        if REVERSE:
            t0 = bos + (n_chunks - 1 - i) * BT
        else:
            t0 = bos + i * BT
        n_sub = tl.cdiv(tl.minimum(eos - t0, BT), BC)
        S_r = S
        if ROUND:
            S_r = tf32_round(S, ROUND)
        U = tl.zeros([BK, BV], dtype=tl.float32)  # the chunk's own change of state
        pre = tl.zeros([BG], dtype=tl.float64)  # log-decay of the sub-chunks this pass has visited in the chunk
        for ii in range(0, n_sub):  # sub-chunks in the pass's order: forward, or backward in time
            if REVERSE:
                i_c = n_sub - 1 - ii
            else:
                i_c = ii
            rows = t0 + i_c * BC + o_c
            m_t = rows < eos
            tok = rows * H + i_h
            m_tk = m_t[:, None] & m_k[None, :]
            m_tv = m_t[:, None] & m_v[None, :]
            b_q = tl.load(q + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            b_k = tl.load(k + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            b_v = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            b_g = tl.load(g + tok[:, None] * G + o_g[None, :], mask=m_t[:, None] & m_g[None, :], other=0.0)
            c, hi, lo, last = chunk_log_decay(b_g)  # [BC, BG] float64, float32 pair; [BG] float64
            if REVERSE:  # rows read sources after them: decay over (t, end] and over [start, s]
                e_out, e_src = last[None, :] - c, c
            else:  # rows read sources before them: decay over [start, t] and over (s, end]
                e_out, e_src = c, last[None, :] - c
            w_out = exp32(e_out.to(tl.float32), PRECISE_EXP)  # [BC, BG]

            # What the state carries in from the chunks already passed.
            w_state = exp32((pre[None, :] + e_out).to(tl.float32), PRECISE_EXP)
            if GATE_ON_OUT:
                b_o = w_state * tl.dot(b_q, S_r, input_precision=DOT_PREC)
                b_qr = b_q
            else:
                b_qs = b_q * w_state
                b_qr = b_q * w_out
                if ROUND:
                    b_qs = tf32_round(b_qs, ROUND)
                    b_qr = tf32_round(b_qr, ROUND)
                b_o = tl.dot(b_qs, S_r, input_precision=DOT_PREC)

            # Sub-chunks passed earlier in this chunk, both sides rebased on this sub-chunk's near boundary.
            acc = tl.zeros([BC, BV], dtype=tl.float32)
            gap = tl.zeros([BG], dtype=tl.float64)  # log-decay of the sub-chunks between source and output
            for d in range(1, ii + 1):
                if REVERSE:
                    j_c = i_c + d
                else:
                    j_c = i_c - d
                rows_j = t0 + j_c * BC + o_c
                m_j = rows_j < eos
                tok_j = rows_j * H + i_h
                b_kj = tl.load(k + tok_j[:, None] * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.0)
                b_vj = tl.load(v + tok_j[:, None] * V + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0.0)
                b_gj = tl.load(g + tok_j[:, None] * G + o_g[None, :], mask=m_j[:, None] & m_g[None, :], other=0.0)
                c_j, _, _, last_j = chunk_log_decay(b_gj)
                if REVERSE:
                    e_src_j = c_j
                else:
                    e_src_j = last_j[None, :] - c_j
                w_src = exp32((gap[None, :] + e_src_j).to(tl.float32), PRECISE_EXP)
                if GATE_ON_OUT:
                    b_kj = b_kj.to(tl.float32)
                    b_vj = b_vj * w_src
                else:
                    b_kj = b_kj * w_src
                    b_vj = b_vj.to(tl.float32)
                if ROUND:
                    b_kj = tf32_round(b_kj, ROUND)
                    b_vj = tf32_round(b_vj, ROUND)
                A = tl.dot(b_qr, tl.trans(b_kj), input_precision=DOT_PREC)  # [BC, BC]
                if ROUND:
                    A = tf32_round(A, ROUND)
                acc += tl.dot(A, b_vj, input_precision=DOT_PREC)
                gap += last_j
            if GATE_ON_OUT:
                b_o += w_out * acc
            else:
                b_o += acc

            # The sub-chunk itself, with the exact decay between each pair of its rows.
            if GATE_ON_OUT:
                A = tl.where(causal, tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC), 0.0)
                decay = _pair_decay(hi, lo, causal[:, :, None], REVERSE, PRECISE_EXP)
                b_o += tl.sum(A[:, :, None] * decay * b_v[None, :, :], 1)
            else:
                A = tl.zeros([BC, BC], dtype=tl.float32)
                for kk in tl.static_range(0, BK, BKD):  # slices of the key dim bound the [BC, BC, BKD] tile
                    if BKD == BK:
                        b_qd, b_kd, hi_d, lo_d = b_q, b_k, hi, lo
                    else:
                        o_kd = kk + tl.arange(0, BKD)
                        m_kd = m_t[:, None] & (o_kd < K)[None, :]
                        b_qd = tl.load(q + tok[:, None] * K + o_kd[None, :], mask=m_kd, other=0.0).to(tl.float32)
                        b_kd = tl.load(k + tok[:, None] * K + o_kd[None, :], mask=m_kd, other=0.0).to(tl.float32)
                        _, hi_d, lo_d, _ = chunk_log_decay(
                            tl.load(g + tok[:, None] * K + o_kd[None, :], mask=m_kd, other=0.0)
                        )
                    decay = _pair_decay(hi_d, lo_d, causal[:, :, None], REVERSE, PRECISE_EXP)
                    A += tl.sum(b_qd[:, None, :] * b_kd[None, :, :] * decay, 2)
                if ROUND:
                    A = tf32_round(A, ROUND)
                b_o += tl.dot(A, b_v, input_precision=DOT_PREC)

            if HAS_W:
                b_w = tl.load(w + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
                tl.store(wo + tok[:, None] * V + o_v[None, :], scale * b_w * b_o, mask=m_tv)
            if HAS_FINAL:  # exp(B_T - B_t) <= 1: the gates after t
                w_fin = exp32((total[None, :] - (B_chunk[None, :] + pre[None, :] + c)).to(tl.float32), PRECISE_EXP)
                b_dkt = w_fin * tl.dot(b_k, tf32_round(R, ROUND), input_precision=DOT_PREC)
                tl.store(dkt + tok[:, None] * V + o_v[None, :], b_dkt, mask=m_tv)
                y = b_v * b_dkt
                b_fin = prefix[None, :] + tl.sum(tl.where(causal[:, :, None], y[None, :, :], 0.0), 1)
                tl.store(fin + tok[:, None] * V + o_v[None, :], b_fin, mask=m_tv)
                prefix += tl.sum(y, 0)
            if GATE_ON_OUT:
                b_o += tl.sum(b_q * b_k, 1)[:, None] * b_v  # s = t: no decay
            tl.store(o + tok[:, None] * V + o_v[None, :], (scale * b_o).to(o.dtype.element_ty), mask=m_tv)

            # This sub-chunk's share of the chunk's change of state, decayed to the chunk's far boundary.
            w_last = exp32(last.to(tl.float32), PRECISE_EXP)
            w_src = exp32(e_src.to(tl.float32), PRECISE_EXP)
            if GATE_ON_OUT:
                U = U * w_last[None, :]
                b_ks = b_k
                b_vs = b_v * w_src
            else:
                U = U * w_last[:, None]
                b_ks = b_k * w_src
                b_vs = b_v
            if ROUND:
                b_ks = tf32_round(b_ks, ROUND)
                b_vs = tf32_round(b_vs, ROUND)
            U += tl.dot(tl.trans(b_ks), b_vs, input_precision=DOT_PREC)
            pre += last

        w_chunk = exp32(pre.to(tl.float32), PRECISE_EXP)
        if HAS_FINAL:
            B_chunk += pre
        if GATE_ON_OUT:
            S = S * w_chunk[None, :] + U
        else:
            S = S * w_chunk[:, None] + U

    tl.store(ht + state_off, S, mask=m_k[:, None] & m_v[None, :])
