"""Chunked parallel form of GLA (a log-decay per head, token and key channel), in PyTorch.

Between chunks it is simple GLA's state passing with a per-channel decay. Inside a chunk the
scores A_ts = sum_k q_tk k_sk exp(b_tk - b_sk) cannot be factored as (q exp(b)) (k exp(-b))^T
without overflow when gates are very negative, so the chunk is cut into sub-chunks of c tokens:

* between sub-chunks j < i, both sides are rebased on rho_i, the log-decay at the end of
  sub-chunk i-1: exp(b_t - rho_i) and exp(rho_i - b_s) are each <= 1;
* inside a diagonal sub-chunk the [c, c, K] decay tensor is formed exactly.

Every exponent is a segment sum of gates (common.chunking.segsum), not a difference of running sums.
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.chunking import ChunkLayout, causal_mask, segsum, suffix_sum
from linattn.ops.simple_gla.chunk import chunk_state_passing


def gla_intra_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, sub_chunk: int) -> torch.Tensor:
    """Causal in-chunk scores A [..., C, C] from q, k and log-decays g, all [..., C, K]."""
    *lead, C, K = q.shape
    c = sub_chunk if C % sub_chunk == 0 else C
    n = C // c
    qs, ks, gs = (x.reshape(*lead, n, c, K) for x in (q, k, g))  # [..., n, c, K]
    strict_lower = causal_mask(c, q.device, strict=True)

    # Between sub-chunks j < i: exp(b_t - rho_i) is a sum inside sub-chunk i; exp(rho_i - b_s) is the
    # rest of sub-chunk j after s plus the whole sub-chunks j+1 ... i-1.
    q_r = qs * torch.exp(gs.cumsum(-2))  # [..., n(i), c, K]
    whole = segsum(gs.sum(-2), dim=-2)  # [..., n, n, K]: sum of sub-chunks j+1 ... i
    whole = torch.cat([torch.full_like(whole[..., :1, :, :], float("-inf")), whole[..., :-1, :, :]], dim=-3)
    e = whole.unsqueeze(-2) + suffix_sum(gs, dim=-2).unsqueeze(-4)  # [..., n(i), n(j), c, K]; -inf for j >= i
    k_r = ks.unsqueeze(-4) * torch.exp(e)
    A = torch.einsum("...itk,...ijsk->...itjs", q_r, k_r)  # [..., n, c, n, c]

    # Diagonal sub-chunks, exactly: exp(b_t - b_s) per channel for s < t from sub-chunk-local sums
    # (|b| <= c |g|, so their difference keeps its precision), and the plain q_t . k_t on the diagonal.
    local = gs.cumsum(-2)
    d = (local.unsqueeze(-2) - local.unsqueeze(-3)).masked_fill(~strict_lower[..., None], float("-inf"))
    A_diag = torch.einsum("...tsk,...sk->...ts", qs.unsqueeze(-2) * torch.exp(d), ks)  # [..., n, c, c]
    A_diag = A_diag + torch.diag_embed((qs * ks).sum(-1))
    eye = torch.eye(n, dtype=A.dtype, device=q.device)[:, None, :, None]
    A = A + A_diag.unsqueeze(-2) * eye
    return A.reshape(*lead, C, C)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 32,
    sub_chunk: int = 4,
):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] log-decay. Returns (o [B, T, H, V], state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    layout = ChunkLayout.build(B, T, chunk_size, cu_seqlens, q.device)
    q, k, v = (layout.to_chunks(x.to(dtype)) for x in (q, k, v))  # [R, H, NC, C, D]
    q = q * scale
    S0 = layout.start_state(initial_state, H, K, V, like=q)

    g = layout.to_chunks(g.to(dtype))  # [R, H, NC, C, K]
    b = g.cumsum(-2)
    dS = (k * torch.exp(suffix_sum(g, dim=-2))).transpose(-1, -2) @ v  # [R, H, NC, K, V]
    states, final = chunk_state_passing(layout, S0, dS, torch.exp(b[..., -1:, :]).transpose(-1, -2))
    A = gla_intra_scores(q, k, g, sub_chunk)
    o = A @ v + (q * torch.exp(b)) @ states
    o = layout.from_chunks(o).to(out_dtype)
    return o, (final if output_final_state else None)
