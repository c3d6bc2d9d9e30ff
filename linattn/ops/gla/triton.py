"""Triton kernels for GLA (a log-decay per head, token and key channel): launchers, registration, public function.

The chunked form (chunk length BT = 64, sub-chunks of BC = 16), in the kernels of triton_kernels.py
and triton_backward.py; b is the chunk-local cumulative log-decay and b_C its value at the chunk's end:

    intra      per chunk      hi + lo = b (summed in float64, stored as a float32 pair) and the scores
                              A_ts = sum_k q_tk k_sk exp(b_tk - b_sk) between sub-chunks (s < t)
    diag       per sub-chunk  the same scores inside each sub-chunk, exactly, and q_t . k_t (s = t)
    state      per sequence   S [BK, BV] in registers, chunk after chunk: o = scale ((q exp(b)) S + A v),
                              S <- exp(b_C) S + (k exp(b_C - b))^T v; or, in reverse, the gradient of the
                              state leaving each chunk: dS <- exp(b_C) dS + scale (q exp(b))^T dO
    dv         per chunk      dv = scale A^T dO + (k exp(b_C - b)) dS
    dA         per chunk      dA = scale dO V^T, masked to s <= t
    dqkg       per chunk      dq, dk, and dg as a float32 reverse cumulative sum within the chunk
    recurrent  per sequence   token by token, for decoding (ops/common/triton_recurrent.py)

Between the kernels lie hi, lo [B, T, H, K] and A, dA [B, T, H, BT] (float32); only the backward stores hi and lo
(the forward's diag sums its sub-chunks' gates itself). The backward forms hi and lo again
(the registration saves the inputs, the outputs and, with SAVE_SCORES, A; without it A too), runs the state
kernel forward to store the state entering every chunk and in reverse to store the gradient of the state leaving
it ([NC, H, K, V] each, NC the number of chunks; bfloat16 with bfloat16 operands, see STATES_LOWP, else float32),
then the per-chunk kernels.
"""

from __future__ import annotations

import torch
import triton

from linattn.ops.common.triton_ops import none_tensor, register_decay_ops
from linattn.ops.common.triton_recurrent import recurrent
from linattn.ops.common.triton_segments import Segments, chain_segments, segment_count
from linattn.ops.common.triton_utils import (
    HOPPER_SHARED,
    ChunkTable,
    gpu_shared_below,
    kernel_flags,
    lowp_dots,
    narrow_bv,
    precise_exp,
    store_dtype,
    triton_unsupported,
)
from linattn.ops.gla.triton_backward import _dA_kernel, _dqk_state_kernel, _dqkg_kernel, _dv_kernel
from linattn.ops.gla.triton_kernels import _diag_kernel, _intra_kernel, _state_kernel

BT = 64  # chunk length
BC = 16  # sub-chunk length: the smallest tl.dot tile


