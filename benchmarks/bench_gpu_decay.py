"""GPU benchmark of the decay family's Triton kernels against fla (if importable) and SDPA, in one run.

The standard shape of shared/BENCHMARKS.md: bf16, H = 16, K = V = 128, B * T = 65,536 tokens for
T in {2K, 4K, 16K, 64K}; decode with B = 8; and one long-context layer at B = 1. Times are medians
of triton.testing.do_bench(warmup=50, rep=200) in ms. The memory floor printed next to each row is
bytes that must move (inputs read once, outputs written once) over the measured copy bandwidth.

    python benchmarks/bench_gpu_decay.py [--json out.json] [--long 262144,1048576]
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from linattn import ops

try:
    import fla
    from fla.ops.linear_attn import chunk_linear_attn as fla_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla as fla_simple_gla
    from fla.ops.simple_gla import fused_recurrent_simple_gla as fla_recurrent_simple_gla

    FLA = f"fla {fla.__version__}"
except Exception as err:  # noqa: BLE001 - any import failure means "no fla here"
    fla_linear_attn = fla_simple_gla = fla_recurrent_simple_gla = None
    FLA = f"fla not importable ({type(err).__name__}: {err})"

H, D = 16, 128


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(2**29, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=20, rep=100, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def inputs(B, T, dtype=torch.bfloat16, gated=True):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        k /= math.sqrt(D)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 4).requires_grad_() if gated else None
    return q, k, v, g


def time_fwd_bwd(fn, leaves):
    """(forward ms, forward + backward ms) of fn() -> o, with o.backward(do)."""
    with torch.no_grad():
        fwd = do_bench(fn, warmup=50, rep=200, return_mode="median")
    o = fn()
    do = torch.randn_like(o)

    def both():
        fn().backward(do)

    full = do_bench(both, warmup=50, rep=200, grad_to_none=leaves, return_mode="median")
    return fwd, full


def row(table, name, T, B, fwd, full, floor_fwd, floor_full):
    table.append(
        dict(name=name, T=T, B=B, fwd_ms=fwd, fwd_bwd_ms=full, floor_fwd_ms=floor_fwd, floor_fwd_bwd_ms=floor_full)
    )
    print(
        f"| {name:34s} | {T:6d} | {B:3d} | {fwd:8.3f} | {full:8.3f} | {floor_fwd:6.3f} | {floor_full:6.3f} |",
        flush=True,
    )


def standard_runs(T, with_fla):
    """The (name, fn, leaves) to time at one length of the standard shape."""
    B = 65536 // T
    q, k, v, g = inputs(B, T)
    leaves = [q, k, v]
    runs = [
        ("linattn linear_attn (triton)", lambda: ops.linear_attn(q, k, v, impl="triton")[0], leaves),
        ("linattn simple_gla (triton)", lambda: ops.simple_gla(q, k, v, g, impl="triton")[0], leaves + [g]),
        ("linattn retention (triton)", lambda: ops.retention(q, k, v, impl="triton")[0], leaves),
    ]
    if with_fla and fla_linear_attn is not None:
        runs.append(("fla chunk_linear_attn", lambda: fla_linear_attn(q, k, v, normalize=False)[0], leaves))
        runs.append(("fla chunk_simple_gla", lambda: fla_simple_gla(q, k, v, g)[0], leaves + [g]))
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    runs.append(("SDPA causal", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), [qt, kt, vt]))
    return B, runs


def standard_shape(table, bw, lengths, fla_lengths):
    print("\n| op | T | B | fwd ms | fwd+bwd ms | floor fwd | floor f+b |\n|---|---|---|---|---|---|---|")
    for T in lengths:
        B, runs = standard_runs(T, T in fla_lengths)
        tensor_bytes = B * T * H * D * 2
        floor_fwd = 4 * tensor_bytes / bw * 1e3
        floor_full = (4 + 7) * tensor_bytes / bw * 1e3
        for name, fn, lv in runs:
            try:
                fwd, full = time_fwd_bwd(fn, lv)
                row(table, name, T, B, fwd, full, floor_fwd, floor_full)
            except Exception as err:  # noqa: BLE001 - report and go on (fla refuses some ops on Hopper)
                print(f"| {name:34s} | {T:6d} | {B:3d} | failed: {type(err).__name__}: {str(err)[:120]} |")
        del runs
        torch.cuda.empty_cache()


def sweep_launch_settings():
    """Time the forward chunk kernel at T = 4096, B = 16 under each launch setting; print the table."""
    from linattn.ops.simple_gla import triton as tri

    q, k, v, g = inputs(16, 4096)
    print("\n| num_warps | num_stages | BV | linear fwd ms | gated fwd ms |\n|---|---|---|---|---|")
    saved = tri.NUM_WARPS, tri.NUM_STAGES, tri.BV_MAX
    for warps in (4, 8):
        for stages in (1, 2, 3):
            for bv in (32, 64):
                tri.NUM_WARPS, tri.NUM_STAGES, tri.BV_MAX = warps, stages, bv
                try:
                    lin = do_bench(lambda: tri.sweep(q, k, v, None, None, 0.1, None), warmup=20, rep=100)
                    gat = do_bench(lambda: tri.sweep(q, k, v, g, None, 0.1, None), warmup=20, rep=100)
                    print(f"| {warps} | {stages} | {bv} | {lin:.3f} | {gat:.3f} |", flush=True)
                except Exception as err:  # noqa: BLE001
                    print(f"| {warps} | {stages} | {bv} | failed: {type(err).__name__}: {str(err)[:80]} |")
    tri.NUM_WARPS, tri.NUM_STAGES, tri.BV_MAX = saved


def agreement_with_fla():
    if fla_linear_attn is None:
        return
    q, k, v, _ = inputs(4, 4096, gated=False)
    with torch.no_grad():
        o = ops.linear_attn(q, k, v, impl="triton")[0].float()
        o_fla = fla_linear_attn(q, k, v, normalize=False)[0].float()
        o_ref = ops.linear_attn(q.double(), k.double(), v.double(), impl="chunk")[0]
    rel = lambda a: ((a - o_ref).norm() / o_ref.norm()).item()  # noqa: E731
    print(f"\nlinear_attn rel. error vs float64 chunk, T=4096 B=4: linattn {rel(o):.2e}, fla {rel(o_fla):.2e}")


def decode(table):
    print("\n| decode step, B=8 | L | ms (eager) | ms (CUDA graph) |\n|---|---|---|---|")
    B = 8
    q, k, v = (torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = -torch.rand(B, 1, H, device="cuda")
    S = torch.randn(B, H, D, D, device="cuda")

    def ours():
        return ops.simple_gla(q, k, v, g, initial_state=S, output_final_state=True, impl="triton")

    steps = [("linattn simple_gla recurrent (fp32 state)", ours)]
    if fla_recurrent_simple_gla is not None:
        steps.append(
            (
                "fla fused_recurrent_simple_gla",
                lambda: fla_recurrent_simple_gla(q, k, v, g, initial_state=S, output_final_state=True),
            )
        )
    for name, fn in steps:
        with torch.no_grad():
            eager = do_bench(fn, warmup=50, rep=200, return_mode="median")
            graph = cuda_graph_ms(fn)
        table.append(dict(name=name, L=0, B=B, eager_ms=eager, graph_ms=graph))
        print(f"| {name} | - | {eager:.4f} | {graph:.4f} |", flush=True)
    for L in (4096, 32768, 131072):
        qs = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        Kc, Vc = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        fn = lambda qs=qs, Kc=Kc, Vc=Vc: F.scaled_dot_product_attention(qs, Kc, Vc)  # noqa: E731
        eager = do_bench(fn, warmup=50, rep=200, return_mode="median")
        graph = cuda_graph_ms(fn)
        table.append(dict(name="SDPA over KV cache", L=L, B=B, eager_ms=eager, graph_ms=graph))
        print(f"| SDPA over a KV cache | {L} | {eager:.4f} | {graph:.4f} |", flush=True)


def cuda_graph_ms(fn, steps: int = 100) -> float:
    """Per-call time of fn replayed from a CUDA graph of `steps` calls (launch overhead removed)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / steps


