"""The contract every op in ``linattn.ops`` shares: input checks, shapes and impl dispatch.

Every public op validates its arguments here, so that a user mistake becomes a ``ValueError`` or
``TypeError`` that names the argument and the shapes it got, never an ``AssertionError`` deep inside
an implementation and never a silently wrong answer.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

IMPL_CHOICES = ("auto", "naive", "chunk", "triton")


@dataclass(frozen=True)
class Dims:
    """Sizes read off q, k and v: q, k are [B, T, H, K], v is [B, T, H, V]; N is the number of sequences."""

    B: int
    T: int
    H: int
    K: int
    V: int
    N: int
    varlen: bool = False


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def check_tensor(op: str, name: str, x, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating dtype, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {_shape(x)}")


def check_qkv(op: str, q, k, v) -> tuple[int, int, int, int, int]:
    """Check q, k [B, T, H, K] and v [B, T, H, V]; return (B, T, H, K, V)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, x, ndim=4)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have the shape of q, [B, T, H, K] = {_shape(q)}, got {_shape(k)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, V] with B, T, H = {list(q.shape[:3])} as in q, got {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    return B, T, H, K, v.shape[-1]


def check_same_device(op: str, name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but q is on {ref.device}")


# cu_seqlens found valid, by id: (a weak reference to the tensor, its version counter, T). Checking its values
# reads them on the host, which for a GPU tensor waits for the device; a model passes one cu_seqlens to every
# layer, so each tensor is read once, and again only after an in-place change (which moves its version counter).
_valid_bounds: dict[int, tuple[weakref.ref, int, int]] = {}


def _known_valid(cu_seqlens: torch.Tensor, T: int) -> bool:
    hit = _valid_bounds.get(id(cu_seqlens))
    return hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version and hit[2] == T


def _remember_valid(cu_seqlens: torch.Tensor, T: int) -> None:
    key = id(cu_seqlens)
    _valid_bounds[key] = (weakref.ref(cu_seqlens, lambda _: _valid_bounds.pop(key, None)), cu_seqlens._version, T)


def check_cu_seqlens(op: str, cu_seqlens, B: int, T: int) -> int:
    """Check packed-sequence boundaries; return the number of sequences N (B when there are none). The values are
    read (a wait for the device) the first time a tensor is seen, and after it changes in place; not for
    inference-mode tensors (no version counter) or while torch.compile traces, which read them each call."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"{op}: cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {_shape(cu_seqlens)}")
    if B != 1:
        raise ValueError(f"{op}: with cu_seqlens the batch size B must be 1 (sequences are packed along T), got B={B}")
    remember = not cu_seqlens.is_inference() and not torch.compiler.is_compiling()
    if remember and _known_valid(cu_seqlens, T):
        return cu_seqlens.numel() - 1
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got {bounds[0]} (cu_seqlens={bounds})")
    if bounds[-1] != T:
        raise ValueError(f"{op}: cu_seqlens must end at T={T}, got {bounds[-1]} (cu_seqlens={bounds})")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {bounds}")
    if remember:
        _remember_valid(cu_seqlens, T)
    return len(bounds) - 1


def check_gate(op: str, name: str, g, q: torch.Tensor, dims: Dims, per_key: bool) -> None:
    """g is [B, T, H] (one log-decay per head) or, with per_key, [B, T, H, K]."""
    check_tensor(op, name, g)
    want = [dims.B, dims.T, dims.H] + ([dims.K] if per_key else [])
    if _shape(g) != want:
        layout = "[B, T, H, K]" if per_key else "[B, T, H]"
        raise ValueError(f"{op}: {name} must have shape {layout} = {want}, got {_shape(g)}")
    check_same_device(op, name, g, q)


# A log-decay at or below GATE_FLOOR is a decay of exactly 0 in every float format (e^-1e4 underflows even in
# float64), a reset of the state. -inf (log 0, as log(sigmoid(x)) gives where sigmoid underflows), or a finite gate
# so negative that a sum of them overflows, would make the chunked forms' differences of sums -inf - (-inf) = NaN
# (or, where such a NaN is masked, a silently wrong result). So the ops floor their gates here first: no result
# changes, and the gradient at a floored gate is 0, as the true one is.
GATE_FLOOR = -1e4


def floor_gate(g: torch.Tensor) -> torch.Tensor:
    """g with every log-decay below GATE_FLOOR raised to it (NaN stays NaN)."""
    return g.clamp_min(GATE_FLOOR)


def check_initial_state(op: str, s, q: torch.Tensor, dims: Dims, v_dim: int) -> None:
    if s is None:
        return
    check_tensor(op, "initial_state", s)
    want = [dims.N, dims.H, dims.K, v_dim]
    if _shape(s) != want:
        rows = "N (one per sequence in cu_seqlens)" if dims.varlen else "B"
        raise ValueError(f"{op}: initial_state must have shape [{rows}, H, K, V] = {want}, got {_shape(s)}")
    check_same_device(op, "initial_state", s, q)


def check_scale(op: str, scale, K: int) -> float:
    if scale is None:
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def check_common(op: str, q, k, v, scale, initial_state, cu_seqlens, v_dim: int | None = None) -> tuple[Dims, float]:
    """The checks every recurrent op needs; v_dim overrides V for the state (normalised linear attention)."""
    B, T, H, K, V = check_qkv(op, q, k, v)
    N = check_cu_seqlens(op, cu_seqlens, B, T)
    dims = Dims(B, T, H, K, V, N, varlen=cu_seqlens is not None)
    check_initial_state(op, initial_state, q, dims, V if v_dim is None else v_dim)
    return dims, check_scale(op, scale, K)


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """Recurrent states are float32; float64 inputs (gradcheck) keep float64 all the way."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_result(q: torch.Tensor, v: torch.Tensor, dims: Dims, v_dim: int, initial_state, output_final_state: bool):
    """No tokens (T = 0) or no sequences (B = 0): an empty output, and the initial state (zeros when none was given)
    passed through."""
    o = v.new_empty(dims.B, dims.T, dims.H, dims.V)
    if not output_final_state:
        return o, None
    if initial_state is not None:
        return o, initial_state.to(state_dtype(q))
    return o, q.new_zeros(dims.N, dims.H, dims.K, v_dim, dtype=state_dtype(q))


# Up to this many tokens (per sequence) the token recurrence runs instead of the chunked form: "auto" picks the
# naive recurrence, and the Triton paths their decode kernel when no gradient is needed. A decode step is cheaper
# than a padded chunk.
RECURRENT_MAX_T = 16


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(
    op: str, impl, impls: dict[str, Callable], q: torch.Tensor, T: int, triton_ok: Callable | None = None
) -> Callable:
    """Pick the implementation function.

    ``impls`` maps each name this op provides to its function. "auto" takes triton on CUDA when the
    op has a triton path that accepts the call; otherwise the recurrence for a few tokens, else chunk.
    ``triton_ok()`` returns None when the triton path can serve the call, or the reason it cannot.
    """
    if not isinstance(impl, str) or impl not in IMPL_CHOICES:
        raise ValueError(f"{op}: impl must be one of {IMPL_CHOICES}, got {impl!r}")
    if impl == "auto":
        if "triton" in impls and q.is_cuda and (triton_ok is None or triton_ok() is None):
            return impls["triton"]
        return impls["naive"] if T <= RECURRENT_MAX_T else impls["chunk"]
    if impl not in impls:
        have = ", ".join(repr(n) for n in impls)
        raise ValueError(f"{op}: impl={impl!r} is not available for this op; it provides {have} (and 'auto')")
    if impl == "triton" and triton_ok is not None:
        why = triton_ok()
        if why is not None:
            raise ValueError(f"{op}: impl='triton' cannot serve this call: {why}")
    return impls[impl]


def dispatch(
    op: str,
    impls: dict[str, Callable],
    impl,
    dims: Dims,
    args: tuple,
    *,
    v_dim: int,
    scale: float,
    initial_state,
    output_final_state: bool,
    cu_seqlens,
    triton_ok: Callable | None = None,
    **options,
):
    """Run ``impls[impl](*args, scale=..., initial_state=..., ...)``, or return the empty result (no tokens, or an
    empty batch, for which the kernels would launch no programs)."""
    q, v = args[0], args[2]
    fn = resolve_impl(op, impl, impls, q, dims.T, triton_ok)
    if dims.T == 0 or dims.B == 0:
        return empty_result(q, v, dims, v_dim, initial_state, output_final_state)
    return fn(
        *args,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **options,
    )
