"""Hybrid stacks: a causal language model and a bidirectional encoder, built from a list of layer names.

    x = embed(ids)
    for each block:  x = x + mixer(rmsnorm(x));  x = x + swiglu(rmsnorm(x))
    logits = head(rmsnorm(x))

The mixers are the layers of linattn.layers. A cache is one layer state per block: a fixed-size
recurrent state for the linear and SSM layers, a KV cache for softmax layers.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from linattn.layers import LAYERS, RMSNorm
from linattn.models.config import LMConfig
from linattn.models.generation import generate

Cache = list  # one layer state per block (RecurrentState, KVCache or None)


class SwiGLU(nn.Module):
    """The MLP: W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm residual block: a mixer (any layer of linattn.layers) and an MLP."""

    def __init__(self, mixer: nn.Module, cfg: LMConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden)

    def forward(self, x, state=None, cu_seqlens=None):
        h, state = self.mixer(self.mixer_norm(x), state, cu_seqlens)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), state


def build_mixer(cfg: LMConfig, i: int, causal: bool) -> nn.Module:
    name, options = cfg.layer_spec(i)
    cls = LAYERS[name]
    kwargs = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, causal=causal, impl=cfg.impl)
    if "norm_eps" in inspect.signature(cls).parameters:
        kwargs["norm_eps"] = cfg.norm_eps
    return cls(**{**kwargs, **options})


def check_ids(model: str, input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{model}: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{model}: input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"{model}: input_ids must be [B, T], got shape {list(input_ids.shape)}")
    # The range check reads the ids on the host, which torch.compile(fullgraph=True) cannot trace; compiled, the
    # embedding's own index check stands in (an IndexError on CPU, a device assert on CUDA).
    if (
        input_ids.numel()
        and not torch.compiler.is_compiling()
        and (input_ids.min() < 0 or input_ids.max() >= vocab_size)
    ):
        raise ValueError(
            f"{model}: input_ids must lie in [0, vocab_size={vocab_size}), got values in "
            f"[{input_ids.min().item()}, {input_ids.max().item()}]"
        )


class _Stack(nn.Module):
    """Embedding, blocks and final norm, with GPT-2's initialisation; shared by the LM and the encoder."""

    causal = True

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(build_mixer(cfg, i, self.causal), cfg) for i in range(len(cfg.layers)))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Linear and embedding weights ~ N(0, 0.02); the projections that write into the residual stream
        # are scaled down by sqrt(2 n_layers). Layer-specific parameters (decays, convs) keep their own init.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "w_down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(cfg.layers)))

    def hidden_states(self, input_ids, cache=None, cu_seqlens=None) -> tuple[torch.Tensor, Cache]:
        check_ids(type(self).__name__, input_ids, self.cfg.vocab_size)
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(
                f"{type(self).__name__}: cache must hold one state per layer ({len(self.blocks)}), got {len(cache)}"
            )
        x = self.embed(input_ids)
        states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if cache is None else cache[i], cu_seqlens)
            states.append(s)
        return self.norm(x), states

    def save(self, path: str | Path) -> None:
        """Write the weights to a safetensors file, with the config (JSON) in its metadata."""
        metadata = {"linattn_class": type(self).__name__, "linattn_config": json.dumps(self.cfg.to_dict())}
        save_model(self, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu"):
        """Build the model from the config in the file's metadata and load its weights."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "linattn_config" not in meta:
            raise ValueError(
                f"{cls.__name__}.load: {path} has no linattn config in its metadata; "
                f"was it written by {cls.__name__}.save?"
            )
        if meta.get("linattn_class") != cls.__name__:
            raise ValueError(f"{cls.__name__}.load: {path} holds a {meta.get('linattn_class')}, not a {cls.__name__}")
        model = cls(LMConfig.from_dict(json.loads(meta["linattn_config"])))
        load_model(model, str(path), device=str(device))
        return model.to(device)


class CausalLM(_Stack):
    """A causal language model over a hybrid stack of layers.

    model(input_ids [B, T] int64) -> logits [B, T, vocab_size] (float, in the model's dtype).
    """

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] int64 (or [1, T] packed, with cu_seqlens int [N + 1]) -> logits [B, T, vocab_size]."""
        x, _ = self.hidden_states(input_ids, None, cu_seqlens)
        return self.head(x)

    def forward_with_cache(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, Cache]:
        """Continue from a cache (None: start fresh). Returns (logits [B, T or 1, vocab_size], new cache).

        The cache is one state per layer; KV caches are extended in place. last_only computes the
        logits of the last position only (all that sampling needs).
        """
        x, states = self.hidden_states(input_ids, cache, cu_seqlens)
        return self.head(x[:, -1:] if last_only else x), states

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each row of input_ids [B, T] by max_new_tokens tokens; returns [B, T + max_new_tokens].

        temperature=0 is greedy; otherwise sample from softmax(logits / temperature), optionally kept to the
        top_k tokens and to the smallest set whose probability reaches top_p. The prompt runs in one chunked
        pass; then each token is one recurrent step per layer (a KV-cache step for softmax layers).
        """
        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, generator).tokens


class Encoder(_Stack):
    """A bidirectional encoder over a hybrid stack: every token sees the whole sequence.

    model(input_ids [B, T] int64) -> hidden states [B, T, d_model]. Softmax and linear-attention layers
    attend both ways in one pass; recurrent layers read the sequence forward and backward with shared weights.
    """

    causal = False

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] int64 (or [1, T] packed, with cu_seqlens int [N + 1]) -> [B, T, d_model]."""
        x, _ = self.hidden_states(input_ids, None, cu_seqlens)
        return x
