"""GLA's Triton kernels (a log-decay per key channel) against the token recurrence.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at
small odd shapes; the GPU-only cases at the end need CUDA and skip elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from linattn import ops
from tests.ops.mechanisms import by_id
from tests.ops.tolerance import ON_DEVICE, assert_same_result, check_against_naive
from tests.ops.triton_checks import (
    assert_checkpointed_equals_plain,
    assert_compiles_fullgraph,
    assert_cuda_graph_replays,
    assert_no_host_sync,
    assert_segments_equal_one_pass,
    count_launches,
    extreme,
    triton_calls,
)

triton = pytest.importorskip("triton")
from linattn.ops.gla import triton as tri  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASE = by_id["gla"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def to(tensors, state, device=DEVICE):
    return [t.to(device) for t in tensors], (None if state is None else state.to(device))


@dtypes
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_triton_matches_naive(dtype, T):
    tensors, state = CASE.draw(B=2, T=T, H=2, K=16, V=24, dtype=dtype, seed=T)
    check_against_naive(CASE, *to(tensors, state), "triton", **ON_DEVICE)


def test_triton_varlen():
    cu_seqlens = torch.tensor([0, 0, 1, 131, 131, 195, 200])  # empty, one token, several chunks, empty, ...
    tensors, state = CASE.draw(B=1, T=200, H=2, K=16, V=24, seed=5, N=6)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


@pytest.mark.parametrize("K, V", [(20, 40), (40, 12)], ids=["K20-V40", "K40-V12"])
def test_triton_head_dims_beyond_one_block(K, V):
    """Masked head dims, several V blocks, and key slices of the in-sub-chunk decay (K > 32)."""
    tensors, state = CASE.draw(B=1, T=40, H=1, K=K, V=V, seed=K)
    check_against_naive(CASE, *to(tensors, state), "triton", **ON_DEVICE)


@pytest.mark.parametrize("state_kernel", [False, True])
def test_state_products_in_dqkg_or_their_own_kernel(state_kernel, monkeypatch):
    """dqkg forming dO S^T, V dS^T and sum_v S dS itself, or reading them from dqk_state (STATE_KERNEL), here with
    key blocks of 16 (three, the last partly past K = 40) and packed sequences across chunks: the same gradients."""
    monkeypatch.setattr(tri, "STATE_KERNEL", state_kernel)
    launch = tri._launch

    def narrow(dtype, K, V):
        cfg = launch(dtype, K, V)
        cfg["dqk_state"].update(BK=16, num_warps=4)
        return cfg

    monkeypatch.setattr(tri, "_launch", narrow)
    cu_seqlens = torch.tensor([0, 70, 71, 150])
    tensors, state = CASE.draw(B=1, T=150, H=2, K=40, V=24, seed=9, N=3)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


def test_float16_takes_one_stage_on_gpus_with_less_shared_memory(monkeypatch):
    """float16's tiles are float32 (its dots take float32 operands): on a GPU that gives a program less than
    Hopper's shared memory (an A100's 163 KiB, 99 KiB on sm_86, sm_89, sm_120) every kernel takes one stage, as
    float32's do everywhere (the forward state kernel at 3 stages took 196,608 B compiled for sm_80); on Hopper, or
    where Triton does not say, float16 keeps the table's stages. bfloat16 keeps them everywhere. The device faked:
    what Triton reports of it."""
    from linattn.ops.common import triton_utils

    monkeypatch.setattr(triton_utils, "triton_interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for optin, one_stage in [(101376, True), (166912, True), (232448, False), (None, False)]:  # 8.9, 8.0, 9.0
        monkeypatch.setattr(triton_utils, "shared_per_program", lambda index, s=optin: s)
        half = tri._launch(torch.float16, 128, 128)
        assert all(c.get("num_stages") == 1 for c in half.values()) == one_stage, optin
        assert tri._launch(torch.bfloat16, 128, 128)["state"].get("num_stages") is None, optin  # Triton's default
        assert all(c["num_stages"] == 1 for c in tri._launch(torch.float32, 128, 128).values())


def test_per_sequence_kernels_narrowed_for_few_sequences(monkeypatch):
    """With few programs (FEW_PROGRAMS, here always), the state kernels take value blocks of 16 (from 32 at V = 24,
    two of them, the second partly past V): the same outputs, states and gradients, with packed sequences."""
    monkeypatch.setattr(tri, "FEW_PROGRAMS", 10**6)
    narrowed = tri._per_sequence(tri._launch(torch.float32, 40, 24)["state"], 40, 24, 6)
    assert narrowed["BV"] == 16 and narrowed["num_warps"] == 4
    cu_seqlens = torch.tensor([0, 70, 71, 150])
    tensors, state = CASE.draw(B=1, T=150, H=2, K=40, V=24, seed=16, N=3)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


@pytest.mark.parametrize("with_state", [True, False], ids=["initial_state", "zeros"])
@pytest.mark.parametrize("segments", [2, 3])
def test_long_sequences_cut_into_segments(segments, with_state, monkeypatch):
    """The per-sequence passes over segments chained by their summed log-decays per key (SEGMENT_HEADS): T = 300 is
    five chunks, so three segments are of 2, 2 and 1 (partial) chunks, and K = 70 takes two key blocks in the state
    passes. Outputs, final state and every gradient against the token recurrence, with an initial state or without;
    without a gradient, the same o and final state as one pass. The library's KEEP_STATES (both settings:
    test_states_kept_for_the_backward_or_formed_again)."""
    scans = []
    chain = tri.chain_segments
    monkeypatch.setattr(tri, "chain_segments", lambda *a, **kw: scans.append(a[3]) or chain(*a, **kw))
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    # mild gates (gate_scale), so that the segments' decays are far from zero and a wrong one shows
    tensors, state = CASE.draw(B=2, T=300, H=2, K=70, V=40, seed=21, gate_scale=0.05, with_state=with_state)
    check_against_naive(CASE, *to(tensors, state), "triton", **ON_DEVICE)
    # the forward's chain; the backward's of the gradients, and of the states unless the forward kept them
    assert scans.count(False) == 1 + (not tri.KEEP_STATES) and scans.count(True) == 1
    assert_segments_equal_one_pass(CASE, tri, *to(tensors, state), monkeypatch)


def test_segment_counts():
    """Segments only for few, long sequences without cu_seqlens, at least MIN_SEGMENTS of them, as the delta
    rules'."""
    assert tri._num_segments(1, 16, 65536, None) == 8  # the standard shape at T = 65536
    assert tri._num_segments(2, 16, 32768, None) == 4
    assert tri._num_segments(4, 16, 16384, None) == 1  # 2 segments: fewer than MIN_SEGMENTS
    assert tri._num_segments(16, 16, 4096, None) == 1
    assert tri._num_segments(1, 16, 65536, torch.tensor([0, 65536])) == 1


