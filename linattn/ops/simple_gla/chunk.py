"""Chunked parallel form of simple GLA (one log-decay per head and token), in PyTorch.

With chunk-local cumulative log-decays b_t = g_1 + ... + g_t (t counted from the chunk start) and
S the state entering the chunk:

    o_t    = exp(b_t) q_t^T S  +  sum_{s <= t in chunk} exp(b_t - b_s) (q_t . k_s) v_s
    S_next = exp(b_C) S        +  sum_s exp(b_C - b_s) k_s v_s^T

Every exponent is <= 0 when g <= 0, and b_t - b_s is formed as the segment sum g_{s+1} + ... + g_t
(common.chunking.segsum), never as a difference of running sums. With g = None there is no decay:
plain linear attention.
"""

from __future__ import annotations

import torch

from linattn.ops._contract import state_dtype
from linattn.ops.common.chunking import ChunkLayout, causal_mask, decay_matrix, scan_chunks, suffix_sum


def _decay_step(S, decay, dS):
    # decay is [R, H, 1, 1] (or [R, H, K, 1] for GLA); dS is [R, H, K, V]
    return S, (S * decay + dS if decay is not None else S + dS)


class _RunningStates(torch.autograd.Function):
    """Without decay: the state entering each chunk, S0 + dS_0 + ... + dS_{c-1} [R, H, NC, K, V], and the final
    state [R, H, K, V], for CPU tensors. One in-place add per chunk each way: on CPU, torch's cumsum along a dim
    that is not the innermost (and the flips of its backward) took several times longer than these adds."""

    @staticmethod
    def forward(ctx, S0, dS):
        states = torch.empty_like(dS)
        acc = S0.clone()
        for c in range(dS.shape[2]):
            states[:, :, c] = acc
            acc += dS[:, :, c]
        return states, acc

    @staticmethod
    def backward(ctx, d_states, d_final):
        # d dS_c = d_final + sum of d_states after c;  d S0 = d_final + sum of every d_states.
        acc = d_final.clone()
        d_dS = torch.empty_like(d_states)
        for c in reversed(range(d_states.shape[2])):
            d_dS[:, :, c] = acc
            acc += d_states[:, :, c]
        return acc, d_dS


def chunk_state_passing(layout: ChunkLayout, S0: torch.Tensor, dS: torch.Tensor, decay: torch.Tensor | None):
    """States entering each chunk [R, H, NC, K, V] and final states [N, H, K, V], for S_next = decay * S + dS."""
    if decay is None and not layout.varlen:  # no decay: the states are a running sum
        if dS.device.type == "cpu":
            return _RunningStates.apply(S0, dS)
        ends = S0.unsqueeze(2) + dS.cumsum(2)  # on a GPU one cumsum beats a launch per chunk
        return torch.cat([S0.unsqueeze(2), ends[:, :, :-1]], dim=2), ends[:, :, -1]
    if decay is None:
        return scan_chunks(lambda S, d: _decay_step(S, None, d), S0, layout, dS)
    return scan_chunks(_decay_step, S0, layout, decay, dS)


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] log-decay or None. Returns (o [B, T, H, V], state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    layout = ChunkLayout.build(B, T, chunk_size, cu_seqlens, q.device)
    q, k, v = (layout.to_chunks(x.to(dtype)) for x in (q, k, v))  # [R, H, NC, C, D]
    q = q * scale
    S0 = layout.start_state(initial_state, H, K, V, like=q)

    A = q @ k.transpose(-1, -2)  # [R, H, NC, C, C]
    if g is None:
        A = A.masked_fill(~causal_mask(layout.C, q.device), 0)
        dS = k.transpose(-1, -2) @ v
        states, final = chunk_state_passing(layout, S0, dS, None)
        o = A @ v + q @ states
    else:
        g = layout.to_chunks(g.to(dtype))  # [R, H, NC, C]
        b = g.cumsum(-1)  # log-decay from the chunk start to t
        A = A * decay_matrix(g)
        dS = (k * torch.exp(suffix_sum(g)).unsqueeze(-1)).transpose(-1, -2) @ v
        states, final = chunk_state_passing(layout, S0, dS, torch.exp(b[..., -1:]).unsqueeze(-1))
        o = A @ v + (q * torch.exp(b).unsqueeze(-1)) @ states
    o = layout.from_chunks(o).to(out_dtype)
    return o, (final if output_final_state else None)
