"""How far an approximation of softmax attention is from the real thing, measured on given or random q, k, v.

``sweep`` runs a mechanism at several numbers of features m (Linformer: its k rows) and several seeds, against
exact softmax attention on the same inputs, and reports per query row:

- rel_err: |o - o_exact| / |o_exact| (o from the library op: ``linear_attn`` with the map, or ``linformer``);
- tv: the total-variation distance 1/2 sum_s |A_ts - P_ts| between the attention row the mechanism implies (A,
  with o = A v) and softmax's (P);
- topk_overlap: the fraction of softmax's top-k keys that are also among A's top k;
- outside_mass: the weight A gives to keys outside softmax's top k (softmax itself gives ``exact_outside_mass``).

Each is averaged over query rows (and batch and heads); the sweep reports the mean and the spread over seeds.
``uniform_rel_err`` is the error of attending uniformly to every visible key: a mechanism at or above it is no
longer an approximation of softmax at these inputs. ``linattn audit`` (linattn/cli/audit.py) is the command.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from linattn import ops
from linattn.feature_maps import (
    CosFormer,
    Elementwise,
    FavorPlus,
    FavorPlusPlus,
    Hedgehog,
    TaylorExp,
    fit_hedgehog,
    kernel_attention,
    softmax_attention_weights,
    visible_mask,
)

# name -> what it is; the first group sweeps m, the second has a fixed number of features.
MECHANISMS = {
    "performer": "FAVOR+, positive features, block-orthogonal projections",
    "performer-iid": "FAVOR+, positive features, iid projections",
    "performer-trig": "FAVOR+, sin/cos features (m/2 frequencies)",
    "performer-relu": "Performer's generalised ReLU kernel (not softmax's kernel)",
    "favor++": "generalised exponential positive features fitted to the data, simplex-coupled (FavorPlusPlus)",
    "linformer": "Linformer: softmax over k projected keys and values (random projections, untrained)",
    "hedgehog": "Hedgehog's learned map, 2F = m features, distilled on a calibration draw",
    "cosformer": "cosFormer: relu with the cos re-weighting, 2K features",
    "taylor": "Based: 2nd-order Taylor expansion of exp, 1 + K + K(K+1)/2 features",
    "elu": "elu(x) + 1, K features",
    "relu": "relu(x), K features",
}
FIXED_FEATURES = ("cosformer", "taylor", "elu", "relu")
LINFORMER_PROJECTIONS = ("gaussian", "sample")
EPS = 1e-6  # linear_attn's default eps: the audit measures what users get
# Mechanism seeds are offset from data seeds: torch's generator seeded alike for the data and an iid projection
# would draw projection rows equal to the first queries, and every estimate would be biased by that alignment.
# (torch's CPU generator keeps only the low 32 bits of a seed, so the offset must change those.)
FEATURE_SEED_OFFSET = 0x9E3779B9


FITTED = ("favor++", "hedgehog")  # the mechanisms whose maps are fitted to calibration queries and keys


def hold_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Split inputs [B, T, H, D] into a part to fit on and a disjoint part to audit on (``sweep``'s default).

    With two or more rows (B >= 2) the first B // 2 rows fit and the rest are audited; with one row the first
    T // 2 tokens fit and the remaining tokens are audited, as a sequence of their own. Returns
    ((q_fit, k_fit), (q, k, v) to audit, a description of the split).
    """
    B, T = q.shape[:2]
    if B >= 2:
        n = B // 2
        return (q[:n], k[:n]), (q[n:], k[n:], v[n:]), f"fitted on rows [0, {n}), audited on rows [{n}, {B})"
    if T < 2:
        raise ValueError(f"--input: holding out tokens to fit on needs T >= 2 tokens, got q {list(q.shape)}")
    n = T // 2
    split = f"fitted on tokens [0, {n}), audited on tokens [{n}, {T})"
    return (q[:, :n], k[:, :n]), (q[:, n:], k[:, n:], v[:, n:]), split


