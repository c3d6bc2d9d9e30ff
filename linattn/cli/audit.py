"""`linattn audit`: measure an approximation's error against exact softmax attention (linattn.audit does the work).

    linattn audit --mechanism performer --features 16,32,64,128,256 --seq-len 512 --head-dim 64 \\
        --temperature 0.25 --seeds 5 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from linattn import audit

# Offset of the calibration draw's seed from the data seed: favor++ and hedgehog are fitted on an independent draw
# from the same distribution, never on the inputs they are measured on.
CALIBRATION_SEED_OFFSET = 1_000_003


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mechanism", required=True, choices=sorted(audit.MECHANISMS), help="the approximation to audit"
    )
    parser.add_argument(
        "--features",
        type=_int_list,
        default=[16, 32, 64, 128, 256],
        help="comma-separated m (Linformer: k rows) to sweep (default 16,32,64,128,256)",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="T of the random inputs (default 512)")
    parser.add_argument("--head-dim", type=int, default=64, help="K = V of the random inputs (default 64)")
    parser.add_argument("--heads", type=int, default=1, help="H of the random inputs (default 1)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.25,
        help="standard deviation of the random inputs' logits scale q^T k (default 0.25)",
    )
    parser.add_argument(
        "--input",
        metavar="PATH",
        help="audit q, k, v from this file (.safetensors or torch.save dict) instead of random ones",
    )
    parser.add_argument(
        "--calibration",
        metavar="PATH",
        help="with --input: fit favor++ and hedgehog on q, k from this file (default: on a held-out part of --input)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="feature draws per m (default 5)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--causal", action="store_true", help="compare causal attention (default: non-causal)")
    parser.add_argument("--topk", type=int, default=8, help="k of the top-k overlap and outside mass (default 8)")
    parser.add_argument(
        "--projection",
        choices=audit.LINFORMER_PROJECTIONS,
        default="gaussian",
        help="Linformer's projection: gaussian (default) or sample (a random subset of tokens)",
    )
    parser.add_argument("--hedgehog-steps", type=int, default=200, help="distillation steps for hedgehog")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of error against m (default: no plot)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.calibration and not args.input:
            raise ValueError("--calibration needs --input (random inputs are fitted on a draw of their own)")
        if args.input:
            q, k, v = audit.load_inputs(args.input)
            temperature = None  # measured from the inputs
            calibration = audit.load_inputs(args.calibration)[:2] if args.calibration else None
            fitted_on = args.calibration  # None: audit.sweep fits on a held-out part and says which
        else:
            q, k, v = audit.draw_inputs(
                args.head_dim, args.seq_len, args.temperature, seed=args.data_seed, heads=args.heads
            )
            temperature = args.temperature
            cq, ck, _ = audit.draw_inputs(
                args.head_dim,
                args.seq_len,
                args.temperature,
                heads=args.heads,
                seed=args.data_seed + CALIBRATION_SEED_OFFSET,
            )
            calibration = (cq, ck)
            fitted_on = f"an independent draw (seed {args.data_seed + CALIBRATION_SEED_OFFSET})"
        result = audit.sweep(
            args.mechanism,
            q,
            k,
            v,
            args.features,
            args.seeds,
            causal=args.causal,
            topk=args.topk,
            temperature=temperature,
            calibration=calibration,
            projection=args.projection,
            hedgehog_steps=args.hedgehog_steps,
        )
    except (ValueError, TypeError, OSError) as err:
        print(f"linattn audit: error: {err}", file=sys.stderr)
        return 2
    result["input"] = args.input or f"random (data seed {args.data_seed})"
    if fitted_on is not None and args.mechanism in audit.FITTED:
        result["calibration"] = fitted_on
    result["torch"] = torch.__version__
    print(audit.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        audit.plot_sweeps([result], args.plot)
    return 0
