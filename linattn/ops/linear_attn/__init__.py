from __future__ import annotations

from collections.abc import Callable

import torch

from linattn.feature_maps import get_feature_map
from linattn.ops._contract import check_common, check_qkv, dispatch
from linattn.ops.common.optional_triton import register_triton
from linattn.ops.linear_attn.chunk import chunk_linear_attn
from linattn.ops.linear_attn.naive import naive_linear_attn

IMPLS = {"naive": naive_linear_attn, "chunk": chunk_linear_attn}
triton_check = register_triton(IMPLS, "linattn.ops.linear_attn.triton", "triton_linear_attn", "linear_attn_unsupported")


def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "identity",
    normalize: bool = False,
    causal: bool = True,
    *,
    eps: float = 1e-6,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel linear attention (Katharopoulos et al., 2020): S_t = S_{t-1} + phi(k_t) v_t^T, o_t = scale S_t^T phi(q_t).

    With ``feature_map="identity"``, ``normalize=False`` and ``scale=1.0`` this is exactly
    o_t = sum_{s <= t} (q_t . k_s) v_s.

    Args:
        q, k: [B, T, H, K], float32, bfloat16 or float16 (one dtype for q, k, v).
        v: [B, T, H, V].
        feature_map: "identity", "elu1" (elu + 1), "relu", or a callable mapping [..., K] to [..., M].
        normalize: divide by the running normaliser, o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps) with
            z_t = z_{t-1} + phi(k_t). z travels in the state as one extra value column.
        causal: if False, every query reads every key (the state after the last token).
        eps: added to the normaliser.
        scale: multiplies phi(q); defaults to K^-0.5 (with normalize it only matters against eps).
        initial_state: [B, H, M, V] or, with normalize, [B, H, M, V + 1] ([N, ...] with cu_seqlens).
        output_final_state: return the state after the last token.
        cu_seqlens: int [N + 1] boundaries of packed sequences; B must be 1.
        impl: "auto", "naive" (token recurrence, float32), "chunk" (chunked, any device), "triton" (CUDA, causal).

    Returns:
        o: [B, T, H, V] in v's dtype.
        final_state: [B, H, M, V (+1)] float32 (or [N, ...]), or None unless output_final_state.
    """
    op = "linear_attn"
    check_qkv(op, q, k, v)
    phi = get_feature_map(feature_map)
    fq, fk = phi(q), phi(k)
    if fq.ndim != 4 or fq.shape[:3] != q.shape[:3] or fk.shape != fq.shape:
        raise ValueError(
            f"{op}: feature_map must map [B, T, H, K] to [B, T, H, M] alike for q and k; "
            f"got {list(fq.shape)} from q {list(q.shape)} and {list(fk.shape)} from k"
        )
    fq, fk = fq.to(v.dtype), fk.to(v.dtype)
    dims, scale = check_common(
        op,
        fq,
        fk,
        v,
        scale if scale is not None else q.shape[-1] ** -0.5,
        initial_state,
        cu_seqlens,
        v_dim=v.shape[-1] + bool(normalize),
    )
    triton_ok = triton_check(fq, v, bool(causal))
    return dispatch(
        op,
        IMPLS,
        impl,
        dims,
        (fq, fk, v),
        v_dim=dims.V + bool(normalize),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        triton_ok=triton_ok,
        normalize=bool(normalize),
        causal=bool(causal),
        eps=eps,
    )
