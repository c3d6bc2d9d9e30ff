"""Models: a config dataclass, hybrid stacks built from a list of layer names, and generation with a cache.

cfg = LMConfig(vocab_size=256, d_model=128, n_heads=4,
               layers=["gated_deltanet", "mamba2", "gated_deltanet", "softmax"])
model = CausalLM(cfg)
logits = model(input_ids)                                          # [B, T, vocab_size]
out = model.generate(input_ids, max_new_tokens=32, temperature=0)  # greedy; [B, T + 32]
"""

from linattn.models.config import LMConfig
from linattn.models.generation import Generation, cache_nbytes, generate, sample_next
from linattn.models.lm import Block, CausalLM, Encoder

__all__ = ["Block", "CausalLM", "Encoder", "Generation", "LMConfig", "cache_nbytes", "generate", "sample_next"]
