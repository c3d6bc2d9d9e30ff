"""Feature maps: unbiasedness of the random features, their projections, exact identities of the deterministic maps,
the causal Performer's chunked path against its recurrence, and finite, accurate half-precision outputs."""

from __future__ import annotations

import math

import pytest
import torch

from linattn import audit, ops
from linattn.feature_maps import (
    LOG_CAP,
    LOG_CAP_DEFAULT,
    CosFormer,
    Elementwise,
    FavorPlus,
    FavorPlusPlus,
    Hedgehog,
    TaylorExp,
    kernel_attention,
    optimal_gerf_a,
    random_projection,
)
from tests.ops.mechanisms import Case
from tests.ops.tolerance import check_against_naive

# ---------------------------------------------------------------------------------------------------------- unbiased

# The estimate X = phi(x)^T phi(y) of one draw of m = 8 features has some variance sigma^2; the mean of N independent
# draws has standard error sigma / sqrt(N), estimated from the draws' sample standard deviation. With |x~|, |y~| ~ 1.3
# (after the map's d^-1/4) the per-feature relative variance is at most e^{|x + y|^2} - 1 < e^{6.8}, and X is
# light-tailed enough for the central limit theorem at N = 2000 (checked: the trig draws are bounded). We allow
# 5 standard errors: a false failure has probability ~6e-7, while a missing factor (the |x|^2 / 2, the 1/sqrt(m),
# the scale) shifts the mean by far more. Draws are independent blocks of one map with N * 8 features: the
# projections are drawn block by block, each block from fresh Gaussians.
N_DRAWS, M, Z = 2000, 8, 5.0


def _block_estimates(phi, x, y, trig: bool) -> torch.Tensor:
    prod = phi(x) * phi(y)  # [N * M] (sin half, then cos half, for trig)
    if trig:
        half = prod.shape[0] // 2
        prod = prod[:half] + prod[half:]  # one term per frequency; M / 2 frequencies per draw
    return prod.view(N_DRAWS, -1).sum(-1) * N_DRAWS  # undo the 1/sqrt(N M) of the big map: one m = M map per block


@pytest.mark.parametrize(
    "make_map, trig",
    [
        (lambda d: FavorPlus(d, N_DRAWS * M, orthogonal=True, seed=1), False),
        (lambda d: FavorPlus(d, N_DRAWS * M, orthogonal=False, seed=2), False),
        (lambda d: FavorPlus(d, N_DRAWS * M, kernel="trig", seed=3), True),
        (lambda d: FavorPlusPlus(d, N_DRAWS * M, seed=4).fit(torch.randn(64, d) * 2, torch.randn(64, d) * 2), False),
        (
            lambda d: FavorPlusPlus(d, N_DRAWS * M, coupling="orthogonal", dense=False, seed=5).fit(
                torch.randn(64, d) * 2, torch.randn(64, d)
            ),
            False,
        ),
    ],
    ids=["favor+orthogonal", "favor+iid", "favor+trig", "favor++simplex-dense", "favor++orthogonal-isotropic"],
)
def test_random_features_are_unbiased(make_map, trig):
    d = M  # one block of the coupled projections per draw (trig: M / 2 frequencies of a d-row block)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    y = torch.randn(d, generator=gen, dtype=torch.float64)
    x, y = 2.2 * x / x.norm(), 2.2 * y / y.norm()
    draws = _block_estimates(make_map(d), x, y, trig)
    mean, se = draws.mean().item(), draws.std().item() / N_DRAWS**0.5
    target = math.exp(d**-0.5 * (x @ y).item())
    assert abs(mean - target) <= Z * se, f"mean {mean:.5f} vs exp(scale x.y) = {target:.5f}, standard error {se:.2g}"


def test_redrawn_maps_are_unbiased():
    # the same statement through redraw(), with fewer draws (each redraw is a module call)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, M, generator=gen, dtype=torch.float64)
    phi, draws = FavorPlus(M, M, seed=9), []
    for _ in range(300):
        phi.redraw()
        draws.append((phi(x) * phi(y)).sum().item())
    draws = torch.tensor(draws, dtype=torch.float64)
    assert abs(draws.mean().item() - math.exp(M**-0.5 * (x @ y).item())) <= Z * draws.std().item() / 300**0.5