def check_mechanism(name: str) -> None:
    if name not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {sorted(MECHANISMS)}, got {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def draw_inputs(
    head_dim: int,
    seq_len: int,
    temperature: float = 0.25,
    *,
    seed: int = 0,
    batch: int = 1,
    heads: int = 1,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float64,
):
    """Random q, k [B, T, H, K] and v [B, T, H, V] with logits scale q^T k of standard deviation ``temperature``.

    q, k ~ N(0, tau I): q^T k has variance K tau^2, and scale = K^-0.5 makes the logits' variance tau^2.
    v ~ N(0, I). Returns (q, k, v) in ``dtype``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    for name, val in (("head_dim", head_dim), ("seq_len", seq_len), ("batch", batch), ("heads", heads)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    gen = torch.Generator().manual_seed(seed)
    V = head_dim if value_dim is None else value_dim
    std = math.sqrt(temperature)
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=torch.float64) * std
    k = torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=torch.float64) * std
    v = torch.randn(batch, seq_len, heads, V, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def load_inputs(path: str, dtype: torch.dtype = torch.float64):
    """q, k, v from a file: a ``.safetensors`` file or a ``torch.save`` dict, with keys "q", "k" and "v".

    Each tensor is [B, T, H, D], or [T, H, D] (B = 1), or [T, D] (B = H = 1). Returns (q, k, v) in ``dtype``.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not all(key in data for key in ("q", "k", "v")):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with tensors 'q', 'k' and 'v', got {got}")
    out = []
    for key in ("q", "k", "v"):
        x = data[key]
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3, 4):
            raise ValueError(
                f"{path}: {key} must be a [B, T, H, D], [T, H, D] or [T, D] tensor, "
                f"got {getattr(x, 'shape', type(x).__name__)}"
            )
        x = x[:, None] if x.ndim == 2 else x
        out.append((x[None] if x.ndim == 3 else x).to(dtype))
    return tuple(out)