def long_run(name, T):
    q, k, v, g = inputs(1, T, gated=name == "simple_gla")
    if g is None:
        return (lambda: ops.linear_attn(q, k, v, impl="triton")[0]), [q, k, v]
    return (lambda: ops.simple_gla(q, k, v, g, impl="triton")[0]), [q, k, v, g]


def long_context(table, lengths):
    print("\n| long context, B=1 H=16 | T | fwd ms | fwd+bwd ms | peak GB |\n|---|---|---|---|---|")
    for T in lengths:
        for name in ("linear_attn", "simple_gla"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                fn, leaves = long_run(name, T)
                with torch.no_grad():
                    fwd = do_bench(fn, warmup=5, rep=20, return_mode="median")
                do = torch.randn_like(leaves[2])
                full = do_bench(
                    lambda fn=fn, do=do: fn().backward(do), warmup=3, rep=10, grad_to_none=leaves, return_mode="median"
                )
                peak = torch.cuda.max_memory_allocated() / 1e9
                table.append(dict(name=f"long {name}", T=T, B=1, fwd_ms=fwd, fwd_bwd_ms=full, peak_gb=peak))
                print(f"| linattn {name} (triton) | {T} | {fwd:.2f} | {full:.2f} | {peak:.1f} |", flush=True)
                del fn, leaves, do
            except Exception as err:  # noqa: BLE001
                print(f"| linattn {name} | {T} | failed: {type(err).__name__}: {str(err)[:150]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,16384,65536")
    parser.add_argument("--fla-lengths", default="4096,65536", help="fla autotunes minutes per new shape")
    parser.add_argument("--long", default="262144,1048576")
    parser.add_argument("--sweep", action="store_true", help="time the chunk kernel's launch settings first")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(
        f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"{FLA}, python {platform.python_version()}; copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    table: list = []
    if args.sweep:
        sweep_launch_settings()
    agreement_with_fla()
    fla_lengths = {int(x) for x in args.fla_lengths.split(",") if x}
    standard_shape(table, bw, [int(x) for x in args.lengths.split(",")], fla_lengths)
    decode(table)
    if args.long:
        long_context(table, [int(x) for x in args.long.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    device=props.name,
                    torch=torch.__version__,
                    triton=triton.__version__,
                    fla=FLA,
                    copy_tb_s=bw / 1e12,
                    rows=table,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