def test_favor_plus_plus_fitted_a_is_not_trivial():
    phi = FavorPlusPlus(8, 8, seed=0).fit(torch.randn(64, 8) * 2, torch.randn(64, 8) * 2)
    assert (phi.a < 0).all(), phi.a  # the unbiasedness test above exercises a != 0


def test_optimal_a_minimises_the_second_moment():
    # the closed form against a grid search of the log second moment ln(1-4a) - ln(1-8a)/2 + 2 s (1-4a)/(1-8a)
    for s in (0.01, 0.3, 2.0, 10.0):
        grid = torch.linspace(-3, 0.12, 200001, dtype=torch.float64)
        moment = torch.log1p(-4 * grid) - 0.5 * torch.log1p(-8 * grid) + 2 * s * (1 - 4 * grid) / (1 - 8 * grid)
        best = grid[moment.argmin()].item()
        assert optimal_gerf_a(torch.tensor(s, dtype=torch.float64)).item() == pytest.approx(best, abs=1e-4)


def test_unfitted_favor_plus_plus_is_favor_plus():
    x = torch.randn(2, 5, 3, 16)
    a = FavorPlusPlus(16, 40, coupling="orthogonal", seed=7)(x)
    b = FavorPlus(16, 40, orthogonal=True, seed=7)(x)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------ projections


@pytest.mark.parametrize("coupling", ["orthogonal", "simplex"])
def test_block_coupled_directions(coupling):
    d = 12
    W = random_projection(2 * d + 5, d, coupling, torch.Generator().manual_seed(0))
    assert W.shape == (2 * d + 5, d)
    unit = W / W.norm(dim=1, keepdim=True)
    gram = unit[:d] @ unit[:d].T
    off = gram[~torch.eye(d, dtype=torch.bool)]
    want = 0.0 if coupling == "orthogonal" else -1.0 / (d - 1)
    torch.testing.assert_close(off, torch.full_like(off, want), atol=1e-12, rtol=0)


def test_projection_norms_follow_chi():
    # each row is N(0, I_d): |w|^2 has mean d and variance 2d; over n rows the mean has standard error sqrt(2d/n)
    d, n = 16, 4096
    W = random_projection(n, d, "orthogonal", torch.Generator().manual_seed(1))
    sq = W.square().sum(1)
    assert abs(sq.mean().item() - d) <= Z * (2 * d / n) ** 0.5


def test_default_num_features_and_seeds():
    assert FavorPlus(64).num_features == math.ceil(64 * math.log(64))
    torch.testing.assert_close(FavorPlus(8, 16, seed=3).projection, FavorPlus(8, 16, seed=3).projection)
    assert not torch.equal(FavorPlus(8, 16, seed=3).projection, FavorPlus(8, 16, seed=4).projection)


def test_redraw_every_interval_training_steps_and_never_between_q_and_k():
    phi = FavorPlus(8, 16, redraw_interval=2, seed=0).train()
    x = torch.randn(1, 4, 1, 8, requires_grad=True)
    seen = [phi.projection.clone()]
    for _ in range(4):
        fq, fk = phi(x), phi(x * 2)  # the query and key calls of one step share one projection
        torch.testing.assert_close(fq, phi.eval()(x).detach())  # no redraw inside a step
        phi.train()
        (fq.sum() + fk.sum()).backward()
        seen.append(phi.projection.clone())
        phi(x)  # the next step's first call counts the finished step
        seen[-1] = phi.projection.clone()
    changed = [not torch.equal(a, b) for a, b in zip(seen[:-1], seen[1:])]
    assert changed == [False, True, False, True], changed
    before = phi.projection.clone()
    phi.eval()
    for _ in range(3):
        phi(x).sum().backward()
        phi(x)
    assert torch.equal(before, phi.projection)  # eval mode never redraws


# ------------------------------------------------------------------------------------------ exact identities


def test_taylor_kernel_is_second_order_exp():
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    s = (x * y).sum(-1) * 5**-0.5
    phi = TaylorExp()
    assert phi(x).shape[-1] == TaylorExp.num_features(5) == 1 + 5 + 15
    torch.testing.assert_close((phi(x) * phi(y)).sum(-1), 1 + s + s**2 / 2)