# The loops over one row at a time inside sub-chunks (diag, dqkg): software-pipelining stages and unroll factor
# (tl.range; 1 and 1 are a plain loop). On an H200 (session 7, T = 4096, B = 16, bf16, one call), GLA fwd+bwd took
# 24.13 ms as a plain loop, 23.41 unrolled 4 times, 25.94 unrolled 16 times, 26.49 and 25.57 with 2 and 3 stages.
# Unrolled 4 times the GLA GPU tests pass (39).
ROW_LOOP = dict(J_STAGES=1, J_UNROLL=4)
# STATE_KERNEL: the dq/dk/dg backward's products with the states (dO S^T, V dS^T, sum_v S dS) run in a kernel of their
# own over key blocks of up to 128 (dqk_state; sm_90 compile, bf16, 8 warps, V blocks of 32: no spills), stored as
# float32 [B, T, H, K] twice, rather than in every 16-column key block of dqkg, each of which read dO and V again.
# On an H200 (session 8, T = 4096, B = 16, bf16, one call): GLA fwd+bwd 21.95 ms against 23.34 without it; the GLA
# GPU tests pass with it (41). Its scratch is 0.5 GiB per tensor at that shape. False: dqkg forms the products itself
# (no scratch; dqkg's STATE_GIVEN constexpr, one kernel either way). Since the states are stored in bfloat16
# (STATES_LOWP) dqkg's own products cost less than the separate kernel: session 12 (H200, one call, bf16, T = 4096,
# B = 16) 9.11 ms without it against 9.17 with it, and 8.80 against 8.82 with the output kernel's 64-column value
# blocks; the GLA GPU tests pass without it (47).
STATE_KERNEL = False
# REBASE_LIMIT: inside a sub-chunk, diag (forward) and dqkg (backward) form the decayed products as matrix products
# rebased on one row of the sub-chunk, exp(b_t - b_s) = exp(b_t - r) exp(r - b_s), where every |b - r| of the
# program's tile is at most this; their factors then lie within exp(+-60) (1e-26 .. 1e26), finite and normal in
# float32 and bfloat16, and the products carry the operands' rounding, as the products between sub-chunks do.
# Elsewhere (decays of more than 60 nats within 16 tokens) exactly, a row at a time. -1 always takes the rows.
# On an H200 (session 10, one call, bf16, T = 4096, B = 16, the benchmark's gates) GLA fwd+bwd went 18.82 ->
# 14.10 ms (diag 1.90 -> 0.63 ms with the forward's diag summing its own gates, 13.80 ms in all).
REBASE_LIMIT = 60.0
# CHUNK_LIMIT: where every key channel's log-decay varies by at most 2 CHUNK_LIMIT over a chunk (|b - m| <=
# CHUNK_LIMIT about the middle m of its range), intra (forward) and dqkg (backward) form a chunk's decayed products
# whole, one matrix product per key block rebased on m, exp(b_t - b_s) = exp(b_t - m) exp(m - b_s), instead of per
# pair of sub-chunks (intra: 3 products and the bridges between sub-chunks, then diag inside them; dqkg: 4 pairs of
# products). The factors stay within exp(+-60), as REBASE_LIMIT's. Gates of typical size (120 nats over 64 tokens is
# -1.9 per token in every channel) take it; stronger ones the sub-chunk form. -1 never takes it.
CHUNK_LIMIT = 60.0
# SAVE_SCORES: the forward's scores A [B, T, H, BT] (bfloat16 for bfloat16 inputs on a GPU, else float32) are kept
# for the backward, which then runs intra without them and skips diag, instead of forming them again: 128 MiB per
# layer at T = 4096, B = 16 (bfloat16), as fla keeps its A. On an H200 (session 9, one call, bf16, that shape) GLA
# fwd+bwd took 18.65 ms with it, 22.01 without (the backward's intra 2.58 -> 1.16 ms, no diag: 1.90 ms). False: the
# backward forms A again (only the inputs and outputs are kept).
SAVE_SCORES = True
# KEEP_STATES: the forward's last pass over each sequence also stores the state entering each chunk (as the
# backward's own state pass would: bfloat16 with STATES_LOWP), kept for the backward, which then runs no forward
# state pass of its own (with segments: neither each segment's own pass nor their chain). 512 MiB kept per layer at
# B T = 65536, H = 16, K = V = 128 in bfloat16; the forward's store is the write the backward's pass would make.
# Only where a gradient is wanted (an argument of the op: see register_decay_ops' keeps). On an H200 (session 18, one
# call, bf16, fwd+bwd ms, the then SEGMENT_HEADS 256), formed again / kept: T = 4096 8.72 / 8.63, 16384 8.85 / 8.67,
# 32768 9.32 / 9.05, 65536 9.33 / 9.05; the GLA GPU tests pass with it. False gives the memory back.
KEEP_STATES = True
# FEW_PROGRAMS: the per-sequence state kernels (the forward's output kernel and the backward's two state passes) run
# (K / BK) (V / BV) N H programs, each a loop over all of its sequence's chunks; where that is fewer than this, their
# value blocks are halved, down to 16 columns, until it is not. At T = 65536, B = 1, H = 16 the output kernel runs 32
# programs and the state passes 64; narrowed for 100 they run 128. On an H200 (session 13, bf16, fwd+bwd ms; 0 is
# the launch table's blocks; the 48 GPU GLA tests pass at 264):
#   FEW_PROGRAMS     0       100     132     264
#   T = 16384, B = 4  8.90*  8.93    -       9.87   (128 programs each: narrowed at 132 and 264, not at 100)
#   T = 65536, B = 1  11.24  11.05   11.06   11.01
# (* session 12; the rest in two calls of session 13.) T = 4096 (1024 programs) is not narrowed: 8.78 / 8.76 / 8.76.
FEW_PROGRAMS = 100
# STATES_LOWP: with bfloat16 operands (lowp_dots), the backward stores the state entering each chunk and the gradient
# of the state leaving it in bfloat16, not float32: every product that reads them casts them to bfloat16 anyway, and
# the one elementwise reader, dg's sum_v S dS, takes them to float32 first. The state carried from chunk to chunk
# stays float32 in registers; only the stored copies are rounded, as fla stores its h and dh. Half the bytes of
# [NC, H, K, V] twice (2 GiB less traffic per layer at T = 4096, B = 16; 16 GiB less memory at T = 1M). On an H200
# (session 12, one call, bf16, T = 4096, B = 16) GLA fwd+bwd took 9.26 ms with it against 9.88 without (main then,
# twice each); the GLA GPU tests pass with it (47).
STATES_LOWP = True
# Long sequences with few sequences and heads (T = 65536, B = 1): the per-sequence passes (the forward's output
# kernel, the backward's state and state-gradient passes) run (K / BK) (V / BV) N H programs, each walking every
# chunk. Each sequence is then cut into segments, run side by side (common/triton_segments.py): each segment's own
# change of state from zeros, a scan over the segments (S <- exp(D_s) S + R_s, D_s the segment's summed log-decay
# per key: GLA's transition is diagonal), then each segment from what enters it; about twice one pass's work. Only
# where SEGMENT_HEADS / (N H) gives at least MIN_SEGMENTS segments of at least SEGMENT_MIN_CHUNKS chunks each; not
# for cu_seqlens; SEGMENTS forces a count (tests). On an H200 (session 14, one call, bf16, fwd+bwd ms) they were
# slower (11.06 against 10.90 at T = 65536), when the host built their tables with two syncs a sweep. Since session
# 16 the tables cost the host nothing; session 17 (one call, same shape): without segments / SEGMENT_HEADS 256 with
# MIN_SEGMENTS 4 / 256 with 8 / 128 with 8 / 512 with 8:
#   T = 16384, B = 4: 8.82 / 9.26 (4 segments) / 8.82 (none) / 8.81 (none) / 9.34 (8)
#   T = 32768, B = 2:  -   /  -                / 9.29 (8)    / 9.45 (none) / 9.38 (16)
#   T = 65536, B = 1: 10.85 / 9.28 (16)        / 9.31 (16)   / 9.25 (8)    / 9.43 (32)
# So 256 with at least 8: segments from T = 32768 at the standard shape. The GLA GPU tests pass with them (session 17).
# Session 18, with KEEP_STATES (three calls, one machine; none / 128 with 2 / 128 with 4 / 256 with 8 / 512 with 8):
#   T = 16384, B = 4:  -   /  -        / 8.66 (none) /  -        /  -
#   T = 32768, B = 2: 8.99 / 8.97 (4)  / 8.97 (4)    / 9.05 (8)  / 9.08 (16)
#   T = 65536, B = 1: 10.08 / 9.00 (8) / 9.00 (8)    / 9.05 (16) / 9.11 (32)
# (64 with 2: 9.22 / 9.21.) So 128 with at least 4: segments from T = 32768, half as many as before.
SEGMENT_HEADS = 128
MIN_SEGMENTS = 4
SEGMENT_MIN_CHUNKS = 16
SEGMENTS = None


