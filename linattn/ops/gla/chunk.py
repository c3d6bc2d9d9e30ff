"""Chunked parallel form of GLA (a log-decay per head, token and key channel), in PyTorch.

Between chunks it is simple GLA's state passing with a per-channel decay. Inside a chunk the
scores A_ts = sum_k q_tk k_sk exp(b_tk - b_sk) cannot be factored as (q exp(b)) (k exp(-b))^T
without overflow when gates are very negative, so the chunk is cut into sub-chunks of c tokens:

* between sub-chunks j < i, both sides are rebased on rho_i, the cumulative gate at the end of
  sub-chunk i-1: exp(b_t - rho_i) and exp(rho_i - b_s) are each <= 1;
* inside a diagonal sub-chunk the [c, c, K] decay tensor is formed exactly.
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.chunking import ChunkLayout, causal_mask
from linattn.ops.simple_gla.chunk import chunk_state_passing


def gla_intra_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub_chunk: int) -> torch.Tensor:
    """Causal in-chunk scores A [..., C, C] from q, k and chunk-local gate sums b, all [..., C, K]."""
    *lead, C, K = q.shape
    c = sub_chunk if C % sub_chunk == 0 else C
    n = C // c
    qs, ks, bs = (x.reshape(*lead, n, c, K) for x in (q, k, b))  # [..., n, c, K]
    neg_inf = float("-inf")

    # Between sub-chunks: rho_i is b at the last token of sub-chunk i-1 (0 for the first one).
    rho = torch.cat([torch.zeros_like(bs[..., :1, -1, :]), bs[..., :-1, -1, :]], dim=-2)  # [..., n, K]
    q_r = qs * torch.exp(bs - rho.unsqueeze(-2))  # [..., n(i), c, K]
    e = rho[..., :, None, None, :] - bs[..., None, :, :, :]  # [..., n(i), n(j), c, K]
    earlier = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # j < i
    e = e.masked_fill(~earlier[:, :, None, None], neg_inf)
    k_r = ks.unsqueeze(-4) * torch.exp(e)
    A = torch.einsum("...itk,...ijsk->...itjs", q_r, k_r)  # [..., n, c, n, c]

    # Diagonal sub-chunks, exactly.
    d = bs.unsqueeze(-2) - bs.unsqueeze(-3)  # [..., n, c(t), c(s), K]
    d = d.masked_fill(~causal_mask(c, q.device)[..., None], neg_inf)
    A_diag = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * torch.exp(d)).sum(-1)  # [..., n, c, c]
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
    chunk_size: int = 64,
    sub_chunk: int = 8,
):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] log-decay. Returns (o [B, T, H, V], state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    layout = ChunkLayout.build(B, T, chunk_size, cu_seqlens, q.device)
    q, k, v, g = (layout.to_chunks(x.to(dtype)) for x in (q, k, v, g))  # [R, H, NC, C, D]
    q = q * scale
    S0 = layout.start_state(initial_state, H, K, V, like=q)

    b = g.cumsum(-2)  # [R, H, NC, C, K]
    b_last = b[..., -1:, :]
    dS = (k * torch.exp(b_last - b)).transpose(-1, -2) @ v  # [R, H, NC, K, V]
    states, final = chunk_state_passing(layout, S0, dS, torch.exp(b_last).transpose(-1, -2))
    A = gla_intra_scores(q, k, b, sub_chunk)
    o = A @ v + (q * torch.exp(b)) @ states
    o = layout.from_chunks(o).to(out_dtype)
    return o, (final if output_final_state else None)
