"""Feature maps phi(x) for kernel linear attention: phi(q)^T phi(k) stands in for a similarity.

Each map takes [..., K] and returns [..., M]; ``linattn.ops.linear_attn(feature_map=...)`` applies one map
to q and to k, each a whole [B, T, H, K] tensor. The plain maps are functions, and ``get_feature_map``
turns their names into them. The rest are nn.Modules:

- ``FavorPlus``: Performer's random features for the softmax kernel (positive or sin/cos), or the
  generalised ReLU kernel.
- ``FavorPlusPlus``: lower-variance positive random features for the softmax kernel: generalised
  exponential features with parameters fitted to the data, in the data's eigenbasis, with simplex-coupled
  projections.
- ``CosFormer``: ReLU with cosFormer's cos re-weighting by position.
- ``TaylorExp``: Based's second-order Taylor expansion of exp.
- ``Hedgehog``: a learnable per-head map, trained by ``hedgehog_distill_loss`` to mimic softmax.

The softmax maps follow the op's scale convention: exact attention is softmax(scale q k^T) with
scale = K^-0.5, so each map multiplies its input by scale^(1/2) and phi(q)^T phi(k) estimates
exp(scale q^T k). With ``normalize=True`` the op then estimates ``softmax_attn`` on the same q, k, v.

Numerics. Random-feature maps compute in float32 (float64 for float64 input) and return float32; the
op casts them to v's dtype. They use no data-dependent stabiliser: a shift of the log-features that
looks at the data would have to be shared by every key a query reads (so, in the causal case, it
would look at future tokens), and a per-token shift of the keys biases the estimate. Plain features
need none: for an input that is not aligned with one projection row, the largest log-feature is about
ln(m), and the normaliser is ~T exp(logit), far above the op's eps. A fixed cap on the log-features
(``LOG_CAP``) keeps adversarial inputs finite: 11 for float16 input (e^11 < 65504, the largest
float16), 30 otherwise (so that products and sums over 10^6 tokens stay inside float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------------
# Plain maps


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def elu1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1, positive everywhere (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


class Elementwise(nn.Module):
    """A plain map as an nn.Module: ``Elementwise("elu1")``."""

    def __init__(self, name: str):
        super().__init__()
        if name not in FEATURE_MAPS:
            raise ValueError(f"Elementwise: name must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FEATURE_MAPS[self.name](x)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity,
    "elu1": elu1,
    "relu": relu,
}


def get_feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(feature_map):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]
    raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces

LOG_CAP = {torch.float16: 11.0}
LOG_CAP_DEFAULT = 30.0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _capped_exp(log_f: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    return torch.exp(log_f.clamp(max=LOG_CAP.get(input_dtype, LOG_CAP_DEFAULT)))


def _check_input(name: str, x, head_dim: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: input must be a floating torch.Tensor [..., K], got {what}")
    if x.ndim == 0 or x.shape[-1] != head_dim:
        raise ValueError(f"{name}: input must be [..., K] with K = head_dim = {head_dim}, got shape {list(x.shape)}")


# Added to a seed before seeding a map's generator, so that a map and data drawn from the same seed do not share
# one stream (an iid projection's rows would equal the first queries). torch keeps a seed's low 32 bits.
SEED_MIX = 0x9E3779B9


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((int(seed) + SEED_MIX) % 2**64)
    return gen


def _haar_rotation(d: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random d x d orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal)."""
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


COUPLINGS = ("iid", "orthogonal", "simplex")