def _pow2(n: int, lo: int = 16, hi: int = 256) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _per_sequence(cfg: dict, K: int, V: int, NH: int) -> dict:
    """A per-sequence kernel's launch settings with its value blocks narrowed for few programs (FEW_PROGRAMS)."""
    BV = narrow_bv(cfg["BV"], V, triton.cdiv(K, cfg["BK"]) * NH, FEW_PROGRAMS)
    if BV == cfg["BV"]:
        return cfg
    # 8 warps on small tiles faulted on Triton 3.6 (the delta rules' _warps)
    return dict(cfg, BV=BV, num_warps=min(cfg["num_warps"], 4))


def _flags(dtype: torch.dtype, gpu: bool | None = None) -> dict:
    flags = kernel_flags(dtype, gpu=gpu)
    del flags["UPCAST_QK"]  # the kernels take operands to float32 (or LOWP's 16-bit type) themselves
    return dict(PRECISE_EXP=precise_exp(dtype, gpu), **flags)


def _launch(dtype: torch.dtype, K: int, V: int) -> dict:
    """Blocks, warps and stages of each kernel, from a sweep on an H200 at K = V = 128 (bfloat16). Compiled for
    sm_90 (Triton 3.9, bf16; compile_kernels --resources gla), intra, dqkg (forming the state products) and the
    forward's output kernel sit at 255 registers and spill 504, 1472 and 1768 B a thread; the 8-warp settings
    measured slower. float32 tiles, and every tile at K = 256, take one stage, so that shared memory holds them.

    dqkg's key blocks: on an H200 (session 11, one call, bf16, T = 4096, B = 16, fwd+bwd ms, dg summed in float64
    then) 10.25 with 32 columns against 10.87 with 16; 11.56 with 32 at 8 warps, 11.51 with 64 at 8 warps. With
    float32 sums as now, 9.94 at 32. In the same call intra with key blocks of 64 took 10.68 (its forward 2.48 ms
    against 2.71). Session 12 (one call, STATES_LOWP on): intra's key blocks 64 against 32, 9.09 against 9.26 (the
    forward 2.45 against 2.67 ms); GPU GLA tests 47 passed with it; dqkg's key blocks 64, 11.06. In the next call
    (9.17 as then), the output kernel's value blocks of 64 (were 32) 8.82 (its forward 2.18 ms against 2.49); the GLA
    GPU tests pass with it (47); dqk_state's of 64, 9.02; none of state BK 128 or 4 warps, dv BK 128, dA BV 128
    moved it by more than 0.03 ms."""
    BK = _pow2(K)
    cfg = dict(
        intra=dict(BK=min(BK, 64), num_warps=4),
        diag=dict(BK=min(BK, 64), num_warps=2, **ROW_LOOP),
        dA=dict(BV=_pow2(V, hi=64), num_warps=4),
        output=dict(BK=BK, BV=_pow2(V, hi=64 if BK <= 128 else 16), num_warps=4),
        state=dict(BK=min(BK, 64), BV=_pow2(V, hi=64), num_warps=8),
        dv=dict(BK=min(BK, 64), BV=_pow2(V, hi=64), num_warps=4),
        dqkg=dict(BK=min(BK, 32), BV=_pow2(V, hi=32), num_warps=4, num_stages=1, **ROW_LOOP),
        dqk_state=dict(BK=min(BK, 128), BV=_pow2(V, hi=32), num_warps=8 if BK >= 64 else 4),
    )
    # float32 tiles and every tile at K = 256 take one stage: Triton 3.6 on an H200 wanted 235-319 KB of shared
    # memory at K = 256. So do float16's (its dots take float32 operands) on GPUs that give a program less than
    # Hopper's: its forward state kernel at Triton's default 3 stages took 196,608 B at K = V = 128 (sm_80 compile,
    # Triton 3.6, session 20; 172,032 B at few programs), past the 163 KiB of an A100 and the 99 KiB of RTX and L4 /
    # L40 cards (tests/ops/launch_shared.py --arch); at one stage 32,768 B. Hopper keeps 3 (212,992 B there).
    if dtype == torch.float32 or BK > 128 or (dtype == torch.float16 and gpu_shared_below(HOPPER_SHARED)):
        for c in cfg.values():
            c["num_stages"] = 1
    return cfg