def test_cosformer_kernel_and_position_offsets():
    B, T, H, K, M = 1, 9, 2, 4, 16
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    i = torch.arange(T, dtype=torch.float64)
    want = torch.einsum("bthk,bshk->bhts", q.relu(), k.relu()) * torch.cos(math.pi * (i[:, None] - i) / (2 * M))
    for start in (0, 37):
        phi = CosFormer(M, start=start)
        got = torch.einsum("bthm,bshm->bhts", phi(q), phi(k))
        torch.testing.assert_close(got, want)


def test_cosformer_packed_sequences_equal_separate_runs_and_continuation():
    T, H, K, V, M = 30, 2, 4, 3, 64
    q, k, v = torch.randn(1, T, H, K), torch.randn(1, T, H, K), torch.randn(1, T, H, V)
    phi = CosFormer(M)
    cu = torch.tensor([0, 12, 30])
    packed, _ = ops.linear_attn(q, k, v, phi, True, True, cu_seqlens=cu)
    parts = [ops.linear_attn(q[:, a:b], k[:, a:b], v[:, a:b], phi, True, True)[0] for a, b in ((0, 12), (12, 30))]
    torch.testing.assert_close(packed, torch.cat(parts, 1), rtol=1e-5, atol=1e-6)
    # continue a sequence from its state: the second call starts at position 12
    o1, s1 = ops.linear_attn(q[:, :12], k[:, :12], v[:, :12], phi, True, True, output_final_state=True)
    o2, _ = ops.linear_attn(q[:, 12:], k[:, 12:], v[:, 12:], CosFormer(M, start=12), True, True, initial_state=s1)
    whole, _ = ops.linear_attn(q, k, v, phi, True, True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), whole, rtol=1e-5, atol=1e-6)


def test_maps_are_modules_and_implied_attention_reproduces_the_op():
    B, T, H, K, V = 2, 11, 3, 8, 5
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for D in (K, K, V))
    maps = [
        FavorPlus(K, 16, seed=0),
        FavorPlus(K, 16, kernel="relu", seed=0),
        FavorPlusPlus(K, 16, seed=0),
        CosFormer(32),
        TaylorExp(),
        Hedgehog(K, H),
        Elementwise("elu1"),
    ]
    for phi in maps:
        assert isinstance(phi, torch.nn.Module)
        for causal in (False, True):
            o, _ = ops.linear_attn(q, k, v, phi, True, causal)
            A = kernel_attention(phi, q, k, causal, eps=1e-6, scale=K**-0.5)
            torch.testing.assert_close(torch.einsum("bhts,bshv->bthv", A, v), o)


# ------------------------------------------------------------------------------------------------ Performer vs softmax


def test_favor_plus_normalized_approximates_softmax_attn():
    # d = 16, logit std 0.125: per-pair relative variance ~ e^{|x + y|^2} - 1 ~ e - 1, so the row error at m = 4096
    # should be about sqrt(1.7 / 4096) ~ 0.02, while attending uniformly is off by sqrt(1 - e^{-tau^2}) ~ 0.125.
    q, k, v = audit.draw_inputs(16, 64, 0.125, seed=0, heads=2)
    exact, _ = ops.softmax_attn(q, k, v, causal=False)
    uniform = audit.uniform_rel_err(v, exact, causal=False)
    errs = []
    for m in (64, 4096):
        o, _ = ops.linear_attn(q, k, v, feature_map=FavorPlus(16, m, seed=0), normalize=True, causal=False)
        errs.append(((o - exact).norm(dim=-1) / exact.norm(dim=-1)).mean().item())
    assert errs[1] < errs[0] and errs[1] < uniform / 2, (errs, uniform)


def test_error_falls_as_m_grows():
    q, k, v = audit.draw_inputs(16, 128, 0.125, seed=0)
    result = audit.sweep("performer", q, k, v, [4, 16, 64, 256], seeds=4)
    errs = [r["rel_err_mean"] for r in result["sweep"]]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    # Monte Carlo error goes as m^(-1/2); allow the fit +-0.2 over four points and four seeds
    assert -0.7 < result["slope"] < -0.3, result["slope"]