def logit_std(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> float:
    """The standard deviation of scale q_t^T k_s over all pairs (the inputs' temperature)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (torch.einsum("bthk,bshk->bhts", q.double(), k.double()) * scale).std().item()


# ---------------------------------------------------------------------------------------------------------------------
# Mechanisms: the output through the library op, and the implied attention matrix


@dataclass
class Mechanism:
    """One instance (one m, one seed) of a mechanism."""

    name: str
    features: int  # M for a feature map, k for Linformer
    run: Callable  # (q, k, v) -> o [B, T, H, V]
    attention: Callable  # (q, k) -> A [B, H, T, T] with o = A v


def _feature_mechanism(name: str, phi, features: int, causal: bool) -> Mechanism:
    def run(q, k, v):
        return ops.linear_attn(q, k, v, phi, True, causal, eps=EPS)[0]

    def attention(q, k):
        return kernel_attention(phi, q, k, causal, eps=EPS, scale=q.shape[-1] ** -0.5)

    return Mechanism(name, features, run, attention)


def linformer_projection(kind: str, rows: int, n: int, seed: int) -> torch.Tensor:
    """[rows, n] float64: "gaussian" entries N(0, 1/rows) (Linformer's analysis), or "sample": rows distinct
    tokens drawn uniformly (each row one-hot), which makes softmax over the projection a self-normalised
    estimate of exact attention from a sample of keys (exact when rows = n)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, n, generator=gen, dtype=torch.float64) / math.sqrt(rows)
    if kind == "sample":
        if rows > n:
            raise ValueError(f"linformer projection 'sample' needs k <= n, got k = {rows} > n = {n}")
        idx = torch.randperm(n, generator=gen)[:rows].sort().values
        return torch.nn.functional.one_hot(idx, n).to(torch.float64)
    raise ValueError(f"linformer projection must be one of {LINFORMER_PROJECTIONS}, got {kind!r}")


def _linformer_mechanism(rows: int, seed: int, n: int, projection: str, causal: bool) -> Mechanism:
    if causal:
        raise ValueError("linformer has no causal form: its projection mixes future tokens into every row")
    P = linformer_projection(projection, rows, n, seed)

    def run(q, k, v):
        return ops.linformer(q, k, v, P.to(q.dtype), P.to(q.dtype))[0]

    def attention(q, k):
        Pq = P.to(q.dtype)
        kp = torch.einsum("rt,bthd->brhd", Pq, k)
        probs = (torch.einsum("bthd,brhd->bhtr", q, kp) * q.shape[-1] ** -0.5).softmax(-1)
        return probs @ Pq  # [B, H, T, n]: o = softmax(.) (F v) = (softmax(.) F) v

    return Mechanism("linformer", rows, run, attention)


def build(
    name: str,
    m: int,
    seed: int,
    *,
    head_dim: int,
    heads: int,
    seq_len: int,
    causal: bool,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    projection: str = "gaussian",
    hedgehog_steps: int = 200,
) -> Mechanism:
    """The mechanism ``name`` with m features (or k rows), drawn with ``seed``.

    ``calibration`` (q, k) is what favor++ fits its parameters to and what hedgehog is distilled on.
    The random draws use the generator seeded with FEATURE_SEED_OFFSET + seed.
    """
    check_mechanism(name)
    seed = FEATURE_SEED_OFFSET + seed
    if name == "linformer":
        return _linformer_mechanism(m, seed, seq_len, projection, causal)
    if name in ("performer", "performer-iid", "performer-trig", "performer-relu"):
        kernel = {"performer-trig": "trig", "performer-relu": "relu"}.get(name, "softmax")
        phi = FavorPlus(head_dim, m, orthogonal=name != "performer-iid", kernel=kernel, seed=seed)
        return _feature_mechanism(name, phi, m, causal)
    if name == "favor++":
        phi = FavorPlusPlus(head_dim, m, seed=seed)
        if calibration is not None:
            phi.fit(*calibration)
        return _feature_mechanism(name, phi, m, causal)
    if name == "hedgehog":
        if m % 2:
            raise ValueError(f"hedgehog has 2F features; m must be even, got {m}")
        phi = Hedgehog(head_dim, heads, m // 2, seed=seed)
        if calibration is not None and hedgehog_steps > 0:
            cq, ck = (x.float() for x in calibration)
            fit_hedgehog(phi, cq, ck, steps=hedgehog_steps, causal=causal)
        phi.requires_grad_(False)
        return _feature_mechanism(name, phi, m, causal)
    if name == "cosformer":
        return _feature_mechanism(name, CosFormer(horizon=seq_len), 2 * head_dim, causal)
    if name == "taylor":
        return _feature_mechanism(name, TaylorExp(), TaylorExp.num_features(head_dim), causal)
    return _feature_mechanism(name, Elementwise("elu1" if name == "elu" else "relu"), head_dim, causal)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def row_metrics(
    o: torch.Tensor, o_exact: torch.Tensor, A: torch.Tensor, P: torch.Tensor, causal: bool, topk: int
) -> dict[str, torch.Tensor]:
    """Per query row: rel_err [B, T, H]; tv, topk_overlap, outside_mass, exact_outside_mass [B, H, T].

    o, o_exact: [B, T, H, V]; A, P: [B, H, T, S] (S = T; A may be signed). With causal rows, row t has t + 1 keys
    and the top k is the top min(k, t + 1).
    """
    rel_err = (o.double() - o_exact.double()).norm(dim=-1) / o_exact.double().norm(dim=-1)
    A, P = A.double(), P.double()
    tv = 0.5 * (A - P).abs().sum(-1)
    T, S = P.shape[-2], P.shape[-1]
    visible = visible_mask(T, causal, P.device) if S == T else torch.ones(T, S, dtype=torch.bool, device=P.device)
    k_eff = visible.sum(-1).clamp(max=topk)  # [T]
    top_p = torch.zeros_like(P, dtype=torch.bool).scatter_(-1, P.topk(min(topk, S), dim=-1).indices, True)
    top_a = torch.zeros_like(A, dtype=torch.bool).scatter_(
        -1, A.masked_fill(~visible, float("-inf")).topk(min(topk, S), dim=-1).indices, True
    )
    top_p, top_a = top_p & visible, top_a & visible
    overlap = (top_p & top_a).sum(-1) / k_eff
    outside = (A * ~top_p).sum(-1)
    exact_outside = (P * ~top_p).sum(-1)
    return dict(rel_err=rel_err, tv=tv, topk_overlap=overlap, outside_mass=outside, exact_outside_mass=exact_outside)


def exact_attention(q, k, v, causal: bool):
    """(o_exact from ``ops.softmax_attn``, P [B, H, T, T]) in q's dtype (use float64 for audits)."""
    o, _ = ops.softmax_attn(q, k, v, causal=causal)
    return o, softmax_attention_weights(q, k, causal)


def uniform_rel_err(v: torch.Tensor, o_exact: torch.Tensor, causal: bool) -> float:
    """Mean row error of attending uniformly to every visible key (the output mean of v, running when causal)."""
    T = v.shape[1]
    if causal:
        o = v.double().cumsum(1) / torch.arange(1, T + 1, dtype=torch.float64, device=v.device).view(1, T, 1, 1)
    else:
        o = v.double().mean(1, keepdim=True).expand_as(v)
    return ((o - o_exact.double()).norm(dim=-1) / o_exact.double().norm(dim=-1)).mean().item()


def measure(mech: Mechanism, q, k, v, o_exact, P, causal: bool, topk: int) -> dict[str, float]:
    """Row means of ``row_metrics`` for one mechanism instance."""
    o = mech.run(q, k, v)
    A = mech.attention(q, k)
    return {key: val.mean().item() for key, val in row_metrics(o, o_exact, A, P, causal, topk).items()}


def fit_slope(ms: Sequence[float], errs: Sequence[float]) -> float | None:
    """Least-squares slope of log(err) against log(m); None with fewer than two distinct m."""
    pts = [(math.log(m), math.log(e)) for m, e in zip(ms, errs) if e > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5


def sweep(
    mechanism: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    features: Sequence[int],
    seeds: int | Sequence[int] = 5,
    *,
    causal: bool = False,
    topk: int = 8,
    temperature: float | None = None,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    projection: str = "gaussian",
    hedgehog_steps: int = 200,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Audit ``mechanism`` on q, k [B, T, H, K] and v [B, T, H, V] (float64 recommended) against softmax attention.

    Args:
        features: the m (Linformer: k) to sweep; ignored by the mechanisms with a fixed number of features
            (cosformer, taylor, elu, relu), which report one entry at their own M.
        seeds: a count (seeds 0 .. n-1) or the seeds themselves: each draws the mechanism's randomness; the
            deterministic mechanisms run once.
        causal: compare causal attention (Linformer refuses).
        topk: k for the top-k overlap and the outside mass.
        temperature: recorded in the result; defaults to the inputs' measured logit standard deviation.
        calibration: (q, k) that favor++ fits to and hedgehog trains on. When None, they fit a held-out part of
            the inputs (``hold_out``) and the rest is audited: a map is never fitted on what it is measured on.
        projection: Linformer's projection, "gaussian" or "sample" (see ``linformer_projection``).
        hedgehog_steps: distillation steps for hedgehog.
        progress: called with a line of text after each point.

    Returns: {"mechanism", "head_dim", "seq_len", "temperature", "sweep": [{"m", "rel_err_mean", "rel_err_std",
        "tv_mean", "tv_std", "topk_overlap_mean", "outside_mass_mean", "exact_outside_mass"}, ...],
        "causal", "topk", "seeds", "uniform_rel_err", "slope"} where the means are over seeds of row means, the
        stds over seeds, and slope is the fitted log-log slope of rel_err_mean against m.
    """
    check_mechanism(mechanism)
    fitted_on = None
    if mechanism in FITTED:
        if calibration is None:
            calibration, (q, k, v), fitted_on = hold_out(q, k, v)
        else:
            fitted_on = "the calibration inputs given"
    B, T, H, K = q.shape
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("seeds must name at least one seed")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    fixed = mechanism in FIXED_FEATURES
    ms = [None] if fixed else sorted(set(int(m) for m in features))
    if not fixed and (not ms or ms[0] < 1):
        raise ValueError(f"features must be positive ints, got {list(features)}")
    if fixed:
        seed_list = seed_list[:1]
    o_exact, P = exact_attention(q, k, v, causal)
    rows = []
    for m in ms:
        per_seed = []
        for seed in seed_list:
            mech = build(
                mechanism,
                m or K,
                seed,
                head_dim=K,
                heads=H,
                seq_len=T,
                causal=causal,
                calibration=calibration,
                projection=projection,
                hedgehog_steps=hedgehog_steps,
            )
            per_seed.append(measure(mech, q, k, v, o_exact, P, causal, topk))
        rel_mean, rel_std = _mean_std([r["rel_err"] for r in per_seed])
        tv_mean, tv_std = _mean_std([r["tv"] for r in per_seed])
        rows.append(
            {
                "m": mech.features,
                "rel_err_mean": rel_mean,
                "rel_err_std": rel_std,
                "tv_mean": tv_mean,
                "tv_std": tv_std,
                "topk_overlap_mean": _mean_std([r["topk_overlap"] for r in per_seed])[0],
                "outside_mass_mean": _mean_std([r["outside_mass"] for r in per_seed])[0],
                "exact_outside_mass": per_seed[0]["exact_outside_mass"],
            }
        )
        if progress is not None:
            progress(f"{mechanism} m={mech.features}: rel_err {rel_mean:.4g} +- {rel_std:.2g}, tv {tv_mean:.4g}")
    return {
        "mechanism": mechanism,
        "head_dim": K,
        "seq_len": T,
        "temperature": float(temperature) if temperature is not None else logit_std(q, k),
        "sweep": rows,
        "causal": bool(causal),
        "topk": topk,
        "seeds": seed_list,
        "uniform_rel_err": uniform_rel_err(v, o_exact, causal),
        "slope": fit_slope([r["m"] for r in rows], [r["rel_err_mean"] for r in rows]),
    } | ({"calibration": fitted_on} if fitted_on is not None else {})


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def format_table(result: dict) -> str:
    """The sweep as a plain-text table, with the uniform-attention line and the fitted slope."""
    head = (
        f"{result['mechanism']}: head_dim={result['head_dim']} seq_len={result['seq_len']} "
        f"temperature={result['temperature']:.4g} causal={result['causal']} seeds={len(result['seeds'])}"
    )
    cols = f"{'m':>6} {'rel_err':>9} {'+-':>8} {'tv':>8} {'top' + str(result['topk']):>6} {'outside':>8}"
    lines = [head, cols]
    for r in result["sweep"]:
        flag = "  (>= uniform: not an approximation here)" if r["rel_err_mean"] >= result["uniform_rel_err"] else ""
        lines.append(
            f"{r['m']:>6} {r['rel_err_mean']:>9.4f} {r['rel_err_std']:>8.4f} {r['tv_mean']:>8.4f} "
            f"{r['topk_overlap_mean']:>6.3f} {r['outside_mass_mean']:>8.4f}{flag}"
        )
    exact_out = result["sweep"][0]["exact_outside_mass"] if result["sweep"] else float("nan")
    lines.append(
        f"uniform attention rel_err {result['uniform_rel_err']:.4f}; softmax's own mass outside its "
        f"top {result['topk']}: {exact_out:.4f}"
    )
    if result["slope"] is not None:
        lines.append(f"fitted log-log slope of rel_err against m: {result['slope']:.3f} (FAVOR+ theory: -0.5)")
    return "\n".join(lines)


def plot_sweeps(results: Sequence[dict], path: str, title: str | None = None) -> None:
    """Error against m on log-log axes, one line per result, with the m^(-1/2) reference slope and the
    uniform-attention error as a horizontal line. Writes a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    all_m = [r["m"] for res in results for r in res["sweep"]]
    for res in results:
        ms = [r["m"] for r in res["sweep"]]
        errs = [r["rel_err_mean"] for r in res["sweep"]]
        stds = [r["rel_err_std"] for r in res["sweep"]]
        label = res["mechanism"] + (f" (slope {res['slope']:.2f})" if res["slope"] is not None else "")
        ax.errorbar(ms, errs, yerr=stds, marker="o", ms=4, capsize=2, label=label)
    first = next((res for res in results if len(res["sweep"]) > 1), results[0] if results else None)
    if first is not None and first["sweep"]:
        m0, e0 = first["sweep"][0]["m"], first["sweep"][0]["rel_err_mean"]
        xs = [min(all_m), max(all_m)]
        ax.plot(xs, [e0 * (x / m0) ** -0.5 for x in xs], "k--", lw=1, label="m^(-1/2) reference")
        ax.axhline(first["uniform_rel_err"], color="grey", ls=":", lw=1, label="uniform attention")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("features m (Linformer: rows k)")
    ax.set_ylabel("mean row |o - o_exact| / |o_exact|")
    if first is not None:
        ax.set_title(
            title or f"d={first['head_dim']}, T={first['seq_len']}, logit std {first['temperature']:.3g}", fontsize=10
        )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
