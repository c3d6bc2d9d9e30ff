from __future__ import annotations

import torch

from linattn.ops._contract import check_common, dispatch, state_dtype
from linattn.ops.simple_gla import IMPLS as SIMPLE_GLA_IMPLS
from linattn.ops.simple_gla import triton_check


def retention_log_decay(H: int, device, dtype) -> torch.Tensor:
    """RetNet's fixed per-head decay in log space: log(1 - 2^(-5-h)) for h = 0 ... H-1, shape [H].

    Built on the device: a tensor from a Python list would be a synchronising host-to-device copy.
    """
    heads = torch.arange(H, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(-5.0 - heads)).to(dtype)


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RetNet's retention (Sun et al., 2023): simple GLA with the fixed decay gamma_h = 1 - 2^(-5-h) per head.

    Args:
        q, k: [B, T, H, K], float32, bfloat16 or float16 (one dtype for q, k, v).
        v: [B, T, H, V].
        scale: multiplies q; defaults to K^-0.5.
        initial_state: [B, H, K, V] (or [N, H, K, V] with cu_seqlens), any floating dtype.
        output_final_state: return the state after the last token.
        cu_seqlens: int [N + 1] boundaries of packed sequences; B must be 1.
        impl: "auto", "naive" (token recurrence, float32), "chunk" (chunked, any device), "triton" (CUDA).

    Returns:
        o: [B, T, H, V] in v's dtype.
        final_state: [B, H, K, V] (or [N, H, K, V]) float32, or None unless output_final_state.
    """
    op = "retention"
    dims, scale = check_common(op, q, k, v, scale, initial_state, cu_seqlens)
    g = retention_log_decay(dims.H, q.device, state_dtype(q))
    g = g.expand(dims.B, dims.T, dims.H)  # [B, T, H]
    return dispatch(
        op,
        SIMPLE_GLA_IMPLS,
        impl,
        dims,
        (q, k, v, g),
        v_dim=dims.V,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        triton_ok=triton_check(q, v),
    )