@pytest.mark.parametrize("save_scores", [False, True])
def test_scores_kept_for_the_backward_or_formed_again(save_scores, monkeypatch):
    """The backward given the forward's scores A (SAVE_SCORES: intra without them, no diag) or forming them again:
    the same gradients, here with packed sequences; with them kept, the backward launches no diag kernel."""
    monkeypatch.setattr(tri, "SAVE_SCORES", save_scores)
    diag_launches = count_launches(monkeypatch, tri, "_diag_kernel")
    cu_seqlens = torch.tensor([0, 70, 71, 150])
    tensors, state = CASE.draw(B=1, T=150, H=2, K=40, V=24, seed=12, N=3)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)
    assert len(diag_launches) == (1 if save_scores else 2)  # one forward and one backward


@pytest.mark.parametrize("keep", [False, True], ids=["formed_again", "kept"])
@pytest.mark.parametrize("segments, packed", [(1, True), (2, False)], ids=["packed", "segments"])
def test_states_kept_for_the_backward_or_formed_again(keep, segments, packed, monkeypatch):
    """KEEP_STATES: the forward's last state pass also stores the state entering each chunk for the backward,
    which then runs no forward state pass of its own: the same outputs and every gradient against the token
    recurrence, with packed sequences (an empty one, one token) or over segments; the backward's launches of the
    state kernel drop from two passes to one (a pass: one launch, or two with segments); the fakes (torch.compile)
    have the kept tensors' shapes and dtypes; nothing kept without a gradient."""
    monkeypatch.setattr(tri, "KEEP_STATES", keep)
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    launches = count_launches(monkeypatch, tri, "_state_kernel")
    keeps, forward = [], tri.forward
    monkeypatch.setattr(tri, "forward", lambda *a: keeps.append(a[-1]) or forward(*a))
    cu_seqlens = torch.tensor([0, 0, 70, 71, 150]) if packed else None
    tensors, state = CASE.draw(B=1 if packed else 2, T=150, H=2, K=40, V=24, seed=14, N=4 if packed else None)
    cu = cu_seqlens.to(DEVICE) if packed else None
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu, **ON_DEVICE)
    # the forward's pass, then the backward's reverse pass and, unless kept, its forward one
    assert len(launches) == segments * (3 - keep) and keeps == [keep]
    (q, k, v, g), h0 = to(tensors, state)
    args = (q, k, v, g.float(), h0.float(), cu, 0.25, keep)
    _, _, saved = torch.ops.linattn.chunk_gla(*args)
    assert len(saved) == 2 and (saved[1].numel() > 0) == keep
    checks = torch.library.opcheck(torch.ops.linattn.chunk_gla, args, test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks
    keeps.clear()
    with torch.no_grad():  # no gradient wanted: nothing kept, whatever the setting
        tri.triton_gla(q.requires_grad_(), k, v, g, scale=0.25, initial_state=h0, cu_seqlens=cu)
    assert keeps == [False]


def test_kept_states_under_activation_checkpointing():
    """What the forward keeps (KEEP_STATES, and its scores: SAVE_SCORES) under torch.utils.checkpoint, with an
    initial state: see assert_checkpointed_equals_plain."""
    assert tri.KEEP_STATES and tri.SAVE_SCORES  # the library's settings, which this test is about
    tensors, state = to(*CASE.draw(B=1, T=150, H=2, K=24, V=16, seed=17))
    assert_checkpointed_equals_plain(CASE, tensors, state)


@pytest.mark.parametrize("limit", [-1.0, 60.0])
def test_sub_chunk_products_rebased_or_row_by_row(limit, monkeypatch):
    """Inside sub-chunks, products rebased on one row (REBASE_LIMIT) or one row at a time (-1): the same result.
    Gates of -0.5 per token in the first 40 tokens and -8 after (128 nats over a sub-chunk, past the limit), so with
    the limit some tiles take products and others, in the same chunk, rows; packed sequences end inside both."""
    monkeypatch.setattr(tri, "REBASE_LIMIT", limit)
    monkeypatch.setattr(tri, "CHUNK_LIMIT", -1.0)  # never the whole chunk at once
    cu_seqlens = torch.tensor([0, 37, 38, 150])
    tensors, state = CASE.draw(B=1, T=150, H=2, K=40, V=24, seed=13, N=3)
    g = torch.full_like(tensors[3], -0.5)
    g[:, 40:] = -8.0
    tensors[3] = g * torch.rand(g.shape, generator=torch.Generator().manual_seed(1)).add(0.5)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


@pytest.mark.parametrize("limit", [-1.0, 60.0])
def test_chunks_whole_or_in_sub_chunks(limit, monkeypatch):
    """A chunk's decayed products at once, rebased on the middle of each channel's log-decays (CHUNK_LIMIT), or
    between and inside sub-chunks (-1): the same result. Gates of about -0.3 per token, and of about -3 in key
    channels 32 and up from token 50 on (156 and 175 nats over the third sequence's two chunks, past the limit's
    120; at most 57 over a sub-chunk, within REBASE_LIMIT): with the limit, the forward forms the first two
    sequences' chunks whole and the third's not, and there dqkg's first key block of 32 columns takes the whole
    chunk and the second (columns 32-39) the sub-chunks."""
    assert tri._launch(torch.float32, 40, 24)["dqkg"]["BK"] == 32, "the gates below split dqkg's key blocks"
    monkeypatch.setattr(tri, "CHUNK_LIMIT", limit)
    cu_seqlens = torch.tensor([0, 37, 38, 150])
    tensors, state = CASE.draw(B=1, T=150, H=2, K=40, V=24, seed=14, N=3)
    g = torch.full_like(tensors[3], -0.3)
    g[:, 50:, :, 32:] = -3.0
    tensors[3] = g * torch.rand(g.shape, generator=torch.Generator().manual_seed(2)).add(0.5)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu_seqlens.to(DEVICE), **ON_DEVICE)


