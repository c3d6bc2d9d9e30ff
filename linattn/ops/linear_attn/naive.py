"""Kernel linear attention token by token, in float32: the spec (q and k arrive already feature-mapped).

    S_t = S_{t-1} + k_t v_t^T              causal: o_t = scale * S_t^T q_t
    z_t = z_{t-1} + k_t                    normalize: o_t = (q_t^T S_t) / (q_t^T z_t + eps)

Non-causal, every query reads the state after the last token. With ``normalize`` the state
carries z as one extra value column: it is [B, H, K, V + 1].
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.varlen import run_per_sequence


def naive_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool,
    causal: bool,
    eps: float,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """q, k [B, T, H, K] (feature-mapped); v [B, T, H, V]."""
    opts = dict(normalize=normalize, causal=causal, eps=eps, scale=scale)
    if cu_seqlens is not None:
        fn = lambda q, k, v, **kw: naive_linear_attn(q, k, v, **opts, **kw)  # noqa: E731
        return run_per_sequence(fn, cu_seqlens, (q, k, v), initial_state, output_final_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    q, k, v = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    S0 = initial_state.to(dtype) if initial_state is not None else q.new_zeros(B, H, K, V + normalize)
    S = S0[..., :V]
    z = S0[..., V] if normalize else q.new_zeros(B, H, K)  # [B, H, K]; read only when normalize

    def read(q_t, S, z):
        num = torch.einsum("bhk,bhkv->bhv", q_t, S)
        if not normalize:
            return num
        return num / (torch.einsum("bhk,bhk->bh", q_t, z)[..., None] + eps)

    o = []
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1)):  # unbind: a linear backward
        S = S + k_t[..., :, None] * v_t[..., None, :]
        z = z + k_t
        if causal:
            o.append(read(q_t, S, z))
    if not causal:
        o = [read(q_t, S, z) for q_t in q.unbind(1)]
    o = torch.stack(o, dim=1) if o else v.new_zeros(B, 0, H, V)
    final = torch.cat([S, z[..., None]], dim=-1) if normalize else S
    return o.to(out_dtype), (final if output_final_state else None)
