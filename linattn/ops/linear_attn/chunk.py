"""Chunked kernel linear attention: simple GLA with no decay.

The normaliser z is carried as one more value column (v augmented with ones), so the same chunked
pass yields both q^T S and q^T z. The non-causal form sums every chunk's k^T v into one state per
sequence and reads it with every query.
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.chunking import ChunkLayout
from linattn.ops.simple_gla.chunk import chunk_simple_gla


def _noncausal(q, k, v, scale, initial_state, cu_seqlens, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = state_dtype(q)
    layout = ChunkLayout.build(B, T, chunk_size, cu_seqlens, q.device)
    q, k, v = (layout.to_chunks(x.to(dtype)) for x in (q, k, v))  # [R, H, NC, C, D]
    S0 = layout.start_state(initial_state, H, K, V, like=q)
    final = S0 + layout.sum_per_sequence(k.transpose(-1, -2) @ v)  # [N, H, K, V]
    o = (q * scale) @ layout.per_chunk(final)
    return layout.from_chunks(o), final


def chunk_linear_attn(
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
    chunk_size: int = 64,
):
    """q, k [B, T, H, K] (feature-mapped); v [B, T, H, V]. Same contract as ``naive_linear_attn``."""
    out_dtype = v.dtype
    V = v.shape[-1]
    if normalize:  # z rides along as an extra column of ones, computed in the state dtype
        v = torch.cat([v.to(state_dtype(q)), v.new_ones(*v.shape[:-1], 1, dtype=state_dtype(q))], dim=-1)
    if causal:
        o, final = chunk_simple_gla(
            q,
            k,
            v.to(state_dtype(q)),
            None,
            scale=scale,
            initial_state=initial_state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )
    else:
        o, final = _noncausal(q, k, v, scale, initial_state, cu_seqlens, chunk_size)
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
    return o.to(out_dtype), (final if output_final_state else None)