@pytest.mark.parametrize("gates", [0.0, -30.0, -1e4, "mixed"])
def test_triton_extreme_gates(gates):
    """No decay, and decay so strong that the state resets every token: no overflow, no NaN."""
    tensors, state = CASE.draw(B=1, T=100, H=2, K=16, V=24, seed=2)
    check_against_naive(CASE, *to(extreme(tensors, gates), state), "triton", **ON_DEVICE)


def test_backward_without_final_state_gradient():
    """dht = None (the reverse state pass starts from nothing) gives what a zero final-state gradient gives."""
    tensors, state = to(*CASE.draw(B=2, T=40, H=1, K=16, V=24, seed=6))
    q, k, v, g = tensors
    do = torch.randn_like(v)
    _, ht, *_ = tri.forward(q, k, v, g, state, 0.25, None)
    none = tri.backward(do, None, q, k, v, g, state, ht, 0.25, None)
    zero = tri.backward(do, torch.zeros_like(ht), q, k, v, g, state, ht, 0.25, None)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), none, zero):
        assert_same_result(name, a, b)


@pytest.mark.parametrize("gates", ["random", "mixed"])
def test_triton_gradients_without_final_state_gradient(gates):
    """dht = None against naive: dg's chunk-local sums and dh0 from the output's gradient alone."""
    tensors, state = CASE.draw(B=2, T=70, H=1, K=20, V=12, seed=9)
    if gates != "random":
        tensors = extreme(tensors, gates)
    check_against_naive(CASE, *to(tensors, state), "triton", state_grad=False, **ON_DEVICE)


