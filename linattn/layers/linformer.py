"""Linformer self-attention as a layer: q, k, v projections and learned sequence projections E, F around ops.linformer.

E and F ([k, n]) project keys and values along the sequence to k rows. Linformer (Wang et al., 2020, section 4)
shares them in four ways, named by ``sharing``:

- "none": each head has its own E_h and F_h ([H, k, n] each).
- "headwise": one E and one F for all heads of the layer.
- "kv": one matrix for keys and values, for all heads (E = F).
- "layerwise": one matrix for keys, values, all heads and all layers; the first layer creates it (or the
  model passes it in), and later layers receive it as ``shared``.

There is no causal form (the projection mixes future tokens into every row), and no recurrent state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from linattn import ops
from linattn.layers.common import check_layer_input, resolve_heads

SHARING = ("none", "headwise", "kv", "layerwise")


def init_projection(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian entries with variance 1/k (k = shape[-2]): the Johnson-Lindenstrauss projection of Linformer's
    analysis, which keeps the projected keys' norms about those of single keys."""
    return torch.randn(*shape, generator=generator) / math.sqrt(shape[-2])


class LinformerAttention(nn.Module):
    """Multi-head Linformer attention (bidirectional).

    Args:
        d_model: width D of x [B, T, D].
        n_heads: H.
        seq_len: n, the longest sequence; shorter ones use the first T columns of E and F.
        proj_len: k, the rows keys and values are projected to.
        head_dim: K = V per head; defaults to D / H.
        sharing: "none", "headwise", "kv" or "layerwise" (see the module docstring).
        shared: with sharing="layerwise", the [k, n] parameter of an earlier layer (``layer.E``); None creates one.
        causal: must be False; True raises ValueError, since the projection mixes future tokens into every row.
        impl: passed to linattn.ops.linformer.
        seed: seeds the initial E and F (None: torch's global generator).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        seq_len: int,
        proj_len: int,
        head_dim: int | None = None,
        sharing: str = "headwise",
        shared: nn.Parameter | None = None,
        causal: bool = False,
        impl: str = "auto",
        seed: int | None = None,
    ):
        super().__init__()
        name = "LinformerAttention"
        if causal:
            raise ValueError(
                f"{name}: causal=True is not supported: the projections E K and F V mix every token, "
                "future ones included, into each of the k rows every query attends to"
            )
        if sharing not in SHARING:
            raise ValueError(f"{name}: sharing must be one of {SHARING}, got {sharing!r}")
        for arg, val in (("seq_len", seq_len), ("proj_len", proj_len)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {val!r}")
        if shared is not None and sharing != "layerwise":
            raise ValueError(f"{name}: shared is only used with sharing='layerwise', got sharing={sharing!r}")
        K = resolve_heads(name, d_model, n_heads, head_dim)
        self.n_heads, self.head_dim, self.seq_len, self.proj_len = n_heads, K, seq_len, proj_len
        self.sharing, self.impl = sharing, impl
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.qkv = nn.Linear(d_model, 3 * n_heads * K, bias=False)
        self.o_proj = nn.Linear(n_heads * K, d_model, bias=False)
        shape = (n_heads, proj_len, seq_len) if sharing == "none" else (proj_len, seq_len)
        if sharing == "layerwise" and shared is not None:
            if not isinstance(shared, nn.Parameter) or list(shared.shape) != [proj_len, seq_len]:
                got = list(shared.shape) if isinstance(shared, torch.Tensor) else type(shared).__name__
                raise ValueError(f"{name}: shared must be an nn.Parameter [k, n] = {[proj_len, seq_len]}, got {got}")
            self.E = shared
        else:
            self.E = nn.Parameter(init_projection(*shape, generator=gen))
        if sharing in ("none", "headwise"):
            self.F = nn.Parameter(init_projection(*shape, generator=gen))
        else:
            self.F = self.E  # one parameter, registered once

    def forward(
        self,
        x: torch.Tensor,
        state=None,
        cu_seqlens: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """x [B, T, D] with T <= seq_len; key_padding_mask [B, T] bool (True = padding). Returns (y [B, T, D], None).

        ``state`` and ``cu_seqlens`` exist for the layers' common interface and must be None: Linformer has no
        recurrent state, and packed sequences would share one projection.
        """
        name = "LinformerAttention"
        check_layer_input(name, x, cu_seqlens)
        if state is not None:
            raise ValueError(f"{name}: Linformer keeps no state; state must be None, got {type(state).__name__}")
        if cu_seqlens is not None:
            raise ValueError(
                f"{name}: cu_seqlens is not supported (the sequence projection would mix packed "
                "sequences); pad to [B, T, D] and pass key_padding_mask"
            )
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        o, _ = ops.linformer(q, k, v, self.E.to(x.dtype), self.F.to(x.dtype), key_padding_mask, impl=self.impl)
        return self.o_proj(o.reshape(B, T, -1)), None

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, head_dim={self.head_dim}, seq_len={self.seq_len}, "
            f"proj_len={self.proj_len}, sharing={self.sharing!r}"
        )
