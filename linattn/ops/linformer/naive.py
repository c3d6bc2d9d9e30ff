"""Linformer written out in float32: the reference for the SDPA path.

    K_p = E K,  V_p = F V          (E, F: [k, n] sliced to [k, T]; per head [H, k, n])
    o   = softmax(scale Q K_p^T) V_p

A key padding mask zeroes padded keys and values before the projection.
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype


def project(x: torch.Tensor, P: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x [B, T, H, D], P [k, T] or [H, k, T], keep [B, T] bool or None -> [B, k, H, D] in dtype."""
    x = x.to(dtype)
    if keep is not None:
        x = x * keep[:, :, None, None].to(dtype)
    if P.ndim == 2:
        return torch.einsum("rt,bthd->brhd", P.to(dtype), x)
    return torch.einsum("hrt,bthd->brhd", P.to(dtype), x)


def naive_linformer(q, k, v, E, F, *, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q, k [B, T, H, K]; v [B, T, H, V]; E, F sliced to [.., k, T]; keep [B, T] bool -> o [B, T, H, V]."""
    dtype = state_dtype(q)
    kp, vp = project(k, E, keep, dtype), project(v, F, keep, dtype)  # [B, k, H, K], [B, k, H, V]
    s = torch.einsum("bthd,brhd->bhtr", q.to(dtype), kp) * scale  # [B, H, T, k]
    return torch.einsum("bhtr,brhv->bthv", s.softmax(-1), vp).to(v.dtype)
