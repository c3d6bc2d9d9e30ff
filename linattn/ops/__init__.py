"""Functional linear-attention mechanisms, one contract for all:

    o, final_state = NAME(q, k, v, <mechanism inputs>, *, scale=None, initial_state=None,
                          output_final_state=False, cu_seqlens=None, impl="auto")

q, k are [B, T, H, K], v is [B, T, H, V], o is [B, T, H, V] in v's dtype, and the recurrent state
is [B, H, K, V] float32 ([N, H, K, V] with cu_seqlens). ``decay_decode_`` advances a decay-family
state in place, for decoding.
"""

from linattn.ops.decode import decay_decode_
from linattn.ops.delta_rule import delta_rule
from linattn.ops.gated_delta_rule import gated_delta_rule
from linattn.ops.gla import gla
from linattn.ops.linear_attn import linear_attn
from linattn.ops.linformer import linformer
from linattn.ops.retention import retention
from linattn.ops.simple_gla import simple_gla
from linattn.ops.softmax_attn import softmax_attn

__all__ = [
    "decay_decode_",
    "delta_rule",
    "gated_delta_rule",
    "gla",
    "linear_attn",
    "linformer",
    "retention",
    "simple_gla",
    "softmax_attn",
]
