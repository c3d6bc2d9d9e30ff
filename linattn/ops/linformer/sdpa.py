"""Linformer through torch's scaled_dot_product_attention: project in float32, attend in the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from linattn.ops._contract import state_dtype
from linattn.ops.linformer.naive import project


def sdpa_linformer(q, k, v, E, F, *, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Same contract as ``naive_linformer``. The projection sums T terms, so it accumulates in float32."""
    dtype = state_dtype(q)
    kp, vp = project(k, E, keep, dtype).to(q.dtype), project(v, F, keep, dtype).to(v.dtype)
    o = F_.scaled_dot_product_attention(q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)
