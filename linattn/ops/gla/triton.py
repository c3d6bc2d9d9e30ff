"""Triton kernels for GLA (a log-decay per head, token and key channel): launchers, autograd, public function.

One chunk kernel (triton_kernels.py) serves the forward pass and all three backward passes. Its
contraction dim is "K" and its output dim "V"; the per-key gate sits on the contraction side
(GATE_ON_OUT=False) or on the output side (GATE_ON_OUT=True) of the state:

    forward   o  = scale S_t^T q_t                 q' = q,  k' = k,  v' = v,  state S0            gate on K'
    dq        dq = scale S_t do_t                  q' = do, k' = v,  v' = k,  state S0^T          gate on V'
    dk        dk = dS_t v_t      (time reversed)   q' = v,  k' = do, v' = q,  state 0 (see below)  gate on V'
    dv        dv = dS_t^T k_t    (time reversed)   q' = k,  k' = q,  v' = do, state dS_T / scale   gate on K'

dg, key channel by key channel (each channel of the state is a simple-GLA recurrence of its own):

    dg_t = sum_{r >= t} (q_r dq_r - k_r dk'_r)  +  sum_{r < t} k_r dkT_r  +  exp(B_T) sum_v dS_T S_0

where dkT_r = exp(B_T - B_r) dS_T v_r is the final state's share of dk, dk' = dk - dkT, and B_t the
log-decay from the sequence's start. The products are taken in float32 inside the dq and dk passes,
each without the token's pair with itself (the two self terms are equal and would cancel only up to
rounding). The telescoped form that simple_gla uses, sum_{r >= t} (q_r dq_r - k_r dk_r) + <dS_T, S_T>,
cancels the final state's share only up to rounding, an absolute error of eps |<dS_T, S_T>| that is
far above dg itself under strong decay; so here the dk pass starts from a zero state, and the dq pass,
which runs forward in time, also writes dkT and the forward sum of k dkT. Every term of dg is then
accurate relative to itself.
"""

from __future__ import annotations

import torch
import triton

from linattn.ops.common.triton_ops import register_decay_ops
from linattn.ops.common.triton_recurrent import recurrent
from linattn.ops.common.triton_utils import (
    kernel_flags,
    precise_exp,
    reverse_cumsum_per_sequence,
    store_dtype,
    triton_unsupported,
)
from linattn.ops.gla.triton_kernels import _chunk_kernel

# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

BT = 64  # chunk length
BC = 16  # sub-chunk length: the smallest tl.dot tile
BKD = 32  # slice of the key dim for the exact in-sub-chunk decay ([BC, BC, BKD] tile)
BV_MAX = 32


