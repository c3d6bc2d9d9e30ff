"""`linattn bench`: time every mechanism against softmax attention as T grows (see linattn.bench).

    linattn bench                                        # this machine's device, its default lengths
    linattn bench --mechanisms gated_delta_rule,softmax_attn --lengths 1024,4096 --dtype bfloat16 --device cuda

Prints a table (forward, forward+backward, one decode step, peak memory) and writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import sys

from linattn.bench import (
    MECHANISMS,
    BenchConfig,
    default_device,
    defaults_for,
    format_table,
    machine_line,
    plot,
    run_bench,
    write_json,
)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    names = ["softmax_attn" if n == "softmax" else n for n in names]
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mechanisms {unknown}; choose from {','.join(MECHANISMS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mechanisms", type=_names, default=None, help=f"comma-separated, from {','.join(MECHANISMS)} (default: all)"
    )
    parser.add_argument(
        "--lengths",
        type=_ints,
        default=None,
        help="comma-separated sequence lengths (default: 256..4096 on CPU, 1024..32768 on CUDA)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="input dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when present)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 4 on CUDA)")
    parser.add_argument("--heads", type=int, default=None, help="heads (default: 4 on CPU, 8 on CUDA)")
    parser.add_argument("--head-dim", type=int, default=None, help="K = V per head (default 64)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 5)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per measurement before stopping early")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", default="linattn-bench.json", help="where to write the results")
    parser.add_argument("--plot", default="linattn-bench.png", help="where to write the plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    options = dict(defaults_for(device), device=device)
    given = dict(
        mechanisms=args.mechanisms,
        lengths=args.lengths,
        dtype=args.dtype,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        reps=args.reps,
        budget_s=args.budget,
    )
    options.update({k: v for k, v in given.items() if v is not None})
    try:
        cfg = BenchConfig(**options, memory=not args.no_memory)
    except ValueError as err:
        raise SystemExit(f"linattn bench: {err}") from None
    rows = run_bench(cfg, progress=not args.no_progress)
    print(f"# {machine_line(cfg)}")
    print(format_table(rows))
    write_json(rows, cfg, args.json)
    plot(rows, cfg, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    failed = [f"{r['mechanism']} at T={r['T']}" for r in rows if r.get("error")]
    if failed:
        print(f"linattn bench: {len(failed)} measurement(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
