from __future__ import annotations

import torch

from linattn.ops._contract import check_common, check_gate, dispatch, floor_gate
from linattn.ops.common.optional_triton import register_triton
from linattn.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from linattn.ops.gated_delta_rule.naive import naive_gated_delta_rule

IMPLS = {"naive": naive_gated_delta_rule, "chunk": chunk_gated_delta_rule}
triton_check = register_triton(
    IMPLS, "linattn.ops.gated_delta_rule.triton", "triton_gated_delta_rule", check="delta_unsupported"
)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    qk_l2norm: bool = False,
    beta_is_logit: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet (Yang et al., 2025): S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.

    The output is o_t = scale S_t^T q_t. Keys are used as given unless qk_l2norm: L2-normalise them
    for the usual stable regime (beta_t |k_t|^2 <= 2).

    Args:
        q, k: [B, T, H, K], float32, bfloat16 or float16 (one dtype for q, k, v).
        v: [B, T, H, V].
        g: [B, T, H], the log-decay, <= 0; any floating dtype. Kept in log space throughout.
        beta: [B, T, H], the write strength, in (0, 1) (or logits with beta_is_logit); any floating dtype.
        scale: multiplies q; defaults to K^-0.5.
        initial_state: [B, H, K, V] (or [N, H, K, V] with cu_seqlens), any floating dtype.
        output_final_state: return the state after the last token.
        cu_seqlens: int [N + 1] boundaries of packed sequences; B must be 1.
        qk_l2norm: use q / sqrt(|q|^2 + 1e-6) and k / sqrt(|k|^2 + 1e-6) (in float32) in place of q, k;
            gradients flow through the normalisation.
        beta_is_logit: beta holds logits; the write strength is sigmoid(beta) (in float32).
        impl: "auto", "naive" (token recurrence, float32), "chunk" (chunked WY form, any device),
            "triton" (CUDA; chunked WY kernels, or the token recurrence for short calls without gradient).

    Returns:
        o: [B, T, H, V] in v's dtype.
        final_state: [B, H, K, V] (or [N, H, K, V]) float32, or None unless output_final_state.
    """
    op = "gated_delta_rule"
    dims, scale = check_common(op, q, k, v, scale, initial_state, cu_seqlens)
    check_gate(op, "g", g, q, dims, per_key=False)
    g = floor_gate(g)  # one log-decay per head: a small [B, T, H] pass (see GATE_FLOOR)
    check_gate(op, "beta", beta, q, dims, per_key=False)
    return dispatch(
        op,
        IMPLS,
        impl,
        dims,
        (q, k, v, g, beta),
        v_dim=dims.V,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        triton_ok=triton_check(q, v),
        qk_l2norm=bool(qk_l2norm),
        beta_is_logit=bool(beta_is_logit),
    )
