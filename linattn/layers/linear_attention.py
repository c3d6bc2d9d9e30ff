"""Kernel linear attention (Katharopoulos et al., 2020) as a layer, with any feature map.

    q, k, v = W_q x, W_k x, W_v x                 per head
    o       = linear_attn(q, k, v, phi, normalize)  phi(q)^T S_t (/ phi(q)^T z_t when normalised)
    y       = W_o rmsnorm(o)

phi is a name that linattn.feature_maps knows ("elu1", "relu", ...), one of the names below that build a
map module for the layer's head size ("favor+", "hedgehog"), or any module or callable that maps
[B, T, H, K] to [B, T, H, M]. A module's parameters (Hedgehog's learned map) or buffers (FAVOR+'s random
features) become the layer's, so they train and save with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from linattn import ops
from linattn.feature_maps import FavorPlus, Hedgehog
from linattn.layers.common import (
    QKV,
    RecurrentLayer,
    RecurrentState,
    RMSNorm,
    check_layer_input,
    repeat_heads,
    resolve_heads,
)

# Feature maps built for the layer by name: (head size K, heads H) -> module.
MAP_MODULES: dict[str, Callable[[int, int], nn.Module]] = {
    "favor+": lambda K, H: FavorPlus(K),  # positive random features for the softmax kernel, m = ceil(K ln K)
    "hedgehog": lambda K, H: Hedgehog(K, H),  # learned per-head map [softmax(z), softmax(-z)], identity init
}


class LinearAttention(RecurrentLayer):
    """Linear attention with a choice of feature map.

    Args:
        d_model: width D of x [B, T, D].
        n_heads: number of heads H.
        head_dim: width K = V per head; defaults to D / H.
        feature_map: a name from linattn.feature_maps, "favor+" or "hedgehog" (built for this layer), or an
            nn.Module / callable [B, T, H, K] -> [B, T, H, M].
        normalize: divide by phi(q)^T z_t, the running sum of phi(k) (the paper's form; wants a positive phi).
        n_kv_heads: heads of k and v (grouped heads); defaults to H.
        conv_size: kernel of an optional short causal conv over q, k, v (0 for none).
        causal: False for an encoder: every query reads every key, in one pass.
        impl: passed to the op.
        norm_eps: epsilon of the output RMSNorm.
    State: RecurrentState(ssm [B, H, M, V (+1 with normalize)] float32, conv or None).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu1",
        normalize: bool = True,
        n_kv_heads: int | None = None,
        conv_size: int = 0,
        causal: bool = True,
        impl: str = "auto",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        K = resolve_heads("LinearAttention", d_model, n_heads, head_dim)
        if not (isinstance(feature_map, str) or callable(feature_map)):
            raise TypeError(f"LinearAttention: feature_map must be a name or a callable, got {type(feature_map)}")
        self.n_heads, self.normalize, self.causal, self.impl = n_heads, normalize, causal, impl
        if isinstance(feature_map, str) and feature_map in MAP_MODULES:
            feature_map = MAP_MODULES[feature_map](K, n_heads)
        self.feature_map = feature_map  # an nn.Module assigned here is registered as a submodule
        self.qkv = QKV(d_model, n_heads, n_kv_heads or n_heads, K, K, conv_size)
        self.o_norm = RMSNorm(K, eps=norm_eps)
        self.o_proj = nn.Linear(n_heads * K, d_model, bias=False)

    def mix(self, x, state, cu_seqlens):
        B, T, _ = x.shape
        q, k, v, conv = self.qkv(x, None if state is None else state.conv, cu_seqlens)
        k, v = repeat_heads(k, self.n_heads), repeat_heads(v, self.n_heads)
        o, ssm = ops.linear_attn(
            q,
            k,
            v,
            self.feature_map,
            self.normalize,
            True,
            initial_state=None if state is None else state.ssm,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            impl=self.impl,
        )
        return self.o_proj(self.o_norm(o).flatten(2)), RecurrentState(ssm=ssm, conv=conv)

    def forward(self, x, state=None, cu_seqlens=None):
        if self.causal or self.qkv.conv is not None:  # a causal conv cannot read ahead: go both ways instead
            return super().forward(x, state, cu_seqlens)
        # Non-causal linear attention is one pass: every query reads the state after the last key.
        check_layer_input("LinearAttention", x, cu_seqlens)
        if state is not None:
            raise ValueError(
                "LinearAttention: a bidirectional layer (causal=False) reads whole sequences and takes no state"
            )
        B, T, _ = x.shape
        q, k, v, _ = self.qkv(x)
        k, v = repeat_heads(k, self.n_heads), repeat_heads(v, self.n_heads)
        o, _ = ops.linear_attn(q, k, v, self.feature_map, self.normalize, False, cu_seqlens=cu_seqlens, impl=self.impl)
        return self.o_proj(self.o_norm(o).flatten(2)), None
