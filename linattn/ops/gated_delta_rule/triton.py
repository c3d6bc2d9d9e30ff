"""Triton kernels for the gated delta rule (the delta rule is g = None): launchers and registration.

The chunked form of ``chunk.py`` (chunk length 64), in the kernels of ``triton_kernels.py``:

    prepare          per chunk      Tinv = (I + A)^-1 by blocked forward substitution, W = Tinv (beta exp(b) K),
                                    U0 = Tinv (beta V), with A_ts = beta_t exp(b_t - b_s) k_t . k_s (s < t)
    forward          per sequence   the state S [K, BV] in registers, chunk after chunk:
                                    U = U0 - W S,  S <- exp(b_C) S + (exp(b_C - b) k)^T U, storing each chunk's
                                    entering S and U; or, without a gradient, forming o itself (as below)
    output           per chunk      o = scale (exp(b) q S + tril(q k^T exp(b_t - b_s)) U)
    local_du         per chunk      dU = scale P^T dO (P the masked, decayed q k^T above), the part of dU
                                    that needs no state (the gated op; the delta rule's backward_state forms it
                                    in its loop: SPLIT_BACKWARD)
    backward_state   per sequence   the same loop in reverse on dS, storing dX = Tinv^T dU (below) and the
                                    gradient dS' of each chunk's exit state: dU += (exp(b_C - b) k) dS',
                                    dS <- exp(b_C) dS' + scale (exp(b) q)^T dO - W^T dU
    backward_chunk   per chunk      dq, dk, dv, dbeta and dg from the chunk's entering state S, dS', U and dU,
                     and key block  through dX = Tinv^T dU: dv = beta dX, dA = -dX U^T (strictly lower)
                                    and dk gains -beta exp(b) dX S^T; one program per block of CHUNK_KEYS
                                    key columns (by op), whose shares of dg and dbeta the launcher adds
    recurrent        per sequence   token by token, for decoding

When a gradient is needed the forward keeps Tinv [B, T, H, 64] (float32; bfloat16 for bfloat16 inputs on a GPU:
PREPARE_LOWP); the backward recomputes W and U0 from it and runs the forward loop again to store each chunk's
entering state and U.

bfloat16 on a GPU (LOWP, by kernel: LOWP_DOTS): the products that a plain bfloat16 run forms with matmuls take
bfloat16 operands with float32 accumulation (``mm_lowp``). These are, forward: W S, (exp(b_C - b) k)^T U (and q k^T,
(exp(b) q) S, P U when it forms o); output: the same three; local_du: k q^T, P^T dO; backward_state: (exp(b_C - b)
k) dS', (exp(b) q)^T dO, W^T dU; backward_chunk: dO S^T, U dS'^T, dO U^T, q k^T, dP k, dP^T q, G k, G^T k (G = beta
exp(b_t - b_s) dA), and (STATES_LOWP) dX S^T, dX U^T; prepare (PREPARE_LOWP): k k^T as A (the same products as
tf32's for bfloat16 keys), and W and U0 from Tinv, as fla's. The solve (one pass of tf32 products with rounded
operands: SOLVE_TF32X3) and Tinv^T dU keep tf32. States, dU and all accumulators stay float32; so do W, unless both
kernels that read it take bfloat16 operands (then it is stored in bfloat16: LOWP_STORE), and U and dX, unless
backward_chunk takes them (then the backward stores them in bfloat16, and for the delta rule the states and their
gradients too: STATES_LOWP, UNGATED_STATES_LOWP). forward, output, local_du and
backward_state take bfloat16 operands only where the ptxas that assembles them is trusted with them
(``common/ptxas.py``); the op's launches run inside ``ptxas.assembler()``, which on Hopper with Triton 3.6 assembles
them with the newer of Triton's two ptxas.

Gates stay in log space: b is the chunk-local cumulative sum (float64, split into a float32 pair by
``chunk_log_decay``) and every exponent used, b_t - b_s for s <= t, b and b_C - b, is <= 0, so gates
of 0 and of -1e4 neither overflow nor produce NaN. dg is a float64 reverse cumulative sum, within the
chunk, of the gradient with respect to b; each token's own +x - x terms are left out rather than cancelled.

qk_l2norm and beta_is_logit are applied as the kernels load q, k and beta, and their backward chains
are applied in the per-chunk kernel, so the options cost no extra pass over memory; but each kernel forms the
row norms of what it loads again, which on an H200 cost more than a pass would (NORMS_IN, WIDE_KEYS_L2NORM).
Few tokens and no gradient run the token recurrence instead (decoding).
"""

from __future__ import annotations

import torch
import triton

from linattn.ops._contract import RECURRENT_MAX_T, triton_interpret
from linattn.ops.common import ptxas
from linattn.ops.common.triton_ops import decode_launch, fake_state, none_tensor
from linattn.ops.common.triton_recurrent import recurrent as common_recurrent
from linattn.ops.common.triton_segments import Segments, segment_count
from linattn.ops.common.triton_utils import (
    HOPPER_SHARED,
    ChunkTable,
    gpu_shared_below,
    kernel_flags,
    narrow_bv,
    needs_grad,
    on_device_of,
    precise_exp,
    short_for_recurrent,
    store_dtype,
    triton_unsupported,
)
from linattn.ops.gated_delta_rule.triton_kernels import (
    _backward_chunk_kernel,
    _backward_state_kernel,
    _chain_kernel,
    _forward_kernel,
    _local_du_kernel,
    _log_decay_kernel,
    _output_kernel,
    _prepare_kernel,
    _row_norms_kernel,
)

