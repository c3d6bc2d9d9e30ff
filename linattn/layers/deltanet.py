"""DeltaNet (Schlag et al., 2021; Yang et al., 2024) and Gated DeltaNet (Yang et al., 2025) layers.

q, k, v = silu(shortconv([W_q x, W_k x, W_v x]))      per head, q and k L2-normalised (by the op)
beta    = sigmoid(W_b x)                                write strength per head, in (0, 1) (by the op)
g       = -exp(A_log) * softplus(W_a x + dt_bias)       Gated DeltaNet only: log-decay per head, <= 0
o       = delta_rule(q, k, v, beta)  or  gated_delta_rule(q, k, v, g, beta)
y       = W_o (rmsnorm(o) * silu(W_g x))                per-head norm and output gate

The normalisation of q and k and the sigmoid of beta are the ops' qk_l2norm and beta_is_logit options, which
the Triton kernels apply as they load their tiles (in float32), instead of as separate passes over memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from linattn import ops
from linattn.layers.common import QKV, GatedRMSNorm, RecurrentLayer, RecurrentState, repeat_heads, resolve_heads


class DeltaNet(RecurrentLayer):
    """The delta rule with projections, a short causal conv, L2-normalised q and k, and a gated output.

    Args:
        d_model: width D of x [B, T, D].
        n_heads: number of heads H.
        head_dim: key width K per head; defaults to D / H.
        expand_v: the value width per head is V = expand_v * K.
        n_kv_heads: heads of k and v (grouped heads, shared by H / n_kv_heads query heads); defaults to H.
        conv_size: kernel of the short causal conv over q, k, v (0 for none).
        causal: False for an encoder (both directions, no state).
        impl: passed to the op ("auto" picks the recurrence when decoding, chunks otherwise, Triton on CUDA).
        norm_eps: epsilon of the output RMSNorm.
    State: RecurrentState(ssm [B, H, K, V] float32, conv [B, conv_size - 1, C]).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        n_kv_heads: int | None = None,
        conv_size: int = 4,
        causal: bool = True,
        impl: str = "auto",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        K = resolve_heads(type(self).__name__, d_model, n_heads, head_dim)
        V = int(K * expand_v)
        self.n_heads, self.head_v, self.causal, self.impl = n_heads, V, causal, impl
        self.qkv = QKV(d_model, n_heads, n_kv_heads or n_heads, K, V, conv_size)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        self.g_proj = nn.Linear(d_model, n_heads * V, bias=False)
        self.o_norm = GatedRMSNorm(V, eps=norm_eps)
        self.o_proj = nn.Linear(n_heads * V, d_model, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor | None:
        return None  # no decay: the plain delta rule

    def mix(self, x, state, cu_seqlens):
        B, T, _ = x.shape
        q, k, v, conv = self.qkv(x, None if state is None else state.conv, cu_seqlens)
        k, v = repeat_heads(k, self.n_heads), repeat_heads(v, self.n_heads)
        beta = self.b_proj(x).float()  # [B, T, H] logits
        g = self.gate(x)
        kwargs = dict(
            initial_state=None if state is None else state.ssm,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            impl=self.impl,
            qk_l2norm=True,
            beta_is_logit=True,
        )
        if g is None:
            o, ssm = ops.delta_rule(q, k, v, beta, **kwargs)
        else:
            o, ssm = ops.gated_delta_rule(q, k, v, g, beta, **kwargs)
        gate = self.g_proj(x).reshape(B, T, self.n_heads, self.head_v)
        y = self.o_proj(self.o_norm(o, gate).flatten(2))
        return y, RecurrentState(ssm=ssm, conv=conv)


class GatedDeltaNet(DeltaNet):
    """DeltaNet with a data-dependent decay per head and token: g = -exp(A_log) softplus(W_a x + dt_bias).

    The arguments are DeltaNet's. A is drawn from U(1, 16) and dt from a log-uniform in [1e-3, 1e-1],
    as in Mamba-2, so that the initial decays exp(g) range from about 0.98 to nearly 0 per head.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        n_kv_heads: int | None = None,
        conv_size: int = 4,
        causal: bool = True,
        impl: str = "auto",
        norm_eps: float = 1e-6,
    ):
        super().__init__(d_model, n_heads, head_dim, expand_v, n_kv_heads, conv_size, causal, impl, norm_eps)
        self.a_proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())  # [B, T, H]
