"""Triton pieces of the delta-rule kernels: float32 rows on load, rounded dots, the unit-lower inverse."""

from __future__ import annotations

import triton
import triton.language as tl

from linattn.ops.common.triton_utils import chunk_log_decay, exp32, tf32_round


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr, ROUND: tl.constexpr):
    """a @ b for float32 tiles: exact products for float32 inputs, tf32 rounded to nearest otherwise."""
    if ROUND:
        a = tf32_round(a, ROUND)
        b = tf32_round(b, ROUND)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def mm_lowp(a, b, DOT_PREC: tl.constexpr, ROUND: tl.constexpr, LOWP: tl.constexpr, LOWP_TY: tl.constexpr):
    """a @ b with operands cast to LOWP_TY (bfloat16) and float32 accumulation when LOWP, as a plain bfloat16
    run's matmuls are; else ``mm``. Only for products that such a run forms with a matmul (see triton.py)."""
    if LOWP:
        c = tl.dot(a.to(LOWP_TY), b.to(LOWP_TY))
    else:
        c = mm(a, b, DOT_PREC, ROUND)
    return c


@triton.jit
def load_rows(
    x,
    tok,
    m_t,
    o_d,
    D: tl.constexpr,
    L2NORM: tl.constexpr,
    TRANS: tl.constexpr = False,
    rn=None,
    R_IN: tl.constexpr = False,
):
    """Rows [BT, BD] of a [.., T, H, D] tensor as float32 (tok = token * H + head), and 1 / norm [BT].

    With L2NORM the rows come back divided by sqrt(sum x^2 + 1e-6) (the norm is 1 otherwise), so
    that the qk_l2norm option costs no extra pass over memory. TRANS: the tile transposed, [BD, BT], loaded
    as such, so that an operand x^T of a product needs no transpose of a register tile (a round trip
    through shared memory). R_IN: the 1 / norms are read (``stored_row_norms``: formed once for the call, the
    delta rules' NORMS_IN), not formed from the rows.
    """
    if TRANS:
        b_x = tl.load(x + tok[None, :] * D + o_d[:, None], mask=m_t[None, :] & (o_d < D)[:, None], other=0.0)
    else:
        b_x = tl.load(x + tok[:, None] * D + o_d[None, :], mask=m_t[:, None] & (o_d < D)[None, :], other=0.0)
    b_x = b_x.to(tl.float32)
    AXIS: tl.constexpr = 0 if TRANS else 1  # the key axis
    if L2NORM:
        if R_IN:
            r = stored_row_norms(rn, tok, m_t)
        else:
            r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=AXIS) + 1e-6)
        b_x = b_x * tl.expand_dims(r, AXIS)
    else:
        r = tl.full([b_x.shape[1 - AXIS]], 1.0, tl.float32)
    return b_x, r


@triton.jit
def stored_row_norms(rn, tok, m_t):
    """The 1 / row norms [BT] of rows tok as formed once for the call (the delta rules' NORMS_IN): at rn + 2 tok
    (rn points at q's, rn + 1 at k's)."""
    return tl.load(rn + 2 * tok, mask=m_t, other=1.0)


@triton.jit
def inverse_row_norms(
    x, tok, m_t, D: tl.constexpr, BD: tl.constexpr, L2NORM: tl.constexpr, rn=None, R_IN: tl.constexpr = False
):
    """1 / sqrt(sum x^2 + 1e-6) [BT] of rows tok of a [.., T, H, D] tensor, read in blocks of BD columns, as
    ``load_rows`` forms it for whole rows (ones without L2NORM), for kernels that go through a row in blocks; with
    R_IN read, as ``load_rows`` reads them."""
    if L2NORM and R_IN:
        r = stored_row_norms(rn, tok, m_t)
    elif L2NORM:
        ss = tl.zeros([m_t.shape[0]], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BD)):
            o_d = i_d * BD + tl.arange(0, BD)
            b_x = tl.load(x + tok[:, None] * D + o_d[None, :], mask=m_t[:, None] & (o_d < D)[None, :], other=0.0)
            b_x = b_x.to(tl.float32)
            ss += tl.sum(b_x * b_x, axis=1)
        r = 1.0 / tl.sqrt(ss + 1e-6)
    else:
        r = tl.full([m_t.shape[0]], 1.0, tl.float32)
    return r


@triton.jit
def l2norm_backward(dx, x, r):
    """Gradient through y = x / |x| given y (here ``x``), dy (``dx``) and 1 / |x| (``r``), row-wise."""
    return (dx - x * tl.sum(x * dx, axis=1)[:, None]) * r[:, None]


@triton.jit
def row_sums_in_place(x, w):
    """Sums of x [R, C] over its columns, times w [R], as tl.sum(x, axis=1) * w but reduced with keep_dims and
    scaled as [R, 1] before the reshape to [R]. Where x lies in a dot's (MMA) layout and the sums meet vectors laid
    out for loaded tiles, the plain form lets the compiler convert the whole tile to the loaded layout first
    (through shared memory and shuffles); here only the [R] result moves."""
    return tl.reshape(tl.sum(x, axis=1, keep_dims=True) * w[:, None], [x.shape[0]])