def test_orthogonal_beats_iid_at_m_equal_d():
    q, k, v = audit.draw_inputs(16, 128, 0.125, seed=0)
    seeds = list(range(8))
    orth = audit.sweep("performer", q, k, v, [16], seeds)["sweep"][0]
    iid = audit.sweep("performer-iid", q, k, v, [16], seeds)["sweep"][0]
    assert orth["rel_err_mean"] < iid["rel_err_mean"], (orth, iid)


def test_favor_plus_plus_has_lower_error_than_favor_plus_at_high_temperature():
    q, k, v = audit.draw_inputs(64, 256, 0.5, seed=0)
    cal = audit.draw_inputs(64, 256, 0.5, seed=1)[:2]
    plus = audit.sweep("performer", q, k, v, [64, 256], 4)["sweep"]
    plusplus = audit.sweep("favor++", q, k, v, [64, 256], 4, calibration=cal)["sweep"]
    for a, b in zip(plus, plusplus):
        assert b["rel_err_mean"] < a["rel_err_mean"], (plus, plusplus)


# ------------------------------------------------------------------------------------------ causal: chunk vs naive


@pytest.mark.parametrize(
    "make_map",
    [
        lambda K: FavorPlus(K, K, seed=0),
        lambda K: FavorPlus(K, K, kernel="trig", seed=0),
        lambda K: FavorPlusPlus(K, K, seed=0).fit(torch.randn(32, K), torch.randn(32, K)),
    ],
    ids=["favor+", "favor+trig", "favor++"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_performer_chunk_matches_naive(make_map, dtype):
    K, V = 8, 5
    phi = make_map(K)
    case = Case("performer", ops.linear_attn, options=dict(feature_map=phi, normalize=True), state_extra=1)
    tensors, state = case.draw(2, 65, 2, K, V, dtype=dtype, seed=1)
    check_against_naive(case, tensors, state, "chunk")


# --------------------------------------------------------------------------------------------- half precision


def _norm_up_to_10(B, T, H, K, gen, dtype):
    x = torch.randn(B, T, H, K, generator=gen)
    radius = 10 * torch.rand(B, T, H, 1, generator=gen)
    radius[:, :4] = 10.0  # some tokens at exactly the largest norm
    return (x / x.norm(dim=-1, keepdim=True) * radius).to(dtype)


HALF_MAPS = {
    "favor+": lambda K, H: FavorPlus(K, 64, seed=0),
    "favor+trig": lambda K, H: FavorPlus(K, 64, kernel="trig", seed=0),
    # fitted on an independent draw of the inputs' distribution (norms up to 10)
    "favor++": lambda K, H: FavorPlusPlus(K, 64, seed=0).fit(
        _norm_up_to_10(1, 256, H, K, torch.Generator().manual_seed(5), torch.float32),
        _norm_up_to_10(1, 256, H, K, torch.Generator().manual_seed(6), torch.float32),
    ),
    "cosformer": lambda K, H: CosFormer(512),
    "taylor": lambda K, H: TaylorExp(),
    "hedgehog": lambda K, H: Hedgehog(K, H),
    "elu1": lambda K, H: Elementwise("elu1"),
}
POSITIVE = ("favor+", "favor++", "cosformer", "hedgehog", "elu1")


@pytest.mark.parametrize("name", list(HALF_MAPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_half_precision_is_finite_and_accurate(name, dtype, causal):
    B, T, H, K, V = 2, 100, 2, 16, 8
    gen = torch.Generator().manual_seed(0)
    q, k = _norm_up_to_10(B, T, H, K, gen, dtype), _norm_up_to_10(B, T, H, K, gen, dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    phi = HALF_MAPS[name](K, H)
    o, _ = ops.linear_attn(q, k, v, phi, True, causal)
    assert o.dtype == dtype
    if name == "favor+trig" and dtype == torch.float16:
        # sin/cos features are signed: the normaliser can cross zero, and the output is then as large as the
        # division makes it, beyond float16's range. The features themselves must stay finite.
        assert torch.isfinite(phi(q).to(dtype)).all() and torch.isfinite(phi(k).to(dtype)).all()
        return
    assert torch.isfinite(o).all()
    if name not in POSITIVE:
        return
    # Positive features f (query) and g (keys) rounded to the dtype have absolute errors <= u f + delta, with u the
    # unit roundoff and delta half the subnormal spacing. To first order each n_s = f^T g_s then moves by at most
    # 2u n_s + delta (|f|_1 + |g_s|_1), the normaliser Z = sum_s n_s by the sum of those, and o = sum_s n_s v_s / Z by
    # at most (max|v| + |o|) sum_s |dn_s| / Z; o's own rounding adds u |o| and the float32 sums T eps32 max|v|.
    # The reference is float64 on the same (already rounded) inputs.
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref, _ = ops.linear_attn(q64, k64, v64, phi, True, causal)
    f, g = phi(q64), phi(k64)  # [B, T, H, M]
    # the bound holds for features the dtype represents; the cap (LOG_CAP) would bias larger ones
    assert max(f.max().item(), g.max().item()) < math.exp(LOG_CAP.get(dtype, LOG_CAP_DEFAULT))
    seen = torch.ones(T, T, dtype=torch.float64).tril() if causal else torch.ones(T, T, dtype=torch.float64)
    Z = torch.einsum("bthm,bshm,ts->bth", f, g, seen)
    l1 = torch.einsum("bshm,ts->bth", g, seen) + seen.sum(1).view(1, T, 1) * f.sum(-1)
    u = torch.finfo(dtype).eps / 2
    delta = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
    vmax = v64.abs().max()
    rel = (2 * u + delta * l1 / Z)[..., None]
    bound = (vmax + ref.abs()) * rel + u * ref.abs() + T * torch.finfo(torch.float32).eps * vmax
    excess = ((o.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"{name} {dtype}: error exceeds the rounding bound by {excess:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "make_map",
    [
        lambda K: FavorPlus(K, 32, seed=0),
        lambda K: FavorPlus(K, 32, kernel="trig", seed=0),
        lambda K: FavorPlusPlus(K, 32, seed=0),
    ],
    ids=["favor+", "trig", "favor++"],
)
def test_half_precision_adversarial_alignment_stays_finite(make_map, dtype):
    # inputs of norm 10 aligned with the longest projection row: the largest log-feature any such input reaches
    B, T, H, K = 1, 40, 1, 16
    phi = make_map(K)
    row = phi.projection[phi.projection.norm(dim=1).argmax()]
    x = (10 * row / row.norm()).expand(B, T, H, K).to(dtype)
    o, _ = ops.linear_attn(x, x, torch.randn(B, T, H, 4).to(dtype), phi, True, True)
    assert torch.isfinite(o).all()


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "build, err, words",
    [
        (lambda: FavorPlus(0), ValueError, ["head_dim", "0"]),
        (lambda: FavorPlus(8, 0), ValueError, ["num_features", "0"]),
        (lambda: FavorPlus(8, 7, kernel="trig"), ValueError, ["trig", "7"]),
        (lambda: FavorPlus(8, kernel="gauss"), ValueError, ["kernel", "gauss"]),
        (lambda: FavorPlus(8, redraw_interval=0), ValueError, ["redraw_interval"]),
        (lambda: FavorPlusPlus(8, coupling="tight"), ValueError, ["coupling", "tight"]),
        (lambda: CosFormer(0), ValueError, ["horizon"]),
        (lambda: FavorPlus(8, seed=1, generator=torch.Generator()), ValueError, ["seed", "generator"]),
        (lambda: FavorPlus(8, 16, seed=0)(torch.randn(2, 3, 4, 9)), ValueError, ["head_dim = 8", "[2, 3, 4, 9]"]),
        (lambda: FavorPlus(8, 16, seed=0)(torch.ones(2, 8, dtype=torch.long)), TypeError, ["torch.int64"]),
        (lambda: Hedgehog(8, 3)(torch.randn(1, 2, 4, 8)), ValueError, ["H = 3", "[1, 2, 4, 8]"]),
        (lambda: FavorPlusPlus(8).fit(torch.randn(0, 8), torch.randn(3, 8)), ValueError, ["at least one token"]),
    ],
    ids=[
        "head_dim",
        "num_features",
        "trig-odd",
        "kernel",
        "redraw",
        "coupling",
        "horizon",
        "seed+generator",
        "input-K",
        "input-dtype",
        "hedgehog-H",
        "fit-empty",
    ],
)
def test_bad_input(build, err, words):
    with pytest.raises(err) as info:
        build()
    for w in words:
        assert w in str(info.value)
