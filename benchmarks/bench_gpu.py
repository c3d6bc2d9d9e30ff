"""GPU benchmark of the Triton kernels against fla (if importable) and SDPA, in one run.

The standard shape of shared/BENCHMARKS.md: bf16, H = 16, K = V = 128, B * T = 65,536 tokens for
T in {2K, 4K, 16K, 64K}; decode with B = 8; and one long-context layer at B = 1. Times are medians
of triton.testing.do_bench(warmup=50, rep=200) in ms. The memory floor printed next to each row is
bytes that must move (inputs read once, outputs written once) over the measured copy bandwidth.

    python benchmarks/bench_gpu.py [--ops linear_attn,gla] [--json out.json] [--long 262144,1048576]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from linattn import ops

if os.environ.get("LINATTN_LAUNCH"):  # launch-setting variants (benchmarks/launch_variants.sh); run from the repo root
    from benchmarks.launch_override import apply_env

    apply_env()

FLA_OPS = {  # our op -> (fla module, chunk function, fused recurrent function or None)
    "linear_attn": ("fla.ops.linear_attn", "chunk_linear_attn", None),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla", "fused_recurrent_simple_gla"),
    "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule", "fused_recurrent_delta_rule"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "gla": ("fla.ops.gla", "chunk_gla", "fused_recurrent_gla"),
}
try:
    import importlib

    import fla

    FLA = f"fla {fla.__version__}"
    fla_chunk, fla_recurrent = {}, {}
    for _op, (_mod, _chunk, _rec) in FLA_OPS.items():
        _m = importlib.import_module(_mod)
        fla_chunk[_op] = getattr(_m, _chunk)
        if _rec is not None:
            fla_recurrent[_op] = getattr(_m, _rec)
except Exception as err:  # noqa: BLE001 - any import failure means "no fla here"
    fla_chunk, fla_recurrent = {}, {}
    FLA = f"fla not importable ({type(err).__name__}: {err})"

H, D = 16, 128


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(2**29, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=20, rep=100, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


# GLA's per-channel log-decays: "standard" logsigmoid(x + 4) / 16 (about -0.001 per token, as fla's benchmarks
# take them), or "strong" logsigmoid(x - 2) (about -2.1 per token: some 135 nats over a 64-token chunk, past what
# GLA's kernels form as one rebased product, so they take the sub-chunk form). x ~ N(0, 1).
GK = "standard"
# --qk-l2norm: the delta rules take raw keys and L2-normalise q and k in their kernels (qk_l2norm=True; fla's
# use_qk_l2norm_in_kernel=True), as Gated DeltaNet layers call them; else keys normalised beforehand.
QK_L2NORM = False


def l2norm_in_kernel(op) -> bool:
    """Whether ``op`` runs with qk_l2norm here (QK_L2NORM, for the delta rules)."""
    return QK_L2NORM and op in ("delta_rule", "gated_delta_rule")


def inputs(B, T, dtype=torch.bfloat16, gated=True):
    """q, k, v [B, T, H, D] (k scaled to unit-ish norm), g [B, T, H] log-decay, beta [B, T, H], gk [B, T, H, D]
    (GK: see above)."""
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        k /= math.sqrt(D)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 4).requires_grad_() if gated else None
    beta = torch.rand(B, T, H, device="cuda", dtype=dtype).requires_grad_()
    x = torch.randn(B, T, H, D, device="cuda")
    gk = (F.logsigmoid(x - 2) if GK == "strong" else F.logsigmoid(x + 4) / 16).requires_grad_()
    return q, k, v, g, beta, gk


def op_runs(op, q, k, v, g, beta, gk, with_fla):
    """[(name, fn, leaves)] for our Triton kernel of ``op`` and, when asked and importable, fla's."""
    kn = F.normalize(k.detach().float(), dim=-1).to(k.dtype).requires_grad_()  # delta rules: L2-normed keys
    args = {
        "linear_attn": (q, k, v),
        "simple_gla": (q, k, v, g),
        "retention": (q, k, v),
        "delta_rule": (q, kn, v, beta),
        "gated_delta_rule": (q, kn, v, g, beta),
        "gla": (q, k, v, gk),
    }[op]
    opts, fla_opts, tag = {}, dict(normalize=False) if op == "linear_attn" else {}, ""
    if l2norm_in_kernel(op):
        args = (q, k, v, *args[3:])  # raw keys
        opts, fla_opts, tag = dict(qk_l2norm=True), dict(use_qk_l2norm_in_kernel=True), " qk_l2norm"
    ours = getattr(ops, op)
    runs = [(f"linattn {op}{tag} (triton)", lambda: ours(*args, impl="triton", **opts)[0], list(args))]
    if with_fla and op in fla_chunk:
        fn = fla_chunk[op]
        runs.append((f"fla {fn.__name__}{tag}", lambda: fn(*args, **fla_opts)[0], list(args)))
    return runs


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


