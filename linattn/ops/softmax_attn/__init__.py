from __future__ import annotations

import torch

from linattn.ops._contract import check_cu_seqlens, check_qkv, check_scale
from linattn.ops.softmax_attn.naive import naive_softmax_attn
from linattn.ops.softmax_attn.sdpa import sdpa_softmax_attn

IMPLS = {"naive": naive_softmax_attn, "sdpa": sdpa_softmax_attn}


def softmax_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, None]:
    """Exact softmax attention, in the layout of every other op: the baseline and the hybrid partner.

    Args:
        q, k: [B, T, H, K], any floating dtype (all three share it).
        v: [B, T, H, V].
        causal: query t sees keys s <= t.
        window: if set, query t sees only keys with |t - s| < window (a sliding window).
        scale: defaults to K^-0.5.
        cu_seqlens: int [N + 1] boundaries of packed sequences (B must be 1); attention stays inside each.
        impl: "auto" or "sdpa" (torch's scaled_dot_product_attention), or "naive" (the float32 softmax, written out).

    Returns:
        (o [B, T, H, V] in v's dtype, None): softmax attention keeps no recurrent state.
    """
    op = "softmax_attn"
    B, T, H, K, V = check_qkv(op, q, k, v)
    check_cu_seqlens(op, cu_seqlens, B, T)
    scale = check_scale(op, scale, K)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{op}: window must be a positive int or None, got {window!r}")
    if impl == "auto":
        impl = "sdpa"
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be 'auto', 'sdpa' or 'naive', got {impl!r}")
    if T == 0:
        return v.new_empty(B, 0, H, V), None
    return IMPLS[impl](q, k, v, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens), None