def random_projection(m: int, d: int, coupling: str, gen: torch.Generator) -> torch.Tensor:
    """[m, d] float64 rows, each marginally N(0, I_d), drawn in blocks of d with the given coupling.

    - "iid": independent Gaussian rows.
    - "orthogonal": each block is the rows of a random orthogonal matrix, each row scaled by an independent
      chi(d) norm, so that rows are exactly orthogonal and each is still N(0, I_d) (Performer's ORF).
    - "simplex": each block's d directions are the vertices of a regular simplex (pairwise cosine -1/(d-1)),
      randomly rotated, with chi(d) norms: the most negatively correlated directions a block can hold,
      which lowers the variance of positive random features further than orthogonality (simplex random
      features, Reid et al., 2023).
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    if coupling == "iid":
        return torch.randn(m, d, generator=gen, dtype=torch.float64)
    blocks = []
    if coupling == "simplex":
        simplex = torch.eye(d, dtype=torch.float64) - 1.0 / d  # rows sum to the centroid-free vertices
        simplex = simplex / simplex.norm(dim=1, keepdim=True) if d > 1 else torch.ones(1, 1, dtype=torch.float64)
    for _ in range(-(-m // d)):
        rotation = _haar_rotation(d, gen)
        blocks.append(rotation.T if coupling == "orthogonal" else simplex @ rotation)
    directions = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1)  # chi(d)
    return directions * norms[:, None]


def default_num_features(head_dim: int) -> int:
    """m = ceil(d ln d), Performer's default (at least 1)."""
    return max(1, math.ceil(head_dim * math.log(head_dim))) if head_dim > 1 else 1