def standard_runs(T, with_fla, op_names):
    """The (name, fn, leaves) to time at one length of the standard shape."""
    B = 65536 // T
    q, k, v, g, beta, gk = inputs(B, T)
    runs = []
    for op in op_names:
        runs += op_runs(op, q, k, v, g, beta, gk, with_fla)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    runs.append(("SDPA causal", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), [qt, kt, vt]))
    return B, runs


def standard_shape(table, bw, lengths, fla_lengths, op_names):
    print("\n| op | T | B | fwd ms | fwd+bwd ms | floor fwd | floor f+b |\n|---|---|---|---|---|---|---|")
    for T in lengths:
        B, runs = standard_runs(T, T in fla_lengths, op_names)
        for name, fn, lv in runs:
            # Bytes that must move: the forward reads every input and writes o (v's size); the backward reads
            # them again with do and writes a gradient of each input's size.
            inputs_bytes = sum(x.numel() * x.element_size() for x in lv)
            out_bytes = lv[2].numel() * lv[2].element_size()
            floor_fwd = (inputs_bytes + out_bytes) / bw * 1e3
            floor_full = floor_fwd + (2 * inputs_bytes + out_bytes) / bw * 1e3
            try:
                fwd, full = time_fwd_bwd(fn, lv)
                row(table, name, T, B, fwd, full, floor_fwd, floor_full)
            except Exception as err:  # noqa: BLE001 - report and go on (fla refuses some ops on Hopper)
                print(f"| {name:34s} | {T:6d} | {B:3d} | failed: {type(err).__name__}: {str(err)[:120]} |")
        del runs
        torch.cuda.empty_cache()


SETTINGS = [(w, s, bv) for w in (4, 8) for s in (1, 2, 3) for bv in (32, 64, 128)]


