from __future__ import annotations

import torch

from linattn.ops._contract import _shape, check_qkv, check_same_device, check_scale, check_tensor
from linattn.ops.linformer.naive import naive_linformer
from linattn.ops.linformer.sdpa import sdpa_linformer

IMPLS = {"naive": naive_linformer, "sdpa": sdpa_linformer}


def _check_projection(op: str, name: str, P, H: int, T: int, q: torch.Tensor) -> None:
    check_tensor(op, name, P)
    if P.ndim not in (2, 3) or (P.ndim == 3 and P.shape[0] != H):
        raise ValueError(f"{op}: {name} must be [k, n] or, per head, [H, k, n] with H = {H}, got {_shape(P)}")
    if P.shape[-2] < 1:
        raise ValueError(f"{op}: {name} must project to k >= 1 rows, got {_shape(P)}")
    if P.shape[-1] < T:
        raise ValueError(
            f"{op}: {name} projects sequences of up to n = {P.shape[-1]} tokens, but T = {T} "
            f"(q is {_shape(q)}); a shorter sequence slices the projection, a longer one cannot"
        )
    check_same_device(op, name, P, q)


def linformer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    E: torch.Tensor,
    F: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, None]:
    """Linformer (Wang et al., 2020): exact softmax attention over keys and values projected along the sequence.

    K_p = E K and V_p = F V have k rows; o = softmax(scale Q K_p^T) V_p. Every query mixes every token
    (future ones included) through the projection, so there is no causal form.

    Args:
        q, k: [B, T, H, K], any floating dtype (q, k, v share it).
        v: [B, T, H, V].
        E, F: [k, n] shared by the heads, or [H, k, n] per head, with n >= T; a shorter sequence uses the
            first T columns. E and F have one shape; any floating dtype (the projection runs in float32).
        key_padding_mask: [B, T] bool, True where a token is padding: its key and value are zeroed before
            the projection (torch.nn.MultiheadAttention's convention).
        causal: must be False; True raises ValueError.
        scale: defaults to K^-0.5.
        impl: "auto" or "sdpa" (torch's scaled_dot_product_attention), or "naive" (float32, written out).

    Returns:
        (o [B, T, H, V] in v's dtype, None): Linformer keeps no recurrent state.
    """
    op = "linformer"
    if causal:
        raise ValueError(
            f"{op}: causal=True is not supported: the projections E K and F V mix every token, "
            "future ones included, into each of the k rows every query attends to"
        )
    B, T, H, K, V = check_qkv(op, q, k, v)
    scale = check_scale(op, scale, K)
    _check_projection(op, "E", E, H, T, q)
    _check_projection(op, "F", F, H, T, q)
    if E.shape != F.shape:
        raise ValueError(f"{op}: E and F must have one shape, got E {_shape(E)} and F {_shape(F)}")
    keep = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            what = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
            raise TypeError(f"{op}: key_padding_mask must be a bool tensor [B, T] (True = padding), got {what}")
        if _shape(key_padding_mask) != [B, T]:
            raise ValueError(f"{op}: key_padding_mask must be [B, T] = {[B, T]}, got {_shape(key_padding_mask)}")
        check_same_device(op, "key_padding_mask", key_padding_mask, q)
        keep = ~key_padding_mask
    if impl == "auto":
        impl = "sdpa"
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be 'auto', 'sdpa' or 'naive', got {impl!r}")
    if T == 0:
        return v.new_empty(B, 0, H, V), None
    return IMPLS[impl](q, k, v, E[..., :T], F[..., :T], keep=keep, scale=scale), None