def _scores_dtype(lowp: bool) -> torch.dtype:
    """A's dtype (and qg's, kd's): that of the dots that take them."""
    return torch.bfloat16 if lowp else torch.float32


def _states_dtype(lowp: bool) -> torch.dtype:
    """The dtype of the backward's stored states and state gradients (see STATES_LOWP)."""
    return torch.bfloat16 if lowp and STATES_LOWP else torch.float32


def _intra(q, k, g, lay: ChunkTable, flags: dict, cfg: dict, lowp: bool, scores: bool = True, decay: bool = True):
    """A [B, T, H, BT] (None without ``scores``), qg and kd [B, T, H, K] (in the dots' operand dtype: bfloat16
    with lowp, else float32), bc [NC, H, K] float32, and hi and lo [B, T, H, K] float32 (None without
    ``decay``: diag sums its sub-chunks' gates itself)."""
    B, T, H, K = q.shape
    dt = _scores_dtype(lowp)
    qg = torch.empty(B, T, H, K, dtype=dt, device=q.device)
    kd = torch.empty_like(qg)
    bc = torch.empty(lay.NC, H, K, dtype=torch.float32, device=q.device)
    hi = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device) if decay else None
    lo = torch.empty_like(hi) if decay else None
    A = torch.empty(B, T, H, BT, dtype=dt, device=q.device) if scores else None
    whole = torch.empty(lay.NC, H, dtype=torch.int8, device=q.device) if scores else None  # chunks formed whole
    _intra_kernel[(lay.NC, H)](
        q, k, g, lay.chunks, hi if decay else bc, lo if decay else bc, A if scores else qg, qg, kd, bc,
        whole if scores else bc, H=H, K=K, BT=BT, BC=BC, STORE_A=scores, STORE_DECAY=decay,
        CHUNK_LIMIT=CHUNK_LIMIT, **cfg["intra"], **flags,
    )  # fmt: skip
    if scores:
        _diag_kernel[(lay.NC, BT // BC, H)](
            q, k, g, lay.chunks, A, whole, H=H, K=K, BT=BT, BC=BC, REBASE_LIMIT=REBASE_LIMIT, **cfg["diag"],
            **flags,
        )  # fmt: skip
    return A, qg, kd, bc, hi, lo


def _num_segments(N: int, H: int, T: int, cu_seqlens) -> int:
    """Segments per sequence for the per-sequence passes (1: none); see SEGMENT_HEADS."""
    return segment_count(N, H, T, BT, cu_seqlens, SEGMENTS, SEGMENT_HEADS, SEGMENT_MIN_CHUNKS, MIN_SEGMENTS)


def _launch_state(x, y, bc, start, cu, first, nseq: int, scale, reverse: bool, cfg, flags, lowp, **out):
    """One launch of _state_kernel over nseq sequences (cu, first: their bounds and first chunks) from start
    [nseq, H, K, V] (None: zeros), filling what ``out`` gives: o (with qg and A), states, last."""
    H, K, V = x.shape[2], x.shape[3], y.shape[3]
    cfg = _per_sequence(cfg, K, V, nseq * H)
    o, states, last = out.get("o"), out.get("states"), out.get("last")
    _state_kernel[(triton.cdiv(K, cfg["BK"]), triton.cdiv(V, cfg["BV"]), nseq * H)](
        x, y, bc, out.get("qg", x), out.get("A", x), start if start is not None else bc, cu, first,
        o if o is not None else y, states if states is not None else bc, last if last is not None else bc, scale,
        H=H, K=K, V=V, BT=BT, REVERSE=reverse, HAS_H0=start is not None, STORE_O=o is not None,
        STORE_STATES=states is not None, STORE_HT=last is not None, LOWP=lowp, **cfg, **flags,
    )  # fmt: skip


def _sweep(x, y, bc, start, lay: ChunkTable, cu_seqlens, scale, reverse: bool, cfg, flags, lowp, own_cfg=None, **out):
    """One per-sequence pass of _state_kernel from start [N, H, K, V] (None: zeros), filling what ``out`` gives
    (see _launch_state). With segments (SEGMENT_HEADS): each segment's own change of state from zeros (own_cfg's
    blocks, default cfg's), chained over the segments by their summed log-decays (common/triton_segments.py), then
    each segment from what enters it."""
    H = x.shape[2]
    NS = _num_segments(lay.N, H, x.shape[1], cu_seqlens)
    if NS == 1:
        _launch_state(x, y, bc, start, lay.cu, lay.first, lay.N, scale, reverse, cfg, flags, lowp, **out)
        return
    seg = Segments.get(lay.N, x.shape[1], NS, BT, x.device)
    own = torch.empty(seg.N, seg.NS, H, x.shape[3], y.shape[3], dtype=torch.float32, device=x.device)
    nseq = seg.N * seg.NS
    _launch_state(x, y, bc, None, seg.cu, seg.first, nseq, scale, reverse, own_cfg or cfg, flags, lowp, last=own)
    hin, _ = chain_segments(own, seg.sum_chunks(bc), start, reverse, ht=out.pop("last", None))
    del own
    _launch_state(x, y, bc, hin, seg.cu, seg.first, nseq, scale, reverse, cfg, flags, lowp, **out)


def _states(x, y, bc, start, lay: ChunkTable, cu_seqlens, scale, reverse, keep_last, flags, cfg, lowp):
    """The state [NC, H, K, V] (float32, or bfloat16 with STATES_LOWP) before each chunk's update (see
    _state_kernel), from start [N, H, K, V] (or zeros), and with keep_last the state after the last update (in
    reverse: dh0), else None."""
    H, K, V = x.shape[2], x.shape[3], y.shape[3]
    states = torch.empty(lay.NC, H, K, V, dtype=_states_dtype(lowp), device=x.device)
    last = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=x.device) if keep_last else None
    _sweep(x, y, bc, start, lay, cu_seqlens, scale, reverse, cfg, flags, lowp, states=states, last=last)
    return states, last


