"""Decoding with the state updated in place, for the decay family (linear attention, retention, simple GLA, GLA).

A decode loop replayed from a CUDA graph needs its state at a fixed address; writing a new state each step
and copying it back would move the state twice. ``decay_decode_`` advances the caller's state in place.
"""

from __future__ import annotations

import torch

from linattn.ops._contract import check_common, check_gate, check_same_device, check_tensor
from linattn.ops.gla.naive import naive_gla

try:
    from linattn.ops.common.triton_recurrent import recurrent
    from linattn.ops.common.triton_utils import on_device_of, triton_unsupported
except ImportError as err:  # no Triton here: the token recurrence serves every call
    if err.name is None or err.name.split(".")[0] != "triton":
        raise
    recurrent = on_device_of = triton_unsupported = None


if recurrent is not None:

    @torch.library.custom_op("linattn::decay_decode_", mutates_args=("state",))
    def _decode_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None,
        state: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        with on_device_of(q):
            o, _ = recurrent(q, k, v, g, state, scale, cu_seqlens, out_state=state)
        return o

    @_decode_op.register_fake
    def _(q, k, v, g, state, cu_seqlens, scale):
        return torch.empty_like(v)


def decay_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advance ``state`` in place by a few tokens and return their outputs (inference only).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T and o_t = scale S_t^T q_t, the recurrence of ``simple_gla`` (g per head),
    ``gla`` (g per key channel) and ``linear_attn`` without a normaliser (g None). For ``retention`` pass
    g = ``retention_log_decay(H, ...)`` expanded to [B, T, H].

    Args:
        q, k: [B, T, H, K], float32, bfloat16 or float16; v: [B, T, H, V].
        g: None, [B, T, H] or [B, T, H, K] log-decay (<= 0), any floating dtype.
        state: [B, H, K, V] (or [N, H, K, V] with cu_seqlens) float32 and contiguous; overwritten with the state
            after each sequence's last token.
        scale: multiplies q; defaults to K^-0.5.
        cu_seqlens: int [N + 1] boundaries of packed sequences; B must be 1.

    Returns:
        o: [B, T, H, V] in v's dtype.

    On CUDA the Triton decode kernel reads each state tile once and writes it back in place; elsewhere the token
    recurrence runs and its final state is copied into ``state``.
    """
    op = "decay_decode_"
    check_tensor(op, "state", state)
    dims, scale = check_common(op, q, k, v, scale, None, cu_seqlens)
    want = [dims.N, dims.H, dims.K, dims.V]
    if list(state.shape) != want:
        rows = "N (one per sequence in cu_seqlens)" if dims.varlen else "B"
        raise ValueError(f"{op}: state must have shape [{rows}, H, K, V] = {want}, got {list(state.shape)}")
    check_same_device(op, "state", state, q)
    if g is not None:
        check_gate(op, "g", g, q, dims, per_key=g.ndim == 4)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"{op}: state must be a contiguous float32 tensor to be updated in place, got {state.dtype}"
            f"{'' if state.is_contiguous() else ' (not contiguous)'} of shape {list(state.shape)}"
        )
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, g, state)):
        raise ValueError(f"{op}: updates state in place, for inference; for gradients call the op with initial_state")
    if dims.T == 0:
        return v.new_empty(v.shape)
    g = g.float().contiguous() if g is not None else None
    if recurrent is not None and triton_unsupported(q, v) is None:
        return _decode_op(q.contiguous(), k.contiguous(), v.contiguous(), g, state, cu_seqlens, float(scale))
    o, final = naive_gla(q, k, v, g, scale=scale, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    state.copy_(final)
    return o
