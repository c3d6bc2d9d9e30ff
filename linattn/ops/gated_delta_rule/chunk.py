"""Chunked gated delta rule in PyTorch, with the WY/UT representation.

Write the update as S_t = a_t S_{t-1} + k_t u_t^T with the "new value"
u_t = beta_t (v_t - a_t S_{t-1}^T k_t) and a_t = exp(g_t). Inside a chunk entered with state S,
and with chunk-local log-decay sums b_t, the u's solve a unit lower-triangular system:

    (I + A) U = beta V - beta exp(b) K S,    A_ts = beta_t exp(b_t - b_s) k_t . k_s  for s < t

so U = U0 - W S with U0 = (I + A)^-1 beta V and W = (I + A)^-1 beta exp(b) K, both computed for
all chunks at once. Only U = U0 - W S and the state update run chunk after chunk:

    o_t    = exp(b_t) q_t^T S + sum_{s <= t} exp(b_t - b_s) (q_t . k_s) u_s
    S_next = exp(b_C) S + sum_s exp(b_C - b_s) k_s u_s^T
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.chunking import ChunkLayout, causal_mask, decay_matrix, scan_chunks, suffix_sum
from linattn.ops.gated_delta_rule.naive import apply_options


def _delta_step(S, W, U0, k_end, decay):
    # S [R, H, K, V]; W [R, H, C, K]; U0 [R, H, C, V]; k_end [R, H, C, K] keys decayed to the chunk end
    U = U0 - W @ S
    S_next = S + k_end.transpose(-1, -2) @ U if decay is None else decay * S + k_end.transpose(-1, -2) @ U
    return (S, U), S_next


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
    qk_l2norm: bool = False,
    beta_is_logit: bool = False,
):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] log-decay or None; beta [B, T, H] (see apply_options)."""
    q, k, beta = apply_options(q, k, beta, qk_l2norm, beta_is_logit)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    layout = ChunkLayout.build(B, T, chunk_size, cu_seqlens, q.device)
    q, k, v = (layout.to_chunks(x.to(dtype)) for x in (q, k, v))  # [R, H, NC, C, D]
    beta = layout.to_chunks(beta.to(dtype)).unsqueeze(-1)  # [R, H, NC, C, 1]
    q = q * scale
    S0 = layout.start_state(initial_state, H, K, V, like=q)
    C = layout.C

    if g is None:
        gamma = causal_mask(C, q.device).to(dtype)  # [C, C]
        q_s, k_w, k_end, decay = q, k, k, None
    else:
        g = layout.to_chunks(g.to(dtype))  # [R, H, NC, C]
        b = g.cumsum(-1)
        gamma = decay_matrix(g)  # exp(b_t - b_s), s <= t
        exp_b = torch.exp(b).unsqueeze(-1)
        k_w = k * exp_b
        k_end = k * torch.exp(suffix_sum(g)).unsqueeze(-1)
        decay = torch.exp(b[..., -1:]).unsqueeze(-1)  # [R, H, NC, 1, 1]
        q_s = q * exp_b  # queries as they read the chunk's entering state

    strict = ~causal_mask(C, q.device, strict=True)
    A = (beta * (k @ k.transpose(-1, -2)) * gamma).masked_fill(strict, 0)
    L = A + torch.eye(C, dtype=dtype, device=q.device)
    rhs = torch.cat([beta * k_w, beta * v], dim=-1)  # [R, H, NC, C, K + V]
    W, U0 = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True).split([K, V], dim=-1)

    per_chunk = (W, U0, k_end) if decay is None else (W, U0, k_end, decay)
    step = (lambda S, W, U0, ke: _delta_step(S, W, U0, ke, None)) if decay is None else _delta_step
    (states, U), final = scan_chunks(step, S0, layout, *per_chunk)

    P = (q @ k.transpose(-1, -2)) * gamma  # [R, H, NC, C, C]
    o = q_s @ states + P @ U
    o = layout.from_chunks(o).to(out_dtype)
    return o, (final if output_final_state else None)
