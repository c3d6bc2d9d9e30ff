"""Gated linear attention (Yang et al., 2024): a decay per key channel from a low-rank projection.

    q, k, v = W_q x, W_k x, W_v x                              per head; key width K = expand_k D / H
    g       = logsigmoid(W_2 W_1 x + b) / gate_normalizer       [B, T, H, K] log-decay, <= 0
    o       = gla(q, k, v, g)
    y       = W_o (rmsnorm(o) * silu(W_g x))

The temperature gate_normalizer = 16 keeps the initial decays close to 1 (the paper's choice), so
the state starts with a long memory.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from linattn import ops
from linattn.layers.common import QKV, GatedRMSNorm, RecurrentLayer, RecurrentState, repeat_heads, resolve_heads


class GLA(RecurrentLayer):
    """Gated linear attention layer.

    Args:
        d_model: width D of x [B, T, D].
        n_heads: number of heads H.
        expand_k, expand_v: key width K = expand_k * D / H and value width V = expand_v * D / H per head.
        gate_rank: rank of the low-rank projection that makes the gate.
        gate_normalizer: the gate is logsigmoid(.) / gate_normalizer.
        n_kv_heads: heads of k and v (grouped heads); defaults to H.
        conv_size: kernel of an optional short causal conv over q, k, v (0, the paper's choice, for none).
        causal: False for an encoder (both directions, no state).
        impl: passed to the op.
        norm_eps: epsilon of the output RMSNorm.
    State: RecurrentState(ssm [B, H, K, V] float32, conv or None).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_rank: int = 16,
        gate_normalizer: float = 16.0,
        n_kv_heads: int | None = None,
        conv_size: int = 0,
        causal: bool = True,
        impl: str = "auto",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"GLA: d_model={d_model} is not divisible by n_heads={n_heads}")
        K, V = int(d_model * expand_k) // n_heads, int(d_model * expand_v) // n_heads
        resolve_heads("GLA", d_model, n_heads, K)
        self.n_heads, self.head_k, self.head_v = n_heads, K, V
        self.causal, self.impl, self.gate_normalizer = causal, impl, gate_normalizer
        self.qkv = QKV(d_model, n_heads, n_kv_heads or n_heads, K, V, conv_size)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False), nn.Linear(gate_rank, n_heads * K))
        self.g_proj = nn.Linear(d_model, n_heads * V, bias=False)
        self.o_norm = GatedRMSNorm(V, eps=norm_eps)
        self.o_proj = nn.Linear(n_heads * V, d_model, bias=False)

    def mix(self, x, state, cu_seqlens):
        B, T, _ = x.shape
        q, k, v, conv = self.qkv(x, None if state is None else state.conv, cu_seqlens)
        k, v = repeat_heads(k, self.n_heads), repeat_heads(v, self.n_heads)
        g = F.logsigmoid(self.gk_proj(x).float()) / self.gate_normalizer
        g = g.reshape(B, T, self.n_heads, self.head_k)
        o, ssm = ops.gla(
            q,
            k,
            v,
            g,
            initial_state=None if state is None else state.ssm,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            impl=self.impl,
        )
        gate = self.g_proj(x).reshape(B, T, self.n_heads, self.head_v)
        y = self.o_proj(self.o_norm(o, gate).flatten(2))
        return y, RecurrentState(ssm=ssm, conv=conv)