@triton.jit
def row_sums_kept(x):
    """Sums of x [R, C] over its columns, reduced in x's own layout as row_sums_in_place does, unscaled."""
    return tl.reshape(tl.sum(x, axis=1, keep_dims=True), [x.shape[0]])


@triton.jit
def load_beta(beta, tok, m_t, BETA_LOGIT: tl.constexpr):
    """beta [BT] as float32 (the sigmoid of the logits with BETA_LOGIT); 0 on padding rows."""
    b = tl.load(beta + tok, mask=m_t, other=0.0).to(tl.float32)
    if BETA_LOGIT:
        b = tl.where(m_t, tl.sigmoid(b), 0.0)
    return b


@triton.jit
def _join_pairs(Ti, A, o, size, PREC: tl.constexpr):
    """One level of unit_lower_inverse's doubling, over the last two axes of Ti and A (index o along each): join
    every pair of neighbouring diagonal blocks of size ``size``, already inverted (T1, T2), into one of twice the
    size, whose lower-left block is -T2 A21 T1; with X = A21 T1 (A masked to those blocks, times Ti) that is
    Ti <- Ti - Ti X, for every pair at once. PREC "tf32" rounds the operands to the nearest tf32 (tf32_round)."""
    pair = (o[:, None] // (2 * size)) == (o[None, :] // (2 * size))
    lower_left = pair & ((o[:, None] // size) % 2 == 1) & ((o[None, :] // size) % 2 == 0)
    ROUND: tl.constexpr = PREC == "tf32"
    X = tl.dot(tf32_round(tl.where(lower_left, A, 0.0), ROUND), tf32_round(Ti, ROUND), input_precision=PREC)
    return Ti - tl.dot(tf32_round(Ti, ROUND), tf32_round(X, ROUND), input_precision=PREC)


@triton.jit
def unit_lower_inverse(A, BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, DIAG_DOUBLING: tl.constexpr = False):
    """(I + A)^-1 for a strictly lower triangular A [BT, BT], by forward substitution in float32.

    Blocked by BD. First the BT / BD diagonal blocks, all at once as a [BT / BD, BD, BD] tile, row by row with
    elementwise float32 products (row r of a block is e_r minus sum_{s < r} A_rs times the block's final row s):
    no tensor-core work, where forming each row as a [BT, BT] product took BD - 1 of them. Then by doubling
    (below), as products of [BT, BT] tiles. PREC is their precision:
    "ieee" (exact float32 products, which Hopper runs on its FMA units, not its tensor cores) for float32 inputs,
    "tf32x3" (three tf32 products, about float32's accuracy, on the tensor cores) for 16-bit ones, or "tf32"
    (one, with operands rounded to the nearest tf32). Unlike the
    product form (I - A)(I + A^2)(I + A^4)..., nothing here cancels for large A.

    DIAG_DOUBLING: the diagonal blocks by doubling too (as below, from blocks of 1), as batched products of
    [BT / BD, BD, BD] tiles: 2 log2(BD) of them (8 for BD = 16) on the tensor cores, instead of BD - 1 rows of
    elementwise products and sums. The delta rules' launcher takes it (SOLVE_DIAG_DOUBLING): on an H200
    (session 10) it cut 0.3 ms from either delta rule's fwd+bwd at T = 4096, B = 16, bf16.
    """
    NB: tl.constexpr = BT // BD
    o_t = tl.arange(0, BT)
    o_r = tl.arange(0, BD)
    # own[t, b, :]: block b is row t's own; A_c[t, j] = A[t, BD (t // BD) + j], the diagonal blocks' rows
    own = (o_t // BD)[:, None, None] == tl.arange(0, NB)[None, :, None]
    A_c = tl.sum(tl.where(own, tl.reshape(A, (BT, NB, BD)), 0.0), axis=1)
    A3 = tl.reshape(A_c, (NB, BD, BD))
    row = o_r[None, :, None]  # a block's row index, over [NB, BD, BD]
    Ti3 = tl.where(row == o_r[None, None, :], 1.0, 0.0) + tl.zeros([NB, BD, BD], dtype=tl.float32)
    if DIAG_DOUBLING:
        part = 1
        while part < BD:  # the same levels as below, batched over the NB blocks
            Ti3 = _join_pairs(Ti3, A3, o_r, part, PREC)
            part *= 2
    else:
        for r in range(1, BD):
            a = tl.sum(tl.where(row == r, A3, 0.0), axis=1)  # [NB, BD]: row r of each block (zero from column r on)
            Ti3 = tl.where(row == r, Ti3 - tl.sum(a[:, :, None] * Ti3, axis=1)[:, None, :], Ti3)
    # back to [BT, BT]: the block-diagonal inverse
    Ti = tl.reshape(tl.where(own, tl.reshape(Ti3, (BT, BD))[:, None, :], 0.0), (BT, BT))
    # Then by doubling (_join_pairs), a level of pairs at a time: 2 log2(BT / BD) products (4 for BT = 64,
    # BD = 16), where block row after block row took 2 (BT / BD - 1) (6). On an H200 (session 9, bf16, T = 4096,
    # B = 16) prepare's solving launch went 1.93 -> 1.78 ms (delta_rule), 2.04 -> 1.87 (gated).
    size = BD
    while size < BT:  # a loop, not unrolled: fewer tiles live at once
        Ti = _join_pairs(Ti, A, o_t, size, PREC)
        size *= 2
    return Ti


@triton.jit
def chunk_decays(b, b_hi, b_lo, b_last, BT: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """From the chunk-local log-decay sums (see ``chunk_log_decay``), every factor a chunk needs.

    Returns gamma [BT, BT] = exp(b_t - b_s) for s <= t (0 above the diagonal), exp(b) [BT] (queries and
    keys as they meet the entering state), exp(b_last - b) [BT] (keys decayed to the chunk end) and
    exp(b_last). Every exponent is <= 0 for log-decays <= 0, so none overflows. PRECISE_EXP: see exp32.
    """
    gamma, e_b = _decay_tile(b_hi, b_lo, BT, PRECISE_EXP)
    e_end = exp32((b_last - b).to(tl.float32), PRECISE_EXP)
    return gamma, e_b, e_end, exp32(b_last.to(tl.float32), PRECISE_EXP)


@triton.jit
def _decay_tile(b_hi, b_lo, BT: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """gamma [BT, BT] = exp(b_t - b_s) for s <= t (0 above the diagonal) and exp(b) [BT], from the log-decay sums
    as hi + lo pairs (see ``chunk_log_decay``)."""
    o_t = tl.arange(0, BT)
    causal = o_t[:, None] >= o_t[None, :]
    diff = (b_hi[:, None] - b_hi[None, :]) + (b_lo[:, None] - b_lo[None, :])
    gamma = tl.where(causal, exp32(tl.where(causal, diff, 0.0), PRECISE_EXP), 0.0)
    return gamma, exp32(b_hi, PRECISE_EXP)


@triton.jit
def chunk_decays_read(gb, tok, m_t, tok_last, BT: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """``chunk_decays`` from the chunk's log-decay sums as stored per token (gb[2 tok], gb[2 tok + 1]: hi, lo, as
    ``chunk_log_decay`` splits them), with tok_last the row of the chunk's last token: rows past it (m_t false) take
    its sums, as a chunk summed in the kernel gives them (their gates load as 0)."""
    last_hi = tl.load(gb + 2 * tok_last)
    last_lo = tl.load(gb + 2 * tok_last + 1)
    b_hi = tl.where(m_t, tl.load(gb + 2 * tok, mask=m_t, other=0.0), last_hi)
    b_lo = tl.where(m_t, tl.load(gb + 2 * tok + 1, mask=m_t, other=0.0), last_lo)
    gamma, e_b = _decay_tile(b_hi, b_lo, BT, PRECISE_EXP)
    e_end = exp32((last_hi - b_hi) + (last_lo - b_lo), PRECISE_EXP)
    return gamma, e_b, e_end, exp32(last_hi, PRECISE_EXP)


@triton.jit
def chunk_decays_or_none(g, tok, m_t, HAS_G: tl.constexpr, BT: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """``chunk_decays`` of the gates g at rows tok, or the factors of no decay (all ones) when not HAS_G."""
    if HAS_G:
        b, b_hi, b_lo, b_last = chunk_log_decay(tl.load(g + tok, mask=m_t, other=0.0))
        gamma, e_b, e_end, e_last = chunk_decays(b, b_hi, b_lo, b_last, BT, PRECISE_EXP)
    else:
        o_t = tl.arange(0, BT)
        gamma = tl.where(o_t[:, None] >= o_t[None, :], 1.0, 0.0)
        e_b = tl.full([BT], 1.0, tl.float32)
        e_end = e_b
        e_last = tl.sum(e_b, axis=0) / BT
    return gamma, e_b, e_end, e_last


@triton.jit
def chunk_decays_summed_or_read(
    g, tok, m_t, tok_last, HAS_G: tl.constexpr, READ: tl.constexpr, BT: tl.constexpr, PRECISE_EXP: tl.constexpr
):
    """``chunk_decays_or_none``, or with READ (and HAS_G) ``chunk_decays_read`` of the sums stored at g (tok_last:
    the row of the chunk's last token)."""
    if READ and HAS_G:
        gamma, e_b, e_end, e_last = chunk_decays_read(g, tok, m_t, tok_last, BT, PRECISE_EXP)
    else:
        gamma, e_b, e_end, e_last = chunk_decays_or_none(g, tok, m_t, HAS_G, BT, PRECISE_EXP)
    return gamma, e_b, e_end, e_last
