"""Kernel linear attention on the simple-GLA Triton kernels (no decay).

The feature map is applied before the kernel. With ``normalize`` the normaliser rides along as one
more value column of ones, computed in float32 so that the division sees unrounded sums.
"""

from __future__ import annotations

import torch

from linattn.ops.simple_gla.triton import triton_simple_gla, triton_unsupported


def linear_attn_unsupported(q: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    if not causal:
        return "causal=False has no Triton kernel (its chunked path is already a single pass)"
    return triton_unsupported(q, v)


def triton_linear_attn(
    q,
    k,
    v,
    *,
    normalize: bool,
    causal: bool,
    eps: float,
    scale: float,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens=None,
):
    """q, k [B, T, H, K] (feature-mapped); v [B, T, H, V]. Same contract as ``naive_linear_attn``; causal only."""
    if not normalize:
        return triton_simple_gla(
            q,
            k,
            v,
            None,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    V = v.shape[-1]
    v1 = torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)
    o, final = triton_simple_gla(
        q,
        k,
        v1,
        None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    return (o[..., :V] / (o[..., V:] + eps)).to(v.dtype), final
