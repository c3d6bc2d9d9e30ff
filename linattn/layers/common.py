"""Pieces that every layer shares: norms, the short causal conv, rotary embeddings, positions and states.

Each piece is written once here and used by all layers in this package. Layouts follow the ops:
activations are [B, T, D] between layers and [B, T, H, head_dim] around an op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- states


@dataclass
class RecurrentState:
    """What a linear-attention or SSM layer carries from one call to the next: constant in size.

    ssm: [N, H, K, V] float32, the op's recurrent state (N = B, or the number of sequences with cu_seqlens).
    conv: [N, W - 1, C], the last W - 1 inputs of the short causal conv (None when the layer has none).
    seen: [N] int64, tokens seen so far: the position of the next token, for layers with rotary embeddings.
    """

    ssm: torch.Tensor
    conv: torch.Tensor | None = None
    seen: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ssm, self.conv, self.seen) if t is not None)


@dataclass
class KVCache:
    """A softmax layer's keys and values so far; grows with the context (trimmed to the window if there is one).

    k: [B, capacity, H_kv, K] and v: [B, capacity, H_kv, V]; entries [0, length) are filled.
    seen: tokens seen so far, the rotary position of the next token. seen - length is the position
    of entry 0 (more than 0 once a sliding window has dropped old keys).
    window: the layer's sliding window, if any: then the cache never holds more than 2 * window entries.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int
    seen: int
    window: int | None = None

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, : self.length]

    def nbytes(self) -> int:
        """Bytes held by the buffers (their capacity, which generate() sizes to the final length)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` entries, so that appending up to there copies nothing."""
        if capacity > self.k.shape[1]:
            self.k = _resized(self.k, capacity, self.length)
            self.v = _resized(self.v, capacity, self.length)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add [B, T, H_kv, *] keys and values; the buffers double when full (amortised O(1) per token)."""
        end = self.length + k.shape[1]
        if end > self.k.shape[1]:
            self.reserve(max(end, 2 * self.k.shape[1]))
        self.k[:, self.length : end] = k
        self.v[:, self.length : end] = v
        self.length, self.seen = end, self.seen + k.shape[1]

    def keep_last(self, n: int) -> None:
        """Drop all but the newest n entries (a sliding window never looks further back)."""
        if self.length > n:
            self.k[:, :n] = self.k[:, self.length - n : self.length].clone()
            self.v[:, :n] = self.v[:, self.length - n : self.length].clone()
            self.length = n


def _resized(buf: torch.Tensor, capacity: int, filled: int) -> torch.Tensor:
    out = buf.new_empty(buf.shape[0], capacity, *buf.shape[2:])
    out[:, :filled] = buf[:, :filled]
    return out


def state_nbytes(state) -> int:
    """Bytes held by a layer state (a RecurrentState, a KVCache, or None)."""
    return 0 if state is None else state.nbytes()


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in float32 and returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """The output gate of the gated linear layers: rmsnorm(o) * silu(gate), per head (o and gate [..., head_dim])."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * F.silu(gate)


# ----------------------------------------------------------------------------- short causal conv


