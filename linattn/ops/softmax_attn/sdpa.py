"""Softmax attention through torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""

from __future__ import annotations

import torch.nn.functional as F

from linattn.ops.softmax_attn.naive import per_sequence, visible


def sdpa_softmax_attn(q, k, v, *, causal: bool, window: int | None, scale: float, cu_seqlens=None):
    """q, k [B, T, H, K]; v [B, T, H, V] -> o [B, T, H, V]."""

    def attend(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        if window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        else:
            mask = visible(q.shape[2], causal, window, q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.transpose(1, 2)

    return attend(q, k, v) if cu_seqlens is None else per_sequence(attend, cu_seqlens, q, k, v)
