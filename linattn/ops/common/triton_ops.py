"""torch.library registration shared by the decay family's Triton kernels (simple GLA, GLA).

``register_decay_ops(name, forward, backward)`` registers three custom ops, opaque to torch.compile,
with fake tensors and autograd: ``linattn::chunk_<name>``, ``linattn::chunk_<name>_backward`` and
``linattn::recurrent_<name>`` (the decode kernel, ops/common/triton_recurrent.py). It returns the
function that the op's ``impl="triton"`` runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from linattn.ops._contract import RECURRENT_MAX_T
from linattn.ops.common.triton_recurrent import recurrent
from linattn.ops.common.triton_utils import needs_grad, on_device_of, plain_eager, short_for_recurrent

# DECODE_DIRECT: an eager decoding call (no gradient, few tokens, plain tensors, not under torch.compile) launches the
# token-by-token kernel itself, not through its custom op, whose dispatch (autograd's and dynamo's wrappers) only
# torch.compile and fake tensors need; and the kernel reads g (and the delta rules' beta) as given, taking them to
# float32 as it loads them, where casting them first launched a copy each. `linattn generate` decodes eagerly, one
# call per layer and token. Host time of one step (B = 8, H = 16, K = V = 128, bf16; the development machine's CPU
# tensors under the interpreter, the launch stubbed out): gated_delta_rule 35.2 us -> 24.1, delta_rule 33.7 -> 22.7
# (without the direct launch, the casts gone: 33.3 and 31.5), simple_gla 32.5 -> 23.7, gla 32.6 -> 22.4. On an H200
# (session 22) an eager delta-rule step took 0.22-0.26 ms against fla's 0.035-0.14 in the same runs; with it (session
# 23, one call, B = 8, ms, fla's in the same run): delta_rule 0.051 (fla 0.129), gated 0.064 (0.064), simple_gla
# 0.063 (0.097), gla 0.049 (0.120). The delta rules' launcher takes it here too (decode_launch).
DECODE_DIRECT = True


def decode_launch(op, body, *tensors):
    """What a decoding call runs: its custom op ``op``, or (DECODE_DIRECT, on plain tensors outside torch.compile)
    the op's own function ``body`` (same arguments), which launches the kernel without the op's dispatch."""
    return body if DECODE_DIRECT and plain_eager(*tensors) else op


def fake_state(q: torch.Tensor, v: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """A fake final state [N, H, K, V] float32 for torch.compile's fake tensors (every Triton op's ops use it)."""
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(N, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)


def none_tensor(q: torch.Tensor) -> torch.Tensor:
    """What stands for None among a custom op's outputs (they must be tensors): an empty float32 tensor, as for
    a gradient not wanted, or a tensor the forward did not keep for the backward."""
    return q.new_empty(0, dtype=torch.float32)


def _fake_forward(q, k, v, g, h0, cu_seqlens, scale):
    """Shapes of (o, final state) for torch.compile's fake tensors; both forward ops share them."""
    return torch.empty_like(v), fake_state(q, v, cu_seqlens)