def _setup(q, v, cu_seqlens):
    """Shapes, the chunk table, the kernels' precision flags, whether dots take bf16 operands, launch settings."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = ChunkTable.get(B, T, cu_seqlens, BT, q.device)
    return B, T, H, K, V, lay, _flags(q.dtype), lowp_dots(q.dtype), _launch(q.dtype, K, V)


def forward(q, k, v, g, h0, scale: float, cu_seqlens, keep: bool = False):
    """o [B, T, H, V] in v's dtype, the final state [N, H, K, V], the scores A [B, T, H, BT] and, with keep, the
    state entering each chunk [NC, H, K, V] (as _states gives it; else None)."""
    B, T, H, K, V, lay, flags, lowp, cfg = _setup(q, v, cu_seqlens)
    A, qg, kd, bc, _, _ = _intra(q, k, g, lay, flags, cfg, lowp, decay=False)
    o = torch.empty(B, T, H, V, dtype=store_dtype(v.dtype), device=q.device)
    ht = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device)
    states = torch.empty(lay.NC, H, K, V, dtype=_states_dtype(lowp), device=q.device) if keep else None
    kept = dict(states=states) if keep else {}
    _sweep(
        kd, v, bc, h0, lay, cu_seqlens, scale, False, cfg["output"], flags, lowp, own_cfg=cfg["state"], qg=qg, A=A,
        o=o, last=ht, **kept,
    )  # fmt: skip
    return o.to(v.dtype), ht, A, states


def backward(do, dht, q, k, v, g, h0, ht, scale: float, cu_seqlens, saved=()):
    """Gradients (dq, dk, dv, dg, dh0 or None); dht is None when the final state got no gradient. saved: the
    forward's scores A (SAVE_SCORES) and states entering each chunk (KEEP_STATES), each empty (or left out) to
    form them again."""
    B, T, H, K, V, lay, flags, lowp, cfg = _setup(q, v, cu_seqlens)
    saved_A, states = (*saved, None, None)[:2]
    given = saved_A is not None and saved_A.numel() > 0
    A, qg, kd, bc, hi, lo = _intra(q, k, g, lay, flags, cfg, lowp, scores=not given)
    A = saved_A if given else A
    c = cfg["state"]
    if states is None or states.numel() == 0:
        states, _ = _states(kd, v, bc, h0, lay, cu_seqlens, scale, False, False, flags, c, lowp)
    dstates, dh0 = _states(qg, do, bc, dht, lay, cu_seqlens, scale, True, h0 is not None, flags, c, lowp)
    del qg

    dv = torch.empty(v.shape, dtype=store_dtype(v.dtype), device=q.device)
    c = cfg["dv"]
    _dv_kernel[(lay.NC * triton.cdiv(V, c["BV"]), H)](
        kd, do, A, lay.chunks, dstates, dv, scale, H=H, K=K, V=V, BT=BT, LOWP=lowp, DOT_PREC=flags["DOT_PREC"],
        ROUND=flags["ROUND"], **c,
    )  # fmt: skip
    del A, kd
    dA = torch.empty(B, T, H, BT, dtype=torch.float32, device=q.device)
    _dA_kernel[(lay.NC, H)](
        v, do, lay.chunks, dA, scale, H=H, V=V, BT=BT, LOWP=lowp, DOT_PREC=flags["DOT_PREC"], ROUND=flags["ROUND"],
        **cfg["dA"],
    )  # fmt: skip
    dq = torch.empty(q.shape, dtype=store_dtype(q.dtype), device=q.device)
    dk = torch.empty(k.shape, dtype=store_dtype(k.dtype), device=q.device)
    dg = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dqs = dks = dc = dg  # placeholders unless STATE_KERNEL
    if STATE_KERNEL:
        dqs = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
        dks = torch.empty_like(dqs)
        dc = torch.empty(lay.NC, H, K, dtype=torch.float32, device=q.device)
        c = cfg["dqk_state"]
        _dqk_state_kernel[(lay.NC * triton.cdiv(K, c["BK"]), H)](
            v, do, lay.chunks, states, dstates, dqs, dks, dc, H=H, K=K, V=V, BT=BT, LOWP=lowp,
            DOT_PREC=flags["DOT_PREC"], ROUND=flags["ROUND"], **c,
        )  # fmt: skip
    c = cfg["dqkg"]
    _dqkg_kernel[(lay.NC * triton.cdiv(K, c["BK"]), H)](
        q, k, v, do, hi, lo, dA, lay.chunks, states, dstates, dqs, dks, dc, dq, dk, dg, scale,
        H=H, K=K, V=V, BT=BT, BC=BC, LOWP=lowp, STATE_GIVEN=STATE_KERNEL,
        REBASE_LIMIT=REBASE_LIMIT, CHUNK_LIMIT=CHUNK_LIMIT, **c, **flags,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration and the public function
# ----------------------------------------------------------------------------------------------------------------


def _forward(q, k, v, g, h0, scale, cu_seqlens, keep):
    o, ht, A, states = forward(q, k, v, g, h0, scale, cu_seqlens, keep)
    return o, ht, (A if SAVE_SCORES else A.new_empty(0)), (states if keep else none_tensor(q))


def _fake_saved(q, k, v, g, h0, cu_seqlens, scale, keep):
    """The fakes of what _forward keeps for the backward: the scores (SAVE_SCORES) and the states (keep)."""
    lowp = lowp_dots(q.dtype)
    A = q.new_empty(*((*q.shape[:3], BT) if SAVE_SCORES else (0,)), dtype=_scores_dtype(lowp))
    if not keep:
        return A, none_tensor(q)
    NC = ChunkTable.count(q.shape[0], q.shape[1], cu_seqlens, BT)
    return A, q.new_empty(NC, q.shape[2], q.shape[3], v.shape[3], dtype=_states_dtype(lowp))


# Same contract as ``naive_gla``, with g [B, T, H, K].
triton_gla = register_decay_ops("gla", _forward, backward, fake_saved=_fake_saved, keeps=lambda: KEEP_STATES)


def compile_variants():
    """The kernel variants the launchers use, for tests/ops/compile_kernels.py to compile for sm_90 without a GPU.

    Each is (label, kernel, pointer dtypes, constexprs, launch options).
    """
    # Every kernel in bfloat16 at the standard head size; float16 (tf32 dots, no 16-bit operands) for the
    # kernels whose dots it changes.
    for dt, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        flags = _flags(torch_dtype, gpu=True)
        lowp = torch_dtype == torch.bfloat16
        cfg = _launch(torch_dtype, 128, 128)
        op = dt if lowp else "fp32"  # A, qg, kd: the dots' operand dtype
        ptrs = {n: dt for n in ("q", "k", "v", "do", "o", "dq", "dk", "dv")} | dict(A=op, qg=op, kd=op)
        ptrs |= dict(x=op, y=dt)
        st = "bf16" if _states_dtype(lowp) == torch.bfloat16 else "fp32"
        ptrs |= dict(states=st, dstates=st)
        ptrs |= dict(chunks="i32", cu_seqlens="i32", chunk_start="i32", whole="i8")
        common = dict(H=16, K=128, V=128, BT=BT, REBASE_LIMIT=REBASE_LIMIT, CHUNK_LIMIT=CHUNK_LIMIT, **flags)
        scalars = dict(scalars={"scale": "fp32"})

        fwd, rev = dict(REVERSE=False, STORE_O=False, STORE_STATES=True), dict(REVERSE=True, STORE_O=False)
        state = dict(HAS_H0=True, STORE_HT=True, LOWP=lowp, STORE_STATES=True)
        kernels = [  # (name, kernel, constexprs, launch config)
            ("dstates", _state_kernel, state | rev, cfg["state"]),
            ("dv", _dv_kernel, dict(LOWP=lowp), cfg["dv"]),
            ("dA", _dA_kernel, dict(LOWP=lowp), cfg["dA"]),
            ("dqkg", _dqkg_kernel, dict(BC=BC, LOWP=lowp, STATE_GIVEN=False), cfg["dqkg"]),
            ("dqkg given the state products", _dqkg_kernel, dict(BC=BC, LOWP=lowp, STATE_GIVEN=True), cfg["dqkg"]),
            ("dqk_state", _dqk_state_kernel, dict(LOWP=lowp), cfg["dqk_state"]),
        ]
        if dt == "bf16":
            kernels += [
                ("intra", _intra_kernel, dict(BC=BC, STORE_A=True, STORE_DECAY=False), cfg["intra"]),
                ("intra for the backward", _intra_kernel, dict(BC=BC, STORE_A=False, STORE_DECAY=True), cfg["intra"]),
                ("diag", _diag_kernel, dict(BC=BC), cfg["diag"]),
                ("forward", _state_kernel, state | fwd | dict(STORE_O=True, STORE_STATES=False), cfg["output"]),
                ("states", _state_kernel, state | fwd, cfg["state"]),
                ("forward keeping its states", _state_kernel, state | fwd | dict(STORE_O=True), cfg["output"]),
                # one sequence of 16 heads: the value blocks narrowed for few programs (FEW_PROGRAMS)
                (
                    "forward, few programs",
                    _state_kernel,
                    state | fwd | dict(STORE_O=True, STORE_STATES=False),
                    _per_sequence(cfg["output"], 128, 128, 16),
                ),
                ("states, few programs", _state_kernel, state | fwd, _per_sequence(cfg["state"], 128, 128, 16)),
                ("dstates, few programs", _state_kernel, state | rev, _per_sequence(cfg["state"], 128, 128, 16)),
                # segments (SEGMENT_HEADS): each segment's own change of state, from zeros, storing only its end
                (
                    "segment's own change",
                    _state_kernel,
                    state | fwd | dict(HAS_H0=False, STORE_STATES=False),
                    cfg["state"],
                ),
            ]
        for name, kernel, const, c in kernels:
            c = dict(c)
            opts = dict(num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages", 2), **scalars)
            const = {n: x for n, x in (common | const | c).items() if n in kernel.arg_names}
            yield f"{name} {dt} K=128 V=128", kernel, ptrs, const, opts


__all__ = ["triton_gla", "triton_unsupported", "forward", "backward", "recurrent", "BT"]
