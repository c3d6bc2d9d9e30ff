"""Time every mechanism's chunk and naive impls, with torch SDPA (causal) in the same run.

Forward, and forward + backward, median of repeated runs, float32, B=1, H=4, K=V=64 by default. With
linear_attn, a plain vectorised chunked linear attention (the peer of shared/BENCHMARKS.md) runs beside it:

    python benchmarks/bench_cpu_ops.py --lengths 1024,2048,4096,8192,16384 --json out.json

The table it prints goes to RESULTS.md with the machine and versions. The timing code lives in
linattn.bench (shared with `linattn bench`); this script keeps its per-impl table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from functools import partial

import torch

from linattn.bench import RECURRENT, make_call, median_ms, sdpa_call

MECHANISMS = RECURRENT


def plain_linear_call(B: int, T: int, H: int, K: int, V: int, device, chunk: int = 64):
    """The peer of shared/BENCHMARKS.md in this run: a plain vectorised chunked causal linear attention
    (identity features, no normaliser, no states in or out), in its own [B, H, T, D] layout. T must be a
    multiple of ``chunk``. Returns (leaves, fn(impl) -> o) like make_call; impl is ignored."""
    g = torch.Generator().manual_seed(T)
    leaves = [torch.randn(B, H, T, D, generator=g).to(device).requires_grad_() for D in (K, K, V)]
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril()

    def fn(impl):
        q, k, v = (x.reshape(B, H, T // chunk, chunk, -1) for x in leaves)
        kv = k.transpose(-1, -2) @ v
        states = kv.cumsum(2) - kv  # the state entering each chunk
        o = q @ states + (q @ k.transpose(-1, -2)).masked_fill(~mask, 0) @ v
        return o.reshape(B, H, T, V)

    return leaves, fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("--impls", default="chunk,naive")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per measurement before stopping early")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    B, H, K = 1, args.heads, args.head_dim
    V = K
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, B={B} H={H} K=V={K}, float32, {args.device}"
    )
    print(f"| {'mechanism':17s} | {'impl':5s} | {'T':>6s} | {'fwd ms':>9s} | {'fwd+bwd ms':>10s} |")
    print(f"|{'-' * 19}|{'-' * 7}|{'-' * 8}|{'-' * 11}|{'-' * 12}|")
    for T in lengths:
        jobs = [("sdpa_causal", "sdpa", *sdpa_call(B, T, H, K, V, args.device))]
        if "linear_attn" in args.mechanisms.split(",") and T % 64 == 0:
            jobs.append(("plain_linear", "peer", *plain_linear_call(B, T, H, K, V, args.device)))
        for name in args.mechanisms.split(","):
            for impl in args.impls.split(","):
                jobs.append((name, impl, *make_call(name, B, T, H, K, V, args.device)))
        for name, impl, leaves, fn in jobs:
            fwd = median_ms(partial(fn, impl), leaves, False, args.reps, args.budget)
            both = median_ms(partial(fn, impl), leaves, True, args.reps, args.budget)
            rows.append(dict(mechanism=name, impl=impl, T=T, fwd_ms=fwd, fwd_bwd_ms=both))
            print(f"| {name:17s} | {impl:5s} | {T:6d} | {fwd:9.1f} | {both:10.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, B=B, H=H, K=K, V=V, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
