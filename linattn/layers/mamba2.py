"""Mamba-2 (Dao and Gu, 2024): the SSD core is simple GLA with k = B, q = C, v = dt x and g = dt A.

z, xBC, dt = W_in x                               one input projection
x, B, C    = silu(shortconv(xBC))                 x [B, T, H, P]; B, C [B, T, G, N] shared by H / G heads
dt         = softplus(dt + dt_bias)               step size per head, > 0
y          = simple_gla(C, B, dt x, dt A) + D x   A = -exp(A_log) < 0 per head; the state is [H, N, P]
out        = W_out rmsnorm(y * silu(z))           gated norm
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from linattn import ops
from linattn.layers.common import RecurrentLayer, RecurrentState, RMSNorm, ShortConv, repeat_heads


class Mamba2(RecurrentLayer):
    """The Mamba-2 block's mixer, with its SSD core run by linattn.ops.simple_gla.

    Args:
        d_model: width D of x [B, T, D].
        n_heads: number of heads H.
        head_dim: width P of each head's x; defaults to expand * D / H. The inner width is H * P.
        expand: the inner width is expand * D when head_dim is not given.
        d_state: state size N per head (the key width of the op).
        n_groups: groups G of B and C, each shared by H / G heads (Mamba-2's grouped heads).
        conv_size: kernel of the short causal conv over x, B and C.
        dt_min, dt_max: range of the initial step sizes (log-uniform).
        causal: False for an encoder (both directions, no state).
        impl: passed to the op.
        norm_eps: epsilon of the gated RMSNorm.
    State: RecurrentState(ssm [B, H, N, P] float32, conv [B, conv_size - 1, H P + 2 G N]).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        expand: int = 2,
        d_state: int = 64,
        n_groups: int = 1,
        conv_size: int = 4,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        causal: bool = True,
        impl: str = "auto",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if head_dim is None:
            if (expand * d_model) % n_heads:
                raise ValueError(
                    f"Mamba2: expand * d_model = {expand * d_model} is not divisible by "
                    f"n_heads={n_heads}; pass head_dim"
                )
            head_dim = expand * d_model // n_heads
        if n_groups < 1 or n_heads % n_groups:
            raise ValueError(f"Mamba2: n_groups must divide n_heads={n_heads}, got n_groups={n_groups}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.n_heads, self.head_dim, self.d_state, self.n_groups = n_heads, head_dim, d_state, n_groups
        self.causal, self.impl = causal, impl
        self.d_inner = d_inner = n_heads * head_dim
        self.sizes = [d_inner, d_inner + 2 * n_groups * d_state, n_heads]  # z, xBC, dt
        self.in_proj = nn.Linear(d_model, sum(self.sizes), bias=False)
        self.conv = ShortConv(self.sizes[1], conv_size)
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(n_heads).uniform_(math.log(dt_min), math.log(dt_max)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = RMSNorm(d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def mix(self, x, state, cu_seqlens):
        B, T, _ = x.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(x).split(self.sizes, dim=-1)
        xBC, conv = self.conv(xBC, None if state is None else state.conv, cu_seqlens)
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.reshape(B, T, H, P)
        Bm = repeat_heads(Bm.reshape(B, T, G, N), H)  # [B, T, H, N], the keys
        Cm = repeat_heads(Cm.reshape(B, T, G, N), H)  # [B, T, H, N], the queries
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        g = -self.A_log.float().exp() * dt  # log-decay dt A, <= 0
        v = (xs.float() * dt[..., None]).to(xs.dtype)
        y, ssm = ops.simple_gla(
            Cm,
            Bm,
            v,
            g,
            scale=1.0,
            initial_state=None if state is None else state.ssm,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            impl=self.impl,
        )
        y = y + self.D.to(y.dtype)[:, None] * xs
        y = self.norm(y.reshape(B, T, self.d_inner) * F.silu(z))
        return self.out_proj(y), RecurrentState(ssm=ssm, conv=conv)
