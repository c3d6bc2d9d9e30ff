"""Where the GPU time of one Triton op goes: per-kernel device time of forward+backward, by torch.profiler.

    python benchmarks/profile_kernels.py [--ops delta_rule,gla] [--T 4096] [--gla-gates strong] [--qk-l2norm] [--fla]

Runs each op a few times at the standard shape (bf16, H = 16, K = V = 128, B * T = 65,536) and prints, per
kernel name, the total device time per iteration and the number of launches, and for a kernel launched more than once
per iteration each launch's share in launch order (e.g. the delta rules' prepare: the forward's, which solves for
Tinv, then the backward's, which loads it). Use it to decide what to work on; time with bench_gpu.py. --fla
profiles fla's kernel of each op instead (its wheels installed, as shared/BENCHMARKS.md says; its first call
autotunes, outside the profiled steps), to set beside ours kernel by kernel.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import benchmarks.bench_gpu as bench_gpu
from benchmarks.bench_gpu import inputs, op_runs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", default="simple_gla,delta_rule,gated_delta_rule,gla")
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--gla-gates", choices=("standard", "strong"), default="standard", help="bench_gpu.GK")
    parser.add_argument("--qk-l2norm", action="store_true", help="bench_gpu.QK_L2NORM")
    parser.add_argument("--fla", action="store_true", help="profile fla's kernel of each op instead of ours")
    args = parser.parse_args()
    bench_gpu.GK, bench_gpu.QK_L2NORM = args.gla_gates, args.qk_l2norm
    B = 65536 // args.T
    for op in args.ops.split(","):
        q, k, v, g, beta, gk = inputs(B, args.T)
        runs = op_runs(op, q, k, v, g, beta, gk, with_fla=args.fla)
        if args.fla and len(runs) < 2:
            print(f"\n{op}: fla has no kernel for it here (or fla is not importable)")
            continue
        name, fn, leaves = runs[-1]
        do = torch.randn_like(q)

        def step(fn=fn, leaves=leaves, do=do):
            for x in leaves:
                x.grad = None
            o = fn()
            o.backward(do)

        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
        times, counts = collections.Counter(), collections.Counter()
        launches = collections.defaultdict(list)  # name -> device times in launch order
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in sorted(events, key=lambda e: e.time_range.start):
            times[e.name] += e.device_time_total / 1e3 / args.iters
            counts[e.name] += 1
            launches[e.name].append(e.device_time_total / 1e3)
        total = sum(times.values())
        print(f"\n{name} T={args.T} B={B}: {total:.2f} ms of kernels per fwd+bwd")
        for name, ms in times.most_common(12):
            per_iter = counts[name] // args.iters
            shares = ""
            if 1 < per_iter <= 4 and len(launches[name]) == per_iter * args.iters:
                each = [sum(launches[name][i::per_iter]) / args.iters for i in range(per_iter)]
                shares = "  (" + " + ".join(f"{t:.3f}" for t in each) + ")"
            print(f"  {ms:8.3f} ms  x{per_iter:<3d} {name[:100]}{shares}")


if __name__ == "__main__":
    main()