class ShortConv(nn.Module):
    """Depthwise causal convolution over time with a short kernel, then SiLU (as in Mamba and DeltaNet).

    y_t = silu(bias + sum_j w_j * x_{t - W + 1 + j}). Its cache is the last W - 1 inputs, so that a
    sequence can be continued token by token. With cu_seqlens each packed sequence sees only its own
    inputs (and its own cache): nothing leaks across a boundary.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"ShortConv: kernel_size must be at least 2, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        bound = 1 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise conv
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, L, C] -> [R, L - W + 1, C]: the valid part of the depthwise convolution."""
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if x.shape[1] < self.kernel_size:  # no complete window: no tokens
            return x.new_empty(x.shape[0], 0, x.shape[2])
        if x.shape[1] - self.kernel_size < 16:  # decoding: a few windows, cheaper than setting up a conv kernel
            y = (x.unfold(1, self.kernel_size, 1) * w).sum(-1) + b  # unfold: [R, L - W + 1, C, W]
        else:
            y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), b, groups=x.shape[-1]).transpose(1, 2)
        return F.silu(y)

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C]; cache [B, W - 1, C] (or [N, W - 1, C] with cu_seqlens) or None for zeros.

        Returns (y [B, T, C], new cache [B or N, W - 1, C]).
        """
        W = self.kernel_size
        if cu_seqlens is None:
            if cache is None:
                cache = x.new_zeros(x.shape[0], W - 1, x.shape[-1])
            xe = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, W - 1 + T, C]
            return self._conv(xe), xe[:, -(W - 1) :]
        # Packed: put each sequence's cache in front of it, convolve once, keep the outputs of real tokens. Every
        # place is found on the device (no read of cu_seqlens on the host, which would wait for a GPU, and no loop
        # over the sequences): sequence n's cache rows start at a_n + n (W - 1), and its token t sits at
        # t + (n + 1) (W - 1), with a_n its first token.
        T, C = x.shape[1], x.shape[2]
        N = cu_seqlens.shape[0] - 1
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        if cache is None:
            cache = x.new_zeros(N, W - 1, C)
        tokens = torch.arange(T, device=x.device)
        seq = torch.bucketize(tokens, cu[1:], right=True)  # each token's sequence
        at = tokens + (seq + 1) * (W - 1)
        lag = torch.arange(W - 1, device=x.device)
        shift = torch.arange(N, device=x.device) * (W - 1)
        cache_at = ((cu[:-1] + shift)[:, None] + lag).reshape(-1)
        xe = x.new_zeros(T + N * (W - 1), C).index_copy(0, at, x[0])
        xe = xe.index_copy(0, cache_at, cache.reshape(-1, C).to(x.dtype))
        y = self._conv(xe[None])[0]  # output i reads xe[i : i + W]: token t's is y[at_t - (W - 1)]
        new_cache = xe[(cu[1:] + shift)[:, None] + lag]  # the last W - 1 rows of each sequence's stretch
        return y[at - (W - 1)][None], new_cache


# ----------------------------------------------------------------------------- positions and rotary embeddings


def token_positions(
    B: int, T: int, device, seen: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Position of every token, [B, T] int64: its index in its own sequence plus the tokens seen before.

    seen: [N] tokens each sequence has already seen (from the layer state), or None for zeros.
    With cu_seqlens (B = 1) positions restart at every packed sequence.
    """
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        offset = seen[:, None] if seen is not None else 0
        return (t[None, :] + offset).expand(B, T)
    cu = cu_seqlens.to(device)
    seq = torch.bucketize(t, cu[1:], right=True)  # [T], the sequence of each token
    pos = t - cu[seq]
    if seen is not None:
        pos = pos + seen[seq]
    return pos[None]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021) on the first `dim` channels of each head, half-split pairs."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be even, got {dim}")
        self.dim = dim
        self.register_buffer(
            "inv_freq", theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim), persistent=False
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] with D >= dim; positions [B or 1, T] int64. Returns x rotated, in x's dtype."""
        angle = positions[..., None].float() * self.inv_freq  # [B, T, dim / 2]
        cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]  # [B, T, 1, dim / 2]
        rot, rest = x[..., : self.dim].float(), x[..., self.dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rot.to(x.dtype), rest], dim=-1)


# ----------------------------------------------------------------------------- sequence helpers


def reverse_time(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse [B, T, ...] along T, each packed sequence on its own when cu_seqlens is given."""
    if cu_seqlens is None:
        return x.flip(1)
    T = x.shape[1]
    t = torch.arange(T, device=x.device)
    cu = cu_seqlens.to(x.device)
    seq = torch.bucketize(t, cu[1:], right=True)
    return x[:, cu[seq] + cu[seq + 1] - 1 - t]


def check_layer_input(layer: str, x, cu_seqlens) -> None:
    """x must be [B, T, D] floating; cu_seqlens (if any) needs B = 1 (the ops check the rest)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"{layer}: x must be a floating [B, T, D] tensor, got shape {list(x.shape)} {x.dtype}")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(
            f"{layer}: with cu_seqlens, x must be [1, T, D] (sequences packed along T), got {list(x.shape)}"
        )


def num_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def resolve_heads(layer: str, d_model: int, n_heads: int, head_dim: int | None) -> int:
    """The per-head width: head_dim if given, else d_model / n_heads (which must then divide)."""
    if n_heads < 1:
        raise ValueError(f"{layer}: n_heads must be positive, got {n_heads}")
    if head_dim is not None:
        if head_dim < 1:
            raise ValueError(f"{layer}: head_dim must be positive, got {head_dim}")
        return head_dim
    if d_model % n_heads:
        raise ValueError(f"{layer}: d_model={d_model} is not divisible by n_heads={n_heads}; pass head_dim")
    return d_model // n_heads