def test_unsupported_call_raises():
    q = torch.randn(1, 8, 1, 16, dtype=torch.float64, device=DEVICE)
    g = -torch.rand(1, 8, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="impl='triton' cannot serve"):
        ops.gla(q, q, q, g, impl="triton")
    q = torch.randn(1, 8, 1, 300, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        ops.gla(q, q, q, -torch.rand_like(q), impl="triton")


@pytest.mark.parametrize("T", [1, 5])
def test_recurrent_decode_equals_chunk(T):
    """Without gradients and with few tokens the token-by-token kernel runs; it must agree with the chunk kernel."""
    tensors, state = to(*CASE.draw(B=3, T=T, H=2, K=20, V=24, seed=T))
    q, k, v, g = tensors
    with torch.no_grad():
        o, S = CASE(tensors, initial_state=state, output_final_state=True, impl="triton")
    o_chunk, S_chunk, *_ = tri.forward(q, k, v, g, state, q.shape[-1] ** -0.5, None)
    assert_same_result("o", o, o_chunk)
    assert_same_result("final_state", S, S_chunk)


def test_recurrent_decode_varlen():
    tensors, state = to(*CASE.draw(B=1, T=6, H=2, K=16, V=24, seed=1, N=4))
    cu = torch.tensor([0, 1, 1, 4, 6], device=DEVICE)
    with torch.no_grad():
        o, S = CASE(tensors, initial_state=state, output_final_state=True, impl="triton", cu_seqlens=cu)
        o_ref, S_ref = CASE(tensors, initial_state=state, output_final_state=True, impl="naive", cu_seqlens=cu)
    assert_same_result("o", o, o_ref)
    assert_same_result("final_state", S, S_ref)


def test_auto_picks_triton_only_on_cuda():
    q = torch.randn(1, 40, 2, 16, device=DEVICE)
    assert bool(triton_calls(ops.gla, lambda: ops.gla(q, q, q, -torch.rand_like(q)))) == CUDA


# ----------------------------------------------------------------------------------------------------------------
# On the GPU: real shapes, every dtype
# ----------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA: the kernels' compiled form runs only on a GPU")


@gpu
def test_torch_compile_fullgraph():
    """The ops are opaque custom ops with fake tensors and autograd: no graph break, same numbers."""
    tensors, state = to(*CASE.draw(B=2, T=70, H=2, K=64, V=64, seed=3))

    def f(q, k, v, g, h0):
        o, s = ops.gla(q, k, v, g, initial_state=h0, output_final_state=True, impl="triton")
        return (o * o).sum() + s.sum()

    assert_compiles_fullgraph(f, [*tensors, state])


@gpu
@dtypes
@pytest.mark.parametrize("K, V", [(128, 128), (256, 96)], ids=["K128-V128", "K256-V96"])
def test_gpu_triton_matches_reference(dtype, K, V):
    tensors, state = CASE.draw(B=2, T=300, H=2, K=K, V=V, dtype=dtype, seed=K)
    check_against_naive(CASE, *to(tensors, state), "triton", reference="chunk", plain_in_dtype=True)


@gpu
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("check", [assert_no_host_sync, assert_cuda_graph_replays], ids=["sync_debug", "cuda_graph"])
def test_gpu_no_host_sync(segments, check, monkeypatch):
    """fwd+bwd, with segments or without, never waits for the device (see assert_no_host_sync), so it can also be
    captured in a CUDA graph and replayed on new values (assert_cuda_graph_replays)."""
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    tensors, state = CASE.draw(B=1, T=2000, H=2, K=128, V=128, dtype=torch.bfloat16, seed=25)
    check(CASE, tensors, state)


@gpu
@pytest.mark.parametrize("segments, packed", [(1, True), (4, False)], ids=["packed", "segments"])
def test_gpu_states_kept_bfloat16(segments, packed, monkeypatch):
    """KEEP_STATES on the card, in bfloat16 (the kept states bfloat16, as STATES_LOWP stores them), with packed
    sequences, or over segments and then captured in a CUDA graph and replayed on new values."""
    monkeypatch.setattr(tri, "KEEP_STATES", True)
    monkeypatch.setattr(tri, "SEGMENTS", segments)
    cu = torch.tensor([0, 0, 1, 700, 2000], device="cuda") if packed else None
    tensors, state = CASE.draw(B=1, T=2000, H=2, K=128, V=128, dtype=torch.bfloat16, seed=29, N=4 if packed else None)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu, reference="chunk", plain_in_dtype=True)
    if not packed:
        assert_cuda_graph_replays(CASE, tensors, state)


