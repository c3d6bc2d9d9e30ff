"""Generation: sampling (greedy, temperature, top-k, top-p) and the prefill-then-decode loop with a per-layer cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from linattn.layers import KVCache, state_nbytes


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, vocab]; returns [B] int64.

    temperature=0 takes the argmax. Otherwise the logits are divided by the temperature, cut to the top_k
    largest, then to the smallest set of tokens whose probability reaches top_p (the nucleus), and sampled.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))  # the top token always stays (nothing ranks above it)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cache_nbytes(cache) -> int:
    """Bytes held by a model's cache (one layer state per block)."""
    return sum(state_nbytes(s) for s in cache)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Generation:
    """What generate() returns: the tokens and how long each phase took.

    tokens: [B, T + new] int64, the prompt followed by the new tokens.
    prefill_seconds: the prompt's forward pass and the first sampled token.
    decode_seconds, decode_steps: the remaining one-token steps.
    cache_bytes: bytes held by the per-layer cache at the end.
    """

    tokens: torch.Tensor
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    cache_bytes: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced per second by the decode steps, over all rows."""
        if self.decode_steps == 0 or self.decode_seconds == 0:
            return float("nan")
        return self.tokens.shape[0] * self.decode_steps / self.decode_seconds


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Prefill the prompt input_ids [B, T] in one pass, then decode max_new_tokens tokens one at a time.

    model is a CausalLM (anything with forward_with_cache). Every row has the same prompt length.
    KV caches are sized once for the final length, so no decode step copies them.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one prompt token per row, got shape {list(input_ids.shape)}")
    device = input_ids.device
    T = input_ids.shape[1] if isinstance(input_ids, torch.Tensor) else 0
    tokens = [input_ids]
    _sync(device)
    start = time.perf_counter()
    logits, cache = model.forward_with_cache(input_ids, None, last_only=True)
    for state in cache:
        if isinstance(state, KVCache):  # a windowed cache is trimmed at 2 * window entries
            state.reserve(state.length + max_new_tokens if state.window is None else 2 * state.window)
    if max_new_tokens:
        tokens.append(sample_next(logits[:, -1], temperature, top_k, top_p, generator)[:, None])
    _sync(device)
    prefill_end = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        logits, cache = model.forward_with_cache(tokens[-1], cache, last_only=True)
        tokens.append(sample_next(logits[:, -1], temperature, top_k, top_p, generator)[:, None])
    _sync(device)
    end = time.perf_counter()
    return Generation(
        tokens=torch.cat(tokens, dim=1),
        prompt_tokens=T,
        prefill_seconds=prefill_end - start,
        decode_seconds=end - prefill_end,
        decode_steps=max(max_new_tokens - 1, 0),
        cache_bytes=cache_nbytes(cache),
    )