def _blocks(K: int, V: int) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(BV_MAX if BK <= 128 else BV_MAX // 2, triton.next_power_of_2(V)))
    return BK, BV


def sweep(
    q,
    k,
    v,
    g,
    h0,
    scale: float,
    cu_seqlens,
    *,
    reverse=False,
    gate_on_out=False,
    w=None,
    final_grad=None,
    out_dtype=None,
):
    """One pass of the chunk kernel over every sequence.

    q, k [B, T, H, K]; v [B, T, H, V]; g float32 [B, T, H, V] if gate_on_out else [B, T, H, K];
    h0 [N, H, K, V] float32 or None. Returns o [B, T, H, V] (out_dtype), the state after the pass
    [N, H, K, V] float32, and, when w [B, T, H, V] is given, scale * w * o without each token's pair
    with itself, [B, T, H, V] float32 (else None). With final_grad (dS_T^T [N, H, K, V] float32, in the
    dq pass only) it also returns dkt and fin, [B, T, H, V] float32 each (see _chunk_kernel).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV = _blocks(K, V)
    out_dtype = out_dtype or v.dtype
    o = torch.empty(B, T, H, V, dtype=store_dtype(out_dtype), device=q.device)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    wo = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device) if w is not None else None
    has_final = final_grad is not None
    dkt = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device) if has_final else None
    fin = torch.empty_like(dkt) if has_final else None
    flags = kernel_flags(q.dtype)
    flags.pop("UPCAST_QK")  # every dot operand is float32 here
    dummy = ht  # stands in for absent optional pointers; never read
    _chunk_kernel[(triton.cdiv(V, BV), N * H)](
        q,
        k,
        v,
        g,
        h0 if h0 is not None else dummy,
        o,
        ht,
        w if w is not None else dummy,
        wo if wo is not None else dummy,
        final_grad if has_final else dummy,
        dkt if has_final else dummy,
        fin if has_final else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BC=BC,
        BK=BK,
        BKD=min(BK, BKD),
        BV=BV,
        G=V if gate_on_out else K,  # the gate's dim and its block
        BG=BV if gate_on_out else BK,
        GATE_ON_OUT=gate_on_out,
        HAS_H0=h0 is not None,
        HAS_W=w is not None,
        HAS_FINAL=has_final,
        REVERSE=reverse,
        VARLEN=cu_seqlens is not None,
        PRECISE_EXP=precise_exp(q.dtype),
        **flags,
    )
    if has_final:
        return o.to(out_dtype), ht, wo, dkt, fin
    return o.to(out_dtype), ht, wo


def backward(do, dht, q, k, v, g, h0, ht, scale: float, cu_seqlens):
    """Gradients (dq, dk, dv, dg, dh0 or None) of the chunked forward; see the module docstring."""
    h0_t = h0.transpose(-1, -2).contiguous() if h0 is not None else None
    if dht is None:
        dq, _, q_dq = sweep(do, v, k, g, h0_t, scale, cu_seqlens, gate_on_out=True, w=q, out_dtype=q.dtype)
        dk, _, k_dk = sweep(
            v, do, q, g, None, scale, cu_seqlens, reverse=True, gate_on_out=True, w=k, out_dtype=k.dtype
        )
        final_term = 0.0
    else:
        # The final state's gradient reaches dk and dg outside the dk pass: the telescoped sum would
        # cancel its share of dg only up to rounding, an error far above dg itself for strong decays.
        dq, _, q_dq, dk_final, final_term = sweep(
            do,
            v,
            k,
            g,
            h0_t,
            scale,
            cu_seqlens,
            gate_on_out=True,
            w=q,
            out_dtype=q.dtype,
            final_grad=dht.transpose(-1, -2).contiguous(),
        )
        dk, _, k_dk = sweep(
            v, do, q, g, None, scale, cu_seqlens, reverse=True, gate_on_out=True, w=k, out_dtype=torch.float32
        )
        dk = (dk + dk_final).to(k.dtype)
    r = (dht / scale).contiguous() if dht is not None else None
    dv, dh0, _ = sweep(k, q, do, g, r, scale, cu_seqlens, reverse=True, out_dtype=v.dtype)
    dg = reverse_cumsum_per_sequence(q_dq - k_dk, cu_seqlens) + final_term
    return dq, dk, dv, dg, (dh0 * scale if h0 is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration and the public function
# ----------------------------------------------------------------------------------------------------------------


def _forward(q, k, v, g, h0, scale, cu_seqlens):
    o, ht, _ = sweep(q, k, v, g, h0, scale, cu_seqlens)
    return o, ht


# Same contract as ``naive_gla``, with g [B, T, H, K].
triton_gla = register_decay_ops("gla", _forward, backward)


SCALARS = dict(scale="fp32", T="i32")  # the kernels' runtime scalars


def compile_variants():
    """The kernel variants the launchers use, for tests/ops/compile_kernels.py to compile for sm_90 without a GPU.

    Each is (label, kernel, pointer dtypes, constexprs, launch options).
    """
    f32 = "fp32"
    passes = {  # name: (gate_on_out, reverse, has_w, has_final, dtype of o)
        "forward": (False, False, False, False, None),
        "dq": (True, False, True, True, None),
        "dk": (True, True, True, False, f32),
        "dv": (False, True, False, False, None),
    }
    # Compiling is slow (a minute or more per float32 variant on a CI core): every pass in bfloat16 at the
    # standard head size, and float16's dq pass with varlen, catch what the interpreter lets through.
    for dt, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        flags = kernel_flags(torch_dtype, gpu=True)
        flags.pop("UPCAST_QK")
        for K, V in ((128, 128),):
            for name, (on_out, reverse, has_w, has_final, o_dt) in passes.items():
                if dt == "fp16" and name != "dq":
                    continue
                Kk, Vk = (V, K) if on_out else (K, V)  # the kernel's contraction and output dims
                BK, BV = _blocks(Kk, Vk)
                ptrs = dict(q=dt, k=dt, v=dt, g=f32, h0=f32, o=o_dt or dt, ht=f32, w=dt, wo=f32)
                ptrs |= dict(dst=f32, dkt=f32, fin=f32, cu_seqlens="i32")
                const = dict(H=16, K=Kk, V=Vk, BT=BT, BC=BC, BK=BK, BKD=min(BK, BKD), BV=BV, G=Vk if on_out else Kk)
                const |= dict(BG=BV if on_out else BK, GATE_ON_OUT=on_out, HAS_H0=True, HAS_W=has_w)
                const |= dict(HAS_FINAL=has_final, REVERSE=reverse, VARLEN=dt == "fp16", PRECISE_EXP=dt == "fp32")
                yield f"chunk {dt} K={K} V={V} {name}", _chunk_kernel, ptrs, const | flags, dict(scalars=SCALARS)


__all__ = ["triton_gla", "triton_unsupported", "sweep", "backward", "recurrent", "BT"]
