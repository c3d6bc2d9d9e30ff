"""RetNet's multi-scale retention layer (Sun et al., 2023).

q, k = rope(W_q x), rope(W_k x)         the paper's xPos rotation, here plain rotary embeddings
v    = W_v x                             value width V = expand_v * K (the paper's 2x)
o    = retention(q, k, v)                fixed decay gamma_h = 1 - 2^(-5-h) per head
y    = W_o (rmsnorm(o) * silu(W_g x))    per-head norm (the paper's GroupNorm) and swish gate
"""

from __future__ import annotations

import torch
import torch.nn as nn

from linattn import ops
from linattn.layers.common import (
    QKV,
    GatedRMSNorm,
    RecurrentLayer,
    RecurrentState,
    RotaryEmbedding,
    num_sequences,
    repeat_heads,
    resolve_heads,
    token_positions,
)


class RetNet(RecurrentLayer):
    """Multi-scale retention with rotary q and k, a per-head norm and a swish output gate.

    Args:
        d_model: width D of x [B, T, D].
        n_heads: number of heads H.
        head_dim: key width K per head; defaults to D / H.
        expand_v: value width per head V = expand_v * K.
        n_kv_heads: heads of k and v (grouped heads); defaults to H.
        rope_theta: base of the rotary frequencies.
        causal: False for an encoder (both directions, no state).
        impl: passed to the op.
        norm_eps: epsilon of the output RMSNorm.
    State: RecurrentState(ssm [B, H, K, V] float32, seen [B] int64 for the rotary positions).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        n_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        causal: bool = True,
        impl: str = "auto",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        K = resolve_heads("RetNet", d_model, n_heads, head_dim)
        V = int(K * expand_v)
        self.n_heads, self.head_v, self.causal, self.impl = n_heads, V, causal, impl
        self.qkv = QKV(d_model, n_heads, n_kv_heads or n_heads, K, V)
        self.rope = RotaryEmbedding(K, rope_theta)
        self.g_proj = nn.Linear(d_model, n_heads * V, bias=False)
        self.o_norm = GatedRMSNorm(V, eps=norm_eps)
        self.o_proj = nn.Linear(n_heads * V, d_model, bias=False)

    def mix(self, x, state, cu_seqlens):
        B, T, _ = x.shape
        q, k, v, _ = self.qkv(x)
        seen = None if state is None else state.seen
        pos = token_positions(B, T, x.device, seen, cu_seqlens)
        q, k = self.rope(q, pos), repeat_heads(self.rope(k, pos), self.n_heads)
        v = repeat_heads(v, self.n_heads)
        o, ssm = ops.retention(
            q,
            k,
            v,
            initial_state=None if state is None else state.ssm,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            impl=self.impl,
        )
        gate = self.g_proj(x).reshape(B, T, self.n_heads, self.head_v)
        y = self.o_proj(self.o_norm(o, gate).flatten(2))
        if seen is None:
            seen = torch.zeros(num_sequences(x, cu_seqlens), dtype=torch.long, device=x.device)
        lengths = torch.full_like(seen, T) if cu_seqlens is None else cu_seqlens.diff().to(seen)
        return y, RecurrentState(ssm=ssm, seen=seen + lengths)
