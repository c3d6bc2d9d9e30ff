"""Layers: nn.Modules that put projections, a short conv, gates and norms around an op from linattn.ops.

Every layer has one interface:

    y, new_state = layer(x, state=None, cu_seqlens=None)      x, y: [B, T, D]

The state is a RecurrentState (a fixed-size float32 recurrent state, plus the short conv's last inputs)
for the linear and SSM layers, and a KVCache for softmax attention. Passing the returned state to the
next call continues the sequence: a prefill followed by token-by-token decoding gives the outputs of
one call over the whole sequence. With few tokens (decoding) the ops run their recurrent form.
"""

from linattn.layers.common import (
    KVCache,
    RecurrentLayer,
    RecurrentState,
    RMSNorm,
    RotaryEmbedding,
    ShortConv,
    state_nbytes,
)
from linattn.layers.deltanet import DeltaNet, GatedDeltaNet
from linattn.layers.gla import GLA
from linattn.layers.linear_attention import LinearAttention
from linattn.layers.linformer import LinformerAttention
from linattn.layers.mamba2 import Mamba2
from linattn.layers.retnet import RetNet
from linattn.layers.softmax_attention import SoftmaxAttention, attend_with_kvcache

# The names a model config uses for each layer type.
LAYERS = {
    "linear_attn": LinearAttention,
    "retnet": RetNet,
    "gla": GLA,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "mamba2": Mamba2,
    "softmax": SoftmaxAttention,
    "linformer": LinformerAttention,  # bidirectional only: for an Encoder, with seq_len and proj_len in a dict
}

__all__ = [
    "LAYERS",
    "DeltaNet",
    "GLA",
    "GatedDeltaNet",
    "KVCache",
    "LinearAttention",
    "LinformerAttention",
    "Mamba2",
    "RMSNorm",
    "RecurrentLayer",
    "RecurrentState",
    "RetNet",
    "RotaryEmbedding",
    "ShortConv",
    "SoftmaxAttention",
    "attend_with_kvcache",
    "state_nbytes",
]
