"""Exact softmax attention written out in float32: the reference for the SDPA path."""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype


def visible(T: int, causal: bool, window: int | None, device) -> torch.Tensor:
    """[T, T] mask: key s is visible to query t (s <= t when causal; |t - s| < window when windowed)."""
    t = torch.arange(T, device=device)
    diff = t[:, None] - t[None, :]  # t - s
    mask = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal:
        mask &= diff >= 0
    if window is not None:
        mask &= diff.abs() < window
    return mask


def per_sequence(fn, cu_seqlens, q, k, v):
    bounds = cu_seqlens.tolist()
    return torch.cat([fn(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)


def naive_softmax_attn(q, k, v, *, causal: bool, window: int | None, scale: float, cu_seqlens=None):
    """q, k [B, T, H, K]; v [B, T, H, V] -> o [B, T, H, V]: softmax(scale q k^T + mask) v per head."""

    def attend(q, k, v):
        dtype = state_dtype(q)
        s = torch.einsum("bthk,bshk->bhts", q.to(dtype), k.to(dtype)) * scale
        s = s.masked_fill(~visible(q.shape[1], causal, window, q.device), float("-inf"))
        return torch.einsum("bhts,bshv->bthv", s.softmax(-1), v.to(dtype)).to(v.dtype)

    return attend(q, k, v) if cu_seqlens is None else per_sequence(attend, cu_seqlens, q, k, v)
