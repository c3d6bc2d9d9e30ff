"""The gated delta rule token by token, in float32: the spec for every faster path.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      S_t is [K, V]
    o_t = scale * S_t^T q_t

With g = None this is DeltaNet's delta rule, S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T.
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.varlen import run_per_sequence


def apply_options(q, k, beta, qk_l2norm: bool, beta_is_logit: bool):
    """The optional input maps, in float32 (float64 for float64 inputs); every impl applies them first.

    qk_l2norm: q, k -> x / sqrt(sum x^2 + 1e-6) over the head dim. beta_is_logit: beta -> sigmoid(beta).
    """
    dtype = state_dtype(q)
    if qk_l2norm:
        q, k = (x.to(dtype) / torch.sqrt(x.to(dtype).square().sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    if beta_is_logit:
        beta = torch.sigmoid(beta.to(dtype))
    return q, k, beta


def naive_gated_delta_rule(
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
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] log-decay or None; beta [B, T, H] (see apply_options)."""
    q, k, beta = apply_options(q, k, beta, qk_l2norm, beta_is_logit)
    if cu_seqlens is not None:
        fn = lambda q, k, v, g, beta, **kw: naive_gated_delta_rule(q, k, v, g, beta, scale=scale, **kw)  # noqa: E731
        return run_per_sequence(fn, cu_seqlens, (q, k, v, g, beta), initial_state, output_final_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    q, k, v, beta = q.to(dtype) * scale, k.to(dtype), v.to(dtype), beta.to(dtype)
    S = initial_state.to(dtype) if initial_state is not None else q.new_zeros(B, H, K, V)
    decays = torch.exp(g.to(dtype)).unbind(1) if g is not None else [None] * T  # [B, H] each
    o = []
    for q_t, k_t, v_t, b_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1), decays):
        if a_t is not None:
            S = a_t[..., None, None] * S
        v_old = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the memory holds for k_t
        S = S + (b_t[..., None] * k_t)[..., :, None] * (v_t - v_old)[..., None, :]
        o.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    o = torch.stack(o, dim=1) if o else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)