BT = 64  # chunk length
# Value columns per program of the per-sequence kernels (forward, backward_state): BV_MAX with tf32 dots, BV_MAX_LOWP
# with bfloat16 operands (LOWP; half the operand bytes). On an H200 (session 8, T = 4096, B = 16, bf16, one call)
# 64 against 32 took delta_rule fwd+bwd 10.19 ms against 11.31, gated_delta_rule 12.78 against 14.17.
BV_MAX = 32
BV_MAX_LOWP = 64
# W stored in bfloat16 where forward and backward_state take bfloat16 operands: they round it so for their products
# anyway, so nothing changes but the bytes (W is read once per V block of each).
LOWP_STORE = True
# Value columns per step of the per-chunk kernels' loops (output, local_du, backward_chunk). On an H200 (session 14,
# one call, bf16, fwd+bwd ms, T = 4096, B = 16) 64 against 32: delta_rule 6.13 against 6.22, gated_delta_rule 8.17
# against 8.48; every delta GPU test passes (144, every dtype).
BV_CHUNK = 64
# backward_chunk's own value columns per step, by op, where they differ from BV_CHUNK (None: BV_CHUNK). sm_90 compile
# (Triton 3.6, bf16, gated, whole rows at 8 warps, the benchmark's launch): spill stack 2,768 B a thread at 64,
# 2,136 at 32 (SASS 10,760 -> 8,112 instructions), 2,968 at 128. Built after session 19's device time, untimed
# (LINATTN_LAUNCH="gated_delta_rule.BACKWARD_CHUNK_BV.gated=32").
BACKWARD_CHUNK_BV = dict(gated=None, ungated=None)
# prepare goes through K in blocks of this many columns (k k^T summed over them, W formed block by block), so that no
# [BT, K] float32 tile is live. sm_90 compile, bf16 with gates, K = 128, 4 warps (Triton 3.9), spill stack a thread
# (solving / loading Tinv): main's kernel 416 / 912 B; in blocks of 128: 952 / 344; 64: 1064 / 464; 32: 616 / 0.
# Spills have not predicted speed here. On an H200 (session 9, one call, bf16, fwd+bwd ms, T = 4096, B = 16):
# delta_rule 9.53 with blocks of 64, 9.64 with 32, 9.82 with 128 (as before); gated_delta_rule 12.10, 12.20, 12.39.
PREPARE_KEYS = 64
# The WY solve's 16-blocks by doubling, as batched tensor-core products (unit_lower_inverse's DIAG_DOUBLING), rather
# than row by row with elementwise products (LINATTN_LAUNCH="gated_delta_rule.SOLVE_DIAG_DOUBLING=0" gives the rows).
# On an H200 (session 10, one call, bf16, fwd+bwd ms, T = 4096, B = 16): delta_rule 8.92 against 9.26 with rows,
# gated_delta_rule 10.37 against 10.68.
SOLVE_DIAG_DOUBLING = True
# prepare's precision for bfloat16 inputs on a GPU. SOLVE_TF32X3: the solve's products in three tf32 passes (about
# float32's accuracy, as the plain run's triangular solve), else one with operands rounded to the nearest tf32.
# PREPARE_LOWP: kkt, A's k k^T from the bfloat16 keys as they are (the same products as tf32's; not with qk_l2norm,
# whose normalised keys tf32 rounds); wu, W's and U0's products with bfloat16 operands (Tinv rounded to bfloat16, as
# fla's solve stores it). On an H200 (session 13, bf16, T = 4096, B = 16, fwd+bwd ms,
# delta_rule / gated; DB_FROM_PRODUCTS on for both in the first four rows):
#   tf32x3, float32 products (before)       7.68 / 9.52
#   kkt                                     7.60 / 9.45   every delta GPU test passes (132)
#   kkt, wu                                 7.16 / 9.01   the bf16 GPU tests (35) pass; all 132 with the defaults
#   kkt, one rounded tf32 pass              7.27 / 9.12
#   kkt, wu, one rounded tf32 pass          6.72 / 8.71   the defaults (other call; DB for the gated op only): the 35
#                                                         pass; with truncated (unrounded) tf32, 6.86 / 8.67 and a
#                                                         bf16 final state failed the dtype rule
#   kkt, wu, U0 stored in bfloat16          6.85 / 8.99   fail: bf16 final state 0.00466 against twice the plain
#                                                         run's error (K = 128, V = 256: 0.00266 against 0.0010);
#                                                         the switch was removed
SOLVE_TF32X3 = False
# tinv: Tinv stored in bfloat16 (it is rounded so for W and U0 anyway, which stay the same to the bit; backward_state's
# dX = Tinv^T dU then takes the rounded Tinv too). u0_backward: the backward's prepare stores U0 in bfloat16 for the
# forward's loop it runs again (the forward's own U0 stays float32: in bfloat16 it failed the bf16 final-state
# test, above). Both with wu, on bfloat16 inputs on a GPU. On an H200 (session 14, one call, bf16, T = 4096,
# B = 16, fwd+bwd ms, delta_rule / gated, each on BV_CHUNK = 64's 6.08 / 8.05): tinv 5.95 / 7.65, u0_backward
# 5.98 / 7.98; the bf16 GPU tests (41) pass with either. Both together (session 15, one call, against 5.94 / 7.63
# with tinv alone): 5.79 / 7.51, the 41 pass.
PREPARE_LOWP = dict(kkt=True, wu=True, tinv=True, u0_backward=True)
# Launch options by kernel. Every kernel holds several [BT, K] float32 tiles: at 4 warps each spills 0.3-3.6 KB of
# registers per thread (compile_kernels --resources), yet on an H200 (T = 4096, B = 16, bf16) 4 warps measured
# faster than 8 (delta_rule fwd+bwd 18.6 ms against 24.8, gated_delta_rule 27.8 against 34.0).
NUM_WARPS = dict(prepare=4, forward=4, output=4, local_du=4, backward_state=4, backward_chunk=4)
# num_stages for 16-bit inputs (float32 always takes 1: its tiles with more stages overflow shared memory). One stage
# cuts shared memory per program (sm_90 compile, bf16: forward 123 -> 82 KB, backward_state 99 -> 66 KB), so more
# programs share an SM; on an H200 (T = 4096, B = 16, bf16, session 5) gated_delta_rule fwd+bwd went 30.6 -> 27.4 ms.
# backward_chunk takes 2 with ONE_PASS_CHUNK (see there): its one loop's second V block's loads in flight while the
# first's are used; for bfloat16 only (ONE_STAGE_FLOAT16): float16's tiles (tf32 products) took 237,568 B so on sm_90
# (Triton 3.6, K = V = 128, 8 warps), past Hopper's 232,448.
NUM_STAGES = dict(prepare=1, forward=1, output=1, local_du=1, backward_state=1, backward_chunk=2)
ONE_STAGE_FLOAT16 = frozenset({"backward_chunk"})
# float16 with qk_l2norm takes one stage as well: with the norms formed in the kernels, its tf32x3 dots and the rows
# it reduces took the delta rule's forward and backward_state past the 227 KiB of shared memory that Hopper gives a
# program at the few-program launches' 2 stages (sm_90, Triton 3.6: 249,856 and 245,760 B; OutOfResources on an
# H200 in session 20, K = 128). With the norms read (NORMS_IN) they would fit (184,832 and 180,736 B), but whether
# a launch reads them depends on the call (NORMS_IN_INFERENCE), so the rule does not ask.
# gated_delta_rule's entries where they differ. On an H200 (session 9, one call, bf16, fwd+bwd ms, B T = 65536),
# 2 stages in forward and backward_state against 1:
#   T                  2048            4096            16384           65536
#   gated_delta_rule   11.27 / 11.72   11.22 / 11.72   14.96 / 16.10   17.69 / 18.30
#   delta_rule          9.17 /  9.33    9.18 /  9.30   13.58 / 13.26   16.80 / 15.71
# so the gated op takes them at every T and delta_rule, slower at long T, does not. Every kernel has its entry, so
# that LINATTN_LAUNCH="gated_delta_rule.GATED_STAGES.<kernel>=2" can try the others. Session 10 (H200, one call,
# T = 4096, gated fwd+bwd 10.69 / 10.71 ms with the settings above): 2 stages in prepare 10.88, output 10.67,
# local_du 10.64, backward_chunk 11.26; none beyond the noise, so they stayed at 1. backward_chunk takes 2 since
# session 25, with ONE_PASS_CHUNK.
GATED_STAGES = dict(prepare=1, forward=2, output=1, local_du=1, backward_state=2, backward_chunk=2)
# num_warps of a kernel whose programs hold 128 key columns or more (NUM_WARPS otherwise): backward_chunk over
# whole rows at K = 128 (CHUNK_KEYS, qk_l2norm). On an H200 (session 19, bf16, fwd+bwd ms, T = 4096, B = 16 /
# T = 65536, B = 1, 8 warps against 4): gated 6.47 / 7.80 against (64 columns at 4 warps) 6.64 / 7.97; with
# qk_l2norm, gated 9.50 / 11.92 against 12.64 / 15.07, the delta rule 6.40 / 8.44 against 7.71 / 9.75.
WIDE_KEYS_WARPS = dict(backward_chunk=8)
# WIDE_KEYS_L2NORM: WIDE_KEYS_WARPS for the kernels with qk_l2norm too (the timings above). Session 20 (H200): the GPU
# tests of training with qk_l2norm at K = 128 (test_gpu_options_at_full_heads) pass at 8 warps in bfloat16 and
# float32 (float16's failed at 4 and 8 warps alike, out of shared memory: see NUM_STAGES). Again in session 20's
# call 1, with qk_l2norm, fwd+bwd ms at T = 4096 / 65536: delta 6.40 / 8.44 against 7.70 / 9.78, gated 9.51 / 11.91
# against 12.66 / 15.10. LINATTN_LAUNCH="gated_delta_rule.WIDE_KEYS_L2NORM=0": off.
WIDE_KEYS_L2NORM = True
# NORMS_IN: with qk_l2norm, the 1 / row norms of q and k are formed once a call (_row_norms: one read of each,
# [B, T, H, 2] float32) and the kernels that load rows of q or k (NORM_KERNELS) read them, where each formed them
# again from the rows it loaded (a sum over the row: shuffles, and the row's squares). sm_90 compile (Triton 3.6,
# bf16, gated, qk_l2norm and beta logits; a load standing in for the stored norm), SASS instructions formed -> read:
# the unsplit forward 11,304 -> 7,968 (7,368 without qk_l2norm), the storing forward 5,992 -> 4,336 (4,176),
# backward_state 10,560 -> 7,592 (7,248), output 8,168 -> 5,088 (4,208), local_du 7,112 -> 4,200 (3,616),
# backward_chunk at 8 warps 15,176 -> 11,664 (10,760). _row_norms_kernel forms them as the kernels do
# (inverse_row_norms), in one launch per forward; the backward reads the forward's (8 MiB at the standard shape).
# On an H200 (session 20, call 3, bf16, qk_l2norm, fwd+bwd ms, T = 4096 / 65536, same GPU): delta 6.38 / 8.08
# against 6.41 / 8.47, gated 8.79 / 10.53 against 9.77 / 12.21; _row_norms_kernel 0.13 ms (a first form with
# torch's vector_norm took 1.08 ms for its four reductions, formed again in the backward). The no-gradient forward
# of the delta rule is slower with it (1.99 / 2.84 against 1.78 / 2.60 ms), the gated one's faster (2.90 / 3.63
# against 3.81 / 4.70). LINATTN_LAUNCH="gated_delta_rule.NORMS_IN=0": off.
NORMS_IN = True
# NORMS_IN_INFERENCE: whether the forward without a gradient reads them too, by op. Session 20 (H200, calls 1 and 3,
# bf16, qk_l2norm, no-gradient forward ms, T = 4096 / 65536): the delta rule 1.78 / 2.60 formed against 1.99 / 2.84
# read (its one loop forms o and loads every row once: the extra launch and reads cost more than the sums they
# save); the gated op 3.81 / 4.70 formed, 2.90 / 3.63 read, 2.43 / 3.22 read and split (SPLIT_INFERENCE). Both forms
# pass the GPU inference tests (test_gpu_inference_forward_bfloat16: formed in session 20's call 1, read in call 4).
NORMS_IN_INFERENCE = dict(gated=True, ungated=False)
NORM_KERNELS = frozenset({"prepare", "forward", "output", "local_du", "backward_state", "backward_chunk"})
# qk_l2norm stays inside the kernels. A pass of its own before the op (built in session 19, then removed) hands them
# q and k rounded to bfloat16, which the kernels then scale (beta, decays) and round again as dot operands, where a
# plain run rounds them once; emulated on CPU (the chunked path with rounded matmuls, the GPU test's shape and seed)
# its error in dh0 alone reached 1.99x the plain run's, before any kernel's own (RESULTS.md, session 19).
# The forward's launch with fewer programs than this (one per SM of an H100/H200) is not limited by shared memory,
# and takes FEW_PROGRAMS_STAGES to hide its loads. At T = 65536, B = 1 (128 programs) on an H200, session 5, forward
# alone: delta_rule 7.28 ms with 2 stages against 9.08 with 1, gated_delta_rule 12.2 against 13.4. The backward's
# launches then kept NUM_STAGES there: with 2 stages for them as well, gated_delta_rule's backward took 31.8 ms,
# against 26.2 with 1 (delta_rule: 19.1 against 18.8), with session 5's kernels. backward_state takes them too since
# session 17 (H200, one call, bf16, delta_rule fwd+bwd ms, 2 stages for every launch of it against 1): T = 16384,
# B = 4 (128 programs) 4.90 against 5.45; but 4.91 against 4.84 at T = 4096 and 6.41 against 6.31 at T = 65536
# (512 programs each, the latter over 16 segments), so by its program count. The gated op's is 2 anyway.
# Session 21 (H200, bf16, fwd+bwd ms, one call, main with 2 stages -> 3): the delta rule at T = 16384, B = 4 (128
# programs) 4.86 -> 4.79, at T = 32768, B = 2 (128 programs, no segments) 5.28 -> 4.64 (its forward alone 0.90 ->
# about 0.5 ms: fwd 1.89 -> 1.50); at T = 65536 over 8 segments (256 programs each pass, not few) unchanged. 4 stages
# ran out of shared memory (OutOfResources) at 16384 and 32768. By dtype: float16 keeps 2, since its tf32x3 dots
# take more shared memory (the delta rule's few-program launch at 3 stages needed 233,472 B on the card, over the
# 232,448 it gives a program: OutOfResources in test_gpu_triton_matches_reference, session 21). float32 takes 1.
# Three were timed on Hopper only, and a GPU that gives a program less shared memory keeps two at most: on an A100
# (166,912 B), without bfloat16 operands in NEEDS_FIXED_PTXAS' kernels, the delta rule's no-gradient forward with
# qk_l2norm would take 229,376 B at three (128 programs of 32 value columns; 155,648 at two) and backward_state
# 172,032 (sm_80, Triton 3.6, tests/ops/launch_shared.py --arch 80).
FEW_PROGRAMS = 132
FEW_PROGRAMS_STAGES = dict(bfloat16=3, float16=2)
# Shared memory: the stages above were chosen on Hopper, which gives a program up to 227 KiB. Compiled for sm_89
# (Triton 3.6, session 18) with the flags a GPU other than compute capability 9 gets (no bfloat16 dots in
# NEEDS_FIXED_PTXAS' kernels: see common/ptxas.py), the gated forward that forms o (no gradient wanted) with
# qk_l2norm takes 108-120 KiB at two stages: more than the 99 KiB of sm_86, sm_89 and sm_120 GPUs, whose launch would
# fail. At one stage every kernel fits (at most 80 KiB for bf16 inputs; 96 KiB for float32's output kernel). So on a
# GPU that offers a program less than SMALL_SHARED, every launch takes one stage.
SMALL_SHARED = 128 * 1024
# There, float32's backward_chunk over whole key rows (the gated op's, and either op's with qk_l2norm) took 114,688 B
# at value blocks of 64 or at 8 warps (sm_89 compile, Triton 3.6, session 20: tests/ops/launch_shared.py --arch 89),
# past 99 KiB; at 32 and 4 warps at most 98,304 B. So float32 there takes value blocks of SMALL_SHARED_CHUNK_BV and
# NUM_WARPS, not WIDE_KEYS_WARPS.
SMALL_SHARED_CHUNK_BV = 32
# FEW_PROGRAMS_WARPS: num_warps of such a launch (None: NUM_WARPS), for tiles where 8 warps are safe (see _warps).
# With fewer programs than SMs, each SM holds one program, so its registers are not shared: 8 warps would halve each
# thread's part of a chunk step, which is the sequential loop's latency. At T = 32768, B = 2 (no segments) the
# per-sequence kernels run 128 programs of 32 value columns, and the forward and backward_state took 0.23 and 0.20
# ms longer than at T = 4096 (session 18's profile). Session 21 (H200, one call, 8 warps for both kernels and ops):
# the delta rule 4.87 -> 4.79 at T = 16384 and 5.30 -> 5.75 at 32768, so it stayed off.
# By op and kernel since session 26 (H200, bf16, fwd / fwd+bwd ms, one call, main then 8 warps for both kernels of the
# delta rule): T = 16384, B = 4 (BV = 64, 128 programs) 1.25 / 4.29 -> 1.49 / 3.87; T = 32768, B = 2 (BV = 32) 1.49 /
# 4.16 -> 1.96 / 4.62; T = 65536 (BV = 16, so 4 warps anyway) 5.09 -> 5.10. Then (call 2) kernel by kernel, 8 warps
# for the delta rule's backward_state alone: 3.87 / 4.50 / 5.11 against 4.32 / 4.17 / 5.11 at 4 (at T = 32768, BV =
# 32, 0.33 ms slower); for the gated op's backward_state alone (its narrow decays then off: see NARROW_FEW) 6.20 /
# 6.59 / 7.06 against 5.90 / 6.37 / 7.07; its forward alone 6.02 / 6.56 / 7.06. So the delta rule's backward_state
# takes 8 where its value blocks are FEW_PROGRAMS_WARPS_BV or wider.
# LINATTN_LAUNCH="gated_delta_rule.FEW_PROGRAMS_WARPS.ungated_backward_state=0": off (0 or None: NUM_WARPS).
FEW_PROGRAMS_WARPS = dict(gated_forward=None, gated_backward_state=None, ungated_forward=None, ungated_backward_state=8)
FEW_PROGRAMS_WARPS_BV = 64
# SMALL_TILE_WARPS: num_warps of tiles under 64 keys or 32 values (see _warps), for trying 8 on a GPU: session 26
# (H200, bf16), 8 took the delta rule at T = 65536 (then 128 programs of 16 value columns) 5.11 -> 6.19 ms.
SMALL_TILE_WARPS = 4
# bf16 operands for bf16 inputs on a GPU (see the module docstring), by kernel (H200, Triton 3.6):
# - backward_chunk: on. Right at K = 128 (gradient errors 4-5e-3 of the largest, as with tf32). Session 6: 4.36 ms
#   against 5.95 with tf32 (delta_rule, T = 4096, B = 16) and 5.82 against 9.20 (gated).
# - forward, backward_state, output, local_du (NEEDS_FIXED_PTXAS): on where common/ptxas.py trusts the ptxas that
#   assembles them (12.9 or later; Triton 3.6 carries one and linattn switches to it for its kernels). Assembled by
#   Triton 3.6's own sm_90 ptxas (12.8) they met illegal memory accesses and gradients of 1e35 (sessions 6-8); by its
#   12.9 every delta-rule GPU test and property test passes (101), and at T = 4096, B = 16 (session 8, one call)
#   fwd+bwd took 11.29 ms against 12.35 with tf32 (delta_rule) and 14.14 against 15.25 (gated). With an older
#   ptxas only they keep tf32.
# - prepare: forms no such product (the solve, W and U0 keep tf32), so its entry changes nothing.
# LINATTN_LAUNCH="gated_delta_rule.LOWP_DOTS.forward=0" turns one off for the tests and the benchmark.
LOWP_DOTS = dict(prepare=False, forward=True, output=True, local_du=True, backward_state=True, backward_chunk=True)
NEEDS_FIXED_PTXAS = frozenset({"forward", "output", "local_du", "backward_state"})
# backward_chunk keeps tf32 dots below this many key columns a program: at K = 16 Triton 3.6's bf16 dots read shared
# memory out of bounds (compute-sanitizer on an H200, 8 warps; at 4 warps a fault again in session 6). 32 is untried:
# LINATTN_LAUNCH="gated_delta_rule.CHUNK_KEYS.ungated=32;gated_delta_rule.LOWP_MIN_KEYS=32" tries it.
LOWP_MIN_KEYS = 64
# The products of q and k that need no state (q k^T, P U and exp(b) q S in the forward, P^T dO in the backward) run
# in kernels parallel over chunks (output, local_du), not in the per-sequence loops, which then form two products per
# chunk (forward) and three (backward_state) instead of five. The backward splits so unless SPLIT_BACKWARD is off
# (below). The forward does only where it keeps its states for the backward (KEEP_STATES), or with SPLIT_FORWARD and
# a gradient wanted; else its loop forms o itself, and its memory stays that of W and U0. The split forward stores
# every chunk's entering state and U only for its output kernel, which the unsplit loop does without: on an H200
# (session 11, one call, bf16, fwd+bwd ms, T = 4096, B = 16) delta_rule 7.97 unsplit against 8.89 split,
# gated_delta_rule 9.90 against 10.33.
SPLIT_FORWARD = False
# SPLIT_INFERENCE: the forward without a gradient splits too, by op and by whether the kernels normalise q and k
# (qk_l2norm: "l2norm") or not ("plain"): its loop then stores each chunk's entering state and U (in KEEP_LOWP's dtypes,
# which the output kernel's products round them to anyway) and the output kernel forms o, in parallel over chunks; the
# loop no longer loads and normalises q. On an H200 (session 19, bf16, T = 4096, B = 16, the no-gradient forward) the
# gated op took 1.75 ms, 3.66 with qk_l2norm; the delta rule 1.36 / 1.78. The price is memory: the states and U, 1 GiB
# at that shape for the delta rule (1.5 gated), for the call's length. On an H200 (session 20, call 3, bf16, qk_l2norm
# with NORMS_IN, no-gradient forward ms, T = 4096 / 65536): gated 2.43 / 3.22 split against 2.90 / 3.63, the delta rule
# 2.18 / 3.06 against 1.99 / 2.84; so the gated op splits with qk_l2norm. Without qk_l2norm untimed since session 19's
# change (LINATTN_LAUNCH="gated_delta_rule.SPLIT_INFERENCE.gated_plain=1" and ungated_plain). Its GPU test
# (test_gpu_inference_forward_bfloat16, both forms) passes on the card (session 20).
SPLIT_INFERENCE = dict(gated_l2norm=True, ungated_l2norm=False, gated_plain=False, ungated_plain=False)
# SPLIT_BACKWARD off: backward_state's loop forms scale P^T dO itself (two more products a chunk, from the q and k it
# loads anyway), and no local_du kernel runs: it wrote dU's share [B, T, H, V] in float32 (512 MiB at the standard
# shape) for backward_state to read back. fla's profile (RESULTS.md, session 14): its dv_local takes 0.25 ms
# against our local_du's 0.42. On an H200 (session 15, one call, bf16, T = 4096, B = 16, fwd+bwd ms, delta_rule /
# gated, against 5.94 / 7.63 split): 5.57 / 7.76, the bf16 GPU tests (41) pass. So the delta rule forms it in its
# loop, and the gated op, whose loop also scales by the decays, splits.
SPLIT_BACKWARD = dict(gated=True, ungated=False)
# NARROW_DECAYS: in the gated op's forward, backward_state and output kernels, the decays scale the narrow side of a
# product, U's rows, dO's rows or the result's rows ([BT, BV]), rather than the [BT, K] tiles of k and q: so those
# go to the tensor cores as loaded (bfloat16 straight from shared memory), where scaled they go through registers,
# are converted and are stored to shared memory again; the delta rule's, unscaled, already go straight. The same
# products; with bfloat16 operands the rounding moves from exp(b) k to exp(b) U (k exact). Each kernel's entry is
# the widest value block BV at which it is on (0: off). The sm_90 compile (Triton 3.6, bf16, the few-program launch:
# B = 1, H = 16): backward_state 2,168 -> 1,752 SASS instructions, forward 1,392 -> 1,216 (session 22). On an H200
# (session 23, bf16, fwd+bwd ms at T = 4096 / 32768 / 65536, main 6.15 / 7.33 / 7.47; profiles in RESULTS.md):
#   all three kernels at every BV: 6.16 / 6.80 / 7.72, backward_state 1.01 / 1.83 / 1.55 -> 1.02 / 1.37 / 1.82
#   (at 65536 the segments' first pass 0.54 -> 0.76); forward alone 6.15 / 7.24 / 7.46, but the no-gradient
#   forward 1.76 / 2.80 / 2.42 -> 1.99 / 2.48 / 2.65; backward_state alone 6.17 / 6.87 / 7.74; output alone 6.16 /
#   7.34 / 7.45.
# So they won where the launch's BV is 32 (T = 32768, B = 2: 32 sequences x heads, no segments) and lost at
# BV = 64 (many sequences, or the segments' 128): on for forward and backward_state at BV <= 32, which took (call 4)
# 6.16 / 6.79 / 7.46 (and 6.64 at T = 16384, BV = 64 there), every delta GPU test passing (90).
# LINATTN_LAUNCH="gated_delta_rule.NARROW_DECAYS.forward=0;gated_delta_rule.NARROW_DECAYS.backward_state=0": off.
NARROW_DECAYS = dict(forward=32, output=0, backward_state=32)
# NARROW_FEW: NARROW_DECAYS on as well, in forward and backward_state (the kernels with an entry), wherever a launch
# runs fewer than FEW_PROGRAMS programs, at any BV, unless FEW_PROGRAMS_WARPS has an entry for the op's kernel (at 8
# warps the narrow backward_state at BV = 64 needs 246,272 B of shared memory, past Hopper's 232,448). Session 24
# measured both kernels narrow at BV = 64 (LINATTN_LAUNCH's NARROW_DECAYS.forward=64 and .backward_state=64) on an H200,
# bf16: gated 2.35 / 6.36 -> 1.77 / 6.04 ms (fwd / fwd+bwd) at T = 16384, B = 4, whose launches run 128 programs, and
# 1.75 / 5.89 -> 1.98 / 5.91 at T = 4096, B = 16 (512 programs), as session 23 found at the segments' launches.
# Session 25 (H200, bf16, fwd+bwd ms, two calls each way in one call; T = 2048 / 4096 / 16384 / 32768 / 65536):
# off 5.89 / 5.87 / 6.36 / 6.53 / 7.21 and 5.89 / 5.87 / 6.34 / 6.51 / 7.19, on 5.89 / 5.87 / 6.04 / 6.51 / 7.20
# and 5.89 / 5.87 / 6.03 / 6.52 / 7.21: at T = 16384 the forward 2.35 -> 1.77 and backward_state 1.37 -> 1.13 ms;
# at 32768 and 65536 the few-program launches were already narrow (BV = 16 or 32). With it on, the gated GPU tests
# of test_triton_delta.py (41) and the property tests (22) pass on the card.
NARROW_FEW = True
# NARROW_AT_FEW_WARPS: NARROW_FEW's narrow decays kept where FEW_PROGRAMS_WARPS gives the gated op's kernel its own
# warps, at NARROW_AT_FEW_WARPS_STAGES stages at most (at three, 8 warps and BV = 64 the narrow backward_state needs
# 246,272 B, past Hopper's 232,448). Session 26 timed the gated backward_state at 8 warps without them only (slower:
# see FEW_PROGRAMS_WARPS); built after its device time, untimed, off. The sm_90 compile (Triton 3.6, bf16, BV = 64):
# at 4 warps and three stages backward_state spills (255 registers, 88 B stack), at 8 and two 254 registers, none;
# the delta rule's spilled at 4 (232 B) and not at 8, where it gained. Try with LINATTN_LAUNCH=
# "gated_delta_rule.FEW_PROGRAMS_WARPS.gated_backward_state=8;gated_delta_rule.NARROW_AT_FEW_WARPS=1".
NARROW_AT_FEW_WARPS = False
NARROW_AT_FEW_WARPS_STAGES = 2
# KEEP_STATES: the forward splits (above) and its stores (every chunk's entering state [NC, H, K, V], U [B, T, H, V])
# and W are kept for the backward, which then neither solves for W and U0 again nor runs the forward's loop again
# (fla's backward forms them again). With segments (long sequences, few of them: see SEGMENT_HEADS) the forward's
# last pass keeps them, and the backward takes the segments' transitions from the forward as well. Kept in float32
# (KEEP_LOWP off) it was slower (session 16, H200, bf16, fwd+bwd ms, T = 4096, B = 16: 6.73 against 5.38 formed
# again, gated 8.05 against 7.40), since the backward's own states, U and dX are bf16 where float32 ones were kept.
# KEEP_LOWP: what KEEP_STATES keeps is stored in the dtypes the backward would store it in itself (STATES_LOWP: for
# bfloat16 inputs on a GPU, U in bfloat16, and the delta rule's states too), so the backward keeps its bfloat16
# stores (dstates, dX); the output kernel's products round the states and U to bfloat16 anyway, as the unsplit
# loop's do. On an H200 (session 17, one call, bf16, fwd+bwd ms, delta_rule / gated) formed again / kept in float32
# / kept with KEEP_LOWP:
#   T = 4096, B = 16:  5.32 / 7.32    6.66 / 7.94    4.80 / 6.63
#   T = 8192, B = 8:   5.31 / 7.35    6.66 / 7.94    4.79 / 6.63
#   T = 65536, B = 1:  7.03 / 8.95    8.40 / 9.69    6.50 / 8.29
# Every delta GPU test passes with both on (session 17). The memory: kept per layer from the forward to the
# backward at B T = 65536, H = 16, K = V = 128, bf16: 1 GiB for the delta rule (its bf16 states 0.5, U and W 0.25
# each), 1.5 GiB gated (its states stay float32: see STATES_LOWP). One layer's peak rose less, since the backward
# allocates the same tensors itself when it forms them again (peak of one fwd+bwd, B = 1, session 17: T = 65536
# 5.1 -> 5.4 GB, gated 6.3 -> 6.5; T = 1M 75.9 -> 80.2 GB, gated 93.6 -> 97.9). Only where a gradient is wanted.
# Read at each call: set KEEP_STATES = False to trade the time for the memory (deep models at long context).
KEEP_STATES = True
KEEP_LOWP = True
# KEEP_SCORES, by op: with KEEP_STATES, the forward's output kernel also stores each chunk's intra-chunk scores P =
# tril(q k^T exp(b_t - b_s)) for the backward ([B, T, H, BT]: P^T's rows, in bfloat16 where backward_state takes
# bfloat16 operands, which round P so anyway; else float32), and backward_state forms dU's share within the chunk,
# scale P^T dO, from them (SCORES_IN): no local_du kernel (the gated op's SPLIT_BACKWARD), and no q k^T product in
# the delta rule's loop (LOCAL_DU). The same values as local_du's, up to the order of the products' sums. Memory: 128
# MiB more kept per layer at the standard shape (bf16). KEEP_SCORES_FEW: also where backward_state's launch runs
# fewer than FEW_PROGRAMS programs (_keeps_scores). On an H200 (session 27, one call, bf16, fwd+bwd ms, T = 2048 /
# 4096 / 16384 / 32768 / 65536, main's run before and after it):
#   gated, main                  5.70 / 5.71 / 5.84 / 6.33 / 7.04   and 5.71 / 5.69 / 5.84 / 6.34 / 7.02
#   gated, scores everywhere     5.35 / 5.33 / 6.06 / 6.59 / 6.71   (16384, 32768: 128 programs, no segments)
#   delta_rule, main             4.33 / 4.33 / 3.85 / 4.17 / 4.98   and 4.32 / 4.31 / 3.85 / 4.16 / 4.99
#   delta_rule, scores           4.43 / 4.42 / 4.30 / 4.81 / 5.70
# The gated backward_state at T = 4096 took 0.96 ms with them against 0.99 + 0.38 for local_du; at 16384 (128
# programs of 64 value columns, narrow decays, 4 warps) 1.67 against 1.13 + 0.38 (sm_90 compile: spill stack 88 ->
# 232 B); at 8 warps with its narrow decays (NARROW_AT_FEW_WARPS) the op took 5.99 / 6.59 at 16384 / 32768. The delta
# rule's backward_state got slower at every T (1.07 -> 1.13 ms at 4096, 0.80 -> 1.20 at 16384), though it forms one
# product fewer: its many-program launch runs one stage (NUM_STAGES), where every load waits, and the scores put a
# load from memory on each chunk's path in place of a product of tiles it loads anyway (k q^T); at few programs see
# SCORES_PIPELINED below. So the gated op keeps them where its backward_state runs many programs (segments'
# launches included), and the delta rule not at all. The GPU tests with both ops on (test_triton_delta.py -k gpu and
# the properties): 120 passed. With this rule (calls 4 and 5): gated 5.36 / 5.33 / 5.34 / 5.87 / 6.36 / 6.72 at T =
# 2048 / 4096 / 8192 / 16384 / 32768 / 65536, and again 5.36 / 5.36 / - / 5.84 / 6.33 / 6.70; with qk_l2norm 6.62 /
# 8.23 at T = 4096 / 65536 against 7.00 / 8.71 without scores; the GPU tests (with test_gpu_scores_kept) 132 passed.
KEEP_SCORES = dict(gated=True, ungated=False)
KEEP_SCORES_FEW = False
# SCORES_AT_FEW_WARPS_STAGES: the stages at most of a backward_state launch that reads the scores (SCORES_IN) at
# FEW_PROGRAMS_WARPS' warps: the delta rule's at 8 warps and three stages took 245,760 B of shared memory with the
# scores' load pipelined (SCORES_PIPELINED; sm_90, Triton 3.6, bf16, BV = 64), past Hopper's 232,448 (221,184
# without scores, and with their unpipelined load).
SCORES_AT_FEW_WARPS_STAGES = 2
# Tried and removed (call 6): dO loaded a second time for backward_state's q^T dO rather than kept live from P^T dO
# (sm_90 spill stack at the 128-program launch 232 -> 128 B): gated 5.92 / 6.01 / 6.64 at T = 4096 / 16384 / 32768
# with scores at every program count, against main's 5.35 / 5.86 / 6.35 in the same call.
# Found after the device time: in all those runs backward_state's load of the scores was not pipelined. Its mask
# varied along the row (the chunk's tokens on both axes), which leaves the load unvectorised (2-byte elements), and
# Triton 3.6 copies asynchronously (pipelines) only loads of at least 4 bytes a copy: it stayed the loop's one plain
# tile load, its latency exposed every chunk. Rows alone are masked now (a stored row holds zeros past the chunk's
# end), and it is one of the asynchronous copies (sm_90 TTGIR, the gated 128-program launch: 18 -> 21 of them; the
# many-program one 12 -> 14). SCORES_PIPELINED turns that form on: built after the device time, untimed and untested
# on a card (backward_state is among the kernels whose compiled code the card's ptxas got wrong before), so off; the
# rule above and the delta rule's entry were set by the unpipelined load. Try it with
# LINATTN_LAUNCH="gated_delta_rule.SCORES_PIPELINED=1" (and KEEP_SCORES.ungated=1, KEEP_SCORES_FEW=1).
SCORES_PIPELINED = False
# SCORES_NARROW_FEW, by dtype: the op also keeps its scores (KEEP_SCORES' entry on) where backward_state's launch runs
# few programs whose value blocks were narrowed to fill the GPU (_sequence_bv: below _blocks' BV), and that launch
# reads them pipelined (SCORES_PIPELINED's rows-only mask; see _scores_narrow_few). On an H200 (session 28, bf16,
# gated fwd+bwd ms, V_EARLY on; the few-program launches are 128 programs: BV = 64 at T = 16384, narrowed to 32 at
# 32768), scores at every program count, pipelined (KEEP_SCORES_FEW, SCORES_PIPELINED) against main, same call:
#   call 1 (V_EARLY off)  T = 4096 5.54 / 5.37, 16384 5.98 / 5.87, 32768 6.12 / 6.35, 65536 6.69 / 6.72
#   call 2                16384 5.96 / 5.85 and 5.84, 32768 6.09 / 6.35 and 6.31
# So pipelined scores lose at the many-program launch (4096) and at the unnarrowed few-program one (16384), and win
# at the narrowed one (32768), where the unpipelined load lost (session 27: 6.59 against 6.33). With this rule
# (calls 3 and 4): gated 6.10 / 6.09 / 6.08 at T = 32768 (5.84 / 5.86 at 16384, unchanged); with qk_l2norm 7.56
# against 8.14 with SCORES_NARROW_FEW off at 32768, 7.71 / 7.69 at 16384; test_triton_delta.py -k gpu and the
# properties 140 passed, and test_gpu_scores_kept (which pins this off: its first form is the unpipelined one) 27.
# Measured in bfloat16 only; not for float16 or float32 (scores in float32 there), untimed.
SCORES_NARROW_FEW = dict(bfloat16=True, float16=False, float32=False)
# STATES_LOWP: where backward_chunk takes bfloat16 operands (LOWP), what the backward stores for it in bfloat16,
# not float32: the states entering each chunk (states), the gradients of the states leaving them (dstates), U (u);
# the loops carry them in float32, only the stored copies are rounded (fla stores its h, dh and v_new so). dx:
# backward_chunk's products of dX with S and U take bfloat16 operands (else tf32). dU (dX) stays float32: it is
# summed into. Not where the forward kept its float32 states (KEEP_STATES).
# On an H200 (session 12, bf16, T = 4096, B = 16, fwd+bwd ms, main then 7.95 / 9.87 for delta_rule / gated):
# - all four on: 7.08 / 9.48, but the gated dg failed the dtype rule, error 0.352 against float64 where the plain
#   bfloat16 run's is 0.0279 (and 0.12 against 0.0465 with packed sequences); every other GPU test passed (118);
# - every variant tried with states or dstates in bfloat16 (six) failed it too, 0.11 - 0.36 against 0.028; likely
#   through <dS', S>, summed elementwise into the gradient of the chunk's last log-decay, whose terms cancel;
# - u and dx alone (the setting here): 7.46 / 9.78 in the same call as main's 7.95 / 9.87; the six bfloat16 GPU
#   tests of outputs and gradients (test_gpu_triton_matches_reference, test_gpu_varlen_with_empty_and_single_token)
#   pass with it. The whole GPU test run with exactly this setting did not finish in the session's device time.
STATES_LOWP = dict(states=False, dstates=False, u=True, dx=True, dx_store=True, du=False)
# dx_store: backward_state stores dX in bfloat16 (a tensor of its own; else float32 in dU's place), which
# backward_chunk reads in both of its passes: its products take it in bfloat16 anyway (dx), while dv = beta dX and
# dbeta's sum over v of dX v take the rounded value.
# du: _local_du_kernel stores dU's share within the chunk, scale P^T dO, in bfloat16 for backward_state to load and
# complete (only with dx_store: else dX takes dU's place in float32). The sums into it (the states' share) stay
# float32; a plain bfloat16 run rounds P^T dO so too. It halves what that kernel writes and backward_state reads of it
# (512 -> 256 MiB each way at the standard shape); the delta rule forms that share in its loop (SPLIT_BACKWARD).
# On an H200 (session 23, one call, bf16, gated fwd+bwd ms with NARROW_DECAYS): 5.99 / 6.66 at T = 4096 / 32768
# against 6.13 / 6.76 without, but test_gpu_extreme_gates[0.0] failed the dtype rule: dv's error against float64
# 0.0288, past 2 x the plain bfloat16 run's 0.0136 (89 other delta GPU tests passed). So off.
# The delta rule's own states and dstates entries (it has no dg, the one gradient that failed): in bfloat16.
# On an H200 (session 14, one call, bf16, T = 4096, B = 16, fwd+bwd ms, delta_rule / gated), against main's
# 6.70 / 8.67: UNGATED_STATES_LOWP 6.29 / 8.69; with dx_store as well 6.16 / 8.41. The 35 bf16 GPU tests (the only
# ones either touches) pass with both.
UNGATED_STATES_LOWP = dict(states=True, dstates=True)
# What the gated op's float32 states cost, and a form that keeps dg exact (session 28, H200, bf16, fwd+bwd ms):
# - STATES_LOWP's states and dstates on (call 5): 4.76 at T = 4096 (1.12x the delta rule's 4.24 in the same call)
#   against main's 5.32, 6.13 against 6.68 at 65536 (out of shared memory at 16384); backward_chunk 2.23 -> 1.95 ms,
#   forward 0.63 -> 0.51, output 0.57 -> 0.47, backward_state 0.97 -> 0.90. dg fails the dtype rule as in session
#   12 (0.352 against float64 where the plain run's is 0.0279): the only term that needs the states exact is <dS', S>,
#   the gradient of each chunk's last log-decay, whose terms cancel.
# - Tried and removed (call 6): the forward stored each state as a bfloat16 pair (hi; lo = S - hi), backward_state
#   formed <dS', S> per chunk and V block from its float32 dS' and hi + lo, and backward_chunk read those shares with
#   hi and dS' in bfloat16 (states moved per chunk and head 320 -> 256 KiB). dg then passed the dtype rule on the card
#   (55 of the gated GPU tests passed, test_gpu_triton_matches_reference included), but the op took 5.83 / 6.65 /
#   7.30 at T = 4096 / 32768 / 65536 against 5.33 / 6.11 / 6.69, and the few-program backward_state at 16384 needed
#   238,080 B of shared memory, past 232,448. sm_90 compile: that backward_state (scores in) spilled 472 B a thread
#   against 136 (the state tile beside dS' in its registers); backward_chunk 3,136 -> 2,768 SASS instructions.
# Tried and removed (session 14, same call as PREPARE_LOWP's tinv, bf16 GPU tests): local_du's scale P^T dO stored
# in bfloat16 (5.81 / 7.61 ms) failed the gated dv at gates of 0 (0.0288 against twice the plain run's 0.0136);
# backward_state's dX = Tinv^T dU with bfloat16 operands (5.95 / 8.05) failed 4 (dv; three at 2.1-2.8x the plain error).
# All four bfloat16 switches together took 5.52 / 7.38.
# DB_FROM_PRODUCTS: backward_chunk forms the row and column sums that db and dbeta take from its [BT, BT] gradient
# tiles (dP * P and dA * A) out of the products that dq and dk need anyway, instead of forming q k^T (a product) and
# k k^T (a tf32 product) and the tiles themselves (see _backward_chunk_kernel): two [BT, BK] products more, one
# [BT, BT] and one tf32 product and two [BT, BT] tiles fewer. With bfloat16 operands the sums then take dP and dA
# rounded to bfloat16. The products take dP's strictly lower part, its diagonal going into dq and dk apart: with
# the diagonal in both of db's sums (session 12's form), they cancelled it only to rounding, and at gates of -30
# and -1e4, where the true sums are ~0, the float32 dg failed the dtype rule on the card (8.0e-7 against the plain
# run's 0). sm_90 compile (bf16, 64 key columns, 4 warps), spill: gated 1576 -> 1504 B; with qk_l2norm (128
# columns) 2392 -> 3632 B. On an H200 (session 13, bf16, T = 4096, B = 16, fwd+bwd ms, same call): gated 9.69 ->
# 9.52, delta_rule 7.52 -> 7.68; so the gated op took it, the delta rule did not. Every delta GPU test passes.
# Since session 19 the gated backward_chunk runs over whole rows at 8 warps (CHUNK_KEYS), and there the products
# lose without qk_l2norm but win with it. On an H200 (session 20, bf16, gated, T = 4096 / 65536, fwd+bwd ms): without
# qk_l2norm 6.385 / 7.676 without them against 6.464 / 7.823 with (call 2; main before and after, same GPU: 6.482 /
# 7.798; call 3 again 6.383 / 7.708); with qk_l2norm and NORMS_IN, backward_chunk alone took 4.59 ms without them
# (call 3's profile, T = 4096) against 3.82 with (call 2's). An entry "l2norm": the products with qk_l2norm only.
# Session 22: the products' sums merged, three row sums of whole gradients (q . dq', k . dk' over the exp(-b) terms,
# k . d_plus for dbeta and beta's share of db) where that form took one per product (seven). sm_90 compile (Triton
# 3.6, bf16, the benchmark's launch): gated (whole rows, 8 warps) 3,944 SASS instructions with the tiles -> 3,360,
# SHFL 201 -> 133, BAR 142 -> 128, spill stack 96 -> 48 B; the delta rule (64 columns, 4 warps) 2,360 -> 2,024. On an
# H200 (call 1, bf16, fwd+bwd ms, T = 4096 / 32768 / 65536, same call): delta 4.83 / 4.67 / 5.59 -> 4.69 / 4.52 /
# 5.45, gated 6.42 / 7.61 / 7.72 -> 6.15 / 7.32 / 7.48; the delta GPU tests pass (90). So both ops take them, but
# for float32 on GPUs with less than SMALL_SHARED of shared memory (see _db_from_products).
DB_FROM_PRODUCTS = dict(gated=True, ungated=True)
# SUMS_IN_PLACE: backward_chunk's first-pass row sums (d_qs q, d_xw k, d_kend k: db's, and dbeta's) reduced in the
# products' own (MMA) layout, with keep_dims and scaled as [BT, 1] (common's row_sums_in_place; db then takes
# dbeta's share times beta), where the plain sums had the compiler convert each [BT, BK] float32 product to the
# loaded tiles' layout first. sm_90 compile, bf16, BK = 64, the benchmark's launch (beta not as logits), gated:
# with Triton 3.9, 13,392 -> 11,408 SASS instructions, SHFL 1,028 -> 464, spill stack 3,576 -> 2,512 B a thread;
# with the card's Triton 3.6, 15,304 -> 13,984, SHFL 889 -> 575, stack 3,080 -> 3,136 B. The delta rule's kernel
# compiles to the same code either way (its db is not formed). The same sums, in another order. On an H200
# (session 16, bf16, fwd+bwd ms, same call): gated 7.50 -> 7.38 at T = 4096, 10.42 -> 9.79 at 16384, 10.70 -> 9.91
# at 65536; every delta GPU test passes with it (156). LINATTN_LAUNCH="gated_delta_rule.SUMS_IN_PLACE=0": off.
SUMS_IN_PLACE = True
# UNCHAINED_DOTS: backward_chunk's products after its loops (with DB_FROM_PRODUCTS) so written that none's result is
# another's accumulator. Triton (AccelerateMatmul's warpsPerTileV3) lays out a Hopper product whose result flows
# into another product over warps [num_warps, 1]; at 8 warps and BT = 64 that is two warp groups on the same 64
# rows, and its accumulator goes to and from the others' [4, 2] layout through shared memory ([64, 128] float32
# tiles, 32 KiB each way). The main kernel chained P's columns of dk into A's; and P's diagonal, added to dq and dk
# as elementwise terms, was formed in the [BT, BT] tiles' layout and converted too. With it, P's products take
# scale after them (a product added to a sum is folded into that sum's chain: Triton's dot + add combine, for
# products whose accumulator is 0), A's columns take dk as their accumulator, and P's diagonal goes in by two
# products of its own (rounded to bfloat16 as the rest of P is). sm_90 compile (Triton 3.6, bf16, whole rows at 8
# warps): gated 3,360 -> 3,112 SASS instructions (STS 157 -> 98, BAR 128 -> 75), no [64, 128] float32 conversion
# left (four before); with qk_l2norm gated 4,248 -> 3,736. On an H200 (session 24, bf16, fwd+bwd ms, same call):
# gated 6.12 / 6.62 / 6.79 / 7.45 -> 5.88 / 6.36 / 6.53 / 7.20 at T = 4096 / 16384 / 32768 / 65536 (backward_chunk
# 2.69 -> 2.45 at 4096); with qk_l2norm at T = 4096 / 65536, delta 5.55 / 7.22 -> 5.43 / 7.11, gated 7.59 / 9.28 ->
# 7.15 / 8.87; every delta GPU test passes (90), and the properties (22). At 4 warps (the delta rule's 64 key
# columns) every layout is [4, 1] anyway. By op: dict(gated=..., ungated=...).
UNCHAINED_DOTS = dict(gated=True, ungated=True)
# ONE_PASS_CHUNK: backward_chunk's two loops over the V blocks as one, which loads U, dO and dX once a block rather
# than twice, and keeps dP and dA live beside the first pass's [BT, K] tiles. Session 25's ncu of the gated kernel
# (H200, bf16, T = 4096, B = 16; 2.42 ms, 255 registers, one program of 8 warps an SM) found it latency-bound: 39%
# of its stall samples waiting on loads (long scoreboard), most at the first use of each loop's loaded tiles
# (the first loop 28% of the samples, the second 14%), and 0.20 instructions issued a cycle a scheduler; the delta
# rule's (1.68 ms) alike. In one loop, two stages (NUM_STAGES, GATED_STAGES) have the second V block's loads issued
# with the first's. On an H200 (session 25, one call, bf16, fwd+bwd ms, T = 4096 / 16384 / 65536):
#   main (two loops, 1 stage)        delta 4.60 / 4.58 / 5.37   gated 5.87 / 6.01 / 7.19 (again: 5.89 / 6.00 / 7.21)
#   one pass, 1 stage                delta 4.50 / 4.48 / 5.26   gated 6.11 / 6.25 / 7.44
#   one pass, 2 stages               delta 4.31 / 4.30 / 5.10   gated 5.74 / 5.88 / 7.07
#   one pass, 2 stages, BV = 32      delta 4.66 / 4.65 / 5.44   gated 6.04 / 6.18 / 7.39
#   two loops, 2 stages              delta 4.48 / 4.47 / 5.26   gated 5.95 / 6.09 / 7.27
# sm_90 compile (Triton 3.6, bf16, the benchmark's launch, 1 stage): gated 2,960 -> 2,736 SASS instructions, spill
# stack 40 -> 120 B; delta 1,448 -> 1,416, none. By op: dict(gated=..., ungated=...).
ONE_PASS_CHUNK = dict(gated=True, ungated=True)
# V_EARLY (with ONE_PASS_CHUNK), by op: backward_chunk loads v's tile at the top of its loop body rather than after
# the loop's three products. The sm_90 TTGIR (Triton 3.6, bf16, the benchmark's launch) has it as the loop's one
# synchronous tile load (Triton pipelines loads that feed products; v's feeds dbeta's row sum alone), issued after
# the products and consumed at once, twice a program; early, its latency may overlap them. Static (gated): 2,968
# -> 2,952 SASS instructions, spill stack 96 -> 120 B; the delta rule's 255 -> 248 registers. On an H200 (session
# 28, call 1, bf16, fwd+bwd ms, T = 4096 / 16384 / 32768 / 65536; main's runs before and after, same call):
#   delta_rule  main 4.34 / 3.85 / 4.16 / 4.97 and 4.34 / 3.86 / 4.14 / 4.96;  V_EARLY 4.27 / 3.78 / 4.07 / 4.87
#   gated       main 5.37 / 5.87 / 6.35 / 6.72 and 5.35 / 5.86 / 6.35 / 6.72;  V_EARLY 5.33 / 5.84 / 6.32 / 6.69
# With both on, test_triton_delta.py -k gpu and the properties pass on the card (144, call 2). Off for either op:
# LINATTN_LAUNCH="gated_delta_rule.V_EARLY.gated=0" (or ungated=0).
V_EARLY = dict(gated=True, ungated=True)
# DECAYS_IN, by kernel: the gated kernel reads each chunk's cumulative log-decays (float32 hi + lo pairs per token,
# formed by _log_decay_kernel once in the forward for output, once in the backward for the others: _log_decays)
# rather than summing the gates in float64 itself (backward_chunk twice a program). backward_chunk:
# Session 25's ncu put about 19% of the gated kernel's stall samples in the stretch between its loop and its
# products, which holds the gates' load and scan. sm_90 compile (Triton 3.6, bf16, the benchmark's launch): 2,880
# -> 2,968 SASS instructions (the sums loaded in each layout that uses them), but layout conversions 16 -> 8, BAR
# 92 -> 75, DADD 20 -> 6; spill stack 72 -> 96 B. On an H200 (session 25, one call, bf16, gated fwd+bwd ms, off /
# on / off / on): T = 4096 5.777 / 5.743 / 5.777 / 5.730, T = 65536 7.093 / 7.043 / 7.090 / 7.046; the gated GPU
# tests of test_triton_delta.py pass with it (41); LINATTN_LAUNCH="gated_delta_rule.DECAYS_IN.backward_chunk=0":
# off. output and local_du: built after session 25's device time,
# untimed (LINATTN_LAUNCH="gated_delta_rule.DECAYS_IN.output=1;gated_delta_rule.DECAYS_IN.local_du=1"); sm_90
# compile (Triton 3.6, bf16, qk_l2norm): output 1,992 -> 2,144 SASS instructions, layout conversions 9 -> 3;
# local_du 1,664 -> 1,704, conversions 8 -> 3.
DECAYS_IN = dict(output=False, local_du=False, backward_chunk=True)