def sweep_launch_settings(settings=SETTINGS):
    """Time simple_gla's chunk kernel at T = 4096, B = 16 under each launch setting (forward alone, and the
    gated op's forward+backward, whose dq/dk passes take BV = BV_MAX); print the table."""
    from linattn.ops.simple_gla import triton as tri

    q, k, v, g, _, _ = inputs(16, 4096)
    do = torch.randn_like(v)

    def gated_fwd_bwd():
        o, _ = ops.simple_gla(q, k, v, g, impl="triton")
        o.backward(do)

    print("\n| num_warps | num_stages | BV | linear fwd ms | gated fwd ms | gated fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    saved = tri.NUM_WARPS, tri.NUM_STAGES, tri.BV_MAX
    for warps, stages, bv in settings:
        tri.NUM_WARPS, tri.NUM_STAGES, tri.BV_MAX = warps, stages, bv
        try:
            lin = do_bench(lambda: tri.sweep(q, k, v, None, None, 0.1, None), warmup=20, rep=100)
            gat = do_bench(lambda: tri.sweep(q, k, v, g, None, 0.1, None), warmup=20, rep=100)
            full = do_bench(gated_fwd_bwd, warmup=20, rep=100, grad_to_none=[q, k, v, g])
            print(f"| {warps} | {stages} | {bv} | {lin:.3f} | {gat:.3f} | {full:.3f} |", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"| {warps} | {stages} | {bv} | failed: {type(err).__name__}: {str(err)[:80]} |", flush=True)
            raise  # a CUDA error leaves the context unusable: later settings would only repeat it
    tri.NUM_WARPS, tri.NUM_STAGES, tri.BV_MAX = saved


def agreement_with_fla(op_names):
    """Relative error of our output and fla's against a float64 chunked run, T = 4096, B = 16."""
    for op in op_names:
        if op not in fla_chunk or op == "simple_gla":  # fla refuses its gated chunk kernels on Hopper
            continue
        q, k, v, g, beta, gk = inputs(16, 4096)  # the standard shape, so fla autotunes once
        runs = op_runs(op, q, k, v, g, beta, gk, with_fla=True)
        leaves = runs[0][2]
        with torch.no_grad():
            outs = [fn().float() for _, fn, _ in runs]
            opts = dict(qk_l2norm=True) if l2norm_in_kernel(op) else {}
            ref = getattr(ops, op)(*[x.double() for x in leaves], impl="chunk", **opts)[0]
        rel = ", ".join(f"{name} {((o - ref).norm() / ref.norm()).item():.2e}" for (name, _, _), o in zip(runs, outs))
        print(f"{op} rel. error vs float64 chunk, T=4096 B=16: {rel}", flush=True)


def decode(table, op_names):
    """One decode step at B = 8 from a float32 state, eager and replayed from a CUDA graph; SDPA over KV caches."""
    print("\n| decode step, B=8 | L | ms (eager) | ms (CUDA graph) |\n|---|---|---|---|")
    B = 8
    q, k, v = (torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = F.normalize(k.float(), dim=-1).to(k.dtype)
    g = -torch.rand(B, 1, H, device="cuda")
    gk = -torch.rand(B, 1, H, D, device="cuda")
    beta = torch.rand(B, 1, H, device="cuda", dtype=torch.bfloat16)
    S = torch.randn(B, H, D, D, device="cuda")
    args = {"simple_gla": (q, k, v, g), "delta_rule": (q, k, v, beta), "gated_delta_rule": (q, k, v, g, beta)}
    args["gla"] = (q, k, v, gk)
    steps = []
    for op in op_names:
        if op not in args:
            continue
        a, ours = args[op], getattr(ops, op)
        steps.append(
            (f"linattn {op}", lambda a=a, f=ours: f(*a, initial_state=S, output_final_state=True, impl="triton"))
        )
        if op in fla_recurrent:
            f = fla_recurrent[op]
            steps.append((f"fla {f.__name__}", lambda a=a, f=f: f(*a, initial_state=S, output_final_state=True)))
    for name, fn in steps:
        try:
            with torch.no_grad():
                eager = do_bench(fn, warmup=50, rep=200, return_mode="median")
                graph = cuda_graph_ms(fn)
        except Exception as err:  # noqa: BLE001
            print(f"| {name} | - | failed: {type(err).__name__}: {str(err)[:100]} |")
            continue
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


def long_context(table, lengths, op_names):
    print("\n| long context, B=1 H=16 | T | fwd ms | fwd+bwd ms | peak GB |\n|---|---|---|---|---|")
    for T in lengths:
        for op in op_names:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                (name, fn, leaves), *_ = op_runs(op, *inputs(1, T), with_fla=False)
                with torch.no_grad():
                    fwd = do_bench(fn, warmup=5, rep=20, return_mode="median")
                do = torch.randn_like(leaves[2])
                full = do_bench(
                    lambda fn=fn, do=do: fn().backward(do), warmup=3, rep=10, grad_to_none=leaves, return_mode="median"
                )
                peak = torch.cuda.max_memory_allocated() / 1e9
                table.append(dict(name=f"long {op}", T=T, B=1, fwd_ms=fwd, fwd_bwd_ms=full, peak_gb=peak))
                print(f"| {name} | {T} | {fwd:.2f} | {full:.2f} | {peak:.2f} |", flush=True)
                del fn, leaves, do
            except Exception as err:  # noqa: BLE001
                print(f"| linattn {op} | {T} | failed: {type(err).__name__}: {str(err)[:150]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="linear_attn,simple_gla,retention,delta_rule,gated_delta_rule,gla")
    parser.add_argument("--lengths", default="2048,4096,16384,65536")
    parser.add_argument("--fla-lengths", default="4096,65536", help="fla autotunes minutes per new shape")
    parser.add_argument("--long", default="262144,1048576")
    parser.add_argument("--sweep", action="store_true", help="time the chunk kernel's launch settings first")
    parser.add_argument("--sweep-settings", default=None, help="warps,stages,bv_max;... (default: all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--gla-gates", choices=("standard", "strong"), default="standard", help="see GK")
    parser.add_argument("--qk-l2norm", action="store_true", help="see QK_L2NORM")
    args = parser.parse_args()
    global GK, QK_L2NORM
    GK, QK_L2NORM = args.gla_gates, args.qk_l2norm
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(
        f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"{FLA}, python {platform.python_version()}; copy bandwidth {bw / 1e12:.2f} TB/s; gla gates {GK}"
    )
    table: list = []
    if args.sweep:
        chosen = args.sweep_settings
        sweep_launch_settings([tuple(map(int, x.split(","))) for x in chosen.split(";")] if chosen else SETTINGS)
    op_names = [x for x in args.ops.split(",") if x]
    fla_lengths = {int(x) for x in args.fla_lengths.split(",") if x}
    if fla_lengths:
        agreement_with_fla(op_names)
    standard_shape(table, bw, [int(x) for x in args.lengths.split(",") if x], fla_lengths, op_names)
    decode(table, op_names)
    if args.long:
        long_context(table, [int(x) for x in args.long.split(",")], op_names)
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
