"""`linattn generate`: continue a prompt with a trained byte-level model; report tokens/s and cache memory.

linattn generate runs/default --prompt "LOVE, n." --max-new-tokens 300 --temperature 0.8 --top-k 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from linattn.models import CausalLM, generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder (from linattn train) or a model .safetensors file")
    parser.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="bytes to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely bytes only")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of probability p")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise SystemExit(f"linattn generate: no checkpoint at {p} (give a run folder or a .safetensors file)")
    return p


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = CausalLM.load(resolve_checkpoint(args.checkpoint), device=device).eval()
    if model.cfg.vocab_size != 256:
        raise SystemExit(
            f"linattn generate: the model has vocab_size {model.cfg.vocab_size}; this command "
            "speaks bytes (vocab_size 256)"
        )
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise SystemExit("linattn generate: --prompt must not be empty")
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    try:
        out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, gen)
    except ValueError as err:
        raise SystemExit(f"linattn generate: {err}") from None
    text = bytes(out.tokens[0].tolist()).decode("utf-8", errors="replace")
    print(text)
    new = out.tokens.shape[1] - out.prompt_tokens
    print(
        f"\n[{out.prompt_tokens} prompt tokens in {out.prefill_seconds:.3f} s; {new} new tokens, "
        f"{out.decode_tokens_per_second:,.1f} tokens/s when decoding; cache {out.cache_bytes:,} bytes "
        f"({out.cache_bytes / 2**20:.2f} MiB) for layers {model.cfg.layers}]",
        file=sys.stderr,
    )
    return 0
