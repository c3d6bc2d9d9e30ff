"""Test-side description of every recurrent mechanism: how to draw its inputs and call its impls.

Each Case knows the public op, how to draw the tensors it takes (gates and beta in float32, keys
L2-normalised for the delta rules), and the impl-level chunk function, so that chunk_size can be varied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from linattn import ops
from linattn.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from linattn.ops.gla.chunk import chunk_gla
from linattn.ops.linear_attn.chunk import chunk_linear_attn
from linattn.ops.simple_gla.chunk import chunk_simple_gla


@dataclass
class Case:
    id: str
    op: callable
    gate: str | None = None  # None, "scalar" [B, T, H] or "vector" [B, T, H, K]
    beta: bool = False
    l2_keys: bool = False
    options: dict = field(default_factory=dict)  # extra keyword options of the op (linear_attn)
    state_extra: int = 0  # state columns beyond V (the normaliser)
    chunk: callable | None = None  # impl-level chunk function: chunk(*tensors, scale=..., chunk_size=...)
    causal: bool = True

    def draw(self, B, T, H, K, V, dtype=torch.float32, seed=0, gate_scale=1.0, with_state=True, N=None):
        """Leaf tensors in call order (q, k, v, [g], [beta]) and an initial state (float32)."""
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(B, T, H, K, generator=gen)
        k = torch.randn(B, T, H, K, generator=gen)
        if self.l2_keys:
            k = F.normalize(k, dim=-1)
        v = torch.randn(B, T, H, V, generator=gen)
        tensors = [q.to(dtype), k.to(dtype), v.to(dtype)]
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # gates stay float32
        if self.gate == "scalar":
            tensors.append(F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2) * gate_scale)
        elif self.gate == "vector":
            tensors.append(F.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 3) * gate_scale)
        if self.beta:
            tensors.append(torch.sigmoid(torch.randn(B, T, H, generator=gen)))
        tensors[3:] = [t.to(gate_dtype) for t in tensors[3:]]
        state = None
        if with_state:
            state = torch.randn(N or B, H, K, V + self.state_extra, generator=gen)
            if self.state_extra:  # a normaliser state must stay positive
                state = state.abs()
            state = state.to(gate_dtype)
        return tensors, state

    def __call__(self, tensors, **kw):
        return self.op(*tensors, **self.options, **kw)

    def chunk_call(self, tensors, chunk_size, *, initial_state=None, cu_seqlens=None):
        """Run the impl-level chunk function at a given chunk size; returns (o, final_state)."""
        return self.chunk(
            tensors,
            scale=tensors[0].shape[-1] ** -0.5,
            initial_state=initial_state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )


def _linear(causal):
    return lambda t, **kw: chunk_linear_attn(*t, normalize=False, causal=causal, eps=1e-6, **kw)


CASES = [
    Case("linear_attn", ops.linear_attn, chunk=_linear(True)),
    Case(
        "linear_attn_elu1_normalized", ops.linear_attn, options=dict(feature_map="elu1", normalize=True), state_extra=1
    ),
    Case("linear_attn_noncausal", ops.linear_attn, options=dict(causal=False), causal=False, chunk=_linear(False)),
    Case("retention", ops.retention),
    Case("simple_gla", ops.simple_gla, gate="scalar", chunk=lambda t, **kw: chunk_simple_gla(*t, **kw)),
    Case("gla", ops.gla, gate="vector", chunk=lambda t, **kw: chunk_gla(*t, **kw)),
    Case(
        "delta_rule",
        ops.delta_rule,
        beta=True,
        l2_keys=True,
        chunk=lambda t, **kw: chunk_gated_delta_rule(t[0], t[1], t[2], None, t[3], **kw),
    ),
    Case(
        "gated_delta_rule",
        ops.gated_delta_rule,
        gate="scalar",
        beta=True,
        l2_keys=True,
        chunk=lambda t, **kw: chunk_gated_delta_rule(*t, **kw),
    ),
]
CAUSAL_CASES = [c for c in CASES if c.causal]
CHUNK_CASES = [c for c in CASES if c.chunk is not None]
by_id = {c.id: c for c in CASES}
