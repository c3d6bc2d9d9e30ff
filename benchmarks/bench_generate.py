"""Generation speed and cache memory: a 4-layer hybrid (3 gated_deltanet + 1 softmax) against softmax-only.

For each model and context length, a random prompt of that length is prefilled in one chunked pass,
then --new-tokens tokens are decoded one at a time (greedy). Reported: prefill seconds, decode
tokens/s, and the bytes held by the per-layer cache at the end (recurrent states + KV caches).
Weights are random: speed and memory do not depend on them.

    python benchmarks/bench_generate.py --contexts 1024,8192,32768 --json gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from linattn.models import CausalLM, LMConfig, generate

MODELS = {
    "hybrid (3 gated_deltanet + 1 softmax)": ["gated_deltanet", "gated_deltanet", "gated_deltanet", "softmax"],
    "softmax-only (4 softmax)": ["softmax"] * 4,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,8192,32768")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    contexts = [int(x) for x in args.contexts.split(",")]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {args.device}, float32, d_model={args.d_model}, n_heads={args.n_heads}, "
        f"batch 1, {args.new_tokens} new tokens (greedy)"
    )
    print(
        f"| {'model':38s} | {'context':>7s} | {'prefill s':>9s} | {'decode tokens/s':>15s} | {'cache MiB':>9s} | "
        f"{'cache bytes':>12s} |"
    )
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 11}|{'-' * 17}|{'-' * 11}|{'-' * 14}|")
    rows = []
    for label, layers in MODELS.items():
        torch.manual_seed(0)
        cfg = LMConfig(vocab_size=256, d_model=args.d_model, n_heads=args.n_heads, layers=layers)
        model = CausalLM(cfg).to(args.device).eval()
        generate(model, torch.randint(0, 256, (1, 64), device=args.device), 4, temperature=0)  # warm-up
        for T in contexts:
            prompt = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T)).to(args.device)
            out = generate(model, prompt, args.new_tokens, temperature=0)
            row = dict(
                model=label,
                context=T,
                prefill_s=out.prefill_seconds,
                decode_steps=out.decode_steps,
                decode_tokens_per_s=out.decode_tokens_per_second,
                cache_bytes=out.cache_bytes,
            )
            rows.append(row)
            print(
                f"| {label:38s} | {T:7d} | {out.prefill_seconds:9.2f} | {out.decode_tokens_per_second:15.1f} | "
                f"{out.cache_bytes / 2**20:9.2f} | {out.cache_bytes:12,d} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    torch=torch.__version__,
                    device=args.device,
                    d_model=args.d_model,
                    n_heads=args.n_heads,
                    new_tokens=args.new_tokens,
                    rows=rows,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
