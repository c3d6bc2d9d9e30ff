"""The Triton kernels of the delta rules (gated_delta_rule, and delta_rule as g = None) against the token recurrence.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at
small odd shapes; the GPU-only cases at the end need CUDA and skip elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest
import torch

from linattn import ops
from tests.ops.mechanisms import by_id
from tests.ops.tolerance import (
    ON_DEVICE,
    assert_same_result,
    check_against_naive,
    run_with_grads,
)
from tests.ops.triton_checks import (
    assert_checkpointed_equals_plain,
    assert_compiles_fullgraph,
    assert_cuda_graph_replays,
    assert_no_host_sync,
    assert_segments_equal_one_pass,
    count_launches,
    extreme,
    launch_kwargs,
    triton_calls,
)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from linattn.ops.common.triton_delta_utils import unit_lower_inverse  # noqa: E402
from linattn.ops.gated_delta_rule import triton as tri  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GATED, DELTA = by_id["gated_delta_rule"], by_id["delta_rule"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
both = pytest.mark.parametrize("case", [GATED, DELTA], ids=lambda c: c.id)


def to(tensors, state, device=DEVICE):
    return [t.to(device) for t in tensors], (None if state is None else state.to(device))


def with_options(case, **options):
    """The case with raw (unnormalised) keys and extra keyword options of the op."""
    opts = "_".join(k for k, v in options.items() if v)
    return dataclasses.replace(case, id=f"{case.id}_{opts}", l2_keys=False, options=options)


@dtypes
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_gated_matches_naive(dtype, T):
    tensors, state = GATED.draw(B=2, T=T, H=2, K=16, V=24, dtype=dtype, seed=T)
    check_against_naive(GATED, *to(tensors, state), "triton", **ON_DEVICE)


@dtypes
@pytest.mark.parametrize("T", [1, 65])
def test_delta_rule_matches_naive(dtype, T):
    tensors, state = DELTA.draw(B=2, T=T, H=2, K=16, V=24, dtype=dtype, seed=T)
    check_against_naive(DELTA, *to(tensors, state), "triton", **ON_DEVICE)


@both
def test_non_power_of_two_head_dims_and_several_value_blocks(case):
    tensors, state = case.draw(B=1, T=70, H=1, K=33, V=40, seed=7)  # V = 40: two blocks of 32 columns
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


@both
def test_wide_value_blocks_of_the_sequence_kernels(case, monkeypatch):
    """Many sequences and heads take BV = 32 in the per-sequence kernels (small test shapes take 16)."""
    monkeypatch.setattr(tri, "FULL_GPU", 0)
    assert tri._sequence_bv(33, 40, 1) == 32
    tensors, state = case.draw(B=1, T=70, H=1, K=33, V=40, seed=8)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


@both
@pytest.mark.parametrize("segments", [1, 2])
def test_state_gradient_in_its_own_value_blocks(case, segments, monkeypatch):
    """backward_state with value blocks of its own (STATE_GRAD_GPU): 16 columns where the forward's loop takes 32."""
    monkeypatch.setattr(tri, "FULL_GPU", 0)
    monkeypatch.setattr(tri, "STATE_GRAD_GPU", 10**6)
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    forward = launch_kwargs(monkeypatch, tri, "_forward_kernel")
    state = launch_kwargs(monkeypatch, tri, "_backward_state_kernel")
    tensors, h0 = case.draw(B=1, T=200, H=1, K=33, V=40, seed=9, gate_scale=0.05)
    check_against_naive(case, *to(tensors, h0), "triton", **ON_DEVICE)
    assert {kw["BV"] for kw in forward} == {32} and {kw["BV"] for kw in state} == {16}


@pytest.mark.parametrize("warps", [None, 8])
def test_few_programs_take_their_own_warps(warps, monkeypatch):
    """FEW_PROGRAMS_WARPS: the per-sequence launches of fewer than FEW_PROGRAMS programs take the op's entry for
    the kernel (None: NUM_WARPS), at value blocks of FEW_PROGRAMS_WARPS_BV or more where their tiles allow 8 warps
    (64 keys, 32 values: see _warps); launches of many programs, the other op's, and the per-chunk kernels, keep
    NUM_WARPS. K = V = 64: 2 value blocks of 32 x 2 sequences x 2 heads = 8 programs. With NARROW_AT_FEW_WARPS the
    gated op's narrow decays stay at the entry's warps, at two stages at most; backward_state reading the scores at
    the entry's warps takes SCORES_AT_FEW_WARPS_STAGES at most."""
    table = {f"{op}_{kernel}": None for op in ("gated", "ungated") for kernel in ("forward", "backward_state")}
    monkeypatch.setattr(tri, "FEW_PROGRAMS_WARPS", table | dict(gated_forward=warps, gated_backward_state=warps))
    monkeypatch.setattr(tri, "FEW_PROGRAMS_WARPS_BV", 32)
    monkeypatch.setattr(tri, "FEW_PROGRAMS", 9)
    monkeypatch.setattr(tri, "FULL_GPU", 0)  # the blocks of many programs (BV_MAX), not narrowed
    launched = {name: launch_kwargs(monkeypatch, tri, name) for name in ("_forward_kernel", "_backward_state_kernel")}
    chunk = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    tensors, state = GATED.draw(B=2, T=150, H=2, K=64, V=64, seed=30, gate_scale=0.05)
    check_against_naive(GATED, *to(tensors, state), "triton", **ON_DEVICE)
    for name, kws in launched.items():
        assert kws and {kw["num_warps"] for kw in kws} == {warps or tri.NUM_WARPS[name[1:-7]]}, name
        assert {kw["BV"] for kw in kws} == {32}
    assert {kw["num_warps"] for kw in chunk} == {tri.NUM_WARPS["backward_chunk"]}  # 64 key columns
    monkeypatch.setattr(tri, "FEW_PROGRAMS", 8)  # 8 programs are then not few
    assert tri._launch("forward", torch.bfloat16, 64, 32, 8)["num_warps"] == tri.NUM_WARPS["forward"]
    assert tri._launch("forward", torch.bfloat16, 64, 16, 4)["num_warps"] == 4  # tiles too small for 8 warps
    monkeypatch.setattr(tri, "FEW_PROGRAMS", 9)
    assert tri._launch("backward_state", torch.bfloat16, 64, 32, 8, gated=True)["num_warps"] == (warps or 4)
    assert tri._launch("backward_state", torch.bfloat16, 64, 32, 8, gated=False)["num_warps"] == 4  # the other op's
    assert tri._narrow("backward_state", True, 64, 8)["NARROW_DECAYS"] == (warps is None)  # narrow at 4 warps only
    monkeypatch.setattr(tri, "FEW_PROGRAMS_WARPS_BV", 64)  # 32 value columns are then too few for the entry
    assert tri._launch("backward_state", torch.bfloat16, 64, 32, 8, gated=True)["num_warps"] == 4
    assert tri._launch("backward_state", torch.bfloat16, 64, 64, 8, gated=True)["num_warps"] == (warps or 4)
    # NARROW_AT_FEW_WARPS: the narrow decays kept at the entry's warps, at two stages at most
    stages = tri._launch("backward_state", torch.bfloat16, 64, 64, 8, gated=True)["num_stages"]
    assert stages > 2 or tri.FEW_PROGRAMS_STAGES["bfloat16"] <= 2
    # SCORES_AT_FEW_WARPS_STAGES: backward_state reading the forward's scores, at the entry's warps only
    scored = tri._launch("backward_state", torch.bfloat16, 64, 64, 8, gated=True, scores=True)["num_stages"]
    assert scored == (min(stages, tri.SCORES_AT_FEW_WARPS_STAGES) if warps else stages)
    many = dict(programs=None, gated=True)
    assert tri._launch("backward_state", torch.bfloat16, 64, 64, scores=True, **many) == tri._launch(
        "backward_state", torch.bfloat16, 64, 64, **many
    )
    monkeypatch.setattr(tri, "NARROW_AT_FEW_WARPS", True)
    assert tri._narrow("backward_state", True, 64, 8)["NARROW_DECAYS"]
    narrow = tri._launch("backward_state", torch.bfloat16, 64, 64, 8, gated=True)
    assert narrow == dict(num_warps=warps or 4, num_stages=min(stages, 2) if warps else stages)
    assert tri._launch("backward_state", torch.bfloat16, 64, 64, 8, gated=False)["num_stages"] == stages  # delta


