"""The GLA recurrence token by token, in float32: the spec that the chunked and Triton paths are tested against.

S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S_t is [K, V], g_t is [K] (or one value per head)
o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.varlen import run_per_sequence


def naive_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] or [B, T, H] (log-decay) or None (no decay)."""
    if cu_seqlens is not None:
        fn = lambda q, k, v, g, **kw: naive_gla(q, k, v, g, scale=scale, **kw)  # noqa: E731
        return run_per_sequence(fn, cu_seqlens, (q, k, v, g), initial_state, output_final_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    q, k, v = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    S = initial_state.to(dtype) if initial_state is not None else q.new_zeros(B, H, K, V)
    decays = torch.exp(g.to(dtype)).unbind(1) if g is not None else [None] * T  # [B, H, K] or [B, H] each
    o = []
    for q_t, k_t, v_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), decays):  # unbind: a linear backward
        if a_t is not None:
            S = (a_t.unsqueeze(-1) if a_t.ndim == 3 else a_t[..., None, None]) * S
        S = S + k_t[..., :, None] * v_t[..., None, :]  # [B, H, K, V]
        o.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    o = torch.stack(o, dim=1) if o else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)