def check_state(layer: str, state, kind: type) -> None:
    if state is not None and not isinstance(state, kind):
        raise TypeError(
            f"{layer}: state must be a {kind.__name__} (from an earlier call) or None, got {type(state).__name__}"
        )


# ----------------------------------------------------------------------------- projections and the layer base


def repeat_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, H_kv, D] -> [B, T, n_heads, D], each kv head shared by n_heads / H_kv consecutive query heads."""
    groups = n_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


class QKV(nn.Module):
    """The q, k, v projections to heads, with an optional short causal conv over all three.

    q is [B, T, H, K]; k [B, T, H_kv, K] and v [B, T, H_kv, V] are shared by groups of H / H_kv query heads
    (grouped-query attention). One depthwise conv over the concatenated channels is the same as a
    separate conv for each of q, k and v.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_k: int, head_v: int, conv_size: int = 0):
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads={n_heads}, got n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_k, self.head_v = n_heads, n_kv_heads, head_k, head_v
        self.q_proj = nn.Linear(d_model, n_heads * head_k, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_k, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_v, bias=False)
        self.sizes = [n_heads * head_k, n_kv_heads * head_k, n_kv_heads * head_v]
        self.conv = ShortConv(sum(self.sizes), conv_size) if conv_size else None

    def forward(self, x: torch.Tensor, conv_cache: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """x [B, T, D] -> (q [B, T, H, K], k [B, T, H_kv, K], v [B, T, H_kv, V], new conv cache or None)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_cache = None
        if self.conv is not None:
            qkv, new_cache = self.conv(torch.cat([q, k, v], dim=-1), conv_cache, cu_seqlens)
            q, k, v = qkv.split(self.sizes, dim=-1)
        B, T = x.shape[:2]
        q = q.reshape(B, T, self.n_heads, self.head_k)
        k = k.reshape(B, T, self.n_kv_heads, self.head_k)
        v = v.reshape(B, T, self.n_kv_heads, self.head_v)
        return q, k, v, new_cache


class RecurrentLayer(nn.Module):
    """Base of the linear-attention and SSM layers: forward(x, state, cu_seqlens) -> (y, new_state).

    Subclasses write ``mix(x, state, cu_seqlens)``, the causal layer. With causal=False (an encoder)
    the layer reads the sequence both ways with the same weights, y = mix(x) + reverse(mix(reverse(x))),
    since gated and delta-rule recurrences have no one-pass bidirectional form; such a layer keeps no state.
    """

    causal: bool = True

    def mix(
        self, x: torch.Tensor, state: RecurrentState | None, cu_seqlens: torch.Tensor | None
    ) -> tuple[torch.Tensor, RecurrentState]:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, state: RecurrentState | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RecurrentState | None]:
        """x [B, T, D] (or [1, T, D] with cu_seqlens int [N + 1]); state from an earlier call or None.

        Returns y [B, T, D] in x's dtype and the state after the last token (float32 recurrent state,
        [B or N, ...]); None when the layer is bidirectional.
        """
        name = type(self).__name__
        check_layer_input(name, x, cu_seqlens)
        check_state(name, state, RecurrentState)
        if state is not None and state.ssm.shape[0] != num_sequences(x, cu_seqlens):
            rows = "N = len(cu_seqlens) - 1" if cu_seqlens is not None else "B"
            raise ValueError(
                f"{name}: the state holds {state.ssm.shape[0]} rows but x has {rows} = "
                f"{num_sequences(x, cu_seqlens)} sequences (x {list(x.shape)})"
            )
        if self.causal:
            return self.mix(x, state, cu_seqlens)
        if state is not None:
            raise ValueError(f"{name}: a bidirectional layer (causal=False) reads whole sequences and takes no state")
        y_fwd, _ = self.mix(x, None, cu_seqlens)
        y_bwd, _ = self.mix(reverse_time(x, cu_seqlens), None, cu_seqlens)
        return y_fwd + reverse_time(y_bwd, cu_seqlens), None