def test_one_stage_on_gpus_with_less_shared_memory(monkeypatch):
    """On a GPU that offers a program less than SMALL_SHARED of shared memory (sm_86, sm_89, sm_120: 99 KiB),
    every launch takes one stage, where Hopper's settings take two or three (NUM_STAGES, GATED_STAGES,
    FEW_PROGRAMS_STAGES) and the gated forward with qk_l2norm would need 108-120 KiB; on an H200 (227 KiB) they keep
    them; where Triton does not say, too. There float32's backward_chunk over whole rows takes value blocks of 32
    and 4 warps, and db from the tiles. The device faked: what Triton reports of it."""
    from linattn.ops.common import triton_utils

    monkeypatch.setattr(triton_utils, "triton_interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # few-program launches: three stages on Hopper, two at most on an A100 (at three the delta rule's no-gradient
    # forward with qk_l2norm would take 229,376 B, past the A100's 166,912)
    for optin, gated_forward, few in [(101376, 1, 1), (232448, 2, 3), (166912, 2, 2), (None, 2, 3)]:  # 8.9, 9.0, 8.0
        monkeypatch.setattr(triton_utils, "shared_per_program", lambda index, s=optin: s)
        assert tri._launch("forward", torch.bfloat16, 128, 32, gated=True)["num_stages"] == gated_forward, optin
        assert tri._launch("backward_state", torch.bfloat16, 128, 32, 64)["num_stages"] == few, optin  # few programs
        # backward_chunk: two stages for bfloat16 (ONE_PASS_CHUNK), one for float16 (ONE_STAGE_FLOAT16: its tf32
        # tiles took 237,568 B at two on sm_90)
        small = optin == 101376
        for gated in (False, True):
            assert tri._launch("backward_chunk", torch.bfloat16, 128, 64, gated=gated)["num_stages"] == 2 - small
            assert tri._launch("backward_chunk", torch.float16, 128, 64, gated=gated)["num_stages"] == 1
        # float32's backward_chunk over whole rows: value blocks of 32 and 4 warps there, else 64 and 8
        assert tri._backward_chunk_bv(128, True, torch.float32) == (32 if small else 64), optin
        assert tri._backward_chunk_bv(128, True, torch.bfloat16) == 64, optin
        wide = tri._launch("backward_chunk", torch.float32, 128, 64, gated=True, qk_l2norm=True)["num_warps"]
        assert wide == (tri.NUM_WARPS["backward_chunk"] if small else tri.WIDE_KEYS_WARPS["backward_chunk"]), optin
        # and db from the tiles (from the products, the delta rule's with qk_l2norm took 106,496 B on sm_89)
        for gated, l2 in [(False, True), (True, True), (False, False)]:
            assert tri._db_from_products(gated, torch.float32, l2) == (not small), (optin, gated, l2)
            assert tri._db_from_products(gated, torch.bfloat16, l2), (optin, gated, l2)
        # the delta rule's no-gradient forward with qk_l2norm reads the row norms in float16 below Hopper's shared
        # memory (forming them it took 147,456 B on sm_89); elsewhere NORMS_IN_INFERENCE decides (off for it)
        below_hopper = optin is not None and optin < 232448
        assert tri._norms_in(True, False, False, torch.float16) == below_hopper, optin
        assert not tri._norms_in(True, False, False, torch.bfloat16), optin
        assert not tri._norms_in(False, False, False, torch.float16), optin


@pytest.mark.parametrize("segments", [1, 2])
def test_state_gradient_launch_counts_its_programs(segments, monkeypatch):
    """backward_state's launch is given its program count (value blocks x sequences x heads x segments), so that
    a launch of fewer programs than SMs takes FEW_PROGRAMS_STAGES (see _launch)."""
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    launches = []
    original = tri._launch
    monkeypatch.setattr(tri, "_launch", lambda *a, **kw: launches.append((a, kw)) or original(*a, **kw))
    B, H, V = 2, 2, 40
    tensors, state = DELTA.draw(B=B, T=300, H=H, K=24, V=V, seed=26)
    check_against_naive(DELTA, *to(tensors, state), "triton", **ON_DEVICE)
    state_launches = [(a, kw) for a, kw in launches if a[0] == "backward_state"]
    assert state_launches, "no backward_state launch seen"
    for (_, _, _, bv, programs, *_), _ in state_launches:
        assert programs == triton.cdiv(V, bv) * B * H * segments


@both
@pytest.mark.parametrize("split", [False, True])
def test_products_without_the_state_in_either_place(case, split, monkeypatch):
    """The forward's q k^T, P U and exp(b) q S give the same results in the per-sequence loop as in the per-chunk
    kernel (SPLIT_FORWARD); with an initial state, partial chunks and V blocks of both kernels' widths (the
    backward, with dX stored by backward_state, runs over the same)."""
    monkeypatch.setattr(tri, "SPLIT_FORWARD", split)
    tensors, state = case.draw(B=2, T=70, H=1, K=33, V=40, seed=9)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


def test_kept_states_in_the_backwards_own_dtypes(monkeypatch):
    """KEEP_LOWP: what KEEP_STATES keeps takes the dtypes the backward stores itself (STATES_LOWP), which are
    bfloat16 only for bfloat16 inputs on a GPU: U for both ops, the states for the delta rule only."""
    f32, bf16 = torch.float32, torch.bfloat16
    for lowp_keep in (False, True):
        monkeypatch.setattr(tri, "KEEP_LOWP", lowp_keep)
        for gated in (False, True):
            for dtype, gpu in [(bf16, True), (bf16, False), (torch.float16, True), (f32, True)]:
                kept = tri._kept_dtypes(dtype, gated, False, 128, gpu=gpu)
                lowp, own = tri._backward_stores(dtype, gated, False, 128, gpu=gpu)
                assert lowp == (dtype == bf16 and gpu)
                assert kept == ((own["states"], own["u"]) if lowp_keep else (f32, f32))
                if lowp:
                    assert own["u"] == bf16 and own["states"] == (f32 if gated else bf16)
                else:
                    assert set(own.values()) == {f32}


@both
@pytest.mark.parametrize("keep", [False, True], ids=["formed_again", "kept"])
def test_forward_states_kept_for_the_backward_or_formed_again(case, keep, monkeypatch):
    """The backward given the forward's states, U and W (KEEP_STATES), or solving for W and running the forward's
    loop again: the same gradients, with packed sequences (an empty one, one token), an initial state and a
    final-state gradient; kept, the backward launches neither prepare nor the forward's loop."""
    monkeypatch.setattr(tri, "KEEP_STATES", keep)
    launches = count_launches(monkeypatch, tri, "_prepare_kernel", "_forward_kernel")
    cu_seqlens = torch.tensor([0, 0, 70, 71, 150])
    tensors, state = case.draw(B=1, T=150, H=2, K=24, V=16, seed=15, N=4)
    check_against_naive(case, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)
    # prepare and the forward's loop: once in the forward; in the backward again unless kept
    assert launches.count("_prepare_kernel") == launches.count("_forward_kernel") == (1 if keep else 2)
    # the fake tensors (torch.compile) have the real outputs' shapes and dtypes, kept tensors included
    (q, k, v, *gates, beta), h0 = to(tensors, state)  # the delta rule draws no g
    g = gates[0].float().contiguous() if gates else None
    args = (q, k, v, g, beta.float(), h0.float(), cu_seqlens.to(DEVICE), 0.25, False, False, True, keep)
    checks = torch.library.opcheck(tri._chunk_op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks


@both
def test_kept_states_under_activation_checkpointing(case):
    """What the forward keeps (KEEP_STATES) under torch.utils.checkpoint: see assert_checkpointed_equals_plain."""
    assert tri.KEEP_STATES  # the library's setting, which this test is about
    tensors, state = to(*case.draw(B=1, T=150, H=2, K=24, V=16, seed=17))
    assert_checkpointed_equals_plain(case, tensors, state)


@both
def test_forward_states_kept_with_segments(case, monkeypatch):
    """KEEP_STATES with segments: the forward's last pass over them keeps the states and U, and the backward takes
    them and the segments' transitions from the forward, running neither prepare nor the forward's loop again."""
    monkeypatch.setattr(tri, "KEEP_STATES", True)
    monkeypatch.setattr(tri, "SEGMENTS", 2)
    launches = count_launches(monkeypatch, tri, "_prepare_kernel", "_forward_kernel", "_output_kernel")
    tensors, state = case.draw(B=2, T=300, H=2, K=24, V=16, seed=16, gate_scale=0.05)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)
    # the forward: prepare, the segments' own states and transitions, then the pass that keeps; its output kernel
    assert [launches.count(n) for n in ("_prepare_kernel", "_forward_kernel", "_output_kernel")] == [1, 3, 1]
    (q, k, v, *gates, beta), h0 = to(tensors, state)
    g = gates[0].float().contiguous() if gates else None
    args = (q, k, v, g, beta.float(), h0.float(), None, 0.25, False, False, True, True)
    out = tri._chunk_op(*args)
    assert out[3].shape == (2 * 5, 2, 24, 16) and out[7].shape == (2, 2, 2, 24, 16)  # kept states; segments' S_in
    checks = torch.library.opcheck(tri._chunk_op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks


@both
@pytest.mark.parametrize("chunk_keys", [None, 16])
def test_backward_chunk_over_key_blocks(case, chunk_keys, monkeypatch):
    """backward_chunk as one program per chunk, or one per block of 16 key columns (CHUNK_KEYS; K = 33: three
    blocks, the last holding one column), whose shares of dg and dbeta the launcher adds: the same gradients,
    with logits for beta (and unit keys: raw ones at K = 33 make the recurrence diverge, in float64 too).
    qk_l2norm, whose backward needs whole rows, keeps one program per chunk."""
    gated = case is GATED
    monkeypatch.setattr(tri, "CHUNK_KEYS", dict(tri.CHUNK_KEYS, **{"gated" if gated else "ungated": chunk_keys}))
    assert tri._chunk_keys(64, False, gated) == (64 if chunk_keys is None else 16)
    assert tri._chunk_keys(64, True, gated) == 64
    variant = dataclasses.replace(case, id=f"{case.id}_beta_is_logit", options=dict(beta_is_logit=True))
    tensors, state = variant.draw(B=2, T=70, H=1, K=33, V=24, seed=12)
    check_against_naive(variant, *to(tensors, state), "triton", **ON_DEVICE)


@both
@pytest.mark.parametrize("qk_l2norm", [False, True], ids=["unit_keys", "qk_l2norm"])
@pytest.mark.parametrize("wide_l2norm", [False, True], ids=["l2norm_narrow", "l2norm_wide"])
def test_backward_chunk_keys_and_warps_by_op(case, qk_l2norm, wide_l2norm, monkeypatch):
    """backward_chunk's programs at K = 128 (CHUNK_KEYS, WIDE_KEYS_WARPS): each op's over CHUNK_KEYS' key columns
    (whole rows where None, as both ops' are now), either's over whole rows with qk_l2norm; whole rows take
    WIDE_KEYS_WARPS' warps, with qk_l2norm only where WIDE_KEYS_L2NORM says; else NUM_WARPS."""
    monkeypatch.setattr(tri, "WIDE_KEYS_L2NORM", wide_l2norm)
    chunk = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    variant = with_options(case, qk_l2norm=True) if qk_l2norm else case
    tensors, state = variant.draw(B=1, T=70, H=1, K=128, V=64, seed=31)
    check_against_naive(variant, *to(tensors, state), "triton", **ON_DEVICE)
    entry = tri.CHUNK_KEYS["gated" if case is GATED else "ungated"]
    keys = 128 if entry is None or qk_l2norm else entry
    wide = keys == 128 and (wide_l2norm or not qk_l2norm)
    want = (keys, tri.WIDE_KEYS_WARPS["backward_chunk"] if wide else tri.NUM_WARPS["backward_chunk"])
    assert {(kw["BK"], kw["num_warps"]) for kw in chunk} == {want}
    assert want[1] == (8 if wide else 4)  # the settings as documented


@both
def test_backward_chunk_value_blocks_of_its_own(case, monkeypatch):
    """BACKWARD_CHUNK_BV: backward_chunk's value blocks set for one op apart from the other per-chunk kernels'
    (BV_CHUNK): V = 40 in blocks of 16 (three, the last partial) while the output kernel keeps one of 64; the same
    outputs and gradients."""
    key = "gated" if case is GATED else "ungated"
    monkeypatch.setattr(tri, "BACKWARD_CHUNK_BV", dict(tri.BACKWARD_CHUNK_BV, **{key: 16}))
    chunk = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    output = launch_kwargs(monkeypatch, tri, "_output_kernel")
    tensors, state = case.draw(B=1, T=70, H=2, K=32, V=40, seed=44)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)
    assert {kw["BV"] for kw in chunk} == {16}
    assert output and {kw["BV"] for kw in output} == {64}


def check_packed_beta_logits(case, seed, qk_l2norm=False, gates=None):
    """The case with beta as logits (and raw keys with qk_l2norm) against naive over packed sequences (one of one
    token, a partial last chunk), K = 33 and V = 24, its gates made extreme where given: the backward_chunk forms'
    common check."""
    if qk_l2norm:
        variant = with_options(case, qk_l2norm=True, beta_is_logit=True)
    else:
        variant = dataclasses.replace(case, id=f"{case.id}_beta_is_logit", options=dict(beta_is_logit=True))
    cu_seqlens = torch.tensor([0, 37, 38, 150])
    tensors, state = variant.draw(B=1, T=150, H=2, K=33, V=24, seed=seed, N=3)
    if gates is not None:
        tensors = extreme(tensors, gates)
    check_against_naive(variant, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


@both
@pytest.mark.parametrize("from_products", [False, True], ids=["tiles", "products"])
@pytest.mark.parametrize("qk_l2norm", [False, True], ids=["unit_keys", "qk_l2norm"])
def test_db_and_dbeta_from_the_tiles_or_the_products(case, from_products, qk_l2norm, monkeypatch):
    """backward_chunk's sums for db and dbeta from its [BT, BT] gradient tiles, or from the products that dq and dk
    take anyway (DB_FROM_PRODUCTS): the same gradients, in key blocks of 16 (K = 33: the last holds one column) or,
    with qk_l2norm, whole rows; beta as logits, packed sequences (one of one token), a partial last chunk."""
    monkeypatch.setattr(tri, "DB_FROM_PRODUCTS", dict(gated=from_products, ungated=from_products))
    launches = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    monkeypatch.setattr(tri, "CHUNK_KEYS", dict(gated=16, ungated=16))
    check_packed_beta_logits(case, 17, qk_l2norm)
    assert launches and all(kw["DB_FROM_PRODUCTS"] == from_products for kw in launches)


@pytest.mark.parametrize(
    "case, gates", [(GATED, None), (DELTA, None), (GATED, -30.0), (GATED, -1e4)], ids=lambda x: getattr(x, "id", x)
)
@pytest.mark.parametrize("in_place", [False, True], ids=["converted", "in_place"])
def test_first_pass_row_sums_in_place_or_not(case, gates, in_place, monkeypatch):
    """SUMS_IN_PLACE: backward_chunk's first-pass row sums (db's and dbeta's shares through the states) reduced
    in place (row_sums_in_place), and dbeta's share then scaled before db takes it, or (off) reduced as loaded
    tiles: the same gradients, in key blocks of 16 (K = 33, the last holding one column), beta as logits, packed
    sequences (one of one token), and for the gated op gates so strong that db's terms are ~0."""
    monkeypatch.setattr(tri, "SUMS_IN_PLACE", in_place)
    monkeypatch.setattr(tri, "CHUNK_KEYS", dict(gated=16, ungated=16))
    launches = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    check_packed_beta_logits(case, 19, gates=gates)
    assert launches and all(kw["SUMS_IN_PLACE"] == in_place for kw in launches)


@pytest.mark.parametrize(
    "case, gates", [(GATED, None), (DELTA, None), (GATED, -30.0), (GATED, -1e4)], ids=lambda x: getattr(x, "id", x)
)
@pytest.mark.parametrize("unchained", [False, True], ids=["chained", "unchained"])
@pytest.mark.parametrize("qk_l2norm", [False, True], ids=["unit_keys", "qk_l2norm"])
def test_products_unchained_or_not(case, gates, unchained, qk_l2norm, monkeypatch):
    """UNCHAINED_DOTS: backward_chunk's products after its loops written so that none's result is another's
    accumulator (scale after P's products, P's diagonal by products of its own), or chained: the same gradients,
    over whole rows (K = 33 in one program) or in key blocks of 16, beta as logits, packed sequences (one of one
    token), and for the gated op gates so strong that db's terms are ~0."""
    monkeypatch.setattr(tri, "UNCHAINED_DOTS", dict(gated=unchained, ungated=unchained))
    monkeypatch.setattr(tri, "CHUNK_KEYS", dict(gated=None, ungated=16))
    launches = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    check_packed_beta_logits(case, 23, qk_l2norm, gates)
    assert launches and all(kw["UNCHAINED"] == unchained and kw["DB_FROM_PRODUCTS"] for kw in launches)


@pytest.mark.parametrize("case", [GATED, DELTA], ids=lambda c: c.id)
@pytest.mark.parametrize(
    "one_pass, v_early", [(False, False), (True, False), (True, True)], ids=["two_passes", "one_pass", "v_early"]
)
@pytest.mark.parametrize("chunk_keys", [None, 16], ids=["whole_rows", "key_blocks"])
def test_backward_chunk_in_one_pass_or_two(case, one_pass, v_early, chunk_keys, monkeypatch):
    """ONE_PASS_CHUNK: backward_chunk's two loops over the V blocks as one (dv, dP and dA formed beside the first
    pass's products; with V_EARLY, v's tile loaded at the top of the loop) or two: the same gradients, over V = 24
    in blocks of 16 (the last partial), whole rows (K = 33) or key blocks of 16 (dv and dbeta's share through v from
    the first block's program alone), beta as logits and packed sequences (one of one token)."""
    monkeypatch.setattr(tri, "ONE_PASS_CHUNK", dict(gated=one_pass, ungated=one_pass))
    monkeypatch.setattr(tri, "V_EARLY", dict(gated=v_early, ungated=v_early))
    monkeypatch.setattr(tri, "CHUNK_KEYS", dict(gated=chunk_keys, ungated=chunk_keys))
    monkeypatch.setattr(tri, "BACKWARD_CHUNK_BV", dict(gated=16, ungated=16))
    launches = launch_kwargs(monkeypatch, tri, "_backward_chunk_kernel")
    check_packed_beta_logits(case, 29)
    assert launches and all(kw["ONE_PASS"] == one_pass and kw["BV"] == 16 for kw in launches)
    assert all(kw["V_EARLY"] == v_early for kw in launches)
    assert all(kw["BK"] == (chunk_keys or 64) for kw in launches)


@pytest.mark.parametrize("gates", [None, -30.0, -1e4], ids=["gates", "strong", "extreme"])
@pytest.mark.parametrize("decays_in", [False, True], ids=["summed", "read"])
@pytest.mark.parametrize("chunk_keys", [None, 16], ids=["whole_rows", "key_blocks"])
def test_gated_kernels_read_log_decays_or_sum_them(gates, decays_in, chunk_keys, monkeypatch):
    """DECAYS_IN: the gated output, local_du and backward_chunk kernels read each chunk's log-decay sums, stored per
    token by _log_decay_kernel (once in the forward, once in the backward), or sum the gates themselves: the same
    outputs and gradients against naive over packed sequences (one of one token, a partial last chunk, whose rows
    past the end take the last token's sums), backward_chunk over whole rows or key blocks of 16, with gates so
    strong (-1e4) that a row past the end decayed from 0 rather than from the last sum would overflow."""
    monkeypatch.setattr(tri, "DECAYS_IN", dict.fromkeys(tri.DECAYS_IN, decays_in))
    monkeypatch.setattr(tri, "CHUNK_KEYS", dict(gated=chunk_keys, ungated=chunk_keys))
    monkeypatch.setattr(tri, "KEEP_STATES", True)  # the forward's output kernel
    monkeypatch.setattr(tri, "SPLIT_BACKWARD", dict(gated=True, ungated=False))  # local_du
    kernels = ("_output_kernel", "_local_du_kernel", "_backward_chunk_kernel")
    launches = {name: launch_kwargs(monkeypatch, tri, name) for name in kernels}
    sums = launch_kwargs(monkeypatch, tri, "_log_decay_kernel")
    check_packed_beta_logits(GATED, 31, False, gates)
    for name, kws in launches.items():
        assert kws and all(kw["DECAYS_IN"] == decays_in for kw in kws), name
    assert len(sums) == (2 if decays_in else 0)  # the forward's, the backward's


@pytest.mark.parametrize("narrow", [False, True], ids=["tiles", "narrow"])
@pytest.mark.parametrize("split", [False, True], ids=["local", "split"])
@pytest.mark.parametrize("keep", [False, True], ids=["formed_again", "kept"])
@pytest.mark.parametrize("segments, packed", [(1, True), (2, False)], ids=["packed", "segments"])
def test_decays_on_the_narrow_side(narrow, split, keep, segments, packed, monkeypatch):
    """NARROW_DECAYS: the gated forward (forming o in its loop, or storing the states for the output kernel),
    output and backward_state kernels scale U, dO and their products' rows by the decays instead of the tiles of q
    and k, or the tiles: the same results against naive, with dU's local share formed in the loop or apart
    (SPLIT_BACKWARD), packed sequences (an empty one, one of one token, partial last chunks) or segments."""
    monkeypatch.setattr(tri, "NARROW_DECAYS", dict.fromkeys(tri.NARROW_DECAYS, 1024 if narrow else 0))
    monkeypatch.setattr(tri, "SPLIT_BACKWARD", dict(gated=split, ungated=split))
    monkeypatch.setattr(tri, "KEEP_STATES", keep)
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    kernels = ("_forward_kernel", "_backward_state_kernel") + (("_output_kernel",) if keep else ())
    launches = {n: launch_kwargs(monkeypatch, tri, n) for n in kernels}
    if packed:
        cu_seqlens = torch.tensor([0, 0, 70, 71, 200]).to(DEVICE)
        tensors, state = GATED.draw(B=1, T=200, H=2, K=16, V=24, seed=41, N=4)
    else:
        cu_seqlens = None
        tensors, state = GATED.draw(B=1, T=300, H=2, K=16, V=24, seed=42)
    check_against_naive(GATED, *to(tensors, state), "triton", cu_seqlens=cu_seqlens, **ON_DEVICE)
    assert all(kws and all(kw["NARROW_DECAYS"] == narrow for kw in kws) for kws in launches.values())


def test_narrow_decays_by_value_block():
    """NARROW_DECAYS is on for the gated op's forward and backward_state launches of value blocks up to their entry
    (32: the few-program launches, where it won on the card), never for the delta rule, and off for output."""
    for kernel in ("forward", "backward_state"):
        assert [tri._narrow(kernel, True, bv)["NARROW_DECAYS"] for bv in (16, 32, 64)] == [True, True, False]
        assert not any(tri._narrow(kernel, False, bv)["NARROW_DECAYS"] for bv in (16, 32, 64))
    assert not any(tri._narrow("output", True, bv)["NARROW_DECAYS"] for bv in (16, 32, 64))


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "formed_again"])
@pytest.mark.parametrize("narrow_few", [False, True], ids=["by_block", "few_programs"])
def test_narrow_decays_at_few_programs(narrow_few, keep, monkeypatch):
    """NARROW_FEW: NARROW_DECAYS on for the gated forward and backward_state launches of fewer than FEW_PROGRAMS
    programs at any value block (not where FEW_PROGRAMS_WARPS has an entry for the op's kernel, nor for output or
    the delta rule); off, only by the block. Against naive: K = V = 64 in 2 value blocks of 32 (past NARROW_DECAYS'
    entries, 16 here) x 2 sequences x 2 heads = 8 programs, few under FEW_PROGRAMS = 9; with the forward's states
    kept for the backward (KEEP_STATES) or formed again there by a second forward launch, launched as the first
    was."""
    monkeypatch.setattr(tri, "NARROW_FEW", narrow_few)
    monkeypatch.setattr(tri, "KEEP_STATES", keep)
    monkeypatch.setattr(tri, "NARROW_DECAYS", dict(forward=16, output=0, backward_state=16))
    monkeypatch.setattr(tri, "FEW_PROGRAMS", 9)
    monkeypatch.setattr(tri, "FULL_GPU", 0)  # the blocks of many programs, not narrowed for want of programs
    launched = {name: launch_kwargs(monkeypatch, tri, name) for name in ("_forward_kernel", "_backward_state_kernel")}
    tensors, state = GATED.draw(B=2, T=150, H=2, K=64, V=64, seed=33)
    check_against_naive(GATED, *to(tensors, state), "triton", **ON_DEVICE)
    for name, kws in launched.items():
        assert kws and {(kw["BV"], kw["NARROW_DECAYS"]) for kw in kws} == {(32, narrow_few)}, name
    assert len(launched["_forward_kernel"]) == (1 if keep else 2)
    for kernel in ("forward", "backward_state"):
        assert tri._narrow(kernel, True, 64, 8)["NARROW_DECAYS"] == narrow_few
        assert not tri._narrow(kernel, True, 64, 9)["NARROW_DECAYS"]  # not fewer than FEW_PROGRAMS
        assert not tri._narrow(kernel, True, 64)["NARROW_DECAYS"]  # many (no count)
        assert not tri._narrow(kernel, False, 64, 8)["NARROW_DECAYS"]
        assert tri._narrow(kernel, True, 16, 100)["NARROW_DECAYS"]  # by the block, whatever the count
    assert not tri._narrow("output", True, 64, 8)["NARROW_DECAYS"]
    monkeypatch.setitem(tri.FEW_PROGRAMS_WARPS, "gated_backward_state", 8)
    assert not tri._narrow("backward_state", True, 64, 8)["NARROW_DECAYS"]
    assert tri._narrow("forward", True, 64, 8)["NARROW_DECAYS"] == narrow_few  # its own entry


