"""Exact softmax attention as a layer: rotary q and k, grouped kv heads, an optional sliding window, a KV cache.

A whole sequence goes through linattn.ops.softmax_attn (SDPA). Continuing from a KV cache needs
queries that attend to more keys than there are queries, which the op's contract (k shaped like q)
does not cover; ``attend_with_kvcache`` below does that step with SDPA directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from linattn import ops
from linattn.layers.common import (
    QKV,
    KVCache,
    RotaryEmbedding,
    check_layer_input,
    check_state,
    repeat_heads,
    resolve_heads,
    token_positions,
)


def attend_with_kvcache(
    q: torch.Tensor, cache: KVCache, window: int | None = None, scale: float | None = None
) -> torch.Tensor:
    """The last q.shape[1] tokens of the cache attend to every cached key before them (causally).

    q: [B, Tq, H, K], the queries of the newest Tq entries of the cache (already appended).
    cache: keys [B, L, H_kv, K] and values [B, L, H_kv, V]; H_kv divides H (grouped-query attention).
    window: if set, a query sees only keys less than `window` positions back.
    Returns o [B, Tq, H, V] in q's dtype.
    """
    Tq, L = q.shape[1], cache.length
    k, v = cache.keys, cache.values
    mask = None
    if Tq > 1 or (window is not None and L > window):
        q_pos = torch.arange(cache.seen - Tq, cache.seen, device=q.device)[:, None]
        k_pos = torch.arange(cache.seen - L, cache.seen, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= q_pos - k_pos < window
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention with RoPE, grouped kv heads, an optional sliding window and a KV cache.

    Args:
        d_model: width D of x [B, T, D].
        n_heads: number of query heads H.
        n_kv_heads: heads of k and v, each shared by H / n_kv_heads query heads (GQA); defaults to H.
        head_dim: width K = V per head; defaults to D / H.
        window: if set, each token attends only to the `window` most recent tokens (itself included);
            the KV cache then keeps only those.
        rope_theta: base of the rotary frequencies.
        causal: False for an encoder (every token sees every other; no cache).
        impl: passed to linattn.ops.softmax_attn.
    State: KVCache (keys [B, L, H_kv, K], values [B, L, H_kv, V], in x's dtype). A decode call extends the
    cache it is given in place and returns it. With cu_seqlens the layer returns no cache.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        window: int | None = None,
        rope_theta: float = 10000.0,
        causal: bool = True,
        impl: str = "auto",
    ):
        super().__init__()
        K = resolve_heads("SoftmaxAttention", d_model, n_heads, head_dim)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"SoftmaxAttention: window must be a positive int or None, got {window!r}")
        self.n_heads, self.window, self.causal, self.impl = n_heads, window, causal, impl
        self.qkv = QKV(d_model, n_heads, n_kv_heads or n_heads, K, K)
        self.rope = RotaryEmbedding(K, rope_theta)
        self.o_proj = nn.Linear(n_heads * K, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, state: KVCache | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        """x [B, T, D] (or [1, T, D] with cu_seqlens int [N + 1]); state a KVCache or None.

        Returns y [B, T, D] in x's dtype and the KV cache after the last token (None if not causal or
        with cu_seqlens).
        """
        check_layer_input("SoftmaxAttention", x, cu_seqlens)
        check_state("SoftmaxAttention", state, KVCache)
        if state is not None and (cu_seqlens is not None or not self.causal):
            raise ValueError(
                "SoftmaxAttention: a KV cache continues one batch of causal rows; it cannot be "
                "combined with cu_seqlens or causal=False"
            )
        B, T, _ = x.shape
        q, k, v, _ = self.qkv(x)
        if state is None:
            pos = token_positions(B, T, x.device, cu_seqlens=cu_seqlens)
            q, k = self.rope(q, pos), self.rope(k, pos)
            o, _ = ops.softmax_attn(
                q,
                repeat_heads(k, self.n_heads),
                repeat_heads(v, self.n_heads),
                self.causal,
                self.window,
                cu_seqlens=cu_seqlens,
                impl=self.impl,
            )
            cache = None
            if self.causal and cu_seqlens is None:
                keep = T if self.window is None else min(T, self.window - 1)
                cache = KVCache(k[:, T - keep :], v[:, T - keep :], length=keep, seen=T, window=self.window)
        else:
            cache = state
            pos = token_positions(B, T, x.device) + cache.seen
            q, k = self.rope(q, pos), self.rope(k, pos)
            cache.append(k, v)
            o = attend_with_kvcache(q, cache, self.window)
            if self.window is not None and cache.length >= 2 * self.window:  # trim now and then: O(1) per token
                cache.keep_last(self.window - 1)
        return self.o_proj(o.flatten(2)), cache