def register_decay_ops(
    name: str,
    forward: Callable,
    backward: Callable,
    fake_saved: Callable | None = None,
    keeps: Callable[[], bool] | None = None,
) -> Callable:
    """Register the ops of one decay mechanism and return its Triton entry point.

    forward(q, k, v, g, h0, scale, cu_seqlens) -> (o, final state float32);
    backward(do, dht, q, k, v, g, h0, ht, scale, cu_seqlens) -> (dq, dk, dv, dg or None, dh0 or None),
    where dht is None when the final state got no gradient.

    With ``fake_saved``, forward takes one more argument, keep, and returns after (o, ht) the tensors that the
    backward gets back as ``saved=`` (a list: things the forward formed and the backward would otherwise form
    again, each empty for none), and fake_saved(q, k, v, g, h0, cu_seqlens, scale, keep) gives their fakes. keep
    is whether a gradient is wanted and ``keeps()`` (a mechanism's setting, read at each call; False without it)
    says to keep what costs memory: an argument of the op, not a setting read inside it, so that a compiled graph
    holds what its fakes say. The saved tensors are an output of the chunk op that takes no gradient, and ``run``
    drops them, so nothing outlives a call without autograd.
    """

    @torch.library.custom_op(f"linattn::chunk_{name}", mutates_args=())
    def chunk_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None,
        h0: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        scale: float,
        keep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        with on_device_of(q):
            if fake_saved is None:
                o, ht = forward(q, k, v, g, h0, scale, cu_seqlens)
                return o, ht, []
            o, ht, *saved = forward(q, k, v, g, h0, scale, cu_seqlens, keep)
        return o, ht, saved

    @chunk_op.register_fake
    def _(q, k, v, g, h0, cu_seqlens, scale, keep):
        saved = list(fake_saved(q, k, v, g, h0, cu_seqlens, scale, keep)) if fake_saved is not None else []
        return (*_fake_forward(q, k, v, g, h0, cu_seqlens, scale), saved)

    @torch.library.custom_op(f"linattn::chunk_{name}_backward", mutates_args=())
    def backward_op(
        do: torch.Tensor,
        dht: torch.Tensor | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None,
        h0: torch.Tensor | None,
        ht: torch.Tensor,
        saved: list[torch.Tensor],
        cu_seqlens: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        extra = dict(saved=saved) if fake_saved is not None else {}
        with on_device_of(q):
            dq, dk, dv, dg, dh0 = backward(do, dht, q, k, v, g, h0, ht, scale, cu_seqlens, **extra)
        empty = none_tensor(q)
        return dq, dk, dv, (dg if dg is not None else empty), (dh0 if dh0 is not None else empty.clone())

    @backward_op.register_fake
    def _(do, dht, q, k, v, g, h0, ht, saved, cu_seqlens, scale):
        empty = none_tensor(q)
        dg = torch.empty_like(g) if g is not None else empty
        dh0 = torch.empty_like(h0) if h0 is not None else empty.clone()
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, dh0

    def setup_context(ctx, inputs, output):
        q, k, v, g, h0, cu_seqlens, scale, _ = inputs
        ctx.save_for_backward(q, k, v, g, h0, output[1], cu_seqlens, *output[2])
        ctx.mark_non_differentiable(*output[2])
        ctx.scale = scale
        # An output that got no gradient (the final state, unless the caller used it) arrives as None, not as
        # zeros: the backward then skips the final-state terms instead of computing them from zeros.
        ctx.set_materialize_grads(False)

    def backward_fn(ctx, do, dht, _):
        q, k, v, g, h0, ht, cu_seqlens, *saved = ctx.saved_tensors
        do = do if do is not None else torch.zeros_like(v)
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = backward_op(do.contiguous(), dht, q, k, v, g, h0, ht, saved, cu_seqlens, ctx.scale)
        return dq, dk, dv, (dg if g is not None else None), (dh0 if h0 is not None else None), None, None, None

    chunk_op.register_autograd(backward_fn, setup_context=setup_context)

    def recurrent_body(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None,
        h0: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with on_device_of(q):
            return recurrent(q, k, v, g, h0, scale, cu_seqlens)

    recurrent_op = torch.library.custom_op(f"linattn::recurrent_{name}", mutates_args=())(recurrent_body)
    recurrent_op.register_fake(_fake_forward)

    def run(q, k, v, g, *, scale: float, initial_state=None, output_final_state: bool = False, cu_seqlens=None):
        """The op's Triton path: q, k [B, T, H, K], v [B, T, H, V], g None, [B, T, H] or [B, T, H, K]."""
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = g.contiguous() if g is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        grad = needs_grad(q, k, v, g, h0)
        if not grad and short_for_recurrent(q, cu_seqlens, RECURRENT_MAX_T):  # g as given: see DECODE_DIRECT
            launch = decode_launch(recurrent_op, recurrent_body, q, k, v, g, h0, cu_seqlens)
            o, ht = launch(q, k, v, g, h0, cu_seqlens, float(scale))
        else:
            g = g.float() if g is not None else None
            o, ht, _ = chunk_op(q, k, v, g, h0, cu_seqlens, float(scale), grad and keeps is not None and keeps())
        return o, (ht if output_final_state else None)

    return run