@both
@pytest.mark.parametrize("mode", ["local", "split", "scores", "scores_pipelined", "scores_narrow_few"])
@pytest.mark.parametrize("segments, packed", [(1, True), (2, False)], ids=["packed", "segments"])
def test_state_pass_forms_local_du_or_not(case, mode, segments, packed, monkeypatch):
    """dU's share within each chunk, scale P^T dO, five ways for either op: SPLIT_BACKWARD off ("local"),
    backward_state's loop forms it from q and k and no local_du kernel runs; on ("split"), local_du forms it;
    KEEP_SCORES ("scores", here at few programs too: KEEP_SCORES_FEW), the forward's output kernel stores P and
    backward_state's loop forms it from that (SCORES_IN), whatever SPLIT_BACKWARD says; and so with their load
    masked by rows only (SCORES_PIPELINED: "scores_pipelined"), or kept and so read by SCORES_NARROW_FEW at these
    few programs of narrowed value blocks ("scores_narrow_few"). Against naive, packed sequences (one of one token)
    or segments (whose first pass forms it as well), dX in dU's tensor (float32 here) or apart."""
    split, scores = mode == "split", mode.startswith("scores")
    pipelined = mode in ("scores_pipelined", "scores_narrow_few")
    monkeypatch.setattr(tri, "SPLIT_BACKWARD", dict(gated=split, ungated=split))
    monkeypatch.setattr(tri, "KEEP_STATES", True)
    monkeypatch.setattr(tri, "KEEP_SCORES", dict(gated=scores, ungated=scores))
    monkeypatch.setattr(tri, "KEEP_SCORES_FEW", mode in ("scores", "scores_pipelined"))
    monkeypatch.setattr(tri, "SCORES_PIPELINED", mode == "scores_pipelined")
    monkeypatch.setattr(tri, "SCORES_NARROW_FEW", dict.fromkeys(tri.SCORES_NARROW_FEW, mode == "scores_narrow_few"))
    if scores:  # else it would be formed in the loop anyway
        monkeypatch.setattr(tri, "SPLIT_BACKWARD", dict(gated=True, ungated=True))
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    if segments > 1:  # dX apart, so that dU's tensor is not needed at all
        monkeypatch.setattr(tri, "_dx_dtype", lambda lowp, parts: torch.float32)
    launches = count_launches(monkeypatch, tri, "_local_du_kernel")
    state_launches = launch_kwargs(monkeypatch, tri, "_backward_state_kernel")
    output_launches = launch_kwargs(monkeypatch, tri, "_output_kernel")
    cu_seqlens = torch.tensor([0, 70, 71, 200]).to(DEVICE) if packed else None
    tensors, state = case.draw(B=1, T=200, H=2, K=40, V=24, seed=37, N=3 if packed else 1, gate_scale=0.05)
    check_against_naive(case, *to(tensors, state), "triton", cu_seqlens=cu_seqlens, **ON_DEVICE)
    assert ("_local_du_kernel" in launches) == split
    assert len(state_launches) == segments  # (the segments' share pass, then each from its exit gradient)
    for kw in state_launches:
        assert kw["LOCAL_DU"] == (mode == "local") and kw.get("SCORES_IN", False) == scores
        assert kw.get("SCORES_PIPELINED", False) == pipelined
    assert [kw.get("STORE_SCORES", False) for kw in output_launches] == [scores]


