"""Where the GPU waits on the host in one fwd+bwd of a Triton op: syncs, host vs device time, idle gaps by frame.

    python -m benchmarks.host_gaps [--ops delta_rule,gated_delta_rule] [--lengths 4096,65536] [--cprofile 15]

At the standard shape (bf16, H = 16, K = V = 128, B * T = 65,536), for each op and T:
  1. the ops that make the host wait for the device (torch's sync debug mode, by file and line);
  2. the host's time to enqueue one fwd+bwd and the device's time for it, from an idle GPU (medians of 10):
     when the host's time nears the device's, launches, not kernels, bound the op;
  3. one profiled fwd+bwd: the span from first kernel to last, the kernels' busy time, and the idle gaps
     between kernels, added up by the innermost linattn frame that launched the kernel after each gap;
  4. with --cprofile N, the host's time by function over 20 steps (cProfile, the N largest by own time): where
     the host's enqueue time goes (launches, torch.library's dispatch, the launchers' own Python).
A profile_kernels.py total well under bench_gpu.py's time for the same op points here. Session 16 found the
delta rules at T = 65536 bound by the host this way (9.1 ms a fwd+bwd against 7.1 ms of kernels).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_gpu import inputs, op_runs


def syncs(step) -> collections.Counter:
    """file:line of each op in one step() that waits for the device."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return collections.Counter(
        f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )


def host_and_device_ms(step, repeats: int = 10) -> tuple[float, float]:
    """Medians of the host's enqueue time of step() and the device's time for it, each from an idle GPU."""
    host, device = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        device.append(start.elapsed_time(end))
    return statistics.median(host), statistics.median(device)


def idle_gaps(step, min_us: float = 3.0):
    """(span, busy, {launching frame -> (idle us, gaps)}) of one profiled step(), in microseconds."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    on_device = ("kernel", "gpu_memcpy", "gpu_memset")
    kernels = sorted((e for e in events if e.get("cat") in on_device), key=lambda e: e["ts"])
    launch_cats = ("cuda_runtime", "cuda_driver")
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in launch_cats and "args" in e}
    frames = [e for e in events if e.get("cat") == "python_function" and "linattn/" in e["name"]]
    gaps = collections.defaultdict(lambda: [0.0, 0])
    end = kernels[0]["ts"]
    for kernel in kernels:
        gap = kernel["ts"] - end
        if gap > min_us:
            launch = launches.get(kernel["args"].get("correlation"))
            where = "?"
            if launch is not None:
                around = [f for f in frames if f["ts"] <= launch["ts"] <= f["ts"] + f["dur"]]
                if around:
                    where = min(around, key=lambda f: f["dur"])["name"].split("linattn/", 1)[-1]
            entry = gaps[f"{where} -> {kernel['name'][:40]}"]
            entry[0] += gap
            entry[1] += 1
        end = max(end, kernel["ts"] + kernel["dur"])
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    return span, sum(k["dur"] for k in kernels), len(kernels), gaps


def host_profile(step, top: int, steps: int = 20) -> None:
    """Print the host's time by function over ``steps`` calls of step() (cProfile, the ``top`` by own time)."""
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    host = (time.perf_counter() - t0) / steps * 1e3
    torch.cuda.synchronize()
    print(f"  host {host:.2f} ms a step under cProfile ({steps} steps, the GPU running behind)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", default="delta_rule,gated_delta_rule")
    parser.add_argument("--lengths", default="4096,65536")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--cprofile", type=int, default=0, help="also the host's top N functions (cProfile)")
    args = parser.parse_args()
    for op in args.ops.split(","):
        for T in (int(t) for t in args.lengths.split(",")):
            B = 65536 // T
            q, k, v, g, beta, gk = inputs(B, T)
            name, fn, leaves = op_runs(op, q, k, v, g, beta, gk, with_fla=False)[-1]
            do = torch.randn_like(q)

            def step(fn=fn, leaves=leaves, do=do):
                for x in leaves:
                    x.grad = None
                fn().backward(do)

            for _ in range(3):  # compiles, and fills the allocator's cache
                step()
            torch.cuda.synchronize()
            waits = syncs(step)
            host, device = host_and_device_ms(step)
            span, busy, count, gaps = idle_gaps(step)
            print(f"\n{name} T={T} B={B}: {sum(waits.values())} syncs {dict(waits)}")
            print(f"  host enqueue {host:.2f} ms, device {device:.2f} ms (from an idle GPU, medians of 10)")
            print(f"  profiled: span {span / 1e3:.2f} ms, kernels busy {busy / 1e3:.2f} ms ({count} kernels)")
            for label, (us, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[: args.top]:
                print(f"    idle {us / 1e3:6.3f} ms x{n:<3d} before {label}")
            if args.cprofile:
                host_profile(step, args.cprofile)


if __name__ == "__main__":
    main()