@gpu
def test_gpu_no_host_sync_varlen():
    """Packed sequences: cu_seqlens is read on the host at its first call only (see check_cu_seqlens)."""
    cu_seqlens = torch.tensor([0, 0, 1, 700, 2000])
    tensors, state = CASE.draw(B=1, T=2000, H=2, K=128, V=128, dtype=torch.bfloat16, seed=27, N=4)
    assert_no_host_sync(CASE, tensors, state, cu_seqlens)


@gpu
def test_gpu_varlen_with_empty_and_single_token():
    cu = torch.tensor([0, 0, 1, 300, 300, 600], device="cuda")
    tensors, state = CASE.draw(B=1, T=600, H=2, K=64, V=64, dtype=torch.bfloat16, seed=1, N=5)
    check_against_naive(CASE, *to(tensors, state), "triton", cu_seqlens=cu, reference="chunk", plain_in_dtype=True)


@gpu
@pytest.mark.parametrize("gates", [0.0, -30.0, -1e4, "mixed"])
def test_gpu_extreme_gates(gates):
    tensors, state = CASE.draw(B=2, T=300, H=2, K=128, V=128, dtype=torch.bfloat16, seed=3)
    check_against_naive(CASE, *to(extreme(tensors, gates), state), "triton", reference="chunk", plain_in_dtype=True)