@pytest.mark.parametrize("few", ["many_only", "few_too", "narrow_few"])
def test_scores_kept_by_op_and_program_count(few, monkeypatch):
    """KEEP_SCORES' rule: by op, only where the forward keeps its states for a backward, and (unless
    KEEP_SCORES_FEW) only where backward_state's launch runs at least FEW_PROGRAMS programs, counted over the
    segments where the op cuts them, or (SCORES_NARROW_FEW, by dtype) fewer whose value blocks were narrowed to
    fill the GPU; the fake's scores agree with the forward's."""
    f32 = torch.float32
    monkeypatch.setattr(tri, "KEEP_SCORES", dict(gated=True, ungated=False))
    monkeypatch.setattr(tri, "KEEP_SCORES_FEW", few == "few_too")
    narrow = dict.fromkeys(tri.SCORES_NARROW_FEW, False) | dict(float32=few == "narrow_few")  # this dtype's entry
    monkeypatch.setattr(tri, "SCORES_NARROW_FEW", narrow)
    monkeypatch.setattr(tri, "SEGMENTS", None)
    monkeypatch.setattr(tri, "SEGMENT_HEADS", dict.fromkeys(tri.SEGMENT_HEADS, 0))  # no segments unless forced
    shape = dict(N=2, H=3, T=130, K=32, V=32, cu_seqlens=None, dtype=f32)
    BV, programs = tri._state_grad_launch(2 * 3, 32, 32, f32)
    assert BV < tri._blocks(32, 32, f32)[1]  # narrowed
    keeps = functools.partial(tri._keeps_scores, qk_l2norm=False, **shape)
    monkeypatch.setattr(tri, "FEW_PROGRAMS", programs)  # exactly enough: many
    assert keeps(True, save=True, keep=True)
    assert not keeps(False, save=True, keep=True)  # not the delta rule's
    assert not keeps(True, save=True, keep=False) and not keeps(True, save=False, keep=True)
    assert not tri._scores_narrow_few(2 * 3, 32, 32, f32)  # many programs
    monkeypatch.setattr(tri, "FEW_PROGRAMS", programs + 1)  # one short: few
    assert keeps(True, save=True, keep=True) == (few != "many_only")
    assert tri._scores_narrow_few(2 * 3, 32, 32, f32) == (few == "narrow_few")
    assert not tri._scores_narrow_few(2 * 3, 32, 32, torch.bfloat16)  # by dtype: bfloat16's entry is off here
    assert tri._scores_in(tri._scores_narrow_few(2 * 3, 32, 32, f32))["SCORES_PIPELINED"] == (few == "narrow_few")
    monkeypatch.setattr(tri, "SEGMENTS", 3)  # three segments: their launch's programs count
    _, seg_programs = tri._state_grad_launch(2 * 3 * 3, 32, 32, f32)
    assert seg_programs > programs and keeps(True, save=True, keep=True)
    monkeypatch.setattr(tri, "FEW_PROGRAMS", seg_programs + 1)
    assert keeps(True, save=True, keep=True) == (few != "many_only")
    # the op: scores kept (bfloat16 where backward_state takes bfloat16 operands, float32 here) and faked alike
    monkeypatch.setattr(tri, "SEGMENTS", None)
    monkeypatch.setattr(tri, "FEW_PROGRAMS", programs)
    (q, k, v, g, beta), _ = to(*GATED.draw(B=2, T=130, H=3, K=32, V=32, seed=5))
    args = (q, k, v, g.float(), beta.float(), None, None, 0.25, False, False, True, True)
    out = tri._chunk_op(*args)
    assert out[6].shape == (2, 130, 3, tri.BT) and out[6].dtype == torch.float32
    checks = torch.library.opcheck(tri._chunk_op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks
    monkeypatch.setattr(tri, "FULL_GPU", 0)  # value blocks never narrowed: few programs keep only by KEEP_SCORES_FEW
    BV, programs = tri._state_grad_launch(2 * 3, 32, 32, f32)
    assert BV == tri._blocks(32, 32, f32)[1] and programs < tri.FEW_PROGRAMS
    assert keeps(True, save=True, keep=True) == (few == "few_too")


@triton.jit
def _inverse_kernel(a, out, BT: tl.constexpr, PREC: tl.constexpr, DOUBLING: tl.constexpr):
    o = tl.arange(0, BT)
    A = tl.load(a + o[:, None] * BT + o[None, :])
    tl.store(out + o[:, None] * BT + o[None, :], unit_lower_inverse(A, BT, 16, PREC, DOUBLING))


@pytest.mark.parametrize("doubling", [False, True], ids=["rows", "doubling"])
def test_unit_lower_inverse_at_each_precision(doubling):
    """The WY solve's helper alone, (I + A)^-1 for A = tril(beta k k^T, -1) with unit keys, against float64: exact
    float32 products ("ieee") and three tf32 passes ("tf32x3") to float32's rounding; one pass ("tf32", the bf16
    default on a GPU) to tf32's, with its operands rounded to tf32 (so its result is not the float32 one)."""
    gen = torch.Generator().manual_seed(5)
    k = torch.nn.functional.normalize(torch.randn(64, 32, generator=gen, dtype=torch.float64), dim=-1)
    beta = torch.rand(64, 1, generator=gen, dtype=torch.float64)
    A = torch.tril(beta * (k @ k.T), -1)
    ref = torch.linalg.inv(torch.eye(64, dtype=torch.float64) + A)
    out = {}
    for prec in ("ieee", "tf32x3", "tf32"):
        out[prec] = torch.empty(64, 64, device=DEVICE)
        _inverse_kernel[(1,)](A.float().to(DEVICE), out[prec], BT=64, PREC=prec, DOUBLING=doubling)
        err = (out[prec].cpu().double() - ref).abs().max().item() / ref.abs().max().item()
        unit = 2.0**-11 if prec == "tf32" else torch.finfo(torch.float32).eps  # tf32 keeps 10 mantissa bits
        assert err <= 8 * unit, f"{prec}: error {err:.3g} of the largest entry, bound {8 * unit:.3g}"
    assert (out["tf32"] != out["ieee"]).any(), "tf32: operands not rounded"


@both
@pytest.mark.parametrize("segments", [1, 2])
def test_dx_stored_apart_from_du(case, segments, monkeypatch):
    """backward_state storing dX in a tensor of its own (as STATES_LOWP's dx_store does in bfloat16 on a GPU; here
    float32), which backward_chunk then reads, with and without segments: the same gradients."""
    monkeypatch.setattr(tri, "_dx_dtype", lambda lowp, parts: torch.float32)
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    tensors, state = case.draw(B=1, T=200, H=2, K=24, V=40, seed=19, gate_scale=0.05)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


@both
@pytest.mark.parametrize("store", ["tinv", "u0_backward"])
def test_bfloat16_stores_round_only(case, store, monkeypatch):
    """PREPARE_LOWP's tinv and u0_backward store in bfloat16 on a GPU; forced here, with float32
    inputs: the gradients change (the store does round) by about bfloat16's rounding and no more, so the stores,
    casts and loads around it are right. (Under the interpreter the GPU's bfloat16 products cannot be checked: see
    test_gpu_bfloat16_operands_wide_value_blocks_and_w.)"""
    # where they apply: bfloat16 inputs on a GPU, with wu (PREPARE_LOWP's entries as the library sets them)
    for part in ("tinv", "u0_backward"):
        on = tri.PREPARE_LOWP[part]
        assert tri._prepare_store(part, torch.bfloat16, gpu=True) == (torch.bfloat16 if on else torch.float32)
        assert (
            tri._prepare_store(part, torch.bfloat16, gpu=False)
            == tri._prepare_store(part, torch.float16, gpu=True)
            == torch.float32
        )
    original = tri._prepare_store
    forced = lambda part, *args, **kwargs: torch.bfloat16 if part == store else original(part, *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(tri, "KEEP_STATES", False)  # the backward's own prepare (u0_backward) runs only then
    monkeypatch.setattr(tri, "_prepare_store", forced)
    tensors, state = to(*case.draw(B=1, T=150, H=2, K=24, V=40, seed=31, gate_scale=0.05))

    def run(ts, s0):
        return case(ts, initial_state=s0, output_final_state=True, impl="triton")

    rounded = run_with_grads(run, tensors, state)
    monkeypatch.setattr(tri, "_prepare_store", original)
    exact = run_with_grads(run, tensors, state)
    names = ["o", "final_state", "dq", "dk", "dv", *["dg"] * (case.gate is not None), "dbeta", "dh0"]
    moved = []
    for name, a, b in zip(names, rounded, exact, strict=True):
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err <= 2.0**-6, f"{name}: {err:.3g} of the largest entry, beyond bfloat16 rounding"
        moved.append(err > 0)
    assert any(moved[2:]), "no gradient changed: nothing was stored in bfloat16"


@both
def test_local_du_stored_in_bfloat16(case, monkeypatch):
    """STATES_LOWP's du (off): _local_du_kernel stores dU's share within each chunk in bfloat16 (bfloat16 operands on a
    GPU, dX stored apart), and backward_state completes it in float32; forced here with float32 inputs, split for
    both ops: the outputs do not move, and the gradients move by about bfloat16's rounding and no more."""
    parts = tri.STATES_LOWP | dict(du=True)  # (off in the library: see STATES_LOWP)
    assert tri._du_dtype(True, parts) == torch.bfloat16
    assert tri._du_dtype(False, parts) == tri._du_dtype(True, parts | dict(dx_store=False)) == torch.float32
    assert tri._du_dtype(True, parts | dict(du=False)) == torch.float32
    monkeypatch.setattr(tri, "SPLIT_BACKWARD", dict(gated=True, ungated=True))
    monkeypatch.setattr(tri, "_dx_dtype", lambda lowp, parts: torch.float32)
    tensors, state = to(*case.draw(B=1, T=150, H=2, K=24, V=40, seed=33, gate_scale=0.05))

    def run(ts, s0):
        return case(ts, initial_state=s0, output_final_state=True, impl="triton")

    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(tri, "_du_dtype", lambda lowp, parts, dtype=dtype: dtype)
        launches = launch_kwargs(monkeypatch, tri, "_local_du_kernel", args=True)
        results[dtype] = run_with_grads(run, tensors, state)
        assert launches and all(args[5].dtype == dtype for args, _ in launches)
    names = ["o", "final_state", "dq", "dk", "dv", *["dg"] * (case.gate is not None), "dbeta", "dh0"]
    for name, a, b in zip(names[:2], results[torch.bfloat16], results[torch.float32]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    moved = []
    for name, a, b in zip(names, results[torch.bfloat16], results[torch.float32], strict=True):
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err <= 2.0**-6, f"{name}: {err:.3g} of the largest entry, beyond bfloat16 rounding"
        moved.append(err > 0)
    unmoved = [name for name, m in zip(names[3:], moved[3:]) if not m]  # (dq does not depend on dU)
    assert not unmoved, f"{unmoved} did not change: dU's share was not stored in bfloat16"


@both
@pytest.mark.parametrize("doubling", [False, True], ids=["rows", "doubling"])
def test_solve_diagonal_blocks_by_rows_or_doubling(case, doubling, monkeypatch):
    """The WY solve's 16-blocks row by row, or by doubling as batched products (SOLVE_DIAG_DOUBLING, the
    library's choice): the same outputs, states and gradients, with a partial last chunk."""
    monkeypatch.setattr(tri, "SOLVE_DIAG_DOUBLING", doubling)
    tensors, state = case.draw(B=1, T=70, H=2, K=24, V=16, seed=13)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


def test_launch_choices(monkeypatch):
    """Narrow value blocks when few programs would run; bfloat16 dot operands only for bfloat16 on a GPU, and
    only for the kernels whose LOWP_DOTS entry is on."""
    assert tri._sequence_bv(128, 128, 16) == 16 and tri._sequence_bv(128, 128, 256) == 32
    assert tri._sequence_bv(128, 128, 32) == 32 == tri._sequence_bv(128, 128, 64)  # FULL_GPU programs: no narrower
    for kernel, on in tri.LOWP_DOTS.items():
        assert tri._flags(torch.bfloat16, True, False, kernel, gpu=True)["LOWP"] == on
        assert not tri._flags(torch.bfloat16, True, False, kernel, gpu=False)["LOWP"]
        assert not tri._flags(torch.float16, True, False, kernel, gpu=True)["LOWP"]
    # found out on a GPU (gpu=None): the kernels that need a trusted ptxas take them only where it is trusted
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for trusted in (False, True):
        monkeypatch.setattr(tri.ptxas, "lowp_trusted", lambda trusted=trusted: trusted)
        for kernel, on in tri.LOWP_DOTS.items():
            expected = on and (trusted or kernel not in tri.NEEDS_FIXED_PTXAS)
            assert tri._flags(torch.bfloat16, True, False, kernel)["LOWP"] == expected, (kernel, trusted)
    assert tri.NEEDS_FIXED_PTXAS < {k for k, on in tri.LOWP_DOTS.items() if on}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tri._flags(torch.bfloat16, True, False, "forward")["LOWP"]
    # backward_chunk keeps tf32 dots below 64 key channels, whatever LOWP_DOTS says
    monkeypatch.setitem(tri.LOWP_DOTS, "backward_chunk", True)
    assert tri._flags(torch.bfloat16, True, False, "backward_chunk", gpu=True, BK=128)["LOWP"]
    assert not tri._flags(torch.bfloat16, True, False, "backward_chunk", gpu=True, BK=16)["LOWP"]
    # stages: one for many programs, more for a launch of fewer programs than SMs, always one for float32
    many = tri._launch("forward", torch.bfloat16, 128, 32, 1024)
    few = tri._launch("forward", torch.bfloat16, 128, 16, 128)
    assert many["num_stages"] == tri.NUM_STAGES["forward"] and few["num_stages"] == 3
    # float16 keeps two there (its tf32x3 dots ran out of shared memory at three on the card), float32 one
    assert tri._launch("forward", torch.float16, 128, 16, 128)["num_stages"] == 2
    assert tri._launch("forward", torch.float32, 128, 16, 128)["num_stages"] == 1
    # the gated op's own stages (GATED_STAGES, an entry for every kernel so that LINATTN_LAUNCH reaches each) where
    # it has them, NUM_STAGES elsewhere; float32 still one
    assert set(tri.GATED_STAGES) == set(tri.NUM_STAGES)
    monkeypatch.setattr(tri, "NUM_STAGES", dict.fromkeys(tri.NUM_STAGES, 1))
    monkeypatch.setattr(tri, "GATED_STAGES", dict(forward=3))
    assert tri._launch("forward", torch.bfloat16, 128, 32, 1024, gated=True)["num_stages"] == 3
    assert tri._launch("forward", torch.bfloat16, 128, 32, 1024)["num_stages"] == 1
    assert tri._launch("backward_state", torch.bfloat16, 128, 32, gated=True)["num_stages"] == 1
    assert tri._launch("backward_state", torch.bfloat16, 128, 64, 128)["num_stages"] == 3
    assert tri._launch("forward", torch.float32, 128, 32, 1024, gated=True)["num_stages"] == 1


@both
@pytest.mark.parametrize("segments", [2, 3])
def test_long_sequences_cut_into_segments(case, segments, monkeypatch):
    """The per-sequence kernels over segments chained by their transitions (SEGMENT_HEADS): T = 300 is five chunks,
    so three segments are of 2, 2 and 1 (partial) chunks. Outputs, final state and every gradient against the token
    recurrence, with an initial state; the backward takes the forward's entering states and transitions, so it runs
    the forward's loop once, or not at all where it takes the forward's states too (KEEP_STATES; the forward: three
    times); the fakes' shapes; without a gradient, the same o and final state as one pass."""
    calls = []
    for name in ("_segmented_forward", "_segmented_backward_state"):
        original = getattr(tri, name)
        monkeypatch.setattr(tri, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    launches = count_launches(monkeypatch, tri, "_forward_kernel")
    # mild gates (gate_scale), so that the segments' transitions are far from zero and a wrong one shows
    tensors, state = case.draw(B=2, T=300, H=2, K=33, V=40, seed=21, gate_scale=0.05)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)
    assert {"_segmented_forward", "_segmented_backward_state"} <= set(calls)
    assert len(launches) == 3 + (not tri.KEEP_STATES)  # the forward's three (R, M, each segment); the backward's
    (q, k, v, *gates, beta), h0 = to(tensors, state)
    g = gates[0].float().contiguous() if gates else None
    args = (q, k, v, g, beta.float(), h0.float(), None, 0.25, False, False, True, False)
    out = tri._chunk_op(*args)
    assert out[7].shape == (2, segments, 2, 33, 40) and out[8].shape == (2, segments, 2, 33, 33)
    torch.library.opcheck(tri._chunk_op, args, test_utils=("test_schema", "test_faketensor"))
    assert_segments_equal_one_pass(case, tri, *to(tensors, state), monkeypatch)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_start", [False, True], ids=["zeros", "start"])
def test_segment_chain_in_one_kernel(reverse, with_start, monkeypatch):
    """CHAIN_KERNEL: the scan over segments in one Triton launch (float64 in registers) gives what the batched
    float64 products give: every entering state and the last, both directions, K = 24 padded to 32 and V = 40 in
    two blocks of CHAIN_BV = 32 columns, the start (an initial state or the final state's gradient) given as a
    broadcast (non-contiguous) tensor."""
    gen = torch.Generator().manual_seed(3)
    N, NS, H, K, V = 2, 3, 2, 24, 40
    M = (torch.randn(N, NS, H, K, K, generator=gen) / K**0.5).to(DEVICE)
    R = torch.randn(N, NS, H, K, V, generator=gen).to(DEVICE)
    start = torch.randn(1, H, K, V, generator=gen).to(DEVICE).expand(N, H, K, V) if with_start else None
    monkeypatch.setattr(tri, "CHAIN_KERNEL", False)
    want = tri._chain(M, R, start, reverse)
    assert want[1].dtype == torch.float64  # the batched products
    monkeypatch.setattr(tri, "CHAIN_KERNEL", True)
    if not tri._chain_kernel_on(M.device):
        pytest.skip("no float64 tensor cores on this GPU: the products chain the segments here")
    launches = count_launches(monkeypatch, tri, "_chain_kernel")
    got = tri._chain(M, R, start, reverse)
    assert launches == ["_chain_kernel"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1].float(), rtol=1e-6, atol=1e-6)


def test_segment_chain_kernel_only_with_float64_tensor_cores(monkeypatch):
    """_chain_kernel runs on GPUs of compute capability 8.0, 9.0 and 10.0 (float64 on tensor cores) and on CPU
    tensors (the interpreter); on others (8.6, 8.9, 12.0) its FMA float64 dot would need more shared memory than
    they have, and the products chain the segments; never with CHAIN_KERNEL off."""
    monkeypatch.setattr(tri, "CHAIN_KERNEL", True)
    cuda = torch.device("cuda", 0)
    for capability, on in [((8, 0), True), ((9, 0), True), ((10, 0), True), ((8, 6), False), ((8, 9), False),
                           ((12, 0), False), ((7, 5), False)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert tri._chain_kernel_on(cuda) == on, capability
    assert tri._chain_kernel_on(torch.device("cpu"))
    monkeypatch.setattr(tri, "CHAIN_KERNEL", False)
    assert not tri._chain_kernel_on(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert not tri._chain_kernel_on(cuda)


@both
def test_segments_chained_in_one_kernel(case, monkeypatch):
    """The ops with segments and CHAIN_KERNEL, against the token recurrence (outputs, final state, every gradient)."""
    monkeypatch.setattr(tri, "CHAIN_KERNEL", True)
    monkeypatch.setattr(tri, "SEGMENTS", 3)
    tensors, state = case.draw(B=1, T=300, H=2, K=24, V=40, seed=28, gate_scale=0.05)
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


def test_segment_counts():
    """Segments only for few, long sequences without cu_seqlens, at least MIN_SEGMENTS of them, and the
    segment table: whole chunks, the last one of each sequence shorter."""
    for gated, l2 in itertools.product((False, True), (False, True)):
        plain_delta = not gated and not l2  # SEGMENT_HEADS 64 with at least 4; the others 128 with at least 8
        assert tri._num_segments(16, 16, 4096, None, gated, l2) == 1  # enough sequences and heads already
        assert tri._num_segments(4, 16, 16384, None, gated, l2) == 1  # 1 or 2 segments: not worth three passes
        assert tri._num_segments(2, 16, 32768, None, gated, l2) == 1  # 2 or 4: fewer than MIN_SEGMENTS
        assert tri._num_segments(1, 16, 65536, torch.tensor([0, 65536]), gated, l2) == 1
        assert tri._num_segments(1, 16, 2048, None, gated, l2) == 1  # 32 chunks: segments would be too short
        assert tri._num_segments(1, 4, 65536, None, gated, l2) == (16 if plain_delta else 32)  # very few N x H
        # the standard shape at T = 65536: 4 segments of 128 programs at 64 value columns (the delta rule without
        # qk_l2norm, whose backward_state takes FEW_PROGRAMS_WARPS' 8 warps there), else 8
        assert tri._num_segments(1, 16, 65536, None, gated, l2) == (4 if plain_delta else 8)
    seg = tri.Segments(N=2, T=300, NS=3, BT=tri.BT, device="cpu")
    assert seg.NS == 3 and seg.cu.tolist() == [0, 128, 256, 300, 428, 556, 600]
    assert seg.first.tolist() == [0, 2, 4, 5, 7, 9]


@both
def test_varlen(case):
    cu_seqlens = torch.tensor([0, 0, 1, 131, 131, 195, 200])  # empty, one token, several chunks, empty, ...
    tensors, state = case.draw(B=1, T=200, H=2, K=16, V=24, seed=5, N=6)
    check_against_naive(case, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


def test_unnormalised_keys_with_beta_near_one():
    """Keys far from unit norm (beta |k|^2 near 2): the WY solve must not cancel where the recurrence does not."""
    case = dataclasses.replace(GATED, l2_keys=False)
    tensors, state = case.draw(B=1, T=130, H=2, K=16, V=24, seed=11)
    tensors[1] = tensors[1] * 0.35  # |k|^2 ~ 2 (raw Gaussian keys have |k|^2 ~ K = 16)
    tensors[4] = 0.9 + 0.1 * tensors[4]
    check_against_naive(case, *to(tensors, state), "triton", **ON_DEVICE)


@pytest.mark.parametrize("from_products", [False, True], ids=["tiles", "products"])
@pytest.mark.parametrize("gates", [0.0, -30.0, -1e4, "mixed"])
def test_extreme_gates(gates, from_products, monkeypatch):
    """No decay, and decay so strong that the state resets every token: finite, and matching naive, with db's sums
    from either form (DB_FROM_PRODUCTS; at strong gates they are ~0, so terms that cancel would show)."""
    monkeypatch.setattr(tri, "DB_FROM_PRODUCTS", dict(gated=from_products, ungated=from_products))
    tensors, state = GATED.draw(B=1, T=70, H=2, K=16, V=24, seed=2)
    check_against_naive(GATED, *to(extreme(tensors, gates), state), "triton", **ON_DEVICE)


@both
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_options_match_naive(case, dtype):
    """qk_l2norm and beta_is_logit, fused into the kernels, against naive with the same options."""
    opt = with_options(case, qk_l2norm=True, beta_is_logit=True)
    tensors, state = opt.draw(B=1, T=70, H=2, K=16, V=24, dtype=dtype, seed=3)
    tensors[-1] = torch.randn(tensors[-1].shape, generator=torch.Generator().manual_seed(4)) * 2  # logits
    check_against_naive(opt, *to(tensors, state), "triton", **ON_DEVICE)


@pytest.mark.parametrize("options", [dict(qk_l2norm=True), dict(beta_is_logit=True)], ids=lambda o: next(iter(o)))
def test_each_option_in_chunk_matches_naive(options):
    opt = with_options(GATED, **options)
    tensors, state = opt.draw(B=2, T=37, H=2, K=8, V=6, seed=1)
    check_against_naive(opt, tensors, state, "chunk")


def test_options_mean_what_they_say():
    tensors, state = with_options(GATED).draw(B=1, T=20, H=2, K=8, V=6, seed=2)
    q, k, v, g, beta = tensors
    norm = lambda x: x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    for impl in ("naive", "chunk"):
        o1, _ = ops.gated_delta_rule(q, k, v, g, beta, qk_l2norm=True, beta_is_logit=True, impl=impl)
        o2, _ = ops.gated_delta_rule(norm(q), norm(k), v, g, torch.sigmoid(beta), impl=impl)
        assert_same_result(f"{impl} options", o1, o2)


@both
@pytest.mark.parametrize("segments", [1, 2])
@pytest.mark.parametrize("options", [{}, dict(qk_l2norm=True, beta_is_logit=True)], ids=["plain", "options"])
@pytest.mark.parametrize("split", [False, True], ids=["loop", "split"])
def test_inference_forward(case, segments, options, split, monkeypatch):
    """Without a gradient, past the decode kernel's length, the chunked forward forms o in its loop (a kernel
    variant training does not run), or with SPLIT_INFERENCE stores the states and U for the output kernel, over
    segments or not: o and the final state against the token recurrence."""
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    monkeypatch.setattr(tri, "SPLIT_INFERENCE", dict.fromkeys(tri.SPLIT_INFERENCE, split))
    output = launch_kwargs(monkeypatch, tri, "_output_kernel")
    opt = with_options(case, **options) if options else case
    tensors, state = opt.draw(B=2, T=150, H=2, K=24, V=40, seed=33, gate_scale=0.05)
    check_against_naive(opt, *to(tensors, state), "triton", grads=False)
    assert bool(output) == split


@both
@pytest.mark.parametrize("qk_l2norm", [False, True], ids=["plain", "qk_l2norm"])
def test_inference_split_by_op_and_options(case, qk_l2norm, monkeypatch):
    """The library's SPLIT_INFERENCE and NORMS_IN_INFERENCE: without a gradient, the gated op with qk_l2norm reads
    the row norms formed once and forms o in the output kernel; the delta rule forms the norms in its loop, which
    forms o too, and so does either op without qk_l2norm."""
    output = launch_kwargs(monkeypatch, tri, "_output_kernel")
    loop = launch_kwargs(monkeypatch, tri, "_forward_kernel")
    formed = count_launches(monkeypatch, tri, "_row_norms_kernel")
    opt = with_options(case, qk_l2norm=True) if qk_l2norm else case
    tensors, state = opt.draw(B=1, T=150, H=2, K=16, V=16, seed=35)
    check_against_naive(opt, *to(tensors, state), "triton", grads=False)
    gated_norms = case is GATED and qk_l2norm
    assert bool(output) == gated_norms
    assert len(formed) == int(gated_norms) and [kw["R_IN"] for kw in loop + output] == [gated_norms] * (1 + len(output))


@both
@dtypes
@pytest.mark.parametrize("layout", ["packed", "segments"])
def test_norms_formed_once(case, dtype, layout, monkeypatch):
    """NORMS_IN: with qk_l2norm the 1 / row norms of q and k are formed once a call and read by every kernel that
    loads their rows (R_IN), training's and the no-gradient forward's: outputs, final state and every gradient
    against the token recurrence, with packed sequences (an empty one, one of one token) or over segments. The
    backward reads the forward's norms (formed once for forward and backward), which the fake tensors
    (torch.compile) give too."""
    monkeypatch.setattr(tri, "NORMS_IN", True)
    monkeypatch.setattr(tri, "NORMS_IN_INFERENCE", dict(gated=True, ungated=True))
    names = ("prepare", "forward", "output", "local_du", "backward_state", "backward_chunk")
    launched = {name: launch_kwargs(monkeypatch, tri, f"_{name}_kernel") for name in names}
    formed = count_launches(monkeypatch, tri, "_row_norms_kernel")
    opt = with_options(case, qk_l2norm=True, beta_is_logit=True)
    if layout == "packed":
        cu = torch.tensor([0, 37, 37, 38, 150], device=DEVICE)
        tensors, state = opt.draw(B=1, T=150, H=2, K=24, V=40, dtype=dtype, seed=45, N=4)
    else:
        monkeypatch.setattr(tri, "SEGMENTS", 2)
        cu = None
        tensors, state = opt.draw(B=2, T=150, H=2, K=24, V=40, dtype=dtype, seed=46, gate_scale=0.05)
    check_against_naive(opt, *to(tensors, state), "triton", cu_seqlens=cu, **ON_DEVICE)
    assert len(formed) == 1  # in the forward, and read again by the backward
    check_against_naive(opt, *to(tensors, state), "triton", cu_seqlens=cu, grads=False, **ON_DEVICE)
    assert len(formed) == 2
    assert all(kw["R_IN"] for kws in launched.values() for kw in kws)
    (q, k, v, *gates, beta), h0 = to(tensors, state)
    g = gates[0].float().contiguous() if gates else None
    args = (q, k, v, g, beta.float(), h0.float(), cu, 0.25, True, True, True, True)
    checks = torch.library.opcheck(tri._chunk_op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks
    ran = {name for name, kws in launched.items() if kws}
    assert ran >= {"prepare", "forward", "backward_state", "backward_chunk"} and ran <= tri.NORM_KERNELS, ran


@both
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("options", [{}, dict(qk_l2norm=True, beta_is_logit=True)], ids=["plain", "options"])
def test_recurrent_decode_path(case, T, options):
    """Without gradients and with few tokens, the token-by-token kernel runs; it must agree with naive."""
    opt = with_options(case, **options) if options else case
    tensors, state = to(*opt.draw(B=3, T=T, H=2, K=16, V=24, seed=T))
    with torch.no_grad():
        o, S = opt(tensors, initial_state=state, output_final_state=True, impl="triton")
        o_ref, S_ref = opt(tensors, initial_state=state, output_final_state=True, impl="naive")
    assert_same_result("o", o, o_ref)
    assert_same_result("final_state", S, S_ref)


def test_recurrent_decode_equals_chunk_kernel():
    """The decode kernel and the chunk kernels compute one thing (varlen, with an empty sequence)."""
    tensors, state = to(*GATED.draw(B=1, T=6, H=2, K=16, V=24, seed=1, N=4))
    q, k, v, g, beta = tensors
    cu = torch.tensor([0, 1, 1, 4, 6], device=DEVICE)
    o1, S1 = tri.recurrent(q, k, v, g, beta, state, 0.25, cu, False, False)
    o2, S2, *_ = tri.forward(q, k, v, g, beta, state, 0.25, cu, False, False)
    assert_same_result("o", o1, o2)
    assert_same_result("final_state", S1, S2)


def test_unsupported_call_raises():
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64, device=DEVICE)
    beta = torch.rand(1, 4, 1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="impl='triton' cannot serve this call"):
        ops.gated_delta_rule(q, q, q, -beta, beta, impl="triton")
    with pytest.raises(ValueError, match="K=300 exceeds 128"):
        big = torch.randn(1, 4, 1, 300, device=DEVICE)
        ops.delta_rule(big, big, big, beta.float(), impl="triton")
    with pytest.raises(ValueError, match="V=300 exceed 256"):
        k = torch.randn(1, 4, 1, 64, device=DEVICE)
        ops.delta_rule(k, k, torch.randn(1, 4, 1, 300, device=DEVICE), beta.float(), impl="triton")


def test_auto_falls_back_to_chunk_beyond_the_kernels_key_dim():
    """K = 256 is valid input; on CUDA "auto" must take the chunked path rather than fail to launch."""
    q = torch.randn(1, 4, 1, 256, device=DEVICE)
    beta = torch.rand(1, 4, 1, device=DEVICE)
    assert triton_calls(ops.delta_rule, lambda: ops.delta_rule(q, q, q[..., :8], beta)) == 0


def test_auto_picks_triton_only_on_cuda():
    q = torch.randn(1, 40, 2, 16, device=DEVICE)
    beta = torch.rand(1, 40, 2, device=DEVICE)
    assert bool(triton_calls(ops.gated_delta_rule, lambda: ops.gated_delta_rule(q, q, q, -beta, beta))) == CUDA


def test_torch_compile_fullgraph(monkeypatch):
    """The ops are opaque custom ops with fake tensors and autograd: no graph break, same numbers (the fakes
    give the shapes of what the forward keeps for the backward, KEEP_STATES, too). One function, compiled with
    KEEP_STATES off, then on, then off again: the op takes it as an argument, so each compiled graph holds what
    its kernels return (read inside the op, a graph compiled with one setting, or torch.compile's caches, served
    the other: on an H200 inductor's size checks failed, "wrong number of dimensions")."""
    tensors, state = to(*GATED.draw(B=2, T=70, H=2, K=16, V=24, seed=3))

    opts = dict(qk_l2norm=True, beta_is_logit=True)

    def f(q, k, v, g, beta, h0):
        o, s = ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl="triton", **opts)
        return (o * o).sum() + s.sum()

    for keep in (False, True, False):
        monkeypatch.setattr(tri, "KEEP_STATES", keep)
        assert_compiles_fullgraph(f, [*tensors, state])


@pytest.mark.parametrize("gated", [False, True], ids=["delta_rule", "gated_delta_rule"])
def test_decode_launches_directly_when_eager(gated, monkeypatch):
    """DECODE_DIRECT: an eager decoding call (no gradient, one token) launches the token-by-token kernel without its
    custom op, with g and beta in bfloat16 as given; under torch.compile(fullgraph=True) the same call goes through
    the custom op (no graph break). Either way, the numbers of the custom op called eagerly on float32 g and beta."""
    B, H, K, V = 3, 2, 16, 24
    gen = torch.Generator().manual_seed(8)
    q, k = (torch.randn(B, 1, H, K, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    v = torch.randn(B, 1, H, V, generator=gen).to(DEVICE, torch.bfloat16)
    g = (-torch.rand(B, 1, H, generator=gen)).to(DEVICE, torch.bfloat16) if gated else None
    beta = torch.rand(B, 1, H, generator=gen).to(DEVICE, torch.bfloat16)
    h0 = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    calls = []
    original = tri._recurrent_op
    monkeypatch.setattr(tri, "_recurrent_op", lambda *a: calls.append(a) or original(*a))

    def step(q, k, v, g, beta, h0):
        args = (q, k, v, g, beta) if gated else (q, k, v, beta)
        op = ops.gated_delta_rule if gated else ops.delta_rule
        return op(*args, initial_state=h0, output_final_state=True, impl="triton", qk_l2norm=True)

    with torch.no_grad():
        o, ht = step(q, k, v, g, beta, h0)
        assert not calls
        g32 = g.float() if gated else None
        o_ref, ht_ref = original(q, k, v, g32, beta.float(), h0, None, K**-0.5, True, False)
        assert calls == []
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
        torch.testing.assert_close(ht, ht_ref, rtol=0, atol=0)
        compiled = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
        o_c, ht_c = compiled(q, k, v, g, beta, h0)
    assert calls, "torch.compile did not go through the custom op"
    torch.testing.assert_close(o_c, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(ht_c, ht_ref, rtol=0, atol=0)


@pytest.mark.parametrize("keep", [False, True], ids=["formed_again", "kept"])
def test_torch_compile_bfloat16(keep, monkeypatch):
    """torch.compile in bfloat16: on a GPU the forward stores Tinv in bfloat16 (PREPARE_LOWP) and the backward its
    own parts (STATES_LOWP), so the fakes must give those dtypes (inductor checks them); the same loss and
    gradients as eager, with the forward's states kept or formed again. The loss is summed in float32, so that
    the compiled and the eager run round it alike."""
    monkeypatch.setattr(tri, "KEEP_STATES", keep)
    tensors, state = to(*GATED.draw(B=2, T=70, H=2, K=16, V=24, dtype=torch.bfloat16, seed=5))

    def f(q, k, v, g, beta, h0):
        o, s = ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl="triton")
        return (o.float() ** 2).sum() + s.sum()

    assert_compiles_fullgraph(f, [*tensors, state])


# ----------------------------------------------------------------------------------------------------------------
# On the GPU: real shapes, every dtype
# ----------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA: the kernels' compiled form runs only on a GPU")


@gpu
@both
@dtypes
@pytest.mark.parametrize("T", [1, 300])
def test_gpu_triton_matches_reference(case, dtype, T):
    tensors, state = case.draw(B=2, T=T, H=2, K=128, V=128, dtype=dtype, seed=T)
    check_against_naive(case, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)


@gpu
@both
@dtypes
@pytest.mark.parametrize("wide_l2norm", [False, True], ids=["l2norm_narrow", "l2norm_wide"])
@pytest.mark.parametrize("norms_in", [False, True], ids=["norms_formed", "norms_in"])
def test_gpu_options_at_full_heads(case, dtype, wide_l2norm, norms_in, monkeypatch):
    """qk_l2norm and beta as logits at K = V = 128, where backward_chunk runs over whole key rows, at NUM_WARPS or
    (WIDE_KEYS_L2NORM) WIDE_KEYS_WARPS, the row norms formed in each kernel or once (NORMS_IN): outputs, final
    state and every gradient by the dtype rule, and the no-gradient forward's."""
    monkeypatch.setattr(tri, "WIDE_KEYS_L2NORM", wide_l2norm)
    monkeypatch.setattr(tri, "NORMS_IN", norms_in)
    opt = with_options(case, qk_l2norm=True, beta_is_logit=True)
    tensors, state = opt.draw(B=2, T=300, H=2, K=128, V=128, dtype=dtype, seed=33)
    tensors[-1] = torch.randn(tensors[-1].shape, generator=torch.Generator().manual_seed(34)) * 2  # logits
    check_against_naive(opt, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)
    check_against_naive(opt, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True, grads=False)


@gpu
@both
def test_gpu_bfloat16_operands_wide_value_blocks_and_w(case, monkeypatch):
    """bfloat16 on a GPU whose ptxas is trusted: every kernel with bfloat16 dot operands, W stored in bfloat16 and
    the per-sequence kernels' V blocks of BV_MAX_LOWP (V = 80: two blocks of 64, the second partial). Only a GPU can
    check this: Triton's interpreter multiplies bfloat16 tiles wrongly (a 16 x 16 product of casts is off by 1e10)."""
    if not tri.ptxas.lowp_trusted():
        pytest.skip("no trusted ptxas here: the kernels keep tf32 dots")
    assert all(tri._lowp(torch.bfloat16, kernel) for kernel, on in tri.LOWP_DOTS.items() if on)
    assert tri._w_dtype(torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(tri, "FULL_GPU", 0)
    assert tri._sequence_bv(64, 80, 1, torch.bfloat16) == tri.BV_MAX_LOWP == 64
    tensors, state = case.draw(B=2, T=200, H=2, K=64, V=80, dtype=torch.bfloat16, seed=9)
    check_against_naive(case, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)


@gpu
@both
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("options", [{}, dict(qk_l2norm=True, beta_is_logit=True)], ids=["plain", "options"])
@pytest.mark.parametrize("split", [False, True], ids=["loop", "split"])
def test_gpu_inference_forward_bfloat16(case, segments, options, split, monkeypatch):
    """Without a gradient the forward forms o in its loop (the kernel the split forward of training does not run),
    or with SPLIT_INFERENCE in the output kernel from the states and U it stores, over segments or not, with the
    in-kernel options or not: o and the final state by the dtype rule."""
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    monkeypatch.setattr(tri, "SPLIT_INFERENCE", dict.fromkeys(tri.SPLIT_INFERENCE, split))
    opt = with_options(case, **options) if options else case
    tensors, state = opt.draw(B=1, T=2000, H=2, K=128, V=128, dtype=torch.bfloat16, seed=32, gate_scale=0.05)
    check_against_naive(opt, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True, grads=False)


@gpu
@both
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("table", ["default", "all_eight", "narrow_eight"])
def test_gpu_few_programs_at_eight_warps(case, segments, table, monkeypatch):
    """FEW_PROGRAMS_WARPS: the per-sequence launches of few programs at its warps, as set (the delta rule's
    backward_state at 8) or at 8 for both kernels of both ops, the gated op's with its narrow decays or without
    (NARROW_AT_FEW_WARPS), with unnarrowed value blocks of 64 (FULL_GPU = 0; 8 warps need FEW_PROGRAMS_WARPS_BV),
    over segments or not: training's outputs, final state and every gradient, and the no-gradient forward, by the
    dtype rule."""
    if table != "default":
        monkeypatch.setattr(tri, "FEW_PROGRAMS_WARPS", dict.fromkeys(tri.FEW_PROGRAMS_WARPS, 8))
    monkeypatch.setattr(tri, "NARROW_AT_FEW_WARPS", table == "narrow_eight")
    monkeypatch.setattr(tri, "FULL_GPU", 0)
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    launched = {name: launch_kwargs(monkeypatch, tri, name) for name in ("_forward_kernel", "_backward_state_kernel")}
    tensors, state = case.draw(B=1, T=2000, H=2, K=128, V=128, dtype=torch.bfloat16, seed=31, gate_scale=0.05)
    check_against_naive(case, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)
    check_against_naive(case, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True, grads=False)
    for name, kws in launched.items():
        key = f"{'gated' if case is GATED else 'ungated'}_{name[1:-7]}"
        assert kws and {kw["num_warps"] for kw in kws} == {tri.FEW_PROGRAMS_WARPS[key] or 4}, name
        narrow = case is GATED and (table != "all_eight" or tri.FEW_PROGRAMS_WARPS[key] is None)
        assert {kw["NARROW_DECAYS"] for kw in kws} == {narrow}, name


@gpu
@both
@pytest.mark.parametrize("keep", [None, False, True], ids=["formed_again", "kept_float32", "kept_own_dtypes"])
def test_gpu_segments_bfloat16(case, keep, monkeypatch):
    """Segments in bfloat16 on the card, where the transitions M are carried with bfloat16 operands (LOWP) over
    segments of 8 chunks: T = 2000 in four segments, the last partial; the backward forming the states again, or
    taking those the forward kept (KEEP_STATES, in float32 or with KEEP_LOWP)."""
    monkeypatch.setattr(tri, "SEGMENTS", 4)
    monkeypatch.setattr(tri, "KEEP_STATES", keep is not None)
    monkeypatch.setattr(tri, "KEEP_LOWP", bool(keep))
    tensors, state = case.draw(B=1, T=2000, H=4, K=128, V=128, dtype=torch.bfloat16, seed=22, gate_scale=0.05)
    check_against_naive(case, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)


@gpu
@both
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("check", [assert_no_host_sync, assert_cuda_graph_replays], ids=["sync_debug", "cuda_graph"])
def test_gpu_no_host_sync(case, segments, check, monkeypatch):
    """fwd+bwd, with segments or without, never waits for the device (see assert_no_host_sync), so it can also be
    captured in a CUDA graph and replayed on new values (assert_cuda_graph_replays)."""
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    tensors, state = case.draw(B=1, T=2000, H=2, K=128, V=128, dtype=torch.bfloat16, seed=25, gate_scale=0.05)
    check(case, tensors, state)


@gpu
@both
def test_gpu_no_host_sync_varlen(case):
    """Packed sequences: cu_seqlens is read on the host at its first call only (see check_cu_seqlens)."""
    cu_seqlens = torch.tensor([0, 0, 1, 700, 2000])
    tensors, state = case.draw(B=1, T=2000, H=2, K=128, V=128, dtype=torch.bfloat16, seed=27, N=4, gate_scale=0.05)
    assert_no_host_sync(case, tensors, state, cu_seqlens)


@gpu
@both
@pytest.mark.parametrize("keep", [None, False, True], ids=["formed_again", "kept_float32", "kept_own_dtypes"])
def test_gpu_kept_states_bfloat16(case, keep, monkeypatch):
    """The forward's states, U and W kept for the backward (KEEP_STATES) on the card, in bfloat16, with packed
    sequences; kept in float32, or in the backward's own dtypes (KEEP_LOWP), or formed again by the backward."""
    monkeypatch.setattr(tri, "KEEP_STATES", keep is not None)
    monkeypatch.setattr(tri, "KEEP_LOWP", bool(keep))
    cu_seqlens = torch.tensor([0, 300, 301, 1000], device=DEVICE)
    tensors, state = case.draw(B=1, T=1000, H=4, K=128, V=128, dtype=torch.bfloat16, seed=23, N=3, gate_scale=0.05)
    check_against_naive(
        case, *to(tensors, state), "triton", cu_seqlens=cu_seqlens, reference="chunk", plain_in_dtype=True
    )
    (q, k, v, *gates, beta), h0 = to(tensors, state)
    g = gates[0] if gates else None
    out = tri._chunk_op(q, k, v, g, beta, h0, cu_seqlens, 0.1, False, False, True, keep is not None)
    if keep is None:
        assert out[3].numel() == out[4].numel() == 0  # nothing kept
    else:
        want = tri._kept_dtypes(torch.bfloat16, g is not None, False, 128)
        assert (out[3].dtype, out[4].dtype) == want and (want != (torch.float32,) * 2) == keep


@gpu
@both
@dtypes
@pytest.mark.parametrize("segments", [None, 2], ids=["packed", "segments"])
@pytest.mark.parametrize("pipelined", [False, True], ids=["rows_and_columns", "rows_masked"])
def test_gpu_scores_kept(case, dtype, segments, pipelined, monkeypatch):
    """KEEP_SCORES on the card for either op, at any program count (KEEP_SCORES_FEW), in each dtype: the output
    kernel stores P (bfloat16 where backward_state takes bfloat16 operands), backward_state forms dU's local share
    from it, their load masked by rows and columns, or by rows only (SCORES_PIPELINED; SCORES_NARROW_FEW off, which
    would take the second form at these few programs of narrowed value blocks); packed sequences (one of one token),
    or two segments."""
    monkeypatch.setattr(tri, "SCORES_PIPELINED", pipelined)
    monkeypatch.setattr(tri, "SCORES_NARROW_FEW", dict.fromkeys(tri.SCORES_NARROW_FEW, False))
    monkeypatch.setattr(tri, "KEEP_STATES", True)
    monkeypatch.setattr(tri, "KEEP_SCORES", dict(gated=True, ungated=True))
    monkeypatch.setattr(tri, "KEEP_SCORES_FEW", True)
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    cu_seqlens = torch.tensor([0, 300, 301, 1000], device=DEVICE) if segments is None else None
    N = 3 if segments is None else None
    tensors, state = case.draw(B=1, T=1000, H=4, K=128, V=128, dtype=dtype, seed=29, N=N, gate_scale=0.05)
    state_launches = launch_kwargs(monkeypatch, tri, "_backward_state_kernel")
    check_against_naive(
        case, *to(tensors, state), "triton", cu_seqlens=cu_seqlens, reference="chunk", plain_in_dtype=True
    )
    assert state_launches and all(kw["SCORES_IN"] and kw["SCORES_PIPELINED"] == pipelined for kw in state_launches)
    (q, k, v, *gates, beta), h0 = to(tensors, state)
    out = tri._chunk_op(q, k, v, gates[0] if gates else None, beta, h0, cu_seqlens, 0.1, False, False, True, True)
    want = torch.bfloat16 if dtype == torch.bfloat16 and tri.ptxas.lowp_trusted() else torch.float32
    assert out[6].shape == (1, 1000, 4, tri.BT) and out[6].dtype == want


@gpu
@pytest.mark.parametrize("K, V", [(128, 256), (64, 256), (33, 24)])
def test_gpu_head_dims(K, V):
    tensors, state = GATED.draw(B=1, T=200, H=2, K=K, V=V, dtype=torch.bfloat16, seed=K)
    check_against_naive(GATED, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)


@gpu
@both
def test_gpu_varlen_with_empty_and_single_token(case):
    cu = torch.tensor([0, 0, 1, 300, 300, 600], device="cuda")
    tensors, state = case.draw(B=1, T=600, H=2, K=64, V=64, dtype=torch.bfloat16, seed=1, N=5)
    check_against_naive(case, *to(tensors, state), "triton", cu_seqlens=cu, reference="chunk", plain_in_dtype=True)


@gpu
@pytest.mark.parametrize("gates", [0.0, -30.0, -1e4, "mixed"])
def test_gpu_extreme_gates(gates):
    tensors, state = GATED.draw(B=2, T=300, H=2, K=128, V=128, dtype=torch.bfloat16, seed=3)
    check_against_naive(GATED, *to(extreme(tensors, gates), state), "triton", reference="chunk", plain_in_dtype=True)