class RandomFeatureMap(nn.Module):
    """Base of the random-feature maps: a projection buffer, ``redraw()`` and automatic redraws.

    With ``redraw_interval=n`` a new projection is drawn every n training steps. A training step is a
    forward pass in training mode whose features are then back-propagated: the backward pass marks the
    step, and the next forward call (the query call of the next step) counts it and redraws, so that q and
    k within one step always share one projection.
    """

    def __init__(
        self,
        head_dim: int,
        num_features: int,
        redraw_interval: int | None,
        seed: int | None,
        generator: torch.Generator | None,
    ):
        super().__init__()
        name = type(self).__name__
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"{name}: head_dim must be a positive int, got {head_dim!r}")
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if redraw_interval is not None and (
            isinstance(redraw_interval, bool) or not isinstance(redraw_interval, int) or redraw_interval < 1
        ):
            raise ValueError(f"{name}: redraw_interval must be a positive int or None, got {redraw_interval!r}")
        self.head_dim, self.num_features, self.redraw_interval = head_dim, num_features, redraw_interval
        self.generator = _make_generator(seed, generator)
        self.steps = 0  # training steps counted since construction
        self._step_pending = False

    def _draw(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection (from ``generator``, else from the map's own generator)."""
        if generator is not None:
            self.generator = generator
        new = self._draw().to(self.projection.device, self.projection.dtype)
        self.projection.copy_(new)

    def _count_step(self) -> None:
        if self._step_pending:
            self._step_pending = False
            self.steps += 1
            if self.redraw_interval is not None and self.steps % self.redraw_interval == 0:
                self.redraw()

    def _mark_step(self, out: torch.Tensor) -> torch.Tensor:
        if self.training and self.redraw_interval is not None and out.requires_grad:

            def hook(grad):
                self._step_pending = True
                return grad

            out.register_hook(hook)
        return out

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, redraw_interval={self.redraw_interval}"


# ---------------------------------------------------------------------------------------------------------------------
# FAVOR+


class FavorPlus(RandomFeatureMap):
    """Performer's FAVOR+ (Choromanski et al., 2021) as a feature map.

    kernel="softmax": positive random features phi(x) = exp(W x - |x|^2/2) / sqrt(m) of x = scale^(1/2) x_in,
    so that E[phi(q)^T phi(k)] = exp(scale q^T k) exactly.
    kernel="trig": phi(x) = exp(|x|^2/2) / sqrt(m/2) [sin(W x), cos(W x)] with m/2 frequencies (same
    expectation, but signed: the normaliser can come near zero).
    kernel="relu": Performer's generalised attention with f = ReLU, phi(x) = relu(W x) / sqrt(m); its kernel
    is not softmax's (it is the arc-cosine kernel).

    Args:
        head_dim: K, the last dimension of the input.
        num_features: m, the output dimension (for "trig", m must be even); defaults to ceil(K ln K).
        orthogonal: block-orthogonal rows with chi(K) norms (True) or iid Gaussian rows (False).
        kernel: "softmax", "trig" or "relu".
        redraw_interval: draw a new W every that many training steps (see ``RandomFeatureMap``); None: never.
        scale: the attention scale; defaults to K^-0.5.
        seed, generator: the source of the draws (one of them; neither: a fresh random seed).

    Call: x [..., K] (any floating dtype) -> [..., m] float32 (float64 for float64 input).
    """

    KERNELS = ("softmax", "trig", "relu")

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        orthogonal: bool = True,
        kernel: str = "softmax",
        redraw_interval: int | None = None,
        *,
        scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        num_features = default_num_features(head_dim) if num_features is None else num_features
        super().__init__(head_dim, num_features, redraw_interval, seed, generator)
        if kernel not in self.KERNELS:
            raise ValueError(f"FavorPlus: kernel must be one of {self.KERNELS}, got {kernel!r}")
        if kernel == "trig" and num_features % 2:
            raise ValueError(f"FavorPlus: kernel='trig' needs an even num_features (sin and cos), got {num_features}")
        self.kernel, self.orthogonal = kernel, bool(orthogonal)
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.register_buffer("projection", self._draw().float())  # [rows, K]

    def _draw(self) -> torch.Tensor:
        rows = self.num_features // 2 if self.kernel == "trig" else self.num_features
        return random_projection(rows, self.head_dim, "orthogonal" if self.orthogonal else "iid", self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("FavorPlus", x, self.head_dim)
        self._count_step()
        dtype = _compute_dtype(x)
        xs = x.to(dtype) * self.scale**0.5
        proj = xs @ self.projection.to(dtype).T  # [..., rows]
        rows = proj.shape[-1]
        if self.kernel == "relu":
            out = F.relu(proj) / math.sqrt(rows)
        elif self.kernel == "softmax":
            out = _capped_exp(proj - xs.square().sum(-1, keepdim=True) / 2 - 0.5 * math.log(rows), x.dtype)
        else:
            magnitude = _capped_exp(xs.square().sum(-1, keepdim=True) / 2 - 0.5 * math.log(rows), x.dtype)
            out = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1) * magnitude
        return self._mark_step(out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel!r}, orthogonal={self.orthogonal}"


# ---------------------------------------------------------------------------------------------------------------------
# Lower-variance positive features


def optimal_gerf_a(lam: torch.Tensor) -> torch.Tensor:
    """The variance-minimising a for a direction in which the data has E[(x + y)_i^2] = lam.

    Generalised exponential features f(x, w) = D exp(a w^2 + b w x - x^2/2), w ~ N(0, 1), are unbiased for
    exp(x y) when b = sqrt(1 - 4a) and D = (1 - 4a)^(1/4). The log of their second moment is
        ln(1 - 4a) - ln(1 - 8a)/2 + 2 s (1 - 4a) / (1 - 8a) - x^2 - y^2,      s = (x + y)^2,
    whose derivative in a vanishes where 16 a^2 + (4 s - 2) a - s = 0; the root below 1/8 is
        a = (1 - 2 s - sqrt((2 s + 1)^2 + 8 s)) / 16   (<= 0; a = 0 is FAVOR+).
    Averaging the log second moment over the data replaces s by its mean, lam.
    """
    lam = lam.clamp(min=0)
    return (1 - 2 * lam - torch.sqrt((2 * lam + 1) ** 2 + 8 * lam)) / 16


class FavorPlusPlus(RandomFeatureMap):
    """Positive random features for the softmax kernel with lower variance than FAVOR+.

    phi(x) = D exp(w^T A w + w^T B x - |x|^2/2) / sqrt(m), x = scale^(1/2) x_in, for m draws of w ~ N(0, I):
    the generalised exponential features of FAVOR++ (Likhosherstov et al., 2022), written in the data's
    eigenbasis as in the symmetric dense features of FAVOR# (Likhosherstov et al., 2023). With
    A = U diag(a) U^T, B = U diag(sqrt(1 - 4a)) U^T and D = prod (1 - 4 a_i)^(1/4), the expectation
    factorises per eigendirection and E[phi(q)^T phi(k)] = exp(scale q^T k) exactly, for any a_i < 1/8.
    ``fit(q, k)`` sets U and a_i from the second moments of x + y (``optimal_gerf_a``); before any fit a = 0
    and the map is FAVOR+ with the chosen coupling. The projections are simplex-coupled by default.

    Causal use: fit on past data (earlier batches, a calibration set), never on the sequence being attended:
    a fit on it would let every output depend on the second moments of future tokens.

    Args:
        head_dim: K.
        num_features: m; defaults to ceil(K ln K).
        coupling: "simplex" (default), "orthogonal" or "iid" (see ``random_projection``).
        dense: fit one a per eigendirection of the data (True), or one a for all directions (isotropic).
        redraw_interval, scale, seed, generator: as in ``FavorPlus``.

    Call: x [..., K] -> [..., m] float32 (float64 for float64 input).
    """

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        coupling: str = "simplex",
        dense: bool = True,
        redraw_interval: int | None = None,
        *,
        scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        num_features = default_num_features(head_dim) if num_features is None else num_features
        super().__init__(head_dim, num_features, redraw_interval, seed, generator)
        if coupling not in COUPLINGS:
            raise ValueError(f"FavorPlusPlus: coupling must be one of {COUPLINGS}, got {coupling!r}")
        self.coupling, self.dense = coupling, bool(dense)
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.register_buffer("projection", self._draw().float())  # [m, K], in the eigenbasis
        self.register_buffer("basis", torch.eye(head_dim))  # U: column i is eigendirection i
        self.register_buffer("a", torch.zeros(head_dim))
        self.register_buffer("second_moment", torch.zeros(head_dim, head_dim, dtype=torch.float64))
        self.fitted = False

    def _draw(self) -> torch.Tensor:
        return random_projection(self.num_features, self.head_dim, self.coupling, self.generator)

    @torch.no_grad()
    def fit(self, q: torch.Tensor, k: torch.Tensor, momentum: float | None = None) -> FavorPlusPlus:
        """Fit the eigenbasis and a_i to the second moments of x + y, over every token of q and k.

        Args:
            q, k: [..., K] (e.g. [B, T, H, K]), any floating dtype; pooled over all leading dimensions.
            momentum: None to replace the statistics; else an exponential moving average with this weight
                on the new batch (for fitting during training).
        """
        _check_input("FavorPlusPlus.fit", q, self.head_dim)
        _check_input("FavorPlusPlus.fit", k, self.head_dim)
        x = q.detach().reshape(-1, self.head_dim).double() * self.scale**0.5
        y = k.detach().reshape(-1, self.head_dim).double() * self.scale**0.5
        if x.shape[0] == 0 or y.shape[0] == 0:
            raise ValueError("FavorPlusPlus.fit: q and k must hold at least one token each")
        mx, my = x.mean(0), y.mean(0)
        # E over pairs (x from q, y from k) of (x + y)(x + y)^T
        moment = x.T @ x / x.shape[0] + y.T @ y / y.shape[0] + torch.outer(mx, my) + torch.outer(my, mx)
        moment = moment.to(self.second_moment.device)
        if momentum is not None and self.fitted:
            moment = (1 - momentum) * self.second_moment + momentum * moment
        self.second_moment.copy_(moment)
        if self.dense:
            lam, basis = torch.linalg.eigh(moment)
        else:
            lam = torch.full((self.head_dim,), moment.trace().item() / self.head_dim, dtype=torch.float64)
            basis = torch.eye(self.head_dim, dtype=torch.float64)
        self.basis.copy_(basis.to(self.basis.device))
        self.a.copy_(optimal_gerf_a(lam).to(self.a.device))
        self.fitted = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("FavorPlusPlus", x, self.head_dim)
        self._count_step()
        dtype = _compute_dtype(x)
        a, W, U = self.a.to(dtype), self.projection.to(dtype), self.basis.to(dtype)
        b = torch.sqrt(1 - 4 * a)
        log_d = 0.25 * torch.log1p(-4 * a).sum()
        offset = (W.square() * a).sum(-1) + log_d - 0.5 * math.log(self.num_features)  # [m]
        xs = x.to(dtype) * self.scale**0.5
        proj = xs @ (U * b) @ W.T  # w^T B x, with w = U w' and B = U diag(b) U^T
        return self._mark_step(_capped_exp(proj + offset - xs.square().sum(-1, keepdim=True) / 2, x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coupling={self.coupling!r}, dense={self.dense}, fitted={self.fitted}"


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic maps


class CosFormer(nn.Module):
    """cosFormer (Qin et al., 2022): relu features re-weighted by cos(pi (i - j) / (2 horizon)).

    cos(a - b) = cos a cos b + sin a sin b, so phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)]
    (2K features) gives phi(q_i)^T phi(k_j) = relu(q_i)^T relu(k_j) cos(pi (i - j) / 2M).

    Positions are the index along dimension 1 of the [B, T, H, K] input, plus ``start``. Only i - j enters the
    kernel, so packed sequences (``cu_seqlens``) need no restart: a global offset cancels within each sequence.
    To continue a sequence from a state (``initial_state``), set ``start`` to the number of tokens already
    consumed. The horizon M is fixed at construction, never the current call's length, so that causal outputs
    do not depend on how long the sequence will get; the weight stays non-negative while |i - j| <= M, so
    choose M at least the longest context.

    Args:
        horizon: M, in tokens.
        start: the position of the first token of the input.

    Call: x [B, T, H, K] (or [B, T, K]: any shape with positions in dimension 1) -> [..., 2K] float32.
    """

    def __init__(self, horizon: int, start: int = 0):
        super().__init__()
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"CosFormer: horizon must be a positive int (tokens), got {horizon!r}")
        self.horizon, self.start = horizon, int(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 3 or not x.is_floating_point():
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"CosFormer: input must be a floating [B, T, ..., K] tensor (positions in dim 1), got {got}"
            )
        dtype = _compute_dtype(x)
        pos = torch.arange(x.shape[1], device=x.device, dtype=dtype) + self.start
        angle = (math.pi / (2 * self.horizon)) * pos.view(1, -1, *([1] * (x.ndim - 2)))
        r = F.relu(x.to(dtype))
        return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)

    def extra_repr(self) -> str:
        return f"horizon={self.horizon}, start={self.start}"


class TaylorExp(nn.Module):
    """Based's map (Arora et al., 2024): phi(q)^T phi(k) = 1 + x^T y + (x^T y)^2 / 2 with x = scale^(1/2) q.

    The quadratic term uses the upper triangle of x x^T (off-diagonal terms weighted by sqrt 2), so
    M = 1 + K + K (K + 1) / 2. The value is >= 1/2 for every pair, so the normaliser never vanishes.

    Args:
        scale: the attention scale; defaults to K^-0.5 of the input.

    Call: x [..., K] -> [..., 1 + K + K (K + 1) / 2] float32 (float64 for float64 input).
    """

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.scale = scale

    @staticmethod
    def num_features(head_dim: int) -> int:
        return 1 + head_dim + head_dim * (head_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim == 0:
            raise TypeError(f"TaylorExp: input must be a floating [..., K] tensor, got {getattr(x, 'dtype', x)}")
        K = x.shape[-1]
        scale = K**-0.5 if self.scale is None else self.scale
        xs = x.to(_compute_dtype(x)) * scale**0.5
        i, j = torch.triu_indices(K, K, device=x.device)
        weight = torch.where(i == j, 0.5**0.5, 1.0).to(xs.dtype)  # (sum_ij x_i x_j y_i y_j) / 2
        quad = xs[..., i] * xs[..., j] * weight
        return torch.cat([torch.ones_like(xs[..., :1]), xs, quad], dim=-1)


class Hedgehog(nn.Module):
    """Hedgehog's learnable map (Zhang et al., 2024): per head z = x W_h + b_h, phi(x) = [softmax(z), softmax(-z)].

    Train it with ``hedgehog_distill_loss`` so that its normalised attention weights match softmax's.

    Args:
        head_dim: K.
        num_heads: H; the input's dimension -2 must be H.
        feature_dim: F, the width of z (phi has 2F features); defaults to K.
        scale: the attention scale applied to the input; defaults to K^-0.5 (its square root, as in the maps
            above, so that the identity initialisation starts from the scaled dot product).
        seed, generator: initialisation when F != K (identity when F == K).

    Call: x [..., H, K] -> [..., H, 2F] in float32 (float64 for float64 input).
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        feature_dim: int | None = None,
        *,
        scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        F_ = head_dim if feature_dim is None else feature_dim
        for name, val in (("head_dim", head_dim), ("num_heads", num_heads), ("feature_dim", F_)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"Hedgehog: {name} must be a positive int, got {val!r}")
        self.head_dim, self.num_heads, self.feature_dim = head_dim, num_heads, F_
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        if F_ == head_dim:
            weight = torch.eye(head_dim).expand(num_heads, -1, -1).clone()
        else:
            gen = _make_generator(seed, generator)
            weight = torch.randn(num_heads, head_dim, F_, generator=gen) / math.sqrt(head_dim)
        self.weight = nn.Parameter(weight)  # [H, K, F]
        self.bias = nn.Parameter(torch.zeros(num_heads, F_))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("Hedgehog", x, self.head_dim)
        if x.ndim < 2 or x.shape[-2] != self.num_heads:
            raise ValueError(f"Hedgehog: input must be [..., H, K] with H = {self.num_heads}, got {list(x.shape)}")
        dtype = _compute_dtype(x)
        z = torch.einsum("...hk,hkf->...hf", x.to(dtype) * self.scale**0.5, self.weight.to(dtype)) + self.bias
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Attention weights implied by a map, and Hedgehog's distillation


def visible_mask(T: int, causal: bool, device=None) -> torch.Tensor:
    """[T, T] bool: key s is visible to query t."""
    mask = torch.ones(T, T, dtype=torch.bool, device=device)
    return mask.tril() if causal else mask


def kernel_attention(
    phi: Callable[[torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool = False,
    eps: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """The attention matrix that normalised linear attention with ``phi`` applies, [B, H, T, T].

    A_ts = scale phi(q_t)^T phi(k_s) / (scale sum_{s' visible} phi(q_t)^T phi(k_s') + eps), so that
    o = A v is ``linear_attn(q, k, v, phi, normalize=True, causal=causal, eps=eps, scale=scale)``.
    q, k: [B, T, H, K]. Computed in float32 (float64 for float64 input).
    """
    fq, fk = phi(q), phi(k)
    dtype = _compute_dtype(q)
    scores = torch.einsum("bthm,bshm->bhts", fq.to(dtype), fk.to(dtype)) * scale
    scores = scores.masked_fill(~visible_mask(q.shape[1], causal, q.device), 0)
    return scores / (scores.sum(-1, keepdim=True) + eps)


def softmax_attention_weights(
    q: torch.Tensor, k: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale q k^T) with the causal mask, [B, H, T, T], float32 (float64 for float64 input)."""
    dtype = _compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bthk,bshk->bhts", q.to(dtype), k.to(dtype)) * scale
    return logits.masked_fill(~visible_mask(q.shape[1], causal, q.device), float("-inf")).softmax(-1)


def hedgehog_distill_loss(
    phi: Callable[[torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Soft cross-entropy -sum_s P_ts log A_ts between softmax's weights P and phi's A, mean over query rows.

    Args:
        phi: the map (a ``Hedgehog``, or any positive map).
        q, k: [B, T, H, K], the queries and keys to match softmax on (detached from the map's inputs is fine).
        causal: compare causal rows.
        scale: softmax's scale; defaults to K^-0.5.

    Returns: a scalar tensor (float32, or float64 for float64 input) with gradients into phi's parameters.
    """
    target = softmax_attention_weights(q, k, causal, scale)
    approx = kernel_attention(phi, q, k, causal)
    tiny = torch.finfo(approx.dtype).tiny
    return -(target * torch.log(approx.clamp(min=tiny))).sum(-1).mean()


def fit_hedgehog(
    phi: Hedgehog, q: torch.Tensor, k: torch.Tensor, steps: int = 200, lr: float = 1e-2, causal: bool = False
) -> list[float]:
    """Train ``phi`` with Adam on ``hedgehog_distill_loss`` for ``steps`` steps; returns the loss per step."""
    opt = torch.optim.Adam(phi.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = hedgehog_distill_loss(phi, q, k, causal)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
