from __future__ import annotations

import torch

from linattn.ops._contract import check_common, check_gate, dispatch, floor_gate
from linattn.ops.common.optional_triton import register_triton
from linattn.ops.simple_gla.chunk import chunk_simple_gla
from linattn.ops.simple_gla.naive import naive_simple_gla

IMPLS = {"naive": naive_simple_gla, "chunk": chunk_simple_gla}
triton_check = register_triton(IMPLS, "linattn.ops.simple_gla.triton", "triton_simple_gla")


def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with one data-dependent decay per head.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T and o_t = scale S_t^T q_t.

    This one form covers Lightning attention (a fixed decay) and the SSD core of Mamba-2
    (g = dt * A, k = B, q = C, v = dt * x).

    Args:
        q, k: [B, T, H, K], float32, bfloat16 or float16 (one dtype for q, k, v).
        v: [B, T, H, V].
        g: [B, T, H], the log-decay, <= 0; any floating dtype. Kept in log space throughout.
        scale: multiplies q; defaults to K^-0.5.
        initial_state: [B, H, K, V] (or [N, H, K, V] with cu_seqlens), any floating dtype.
        output_final_state: return the state after the last token.
        cu_seqlens: int [N + 1] boundaries of packed sequences; B must be 1.
        impl: "auto", "naive" (token recurrence, float32), "chunk" (chunked, any device), "triton" (CUDA).

    Returns:
        o: [B, T, H, V] in v's dtype.
        final_state: [B, H, K, V] (or [N, H, K, V]) float32, or None unless output_final_state.
    """
    op = "simple_gla"
    dims, scale = check_common(op, q, k, v, scale, initial_state, cu_seqlens)
    check_gate(op, "g", g, q, dims, per_key=False)
    g = floor_gate(g)  # one log-decay per head: a small [B, T, H] pass (see GATE_FLOOR)
    return dispatch(
        op,
        IMPLS,
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