def _reads_decays(kernel: str, gated: bool) -> bool:
    """Whether ``kernel`` reads the stored log-decay sums (DECAYS_IN) rather than summing the gates, with gates."""
    return gated and bool(DECAYS_IN[kernel])


def _log_decays(g: torch.Tensor | None, lay: ChunkTable, kernels: tuple[str, ...]) -> torch.Tensor | None:
    """Each chunk's cumulative log-decays of the gates g [B, T, H] (float32), as float32 (hi, lo) pairs per token
    [B, T, H, 2], for the kernels of DECAYS_IN among ``kernels`` that read them; None without gates or readers."""
    if not any(_reads_decays(n, g is not None) for n in kernels):
        return None
    sums = torch.empty(*g.shape, 2, dtype=torch.float32, device=g.device)
    _log_decay_kernel[(lay.NC, g.shape[2])](g, sums, lay.chunks, H=g.shape[2], BT=BT, num_warps=4)
    return sums


def _decays_in(kernel: str, g_: torch.Tensor, sums: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """What ``kernel`` takes as g (the stored sums where it reads them, DECAYS_IN, else g_), and its constexpr."""
    on = sums is not None and _reads_decays(kernel, True)
    return (sums if on else g_), dict(DECAYS_IN=on)


# output and local_du loop over a chunk's V blocks, forming q k^T once; one V block per program was slower on an H200
# (session 7, T = 4096, B = 16, bf16: delta_rule fwd+bwd 14.83 ms against 13.88). backward_state stores dX = Tinv^T dU
# in dU's place, formed once as each chunk's dU is final, rather than backward_chunk forming it in each of its two
# passes over V: on the same card, delta_rule 13.12 ms against 13.67, gated_delta_rule 15.72 against 15.77
# (backward_state takes 0.7 ms more, backward_chunk about 1 ms less).
# CHUNK_KEYS: backward_chunk runs one program per chunk and block of this many key columns (without qk_l2norm),
# halving its [BT, K] tiles at K = 128; the products over V (dP, dA) are formed in each program. None (or >= K): one
# program per chunk. On an H200 (session 7, T = 4096, B = 16, bf16, fwd+bwd): delta_rule 12.49 ms against 13.24,
# gated_delta_rule 15.39 against 16.01; backward_chunk alone 3.0 ms (delta_rule) and 4.9 (gated). Its sm_90 compile
# still spills (bf16 with gates: 1928 B a thread at 64 columns, against 2936 B at 128).
# The gated op takes whole rows (None), at WIDE_KEYS_WARPS' 8 warps: on an H200 (session 19, one call, bf16, fwd+bwd
# ms, T = 4096, B = 16 / T = 65536, B = 1), gated 6.64 / 7.97 with 64 columns at 4 warps, 6.47 / 7.80 with whole rows
# at 8, 7.15 / 8.48 with 64 columns at 8; the delta rule took 4.81 / 6.15 with 64 at 4, 4.95 / 6.29 whole at 8.
# sm_90 compile (Triton 3.6, bf16, gated, the benchmark's launch): spill stack 3,136 B a thread at 64 columns and 4
# warps, 1,248 at 64 and 8, 2,768 whole at 8. Session 24: with UNCHAINED_DOTS the delta rule too is faster over whole
# rows at 8 warps, on an H200 (bf16, fwd+bwd ms, T = 4096 / 32768 / 65536, two calls): 4.66 / 4.52 / 5.44 with 64
# columns at 4 warps against 4.62 / 4.46 / 5.41 and 4.62 / 4.45 / 5.38 whole; sm_90 compile (Triton 3.6, bf16) 2,088
# SASS instructions a program at 64 columns (two programs a chunk, 256 B spill stack) against 1,496 whole (one, no
# stack); every delta GPU test passes so (90) and the properties (22). By op: dict(gated=..., ungated=...).
CHUNK_KEYS = dict(gated=None, ungated=None)
# FULL_GPU: the per-sequence kernels narrow BV (halving, down to 16) only while they would run fewer programs than
# this. Narrow blocks repeat each chunk's K-side work once per block: on an H200 (session 16, bf16, fwd+bwd ms, one
# call), T = 16384, B = 4 without segments, BV = 64 (128 programs) took delta_rule 6.55 and gated 8.50, against 8.35
# and 10.74 at BV = 16 (512 programs, as FULL_GPU = 264 chose); T = 8192, B = 8, BV = 64 (256 programs) 5.32 and
# 7.36, against 6.31 and 8.22 at BV = 32 (512).
FULL_GPU = 128
# The same for backward_state alone (None: FULL_GPU), for trying it apart (built after session 16's device time,
# untimed): at T = 16384, B = 4, fla 0.6.0 took 5.66 ms against our 6.47, and our backward is 0.96 ms longer there
# than at T = 4096, where backward_state runs 4x the programs (LINATTN_LAUNCH="gated_delta_rule.STATE_GRAD_GPU=256").
STATE_GRAD_GPU = None
# Long sequences with few sequences and heads (T = 65536, B = 1): the per-sequence kernels would run N H (V / BV)
# programs, too few for the GPU, each walking every chunk. They are then cut into segments, run side by side:
#   1. each segment from a zero state: its own final state R and, from identity columns with U0 = 0, its
#      transition M [K, K] (the product of the chunks' exp(b_C) (I - (exp(b_C - b) k)^T W));
#   2. a scan over the segments in float64 (S_in(s+1) = M_s S_in(s) + R_s; dS_out(s-1) = M_s^T dS_out(s) + L_s);
#   3. each segment again from its true entering state (or exit gradient), storing what the backward needs.
# About three times the work of one pass, so only where SEGMENT_HEADS / (N H) gives at least MIN_SEGMENTS segments
# of at least SEGMENT_MIN_CHUNKS chunks each. Not for cu_seqlens. SEGMENTS forces a count (tests). The forward keeps
# what the scan found, the entering states and transitions (N NS H K (V + K) float32: 32 MiB at T = 65536, B = 1,
# H = 16, K = V = 128), so that the backward runs only step 3 (the same states as running all three again;
# session 13, not yet timed).
# On an H200 (session 9, bf16, fwd+bwd ms, T = 65536, B = 1: 16 segments), with and without them in one call:
# delta_rule 13.04 against 15.16, gated_delta_rule 14.74 against 15.69. Session 16 (the host no longer the bound,
# one card, one day): at T = 65536 (16 segments) 7.09 / 9.00 against 12.62 / 15.27 without (BV = 32); at 32768, B = 2
# (8 segments) 7.00 / 8.93 against 8.03 / 10.40; at 16384, B = 4, 4 segments took 6.94 / 8.85 against 6.55 / 8.50
# without (BV = 64), so MIN_SEGMENTS is 8. 8 segments at T = 65536 (SEGMENT_HEADS = 128): 8.52 / 10.47; 32 (512):
# 7.55 / 9.46. Session 18 (one card, one day; kept states, the chain kernel, two stages for few programs), delta_rule /
# gated at SEGMENT_HEADS 256 with 8 (then main) / none / 128 with 2 / 128 with 4 / 64 with 2:
#   T = 32768, B = 2: 6.22 / 8.01 (8) | 5.35 / 8.30 (none) | 6.15 / 7.96 (4) | 6.16 / 7.96 (4) | 6.41 / 9.24 (2)
#   T = 65536, B = 1: 6.31 / 8.10 (16) | 6.96 / 10.82 (none) | 6.19 / 7.99 (8) | 6.20 / 8.01 (8) | 6.42 / 9.25 (4)
# and at 16384 (B = 4, none at 128) 4.88 / 7.21. So 128, with at least 8 segments for the delta rule (none at
# 32768), 4 for the gated one. Session 21, with three stages at few programs (FEW_PROGRAMS_STAGES; one call,
# delta_rule / gated, main's segments / none / 2 segments (SEGMENT_HEADS 32) / 4 (64)):
#   T = 32768, B = 2: 4.64 (none) / 7.64 (4) | 4.64 / 7.55 | 4.65 / 7.51 (none) | 5.80 / 8.44 (2)
#   T = 65536, B = 1: 6.16 (8) / 7.70 (8) | 5.57 / 9.52 | 6.15 / 10.11 (2) | 5.82 / 8.44 (4)
# So the delta rule takes none at the standard shape (its sequential passes at 128 programs of 16 value columns
# beat three passes over segments), and the gated op none at 32768 and 8 at 65536. At SEGMENT_HEADS / 16 = 8 or fewer
# sequences x heads the delta rule still cuts them (untimed since). With qk_l2norm the delta rule without segments
# took 9.03 ms at T = 65536 (same call; fwd 4.03 ms against 2.00 without the option), against 8.06 over 8 segments
# in session 20, so with qk_l2norm it keeps 8 (entries by op and option, as SPLIT_INFERENCE's).
# Session 26 (H200, bf16, fwd+bwd ms, one call), with backward_state at 8 warps in the delta rule's few-program
# launches of 64 value columns (FEW_PROGRAMS_WARPS): at T = 65536, B = 1 the delta rule over 4 segments (SEGMENT_HEADS
# 64: 128 programs of 64 columns each pass) took 4.96 against 5.11 without segments (a call before), 5.65 over 2. So
# SEGMENT_HEADS and MIN_SEGMENTS are by op and option: the delta rule without qk_l2norm aims at 64, with at least 4.
# LINATTN_LAUNCH="gated_delta_rule.SEGMENT_HEADS.ungated_plain=0" turns them off for one (each entry, all).
SEGMENT_HEADS = dict(gated_plain=128, ungated_plain=64, gated_l2norm=128, ungated_l2norm=128)  # N x H x segments
MIN_SEGMENTS = dict(gated_plain=8, ungated_plain=4, gated_l2norm=8, ungated_l2norm=8)
SEGMENT_MIN_CHUNKS = 16
SEGMENTS = None


def _blocks(K: int, V: int, dtype: torch.dtype | None = None, gpu: bool | None = None) -> tuple[int, int]:
    """Key and value blocks; values at most BV_MAX_LOWP where the per-sequence kernels take bfloat16 operands for
    inputs of ``dtype`` (None: never; ``gpu`` as for _lowp), else BV_MAX."""
    BK = max(16, triton.next_power_of_2(K))
    bv_max = BV_MAX_LOWP if dtype is not None and _lowp(dtype, "forward", gpu) else BV_MAX
    BV = max(16, min(bv_max if BK <= 128 else bv_max // 2, triton.next_power_of_2(V)))
    return BK, BV


def _w_dtype(dtype: torch.dtype, gpu: bool | None = None) -> torch.dtype:
    """W's storage: bfloat16 where both kernels that read it take bfloat16 operands (LOWP_STORE), else float32."""
    lowp = LOWP_STORE and _lowp(dtype, "forward", gpu) and _lowp(dtype, "backward_state", gpu)
    return torch.bfloat16 if lowp else torch.float32


def _by_op(setting: dict, gated: bool, qk_l2norm: bool | None = None):
    """A setting given by op, dict(gated=..., ungated=...): the gated op's entry or the delta rule's; or, with
    ``qk_l2norm`` given, by op and option (gated_l2norm, gated_plain, ungated_l2norm, ungated_plain)."""
    op = "gated" if gated else "ungated"
    return setting[op if qk_l2norm is None else f"{op}_{'l2norm' if qk_l2norm else 'plain'}"]


def _launch(
    kernel: str,
    dtype: torch.dtype,
    BK: int,
    BV: int,
    programs: int | None = None,
    gated: bool = False,
    qk_l2norm: bool = False,
    scores: bool = False,
) -> dict:
    """num_warps (see _warps; WIDE_KEYS_WARPS with qk_l2norm only with WIDE_KEYS_L2NORM) and num_stages of a kernel
    launched as ``programs`` programs (None: many), with gates (GATED_STAGES) or without: one stage for float32
    inputs, for float16 ones with qk_l2norm or in ONE_STAGE_FLOAT16's kernels (see NUM_STAGES) and on GPUs with less
    shared memory (SMALL_SHARED), at least FEW_PROGRAMS_STAGES for fewer programs than FEW_PROGRAMS (two at most
    below Hopper's shared memory; NARROW_AT_FEW_WARPS_STAGES at most for narrow decays at FEW_PROGRAMS_WARPS', and
    SCORES_AT_FEW_WARPS_STAGES for backward_state reading the forward's scores there: ``scores``)."""
    stages = GATED_STAGES.get(kernel, NUM_STAGES[kernel]) if gated else NUM_STAGES[kernel]
    few = _few(programs)
    if dtype == torch.float32 or _float16_norms(dtype, qk_l2norm) or gpu_shared_below(SMALL_SHARED):
        stages = 1
    elif dtype == torch.float16 and kernel in ONE_STAGE_FLOAT16:
        stages = 1
    elif few:
        few_stages = FEW_PROGRAMS_STAGES[str(dtype).removeprefix("torch.")]
        stages = max(stages, min(few_stages, 2) if gpu_shared_below(HOPPER_SHARED) else few_stages)
        if _narrow_few(kernel, gated, BV, programs) and _few_warps(kernel, gated, BV) is not None:
            stages = min(stages, NARROW_AT_FEW_WARPS_STAGES)  # narrow decays at FEW_PROGRAMS_WARPS' warps
        if scores and kernel == "backward_state" and _few_warps(kernel, gated, BV) is not None:
            stages = min(stages, SCORES_AT_FEW_WARPS_STAGES)
    wide = (WIDE_KEYS_L2NORM or not qk_l2norm) and not _float32_small_shared(dtype)
    return dict(num_warps=_warps(kernel, BK, BV, few, wide=wide, gated=gated), num_stages=stages)


def _few(programs: int | None) -> bool:
    """Whether a launch of ``programs`` programs (None: many) is of few, fewer than FEW_PROGRAMS."""
    return programs is not None and programs < FEW_PROGRAMS


def _few_warps(kernel: str, gated: bool, BV: int) -> int | None:
    """FEW_PROGRAMS_WARPS' entry for ``kernel`` of the op at value blocks of BV (None, or 0 from LINATTN_LAUNCH, or
    BV under FEW_PROGRAMS_WARPS_BV: none)."""
    if BV < FEW_PROGRAMS_WARPS_BV:
        return None
    return FEW_PROGRAMS_WARPS.get(f"{'gated' if gated else 'ungated'}_{kernel}") or None


def _warps(kernel: str, BK: int, BV: int, few: bool = False, wide: bool = True, gated: bool = False) -> int:
    """num_warps of a kernel: NUM_WARPS (WIDE_KEYS_WARPS' entry for BK >= 128 where ``wide``; FEW_PROGRAMS_WARPS'
    entry for the op where set, for a launch of ``few`` programs) for tiles of BK >= 64 keys and BV >= 32 values;
    SMALL_TILE_WARPS (4) for smaller ones, where 8 warps ended in illegal memory accesses or wrong gradients on an
    H200 (Triton 3.6), in tf32 dots as well as bf16 ones."""
    if BK < 64 or BV < 32:
        return SMALL_TILE_WARPS
    own = _few_warps(kernel, gated, BV) if few else None
    if own is not None:
        return own
    return WIDE_KEYS_WARPS.get(kernel, NUM_WARPS[kernel]) if wide and BK >= 128 else NUM_WARPS[kernel]


def _chunk_keys(BK: int, qk_l2norm: bool, gated: bool) -> int:
    """Key columns per program of backward_chunk: CHUNK_KEYS' entry for the op (None: all), or all of them with
    qk_l2norm, whose backward needs whole rows."""
    keys = _by_op(CHUNK_KEYS, gated)
    return BK if keys is None or qk_l2norm else min(BK, keys)


def _chunk_bv(V: int, block: int | None = None) -> int:
    """BV of the per-chunk kernels, which loop over the V blocks: ``block`` (None: BV_CHUNK), narrowed to V."""
    return min(block or BV_CHUNK, max(16, triton.next_power_of_2(V)))


def _backward_chunk_bv(V: int, gated: bool, dtype: torch.dtype | None = None) -> int:
    """BV of backward_chunk: BACKWARD_CHUNK_BV's entry for the op (None: BV_CHUNK); SMALL_SHARED_CHUNK_BV for float32
    inputs on a GPU that gives a program less than SMALL_SHARED."""
    if _float32_small_shared(dtype):
        return _chunk_bv(V, SMALL_SHARED_CHUNK_BV)
    return _chunk_bv(V, _by_op(BACKWARD_CHUNK_BV, gated))


def _sequence_bv(K: int, V: int, NH: int, dtype: torch.dtype | None = None, state_grad: bool = False) -> int:
    """BV of the per-sequence kernels, which run (V / BV) N H programs: narrower when that is too few (FULL_GPU,
    or for backward_state, with state_grad, STATE_GRAD_GPU where set)."""
    target = STATE_GRAD_GPU if state_grad and STATE_GRAD_GPU is not None else FULL_GPU
    return narrow_bv(_blocks(K, V, dtype)[1], V, NH, target)


def _num_segments(N: int, H: int, T: int, cu_seqlens, gated: bool, qk_l2norm: bool) -> int:
    """Segments per sequence for the per-sequence kernels (1: none), with gates or without, with qk_l2norm or
    without; see SEGMENT_HEADS."""
    least = _by_op(MIN_SEGMENTS, gated, qk_l2norm)
    heads = _by_op(SEGMENT_HEADS, gated, qk_l2norm)
    return segment_count(N, H, T, BT, cu_seqlens, SEGMENTS, heads, SEGMENT_MIN_CHUNKS, least)


MAX_KEY_DIM = 128  # the per-chunk backward holds several [64, K] float32 tiles: K = 256 needs ~280 KB of shared memory


def delta_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if these kernels can serve q, v; else why not (the shared checks, and K <= 128)."""
    if q.shape[-1] > MAX_KEY_DIM:
        return f"key dim K={q.shape[-1]} exceeds {MAX_KEY_DIM} (the delta-rule kernels' shared memory bound)"
    return triton_unsupported(q, v)


def _flags(
    dtype: torch.dtype, gated: bool, qk_l2norm: bool, kernel: str, gpu: bool | None = None, BK: int | None = None
) -> dict:
    """The constexprs every chunk kernel takes, for inputs of ``dtype``, for ``kernel`` (a key of NUM_WARPS) with
    key blocks of BK (None: 64 or more).

    LOWP (bfloat16 on a GPU): the products that a plain bfloat16 run forms with matmuls take bfloat16
    operands (``mm_lowp``); those through the WY inverse Tinv keep tf32 (``mm``).
    """
    lowp = _lowp(dtype, kernel, gpu, BK)
    gpu = not triton_interpret() if gpu is None else gpu
    flags = kernel_flags(dtype, long_sums=True, gpu=gpu)  # the chains through the WY inverse (dbeta)
    del flags["UPCAST_QK"]  # these kernels take every operand to float32 as they load it
    exact_exp = precise_exp(dtype, gpu)
    out = dict(HAS_G=gated, L2NORM=qk_l2norm, LOWP=lowp, PRECISE_EXP=exact_exp, **flags)
    if kernel in NORM_KERNELS:  # their 1 / row norms read, not formed (NORMS_IN), with qk_l2norm
        out["R_IN"] = _norms_in(qk_l2norm)
    if kernel == "backward_state":
        out["LOCAL_DU"] = not _by_op(SPLIT_BACKWARD, gated)
    return out


def _narrow_few(kernel: str, gated: bool, BV: int, programs: int | None) -> bool:
    """NARROW_FEW's rule: the gated op's launch of ``kernel`` (one with a NARROW_DECAYS entry) in fewer than
    FEW_PROGRAMS programs, at NUM_WARPS' warps or (NARROW_AT_FEW_WARPS) at FEW_PROGRAMS_WARPS' entry."""
    if not (gated and NARROW_FEW and _few(programs) and NARROW_DECAYS.get(kernel, 0) > 0):
        return False
    return _few_warps(kernel, gated, BV) is None or NARROW_AT_FEW_WARPS


def _narrow(kernel: str, gated: bool, BV: int, programs: int | None = None) -> dict:
    """NARROW_DECAYS' constexpr for a launch of ``kernel`` over value blocks of BV (in ``programs`` programs, None:
    many): on for the gated op where BV is at most the kernel's entry, or where _narrow_few says so."""
    return dict(NARROW_DECAYS=gated and (BV <= NARROW_DECAYS[kernel] or _narrow_few(kernel, gated, BV, programs)))


def _lowp(dtype: torch.dtype, kernel: str, gpu: bool | None = None, BK: int | None = None) -> bool:
    """Whether ``kernel`` takes bfloat16 dot operands (LOWP): bfloat16 inputs on a GPU, with its LOWP_DOTS on.

    gpu None: found out (no GPU under the interpreter), and the kernels of NEEDS_FIXED_PTXAS take them only where
    ``ptxas.lowp_trusted()``; True: a GPU whose ptxas is trusted (what compile_variants compiles). backward_chunk
    keeps tf32 dots below LOWP_MIN_KEYS key channels a program.
    """
    if gpu is None:
        gpu = not triton_interpret()
        trusted = gpu and (kernel not in NEEDS_FIXED_PTXAS or ptxas.lowp_trusted())
    else:
        trusted = gpu
    small = kernel == "backward_chunk" and BK is not None and BK < LOWP_MIN_KEYS
    return bool(LOWP_DOTS[kernel]) and dtype == torch.bfloat16 and trusted and not small


def _prepare_flags(dtype: torch.dtype, qk_l2norm: bool, gpu: bool | None = None) -> dict:
    """prepare's precision constexprs (SOLVE_TF32X3, PREPARE_LOWP) for inputs of ``dtype``."""
    gpu = not triton_interpret() if gpu is None else gpu
    prec = kernel_flags(dtype, long_sums=True, gpu=gpu)["DOT_PREC"]
    bf16 = dtype == torch.bfloat16 and gpu
    return dict(
        SOLVE_PREC="ieee" if prec == "ieee" else ("tf32x3" if SOLVE_TF32X3 or not bf16 else "tf32"),
        KKT_LOWP=bool(PREPARE_LOWP["kkt"]) and bf16 and not qk_l2norm,
        WU_LOWP=bool(PREPARE_LOWP["wu"]) and bf16,
    )


def _float32_small_shared(dtype: torch.dtype) -> bool:
    """float32 inputs on a GPU that gives a program less than SMALL_SHARED, whose backward_chunk is sized down
    (SMALL_SHARED_CHUNK_BV and NUM_WARPS: see SMALL_SHARED_CHUNK_BV)."""
    return dtype == torch.float32 and gpu_shared_below(SMALL_SHARED)


def _float16_norms(dtype: torch.dtype, qk_l2norm: bool) -> bool:
    """float16 inputs with qk_l2norm, whose launches are sized down for shared memory (see NUM_STAGES and
    _db_from_products)."""
    return dtype == torch.float16 and qk_l2norm


def _norms_in(qk_l2norm: bool, gated: bool = False, save: bool = True, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels read the row norms of q and k (NORMS_IN, with qk_l2norm) rather than form them: in
    training (``save``: the forward of a call that wants gradients, and its backward), and without a gradient where
    NORMS_IN_INFERENCE says for the op, or for float16 inputs (``dtype``) on a GPU that gives a program less shared
    memory than Hopper: there the delta rule's no-gradient forward that forms them, in float16's tf32x3 dots, took
    147,456-163,840 B at one stage (sm_89, Triton 3.9 and 3.6, session 21: past its 101,376 B; an A100's 166,912 B
    only just holds it), and 49,152 B reading them."""
    small = dtype == torch.float16 and gpu_shared_below(HOPPER_SHARED)
    return bool(qk_l2norm and NORMS_IN and (save or _by_op(NORMS_IN_INFERENCE, gated) or small))


ROW_NORM_ROWS = 64  # rows of q and of k per program of _row_norms_kernel


def _row_norms(
    q: torch.Tensor, k: torch.Tensor, qk_l2norm: bool, gated: bool = False, save: bool = True
) -> torch.Tensor | None:
    """Where _norms_in (for these arguments), 1 / sqrt(sum x^2 + 1e-6) of every row of q and k, [B, T, H, 2]
    float32 (q's first), which the kernels read at 2 (token H + head) and the next; else None. One launch that reads
    q and k once (on an H200, session 20, torch's vector_norm over the rows of bf16 took 0.27 ms for each of q and k
    at the standard shape: a quarter of their bandwidth)."""
    if not _norms_in(qk_l2norm, gated, save, q.dtype):
        return None
    B, T, H, K = q.shape
    norms = torch.empty(B, T, H, 2, dtype=torch.float32, device=q.device)
    R = B * T * H
    if R:
        BD = max(16, triton.next_power_of_2(K))
        _row_norms_kernel[(triton.cdiv(R, ROW_NORM_ROWS),)](q, k, norms, R, D=K, BR=ROW_NORM_ROWS, BD=BD, num_warps=4)
    return norms


def prepare(
    k, v, g, beta, lay: ChunkTable, qk_l2norm: bool, beta_is_logit: bool, tinv=None, store_t: bool = False,
    u0_dtype: torch.dtype = torch.float32, norms=None,
):  # fmt: skip
    """W [B, T, H, K] (float32, or bfloat16: see _w_dtype), U0 [B, T, H, V] in u0_dtype and Tinv [B, T, H, BT]
    (float32, or bfloat16: see _prepare_store).

    Tinv is solved for unless given (as the forward stored it); it is returned only when given or store_t.
    ``norms``: _row_norms' (read where NORMS_IN says; None: formed here).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V, k.dtype)
    w = torch.empty(B, T, H, K, dtype=_w_dtype(k.dtype), device=k.device)
    u0 = torch.empty(B, T, H, V, dtype=u0_dtype, device=k.device)
    solve = tinv is None
    store_t = store_t and solve
    if store_t:
        tinv = torch.empty(B, T, H, BT, dtype=_prepare_store("tinv", k.dtype), device=k.device)
    _prepare_kernel[(lay.NC, H)](
        k,
        v,
        g if g is not None else u0,
        beta,
        lay.chunks,
        w,
        u0,
        tinv if tinv is not None else u0,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=BK,
        BV=BV,
        BKP=min(BK, PREPARE_KEYS),
        DIAG_DOUBLING=SOLVE_DIAG_DOUBLING,
        BETA_LOGIT=beta_is_logit,
        SOLVE=solve,
        STORE_T=store_t,
        **_launch("prepare", k.dtype, BK, BV, gated=g is not None, qk_l2norm=qk_l2norm),
        **(_flags(k.dtype, g is not None, qk_l2norm, "prepare") | dict(R_IN=norms is not None)),
        **_prepare_flags(k.dtype, qk_l2norm),
        rn=norms if norms is not None else u0,
    )
    return w, u0, tinv


def _prepare_store(part: str, dtype: torch.dtype, gpu: bool | None = None) -> torch.dtype:
    """The storage of what prepare stores, ``part`` "tinv" (Tinv) or "u0_backward" (U0 in the backward), for inputs
    of ``dtype``: bfloat16 where W's and U0's products round Tinv so (PREPARE_LOWP's wu) and the part's entry is on,
    else float32."""
    lowp = _prepare_flags(dtype, False, gpu)["WU_LOWP"] and PREPARE_LOWP[part]
    return torch.bfloat16 if lowp else torch.float32


def _scores_dtype(dtype: torch.dtype, gated: bool, qk_l2norm: bool, gpu: bool | None = None) -> torch.dtype:
    """The dtype of the scores that KEEP_SCORES keeps: bfloat16 where backward_state's products take bfloat16
    operands (LOWP), else float32."""
    return torch.bfloat16 if _flags(dtype, gated, qk_l2norm, "backward_state", gpu)["LOWP"] else torch.float32


def _scores_in(narrow_few: bool = False) -> dict:
    """backward_state's constexprs where it reads the forward's scores: SCORES_IN (LOCAL_DU off), and
    SCORES_PIPELINED, also at a launch that takes scores by SCORES_NARROW_FEW (narrow_few: _scores_narrow_few)."""
    return dict(LOCAL_DU=False, SCORES_IN=True, SCORES_PIPELINED=bool(SCORES_PIPELINED) or narrow_few)


def _state_grad_launch(NSH: int, K: int, V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BV, programs) of a backward_state launch over NSH sequences (or segments) x heads."""
    BV = _sequence_bv(K, V, NSH, dtype, state_grad=True)
    return BV, triton.cdiv(V, BV) * NSH


def _scores_narrow_few(NSH: int, K: int, V: int, dtype: torch.dtype) -> bool:
    """Whether SCORES_NARROW_FEW takes scores at the backward_state launch over NSH sequences (or segments) x heads:
    its entry for ``dtype``, where that launch runs few programs of value blocks narrowed below _blocks' BV."""
    BV, programs = _state_grad_launch(NSH, K, V, dtype)
    entry = SCORES_NARROW_FEW.get(str(dtype).removeprefix("torch."), False)
    return bool(entry) and _few(programs) and BV < _blocks(K, V, dtype)[1]


def _keeps_scores(
    gated: bool, qk_l2norm: bool, save: bool, keep: bool, N: int, H: int, T: int, K: int, V: int, cu_seqlens,
    dtype: torch.dtype,
) -> bool:  # fmt: skip
    """Whether the forward keeps its scores for the backward: KEEP_SCORES' entry, where it keeps its states, and
    where the backward's backward_state launch (over segments where it cuts them) runs at least FEW_PROGRAMS
    programs, or where SCORES_NARROW_FEW says, or anywhere with KEEP_SCORES_FEW."""
    if not (save and keep and _by_op(KEEP_SCORES, gated)):
        return False
    NS = _num_segments(N, H, T, cu_seqlens, gated, qk_l2norm)
    NSH = N * (Segments.count(T, NS, BT) if NS > 1 else 1) * H  # backward_state's sequences (or segments) x heads
    _, programs = _state_grad_launch(NSH, K, V, dtype)
    return KEEP_SCORES_FEW or not _few(programs) or _scores_narrow_few(NSH, K, V, dtype)


def _states_lowp(gated: bool) -> dict:
    """STATES_LOWP for the gated op; for the delta rule, with its own states and dstates (UNGATED_STATES_LOWP)."""
    return STATES_LOWP if gated else STATES_LOWP | UNGATED_STATES_LOWP


def _dx_dtype(lowp: bool, parts: dict) -> torch.dtype | None:
    """The dtype of dX where backward_state stores it in a tensor of its own (bfloat16: STATES_LOWP's dx_store, where
    the backward stores for a backward_chunk with bfloat16 operands, as for the other parts), else None: float32 in
    dU's place."""
    return torch.bfloat16 if lowp and parts["dx_store"] else None


def _du_dtype(lowp: bool, parts: dict) -> torch.dtype:
    """The dtype of dU's share within each chunk as _local_du_kernel stores it: bfloat16 where STATES_LOWP's du and
    dx_store are on (dX then a tensor of its own), with bfloat16 operands; else float32."""
    return torch.bfloat16 if _dx_dtype(lowp, parts) is not None and parts["du"] else torch.float32


def _db_from_products(gated: bool, dtype: torch.dtype, qk_l2norm: bool) -> bool:
    """DB_FROM_PRODUCTS' entry for the gated op, or the delta rule's ("l2norm": with qk_l2norm); float16 with
    qk_l2norm takes the products anyway: without them, its row norms formed in the kernel, its tf32x3 tiles of q k^T
    and k k^T took the gated backward_chunk over whole rows to 294,912 B of shared memory, past Hopper's 227 KiB
    (sm_90, Triton 3.6, at 4 warps and at 8; 229,376 B with the norms read). float32 on a GPU that gives a program
    less than SMALL_SHARED takes the tiles: with the products, the delta rule's backward_chunk with qk_l2norm took
    106,496 B there (sm_89, Triton 3.6; 57,344 with Triton 3.9), past its 101,376; with the tiles 90,112."""
    entry = _by_op(DB_FROM_PRODUCTS, gated)
    if _float32_small_shared(dtype):  # the tiles: see DB_FROM_PRODUCTS
        return False
    return (qk_l2norm if entry == "l2norm" else bool(entry)) or _float16_norms(dtype, qk_l2norm)


def _backward_stores(
    dtype: torch.dtype, gated: bool, qk_l2norm: bool, BK: int, gpu: bool | None = None
) -> tuple[bool, dict]:
    """(lowp, dtypes): whether backward_chunk takes bfloat16 operands (LOWP), and the dtypes that the backward stores
    the states, their gradients and U in for it (bfloat16 where STATES_LOWP says, with LOWP; else float32)."""
    bk = _chunk_keys(BK, qk_l2norm, gated)
    lowp = _flags(dtype, gated, qk_l2norm, "backward_chunk", gpu=gpu, BK=bk)["LOWP"]
    parts = _states_lowp(gated)
    return lowp, {n: torch.bfloat16 if lowp and parts[n] else torch.float32 for n in ("states", "dstates", "u")}


def _kept_dtypes(
    dtype: torch.dtype, gated: bool, qk_l2norm: bool, BK: int, gpu: bool | None = None
) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of the states and U that KEEP_STATES keeps: the backward's own with KEEP_LOWP, else float32."""
    if not KEEP_LOWP:
        return torch.float32, torch.float32
    _, stored = _backward_stores(dtype, gated, qk_l2norm, BK, gpu)
    return stored["states"], stored["u"]


def forward(
    q, k, v, g, beta, h0, scale: float, cu_seqlens, qk_l2norm: bool, beta_is_logit: bool, save: bool = False,
    keep: bool = False,
):  # fmt: skip
    """The chunked forward: o [B, T, H, V] in v's dtype, the final state [N, H, K, V] float32, with save Tinv
    [B, T, H, BT] float32 for the backward (else None), with save and keep (states, U, W, scores) where it keeps
    them (with keep; else None; scores None unless KEEP_SCORES), with save and segments what the segments' scan
    found, (S_in, M) (see _segmented_forward; else None), and with save the row norms of q and k where the kernels
    read them (_row_norms; else None), which the backward reads again."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = ChunkTable.get(B, T, cu_seqlens, BT, q.device)
    keep = save and keep  # (KEEP_STATES, read when the op is called) with segments or without
    BK, _ = _blocks(K, V)
    BV = _sequence_bv(K, V, lay.N * H, q.dtype)
    o = torch.empty(B, T, H, V, dtype=store_dtype(v.dtype), device=q.device)
    ht = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device)
    norms = _row_norms(q, k, qk_l2norm, g is not None, save)
    rn = norms if norms is not None else ht  # (unread without them)
    read = dict(R_IN=norms is not None, rn=rn)
    w, u0, tinv = prepare(k, v, g, beta, lay, qk_l2norm, beta_is_logit, store_t=save, norms=norms)
    inference = not save and _by_op(SPLIT_INFERENCE, g is not None, qk_l2norm)
    split = keep or (save and SPLIT_FORWARD) or inference
    own = keep or inference  # the stores in KEEP_LOWP's dtypes, else float32
    s_dtype, u_dtype = _kept_dtypes(q.dtype, g is not None, qk_l2norm, BK) if own else (torch.float32, torch.float32)
    states = torch.empty(lay.NC, H, K, V, dtype=s_dtype, device=q.device) if split else ht
    u = torch.empty(B, T, H, V, dtype=u_dtype, device=q.device) if split else ht
    g_ = g if g is not None else ht
    flags = _flags(q.dtype, g is not None, qk_l2norm, "forward", BK=BK) | read
    NS = _num_segments(lay.N, H, T, cu_seqlens, g is not None, qk_l2norm)
    if NS == 1:
        NV = triton.cdiv(V, BV)
        _forward_kernel[(NV, lay.N * H)](
            q, k, g_, w, u0, h0 if h0 is not None else ht, lay.cu, lay.first, o, ht, states, u,
            scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_H0=h0 is not None, HAS_U0=True, STORE_O=not split,
            STORE_HT=True, STORE_STATES=split,
            **_launch("forward", q.dtype, BK, BV, NV * lay.N * H, g is not None, qk_l2norm),
            **flags, **_narrow("forward", g is not None, BV, NV * lay.N * H),
        )  # fmt: skip
        segs = None
    else:
        seg = Segments.get(lay.N, T, NS, BT, q.device)
        segs = _segmented_forward(q, k, g_, w, u0, h0, seg, o, ht, states, u, scale, not split, split, flags)
        segs = segs if save else None
    if split:
        scores = None
        if _keeps_scores(g is not None, qk_l2norm, save, keep, lay.N, H, T, K, V, cu_seqlens, q.dtype):
            s_dtype = _scores_dtype(q.dtype, g is not None, qk_l2norm)
            scores = torch.empty(B, T, H, BT, dtype=s_dtype, device=q.device)
        kept = (states, u, w, scores) if keep else None
        del w, u0
        bv = _chunk_bv(V)
        g_out, decays = _decays_in("output", g_, _log_decays(g, lay, ("output",)))
        _output_kernel[(lay.NC, H)](
            q, k, g_out, states, u, lay.chunks, o, scores if scores is not None else ht, scale,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=bv, STORE_SCORES=scores is not None,
            **_launch("output", q.dtype, BK, bv, gated=g is not None, qk_l2norm=qk_l2norm),
            **(_flags(q.dtype, g is not None, qk_l2norm, "output") | read), **_narrow("output", g is not None, bv),
            **decays,
        )  # fmt: skip
    else:
        kept = None
    return o.to(v.dtype), ht, tinv, kept, segs, (norms if save else None)


# CHAIN_KERNEL: the scan over segments (_chain) as one Triton launch (_chain_kernel: float64 in registers, DMMA on
# Hopper), not NS batched cuBLAS products and four copies. Built after session 16's device time, where the chain took
# about 0.1-0.2 ms of GPU time each way at T = 65536 (estimated, not profiled apart). On an H200 (session 17, one
# call, bf16, fwd+bwd ms, delta_rule / gated, against the batched products): T = 32768, B = 2 6.23 / 8.02 against
# 6.44 / 8.24; T = 65536, B = 1 6.31 / 8.10 against 6.55 / 8.34. Its GPU tests and every segment test pass on the
# card. LINATTN_LAUNCH="gated_delta_rule.CHAIN_KERNEL=0" goes back to the products.
# Only on GPUs whose float64 products run on tensor cores (DMMA: compute capability 8.0, 9.0, 10.0; A100, H100/H200,
# B200): elsewhere (8.6, 8.9, 12.0: consumer cards) Triton forms the kernel's float64 dot as an FMA loop whose
# tiles take 144 KiB of shared memory (136 KiB on sm_120; compiled with Triton 3.9, against 64 KiB on sm_80, sm_90
# and sm_100), past those cards' 99 KiB, so the products chain the segments there.
CHAIN_KERNEL = True
CHAIN_BV = 32  # state columns a program of _chain_kernel (sm_90, K = 128: 64 KiB of shared memory, no spills)
FP64_MMA = frozenset({(8, 0), (9, 0), (10, 0)})  # compute capabilities with float64 tensor cores


def _chain_kernel_on(device: torch.device) -> bool:
    """Whether _chain runs _chain_kernel on this device: CHAIN_KERNEL, on a GPU with float64 tensor cores (see
    above), or on CPU tensors (the interpreter)."""
    if not CHAIN_KERNEL:
        return False
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) in FP64_MMA


def _chain(M, R, start, reverse: bool):
    """The scan that chains segments, in float64: X(s+1) = M_s X(s) + R_s from X(0) = start (None: zeros), or
    with reverse, X(s-1) = M_s^T X(s) + R_s from the last. M [N, NS, H, K, K], R [N, NS, H, K, V]. Returns
    what enters each segment, [N, NS, H, K, V] float32, and what leaves the last one, [N, H, K, V] float64
    (float32 from _chain_kernel: see _chain_kernel_on).
    One batched product-and-add (baddbmm) a segment, over every sequence and head at once, each into its place
    in one buffer of every X: NS + 4 launches in all (the host's launches bound this at few, long sequences)."""
    N, NS, H, K, V = R.shape
    if _chain_kernel_on(R.device):
        entering = torch.empty(N, NS, H, K, V, dtype=torch.float32, device=R.device)
        last = torch.empty(N, H, K, V, dtype=torch.float32, device=R.device)
        _chain_kernel[(N * H, triton.cdiv(V, CHAIN_BV))](
            M, R, start.contiguous() if start is not None else last, entering, last, NS, H=H, K=K, V=V,
            BK=max(16, triton.next_power_of_2(K)), BV=CHAIN_BV, HAS_START=start is not None, REVERSE=reverse,
            num_warps=4, num_stages=1,
        )  # fmt: skip
        return entering, last
    f64 = dict(dtype=torch.float64, device=R.device)
    Ms = torch.empty(NS, N, H, K, K, **f64).copy_(M.transpose(0, 1)).view(NS, N * H, K, K)  # segment-major
    Rs = torch.empty(NS, N, H, K, V, **f64).copy_(R.transpose(0, 1)).view(NS, N * H, K, V)
    X = torch.empty(NS + 1, N * H, K, V, **f64)  # forward: X[s] enters segment s; reverse: X[s + 1] does
    first = NS if reverse else 0
    if start is None:
        X[first].zero_()
    else:
        X[first].copy_(start.reshape(N * H, K, V))
    for i in reversed(range(NS)) if reverse else range(NS):
        into, src = (i, i + 1) if reverse else (i + 1, i)
        torch.baddbmm(Rs[i], Ms[i].transpose(-1, -2) if reverse else Ms[i], X[src], out=X[into])
    entering = X[1:] if reverse else X[:NS]
    out = torch.empty(N, NS, H, K, V, dtype=torch.float32, device=R.device)
    out.copy_(entering.view(NS, N, H, K, V).transpose(0, 1))
    return out, X[NS - first].view(N, H, K, V)


def _segmented_forward(
    q, k, g_, w, u0, h0, seg: Segments, o, ht, states, u, scale, store_o, store_states, flags, given=None
):  # fmt: skip
    """The per-sequence forward over segments (see SEGMENT_HEADS): fills ht and, as asked, o or states and U.
    Returns what the scan found, (S_in, M): the state entering each segment [N, NS, H, K, V] and the segments'
    transitions [N, NS, H, K, K] (float32; M for the backward's scan). ``given``: those, as an earlier run over
    the same inputs returned them (the forward's, for the backward): then only the last step runs, and ht is
    left as it was."""
    H, K, V = q.shape[2], q.shape[3], u0.shape[-1]
    BK, _ = _blocks(K, V)
    NSH = seg.N * seg.NS * H
    f32 = dict(dtype=torch.float32, device=q.device)
    common = dict(H=H, K=K, BT=BT, BK=BK, **flags)

    def run(V_, h0_, ht_, u0_, has_u0, store_o_, store_ht, store_states_):
        BV = _sequence_bv(K, V_, NSH, q.dtype)
        programs = triton.cdiv(V_, BV) * NSH
        _forward_kernel[(triton.cdiv(V_, BV), NSH)](
            q, k, g_, w, u0_, h0_ if h0_ is not None else ht, seg.cu, seg.first, o, ht_, states, u, scale,
            V=V_, BV=BV, HAS_H0=h0_ is not None, HAS_U0=has_u0, STORE_O=store_o_, STORE_HT=store_ht,
            STORE_STATES=store_states_, **common,
            **_launch("forward", q.dtype, BK, BV, programs, flags["HAS_G"], flags["L2NORM"]),
            **_narrow("forward", flags["HAS_G"], BV, programs),
        )  # fmt: skip

    if given is not None:
        S_in, M = given
        run(V, S_in, ht, u0, True, store_o, False, store_states)
        return S_in, M
    # 1. each segment's own final state R, and its transition M (identity columns carried with U0 = 0)
    R = torch.empty(seg.N, seg.NS, H, K, V, **f32)
    run(V, None, R, u0, True, False, True, False)
    eye = torch.eye(K, **f32).expand(seg.N * seg.NS, H, K, K).contiguous()
    M = torch.empty(seg.N, seg.NS, H, K, K, **f32)
    run(K, eye, M, u0, False, False, True, False)
    del eye
    # 2. the scan, in float64: the state entering each segment
    S_in, S = _chain(M, R, h0, reverse=False)
    ht.copy_(S)
    del R
    # 3. each segment from its entering state
    run(V, S_in, ht, u0, True, store_o, False, store_states)
    return S_in, M


def _segmented_backward_state(
    q, k, g_, w, do, dht, seg: Segments, M, dstates, du, dx, dh0, tinv, scores, scale, flags
):  # fmt: skip
    """backward_state over segments: each segment's own share L of its entering gradient, the reverse scan
    (dS_out(s - 1) = M_s^T dS_out(s) + L_s, float64), then each segment from its true exit gradient."""
    H, K, V = q.shape[2], q.shape[3], do.shape[-1]
    BK, _ = _blocks(K, V)
    NSH = seg.N * seg.NS * H
    BV, programs = _state_grad_launch(NSH, K, V, q.dtype)
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)

    def run(dht_, dh0_, store_grads):
        _backward_state_kernel[(triton.cdiv(V, BV), NSH)](
            q, k, g_, w, do, dht_ if dht_ is not None else dummy, seg.cu, seg.first, dstates, du, dx,
            dh0_ if dh0_ is not None else dummy, tinv, scores if scores is not None else dummy, scale,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            HAS_DHT=dht_ is not None, STORE_DH0=dh0_ is not None, STORE_GRADS=store_grads,
            **_launch(
                "backward_state", q.dtype, BK, BV, programs, flags["HAS_G"], flags["L2NORM"],
                scores=flags.get("SCORES_IN", False),
            ),
            **flags, **_narrow("backward_state", flags["HAS_G"], BV, programs),
        )  # fmt: skip

    L = torch.empty(seg.N, seg.NS, H, K, V, dtype=torch.float32, device=q.device)
    run(None, L, False)
    dS_out, dS = _chain(M, L, dht, reverse=True)
    if dh0 is not None:
        dh0.copy_(dS)
    del L
    run(dS_out, None, True)


def backward(
    do, dht, q, k, v, g, beta, h0, tinv, scale: float, cu_seqlens, qk_l2norm: bool, beta_is_logit: bool, kept=None,
    segs=None, norms=None,
):  # fmt: skip
    """Gradients (dq, dk, dv, dg or None, dbeta, dh0 or None).

    Recomputes W, U0 (from the forward's Tinv when given), then the state entering every chunk and U
    (float32, or bfloat16: STATES_LOWP), unless the forward kept (states, U, W, scores or None) (``kept``; with
    segments, from the forward's (S_in, M), ``segs``, rather than by the scan again); then the gradient of
    the state leaving every chunk (in the states' dtype) and dU (float32), and from those, per chunk, every input
    gradient. ``norms``: the row norms the forward formed (_row_norms; None: formed again where the kernels read
    them)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = ChunkTable.get(B, T, cu_seqlens, BT, q.device)
    BK, _ = _blocks(K, V)
    BV = _sequence_bv(K, V, lay.N * H, q.dtype)
    NV = triton.cdiv(V, BV)
    common = dict(H=H, K=K, V=V, BT=BT, BK=BK)

    dummy = torch.empty(1, dtype=torch.float32, device=q.device)  # for pointers that a constexpr leaves unread
    norms = norms if norms is not None and _norms_in(qk_l2norm) else _row_norms(q, k, qk_l2norm)  # (training's)
    rn = norms if norms is not None else dummy

    def flags(kernel):
        return _flags(q.dtype, g is not None, qk_l2norm, kernel, BK=BK) | dict(rn=rn)

    bk = _chunk_keys(BK, qk_l2norm, g is not None)
    chunk_flags = _flags(q.dtype, g is not None, qk_l2norm, "backward_chunk", BK=bk) | dict(rn=rn)
    NS = _num_segments(lay.N, H, T, cu_seqlens, g is not None, qk_l2norm)
    use_kept = kept is not None and (NS == 1 or segs is not None)  # with segments, their transitions M as well
    # what the backward stores itself may be bfloat16 (STATES_LOWP); not with kept float32 states and U, only with
    # ones kept in those same dtypes (KEEP_LOWP)
    lowp, stored = _backward_stores(q.dtype, g is not None, qk_l2norm, BK)
    if use_kept and (kept[0].dtype, kept[1].dtype) != (stored["states"], stored["u"]):
        lowp, stored = False, dict.fromkeys(stored, torch.float32)
    parts = _states_lowp(g is not None)
    g_ = g if g is not None else dummy
    scores = None
    if use_kept:
        states, u, w, scores = kept
        seg = Segments.get(lay.N, T, NS, BT, q.device) if NS > 1 else None
        M = segs[1] if seg is not None else None
    else:
        u0_dtype = _prepare_store("u0_backward", q.dtype)
        w, u0, tinv = prepare(
            k, v, g, beta, lay, qk_l2norm, beta_is_logit, tinv, store_t=True, u0_dtype=u0_dtype, norms=norms
        )  # fmt: skip
        states = torch.empty(lay.NC, H, K, V, dtype=stored["states"], device=q.device)
        u = torch.empty(B, T, H, V, dtype=stored["u"], device=q.device)
        seg = Segments.get(lay.N, T, NS, BT, q.device) if NS > 1 else None
        if seg is None:  # launched as the forward launched it (program count: few-program stages, NARROW_FEW)
            programs = NV * lay.N * H
            _forward_kernel[(NV, lay.N * H)](
                q, k, g_, w, u0, h0 if h0 is not None else dummy, lay.cu, lay.first, dummy, dummy, states, u, scale,
                BV=BV, HAS_H0=h0 is not None, HAS_U0=True, STORE_O=False, STORE_HT=False, STORE_STATES=True,
                **_launch("forward", q.dtype, BK, BV, programs, g is not None, qk_l2norm), **common,
                **flags("forward"), **_narrow("forward", g is not None, BV, programs),
            )  # fmt: skip
        else:
            ht = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device)
            _, M = _segmented_forward(
                q, k, g_, w, u0, h0, seg, dummy, ht, states, u, scale, False, True, flags("forward"), segs
            )  # fmt: skip
            del ht
        del u0
    dstates = torch.empty(states.shape, dtype=stored["dstates"], device=q.device)
    state_flags = flags("backward_state")
    if scores is not None:  # P^T dO from the forward's scores (KEEP_SCORES), in backward_state's loop
        NSH = (lay.N if seg is None else seg.N * seg.NS) * H  # its launch's sequences (or segments) x heads
        state_flags |= _scores_in(_scores_narrow_few(NSH, K, V, q.dtype))
    dx_dtype = _dx_dtype(lowp, parts)
    local = state_flags["LOCAL_DU"] or scores is not None  # backward_state forms P^T dO: du neither written nor read
    if local and dx_dtype is not None:
        du = dummy
    else:
        du = torch.empty(B, T, H, V, dtype=torch.float32 if local else _du_dtype(lowp, parts), device=q.device)
    dx = du if dx_dtype is None else torch.empty(B, T, H, V, dtype=dx_dtype, device=q.device)
    dh0 = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
    bv_chunk, bv_bwd = _chunk_bv(V), _backward_chunk_bv(V, g is not None, q.dtype)
    sums = _log_decays(g, lay, ("backward_chunk",) if local else ("local_du", "backward_chunk"))
    if not local:  # du = scale P^T dO, per chunk; backward_state adds the states' share
        g_du, decays = _decays_in("local_du", g_, sums)
        _local_du_kernel[(lay.NC, H)](
            q, k, g_du, do, lay.chunks, du, scale, BV=bv_chunk,
            **_launch("local_du", q.dtype, BK, bv_chunk, gated=g is not None, qk_l2norm=qk_l2norm), **common,
            **flags("local_du"), **decays,
        )  # fmt: skip
    if seg is None:
        bv_state, programs = _state_grad_launch(lay.N * H, K, V, q.dtype)
        _backward_state_kernel[(triton.cdiv(V, bv_state), lay.N * H)](
            q, k, g_, w, do, dht if dht is not None else dummy, lay.cu, lay.first, dstates, du, dx,
            dh0 if dh0 is not None else dummy, tinv, scores if scores is not None else dummy, scale,
            BV=bv_state, HAS_DHT=dht is not None, STORE_DH0=h0 is not None, STORE_GRADS=True,
            **_launch("backward_state", q.dtype, BK, bv_state, programs, g is not None, qk_l2norm, scores is not None),
            **common, **state_flags, **_narrow("backward_state", g is not None, bv_state, programs),
        )  # fmt: skip
    else:
        _segmented_backward_state(
            q, k, g_, w, do, dht, seg, M, dstates, du, dx, dh0, tinv, scores, scale, state_flags
        )  # fmt: skip
        del M
    del w, du, scores  # dx holds what backward_chunk needs
    dq = torch.empty(q.shape, dtype=store_dtype(q.dtype), device=q.device)
    dk = torch.empty(k.shape, dtype=store_dtype(k.dtype), device=q.device)
    dv = torch.empty(v.shape, dtype=store_dtype(v.dtype), device=q.device)
    # backward_chunk: NK programs per chunk, one per block of bk key columns; each stores its share of the sums
    # over keys, dg (float64 when shared, as the kernel forms it) and dbeta, and the shares are added here.
    NK = triton.cdiv(K, bk)
    dg_dtype = torch.float64 if NK > 1 else torch.float32
    dg = torch.empty(NK, B, T, H, dtype=dg_dtype, device=q.device) if g is not None else None
    dbeta = torch.empty(NK, B, T, H, dtype=torch.float32, device=q.device)
    g_chunk, decays = _decays_in("backward_chunk", g_, sums)
    _backward_chunk_kernel[(lay.NC * NK, H)](
        q, k, v, g_chunk, beta, u, dx, do, lay.chunks, states, dstates,
        dq, dk, dv, dg if dg is not None else dummy, dbeta, scale, B * T * H,
        BV=bv_bwd, BETA_LOGIT=beta_is_logit,
        **_launch("backward_chunk", q.dtype, bk, bv_bwd, gated=g is not None, qk_l2norm=qk_l2norm),
        **dict(common, BK=bk),
        **chunk_flags, DX_LOWP=lowp and parts["dx"],
        DB_FROM_PRODUCTS=_db_from_products(g is not None, q.dtype, qk_l2norm),
        SUMS_IN_PLACE=bool(SUMS_IN_PLACE), UNCHAINED=bool(_by_op(UNCHAINED_DOTS, g is not None)),
        ONE_PASS=bool(_by_op(ONE_PASS_CHUNK, g is not None)), V_EARLY=bool(_by_op(V_EARLY, g is not None)), **decays,
    )  # fmt: skip
    dg = dg.sum(0).float() if dg is not None else None
    dbeta = dbeta.sum(0)
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
    keep: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(o, final state, then for the backward Tinv (empty unless save), the kept states, U and W (empty unless
    kept) and scores (empty unless kept with KEEP_SCORES: _keeps_scores), the segments' S_in and M (empty unless
    save with segments) and the row norms of q and k (empty unless save where the kernels read them: _norms_in)).
    keep is an argument, not KEEP_STATES read here, so that a compiled graph (and torch.compile's caches, which do
    not see module settings) holds what the fake and the kernels do."""
    with on_device_of(q), ptxas.assembler():
        o, ht, tinv, kept, segs, norms = forward(
            q, k, v, g, beta, h0, scale, cu_seqlens, qk_l2norm, beta_is_logit, save, keep
        )  # fmt: skip
    empty = none_tensor(q)
    states, u, w, scores = kept if kept is not None else (empty, empty.clone(), empty.clone(), None)
    scores = scores if scores is not None else empty.clone()
    seg_in, seg_m = segs if segs is not None else (empty.clone(), empty.clone())
    norms = norms if norms is not None else empty.clone()
    return o, ht, (tinv if tinv is not None else empty.clone()), states, u, w, scores, seg_in, seg_m, norms


@_chunk_op.register_fake
def _(q, k, v, g, beta, h0, cu_seqlens, scale, qk_l2norm, beta_is_logit, save, keep):
    B, T, H, K = q.shape
    V = v.shape[-1]
    empty = none_tensor(q)
    tinv = q.new_empty(B, T, H, BT, dtype=_prepare_store("tinv", k.dtype)) if save else empty
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if save and keep:
        s_dtype, u_dtype = _kept_dtypes(q.dtype, g is not None, qk_l2norm, _blocks(K, V)[0])
        states = q.new_empty(ChunkTable.count(B, T, cu_seqlens, BT), H, K, V, dtype=s_dtype)
        u = q.new_empty(B, T, H, V, dtype=u_dtype)
        w = q.new_empty(B, T, H, K, dtype=_w_dtype(k.dtype))
    else:
        states, u, w = empty.clone(), empty.clone(), empty.clone()
    if _keeps_scores(g is not None, qk_l2norm, save, keep, N, H, T, K, V, cu_seqlens, q.dtype):
        scores = q.new_empty(B, T, H, BT, dtype=_scores_dtype(q.dtype, g is not None, qk_l2norm))
    else:
        scores = empty.clone()
    # (no shape guards otherwise)
    NS = Segments.count(T, _num_segments(N, H, T, cu_seqlens, g is not None, qk_l2norm), BT) if save else 1
    if NS > 1:
        seg_in = q.new_empty(N, NS, H, K, V, dtype=torch.float32)
        seg_m = q.new_empty(N, NS, H, K, K, dtype=torch.float32)
    else:
        seg_in, seg_m = empty.clone(), empty.clone()
    norms = q.new_empty(B, T, H, 2, dtype=torch.float32) if save and _norms_in(qk_l2norm) else empty.clone()
    return torch.empty_like(v), fake_state(q, v, cu_seqlens), tinv, states, u, w, scores, seg_in, seg_m, norms


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
    states: torch.Tensor,
    u: torch.Tensor,
    w: torch.Tensor,
    scores: torch.Tensor,
    seg_in: torch.Tensor,
    seg_m: torch.Tensor,
    norms: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    qk_l2norm: bool,
    beta_is_logit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tinv = tinv if tinv.numel() else None
    kept = (states, u, w, scores if scores.numel() else None) if states.numel() else None
    segs = (seg_in, seg_m) if seg_in.numel() else None
    norms = norms if norms.numel() else None
    with on_device_of(q), ptxas.assembler():
        grads = backward(
            do, dht, q, k, v, g, beta, h0, tinv, scale, cu_seqlens, qk_l2norm, beta_is_logit, kept, segs, norms
        )  # fmt: skip
    dq, dk, dv, dg, dbeta, dh0 = grads
    empty = none_tensor(q)
    return dq, dk, dv, (dg if dg is not None else empty), dbeta, (dh0 if dh0 is not None else empty.clone())


@_chunk_backward_op.register_fake
def _(
    do, dht, q, k, v, g, beta, h0, tinv, states, u, w, scores, seg_in, seg_m, norms, cu_seqlens, scale, qk_l2norm,
    beta_is_logit,
):  # fmt: skip
    empty = none_tensor(q)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(g) if g is not None else empty,
        torch.empty_like(beta),
        torch.empty_like(h0) if h0 is not None else empty.clone(),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, h0, cu_seqlens, scale, qk_l2norm, beta_is_logit, _, _ = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, *output[2:], cu_seqlens)
    ctx.options = (scale, qk_l2norm, beta_is_logit)
    ctx.set_materialize_grads(False)  # an unused final state's gradient arrives as None, not as zeros


def _backward(ctx, do, dht, *_):
    q, k, v, g, beta, h0, tinv, states, u, w, scores, seg_in, seg_m, norms, cu_seqlens = ctx.saved_tensors
    scale, qk_l2norm, beta_is_logit = ctx.options
    dht = dht.contiguous() if dht is not None else None
    do = do if do is not None else torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, dh0 = _chunk_backward_op(
        do.contiguous(),
        dht,
        q,
        k,
        v,
        g,
        beta,
        h0,
        tinv,
        states,
        u,
        w,
        scores,
        seg_in,
        seg_m,
        norms,
        cu_seqlens,
        scale,
        qk_l2norm,
        beta_is_logit,
    )
    dg = dg if g is not None else None
    dh0 = dh0 if h0 is not None else None
    return dq, dk, dv, dg, dbeta, dh0, None, None, None, None, None, None


_chunk_op.register_autograd(_backward, setup_context=_setup_context)


def _recurrent_body(
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
    with on_device_of(q):
        return recurrent(q, k, v, g, beta, h0, scale, cu_seqlens, qk_l2norm, beta_is_logit)


_recurrent_op = torch.library.custom_op("linattn::recurrent_gated_delta_rule", mutates_args=())(_recurrent_body)


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
    """Same contract as ``naive_gated_delta_rule``; g may be None (the delta rule).

    Decoding (no gradient, few tokens) runs the token-by-token kernel, which takes g and beta in their own dtypes;
    called eagerly on plain tensors it is launched directly (see common/triton_ops.py's DECODE_DIRECT)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = g.contiguous() if g is not None else None
    beta = beta.contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    grad = needs_grad(q, k, v, g, beta, h0)
    if not grad and short_for_recurrent(q, cu_seqlens, RECURRENT_MAX_T):
        launch = decode_launch(_recurrent_op, _recurrent_body, q, k, v, g, beta, h0, cu_seqlens)
        o, ht = launch(q, k, v, g, beta, h0, cu_seqlens, float(scale), bool(qk_l2norm), bool(beta_is_logit))
        return o, (ht if output_final_state else None)
    g = g.float() if g is not None else None
    args = (q, k, v, g, beta.float(), h0, cu_seqlens, float(scale), bool(qk_l2norm), bool(beta_is_logit))
    o, ht, *_ = _chunk_op(*args, grad, grad and KEEP_STATES)
    return o, (ht if output_final_state else None)


__all__ = ["triton_gated_delta_rule", "triton_unsupported", "forward", "backward", "recurrent", "BT"]


def compile_variants():
    """The kernel variants that tests/ops/compile_kernels.py compiles for sm_90 (in CI, without a GPU): the library's
    launches, and those with qk_l2norm again with the row norms read (NORMS_IN)."""
    for label, kernel, pointers, constexprs, opts in _library_variants():
        yield label, kernel, pointers, constexprs, opts
        if constexprs.get("L2NORM") and constexprs.get("R_IN") is False and "K=64" not in label:  # (K = 128 only)
            yield f"{label} NORMS_IN", kernel, pointers, constexprs | dict(R_IN=True), opts
    rows = dict(R="i32")
    for dt in ("bf16", "fp16"):
        norms = dict(D=128, BR=ROW_NORM_ROWS, BD=128)
        yield f"row norms {dt}", _row_norms_kernel, dict(q=dt, k=dt), norms, dict(num_warps=4, scalars=rows)
    yield "log decay", _log_decay_kernel, dict(chunks="i32"), dict(H=16, BT=BT), dict(num_warps=4)


def _library_variants():
    """compile_variants' launches as the library's settings make them."""
    # Compiling is slow (minutes per float32 variant on a CI core): bfloat16 with every option, and
    # float16 without gates, catch what the interpreter lets through. The per-sequence kernels run with
    # BV = BV_MAX_LOWP for bfloat16 (BV_MAX otherwise; many sequences and heads) and BV = 16 (few), bfloat16 with
    # the bfloat16 operands and W that a GPU with a trusted ptxas runs.
    for dt, gated, opt in (("bf16", True, True), ("fp16", False, False)):
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        ptrs = {n: dt for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}
        w = {torch.bfloat16: "bf16", torch.float32: "fp32"}[_w_dtype(torch_dtype, gpu=True)]
        ptrs |= dict(chunks="i32", cu_seqlens="i32", chunk_start="i32", w=w)
        BK, BV = _blocks(128, 128)
        _, seq_bv = _blocks(128, 128, torch_dtype, gpu=True)
        opts = {name: _launch(name, torch_dtype, BK, BV, gated=gated, qk_l2norm=opt) for name in NUM_WARPS}
        common = {
            name: dict(H=16, K=128, V=128, BT=BT, BK=BK, **_flags(torch_dtype, gated, opt, name, gpu=True))
            for name in NUM_WARPS
        }
        label = f"{dt} gated={gated} l2norm/logit={opt}"
        # what the backward stores for backward_chunk: bfloat16 where it takes bfloat16 operands (STATES_LOWP)
        lowp = _lowp(torch_dtype, "backward_chunk", True, _chunk_keys(BK, False, gated))
        parts = _states_lowp(gated)
        sptrs = ptrs | {n: "bf16" if lowp and parts[n] else "fp32" for n in ("states", "dstates", "u")}
        xd = "bf16" if _dx_dtype(lowp, parts) == torch.bfloat16 else "fp32"
        dud = "bf16" if _du_dtype(lowp, parts) == torch.bfloat16 else "fp32"  # local_du's share of dU
        sptrs |= dict(dx=xd, du=dud)  # backward_state's dX (backward_chunk reads it as du) and dU's local share
        td, u0d = (
            "bf16" if _prepare_store(part, torch_dtype, gpu=True) == torch.bfloat16 else "fp32"
            for part in ("tinv", "u0_backward")
        )
        ptrs |= dict(tinv=td)
        sptrs |= dict(tinv=td, u0=u0d)
        solve = dict(BV=seq_bv, BKP=min(BK, PREPARE_KEYS), SOLVE=True, STORE_T=True, BETA_LOGIT=opt)
        solve |= dict(DIAG_DOUBLING=SOLVE_DIAG_DOUBLING, **_prepare_flags(torch_dtype, opt, gpu=True))
        yield f"prepare {label}", _prepare_kernel, ptrs, common["prepare"] | solve, opts["prepare"]
        compiled = []  # forward's and backward_state's constexprs and launch options, by BV and program count
        # many programs at seq_bv; few (FEW_PROGRAMS_STAGES, NARROW_FEW) at seq_bv (e.g. T = 16384, B = 4: 128
        # programs) and at 16; a few-program launch that compiles as the many-program one is not compiled again
        for bv, programs in ((seq_bv, None), (seq_bv, 1), (16, 1)):
            run = {n: _launch(n, torch_dtype, BK, bv, programs, gated, opt) for n in opts}
            out = dict(BV=bv, HAS_H0=True, HAS_U0=True, STORE_O=True, STORE_HT=True, STORE_STATES=False)
            out |= _narrow("forward", gated, bv, programs)
            state = common["backward_state"] | dict(BV=bv, HAS_DHT=True, STORE_DH0=True, STORE_GRADS=True)
            state |= _narrow("backward_state", gated, bv, programs)
            if programs is None:
                many = out, state
            if (out, state, run) in compiled:
                continue
            compiled.append((out, state, run))
            tag = f"BV={bv}{' few' if programs is not None else ''}"
            yield f"forward {tag} {label}", _forward_kernel, ptrs, common["forward"] | out, run["forward"]
            states = out | dict(STORE_O=False, STORE_HT=False, STORE_STATES=True)
            yield f"forward states {tag} {label}", _forward_kernel, sptrs, common["forward"] | states, run["forward"]
            yield f"backward state {tag} {label}", _backward_state_kernel, sptrs, state, run["backward_state"]
        out, state = many  # the variants below launch at seq_bv, many programs
        if opt:  # backward_state with the other SPLIT_BACKWARD setting than this op's (LOCAL_DU)
            other = state | dict(LOCAL_DU=not state["LOCAL_DU"])
            yield (
                f"backward state LOCAL_DU={other['LOCAL_DU']} {label}",
                _backward_state_kernel,
                sptrs,
                other,
                opts["backward_state"],
            )
        # backward_state forming P^T dO from the forward's scores (KEEP_SCORES), whose output kernel stores them
        kept_scores = "bf16" if _scores_dtype(torch_dtype, gated, opt, gpu=True) == torch.bfloat16 else "fp32"
        scores_in = state | _scores_in()
        scores_ptrs = sptrs | dict(scores=kept_scores)
        scores_label = f"backward state SCORES_IN {label}"
        yield scores_label, _backward_state_kernel, scores_ptrs, scores_in, opts["backward_state"]
        other = scores_in | dict(SCORES_PIPELINED=not scores_in["SCORES_PIPELINED"])
        other_label = f"{scores_label} SCORES_PIPELINED={other['SCORES_PIPELINED']}"
        yield other_label, _backward_state_kernel, scores_ptrs, other, opts["backward_state"]
        if opt:  # heads of K = 64 too: their key tiles take other shapes (session 14's STATE_HALVES compiled here at
            # K = 128 only, and failed to compile on the card at K <= 64)
            small = dict(K=64, BK=64)
            yield f"forward K=64 {label}", _forward_kernel, ptrs, common["forward"] | out | small, opts["forward"]
            yield f"backward state K=64 {label}", _backward_state_kernel, sptrs, state | small, opts["backward_state"]
        # segments (SEGMENT_HEADS): the transitions (U0 = 0, K columns) and each segment's own gradient share
        transition = out | dict(HAS_U0=False, STORE_O=False, V=128)
        yield f"forward transition {label}", _forward_kernel, ptrs, common["forward"] | transition, opts["forward"]
        share = state | dict(HAS_DHT=False, STORE_GRADS=False)
        yield f"backward state share {label}", _backward_state_kernel, sptrs, share, opts["backward_state"]
        if opt:  # the segments' chain in one launch (CHAIN_KERNEL), float32 in and out, whatever the inputs' dtype
            for K_, reverse in ((128, False), (128, True), (64, True)):
                chain = dict(H=4, K=K_, V=128, BK=K_, BV=CHAIN_BV, HAS_START=True, REVERSE=reverse)
                chain_opts = dict(num_warps=4, num_stages=1, scalars=dict(NS="i32"))
                yield f"chain K={K_} reverse={reverse}", _chain_kernel, {}, chain, chain_opts
        output = common["output"] | dict(BV=BV_CHUNK) | _narrow("output", gated, BV_CHUNK)
        output |= dict(DECAYS_IN=_reads_decays("output", gated))
        yield f"output {label}", _output_kernel, ptrs, output, opts["output"]
        scores_out = output | dict(STORE_SCORES=True)
        scores_label = f"output STORE_SCORES {label}"
        yield scores_label, _output_kernel, ptrs | dict(scores=kept_scores), scores_out, opts["output"]
        if lowp:  # reading states and U kept in the backward's own dtypes (KEEP_LOWP): this gating's, the delta rule's
            for kept in (sptrs, ptrs | dict(states="bf16", u="bf16")):
                kept_label = f"output kept states={kept['states']} u={kept['u']} {label}"
                yield kept_label, _output_kernel, kept, output, opts["output"]
        local_du = common["local_du"] | dict(BV=BV_CHUNK, DECAYS_IN=_reads_decays("local_du", gated))
        yield f"local du {label}", _local_du_kernel, ptrs | dict(du=dud), local_du, opts["local_du"]
        if gated:  # output and local_du with the other DECAYS_IN setting
            other = output | dict(DECAYS_IN=not output["DECAYS_IN"])
            yield f"output DECAYS_IN={other['DECAYS_IN']} {label}", _output_kernel, ptrs, other, opts["output"]
            other = local_du | dict(DECAYS_IN=not local_du["DECAYS_IN"])
            yield (
                f"local du DECAYS_IN={other['DECAYS_IN']} {label}",
                _local_du_kernel,
                ptrs | dict(du=dud),
                other,
                opts["local_du"],
            )
        for l2 in sorted({opt, False}):  # key columns per program: CHUNK_KEYS, or all of them with qk_l2norm
            bk = _chunk_keys(BK, l2, gated)
            bv_bwd = _backward_chunk_bv(128, gated)
            chunk = dict(BV=bv_bwd, BETA_LOGIT=opt, BK=bk)
            chunk |= _flags(torch_dtype, gated, l2, "backward_chunk", gpu=True, BK=bk)
            chunk |= dict(DX_LOWP=chunk["LOWP"] and parts["dx"])
            chunk |= dict(DB_FROM_PRODUCTS=_db_from_products(gated, torch_dtype, l2))
            chunk |= dict(SUMS_IN_PLACE=bool(SUMS_IN_PLACE), UNCHAINED=bool(_by_op(UNCHAINED_DOTS, gated)))
            chunk |= dict(
                ONE_PASS=bool(_by_op(ONE_PASS_CHUNK, gated)), DECAYS_IN=_reads_decays("backward_chunk", gated)
            )
            chunk |= dict(V_EARLY=bool(_by_op(V_EARLY, gated)))
            chunk_ptrs = sptrs | dict(du=xd) if chunk["LOWP"] else ptrs
            scalars = dict(scalars=dict(scale="fp32", part="i32"))
            chunk_opts = _launch("backward_chunk", torch_dtype, bk, bv_bwd, gated=gated, qk_l2norm=l2) | scalars
            chunk_label = f"backward chunk BK={bk} {dt} gated={gated} l2norm={l2} logit={opt}"
            yield chunk_label, _backward_chunk_kernel, chunk_ptrs, common["backward_chunk"] | chunk, chunk_opts
            if opt and not l2:  # the benchmark's launch (beta not as logits), with either SUMS_IN_PLACE setting
                for in_place in (False, True):
                    bench = chunk | dict(BETA_LOGIT=False, SUMS_IN_PLACE=in_place)
                    bench_label = chunk_label.replace("logit=True", f"logit=False SUMS_IN_PLACE={in_place}")
                    yield bench_label, _backward_chunk_kernel, chunk_ptrs, common["backward_chunk"] | bench, chunk_opts
            if opt:  # either UNCHAINED_DOTS setting, where the products go into db (DB_FROM_PRODUCTS)
                other = chunk | dict(UNCHAINED=not chunk["UNCHAINED"])
                if other["DB_FROM_PRODUCTS"]:
                    other_label = f"{chunk_label} UNCHAINED={other['UNCHAINED']}"
                    yield other_label, _backward_chunk_kernel, chunk_ptrs, common["backward_chunk"] | other, chunk_opts
            if opt:  # the other ONE_PASS_CHUNK, DECAYS_IN and V_EARLY settings
                for key in ("ONE_PASS", "DECAYS_IN", "V_EARLY"):
                    other = chunk | {key: not chunk[key]}
                    other_label = f"{chunk_label} {key}={other[key]}"
                    yield other_label, _backward_chunk_kernel, chunk_ptrs, common["backward_chunk"] | other, chunk_opts
    # The decode kernel, with the delta rule's update, compiles in the "recurrent" group.
