"""The shared memory that a call's Triton launches take when compiled for a GPU (Hopper's sm_90 by default), found
without one.

The interpreter runs the kernels' logic but not the compiler, so a launch whose compiled form needs more shared
memory than the GPU offers a program passes every interpreter test and fails only on the card (OutOfResources).
This runs a call of one op under the interpreter (CPU tensors), records every launch of its chunk kernels (pointer
dtypes, constexprs, warps and stages), then compiles each distinct launch in a fresh process and reports its shared
memory against what that GPU gives a program (Hopper: 227 KiB).

    python -m tests.ops.launch_shared --dtype float16 --B 2 --T 300 --H 2 --K 128 --qk-l2norm [--no-grad]
    python -m tests.ops.launch_shared --op gla --dtype float16 --K 256 --V 64
        [--compiler .venv36/bin/python]   # compile with another environment's Triton (the card's)
    LINATTN_LAUNCH="gated_delta_rule.NORMS_IN=1" python -m tests.ops.launch_shared ...   # with other settings
    python -m tests.ops.launch_shared --arch 89 ...   # for an sm_89 GPU (99 KiB a program), as the launchers make it
    python -m tests.ops.launch_shared --resources ...  # registers, spill stack and SASS counts of each launch too

The launchers choose their constexprs as for a GPU (compile_variants' gpu=True), with the shared memory of
--arch's GPUs (Hopper's by default) and, on compute capability 9 only, a ptxas trusted with bfloat16 dots
(common/ptxas.py); on Hopper every dtype's launches are then the card's. The interpreter runs them only to record
them: its numbers (bfloat16 products among them) are not looked at.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DTYPES = {"torch.float32": "fp32", "torch.float64": "fp64", "torch.float16": "fp16", "torch.bfloat16": "bf16",
          "torch.int32": "i32", "torch.int64": "i64", "torch.int8": "i8", "torch.uint8": "u8",
          "torch.bool": "i1"}  # fmt: skip
MODULES = dict(delta_rule="gated_delta_rule", gated_delta_rule="gated_delta_rule", gla="gla", simple_gla="simple_gla")


def record(args) -> list[dict]:
    """Run the call under the interpreter; every distinct launch as {kernel, args, warps, stages}."""
    import importlib
    import inspect

    import torch

    import linattn
    from linattn.ops.common import ptxas
    from linattn.ops.common.triton_utils import kernel_flags

    tri = importlib.import_module(f"linattn.ops.{MODULES[args.op]}.triton")

    if os.environ.get("LINATTN_LAUNCH"):  # settings to try, as benchmarks/launch_variants.sh gives them
        from benchmarks.launch_override import apply_env

        apply_env()
    launches: dict[str, dict] = {}

    def wrap(name):
        kernel = getattr(tri, name)
        names = list(inspect.signature(kernel.fn).parameters)

        class Wrapped:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*a, **kw):
                    given = dict(zip(names, a)) | {n: v for n, v in kw.items() if n not in ("num_warps", "num_stages")}
                    desc = {
                        n: ["ptr", DTYPES[str(v.dtype)], v.data_ptr() % 16 == 0]
                        if isinstance(v, torch.Tensor)
                        else ["val", v]
                        for n, v in given.items()
                    }
                    item = dict(kernel=name, module=tri.__name__, args=desc)
                    item |= dict(warps=kw.get("num_warps", 4), stages=kw.get("num_stages", 3))
                    launches.setdefault(json.dumps(item, sort_keys=True), item)
                    return launch(*a, **kw)

                return run

        setattr(tri, name, Wrapped())

    for name in [n for n in dir(tri) if n.startswith("_") and n.endswith("_kernel")]:
        wrap(name)
    # the launchers choose their flags as for a GPU with a trusted ptxas (float16's tf32x3 dots, bfloat16 operands
    # and stores), but exp as the interpreter can run it (not libdevice's); the interpreter's numbers are not looked at
    tri.triton_interpret = lambda: False
    tri.kernel_flags = lambda dtype, long_sums=False, gpu=None: kernel_flags(dtype, long_sums, True)
    tri.precise_exp = lambda dtype, gpu=None: False
    gpu_forms = dict(lowp_dots=lambda dtype: dtype == torch.bfloat16, store_dtype=lambda dtype: dtype)
    for name in set(gpu_forms) & set(vars(tri)):
        setattr(tri, name, gpu_forms[name])
    # bfloat16 operands in the kernels that need a fixed ptxas (common/ptxas.py) only on compute capability 9, where
    # linattn switches to the newer ptxas; elsewhere they keep tf32 (larger tiles in shared memory)
    ptxas.lowp_trusted = lambda: args.arch // 10 == 9
    if hasattr(tri, "gpu_shared_below"):  # the launchers' settings for --arch's shared memory
        tri.gpu_shared_below = lambda limit: shared_limit(args.arch) < limit
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    q, k = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    g = -torch.rand(B, T, H, generator=gen) * 0.1
    gk = -torch.rand(B, T, H, K, generator=gen) * 0.1
    beta = torch.randn(B, T, H, generator=gen)
    opts = dict(impl="triton", output_final_state=True)
    delta = dict(opts, qk_l2norm=args.qk_l2norm, beta_is_logit=True)
    leaves = [q, k, v] if not args.no_grad else []
    for x in leaves:
        x.requires_grad_(True)
    calls = dict(
        delta_rule=lambda: linattn.ops.delta_rule(q, k, v, beta, **delta),
        gated_delta_rule=lambda: linattn.ops.gated_delta_rule(q, k, v, g, beta, **delta),
        gla=lambda: linattn.ops.gla(q, k, v, gk, **opts),
        simple_gla=lambda: linattn.ops.simple_gla(q, k, v, g, **opts),
    )
    with torch.set_grad_enabled(not args.no_grad):
        o, s = calls[args.op]()
        if not args.no_grad:
            (o.float().square().sum() + s.sum()).backward()
    return list(launches.values())


SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 120: 99 * 1024}  # per program; sm_90: HOPPER_SHARED


def shared_limit(arch: int) -> int:
    """The shared memory a program may take on sm_``arch`` (imported late: triton must not load before the
    interpreter is chosen)."""
    from linattn.ops.common.triton_utils import HOPPER_SHARED

    return SHARED_LIMITS.get(arch, HOPPER_SHARED)


def compile_all(launches: list[dict], arch: int = 90, show: bool = False) -> int:
    """Compile each launch for sm_``arch``; print its shared memory (``show``: its registers, spill stack and SASS
    instruction counts too); 1 if any exceeds what that GPU gives a program (shared_limit)."""
    import importlib

    from tests.ops.compile_kernels import compile_variant, resources, sass_counts

    limit = shared_limit(arch)
    top = int(os.environ.get("LINATTN_SASS_TOP", "8"))  # opcodes shown with show

    worst = 0
    for item in launches:
        kernel = getattr(importlib.import_module(item["module"]), item["kernel"])
        constexprs, pointers, scalars, divisible = {}, {}, {}, []
        for p in kernel.params:
            kind, value, *aligned = item["args"].get(p.name, ["val", None])
            if p.is_constexpr:
                constexprs[p.name] = value
            elif kind == "ptr":
                pointers[p.name] = value
                divisible += [p.name] if aligned[0] else []
            else:
                scalars[p.name] = "fp32" if isinstance(value, float) else "i32"
                # as the launch specialises it: an integer multiple of 16 is known divisible by 16
                divisible += (
                    [p.name] if isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0 else []
                )
        opts = dict(scalars=scalars, arch=arch, num_warps=item["warps"], num_stages=item["stages"], divisible=divisible)
        out = compile_variant(kernel, pointers, constexprs, **opts)
        shared = out.metadata.shared
        worst = max(worst, shared)
        flag = "  OVER" if shared > limit else ""
        extra = f", {resources(out)}\n    {sass_counts(out, top=top)}" if show else ""
        launch = f"{item['kernel']} warps={item['warps']} stages={item['stages']}"
        print(f"{launch}: shared {shared} B{flag}{extra}", flush=True)
    return int(worst > limit)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", choices=sorted(MODULES), default="delta_rule")
    parser.add_argument("--dtype", default="float16")
    for dim, size in dict(B=2, T=300, H=2, K=128, V=128).items():
        parser.add_argument(f"--{dim}", type=int, default=size)
    parser.add_argument("--gated", action="store_true", help="the gated delta rule (--op gated_delta_rule)")
    parser.add_argument("--qk-l2norm", action="store_true")
    parser.add_argument("--no-grad", action="store_true")
    parser.add_argument("--compiler", default=sys.executable, help="the python that compiles (e.g. the card's Triton)")
    parser.add_argument("--arch", type=int, choices=sorted([*SHARED_LIMITS, 90]), default=90, help="sm_ARCH")
    parser.add_argument("--resources", action="store_true", help="registers, spill stack and SASS counts too")
    parser.add_argument("--compile", help="(internal) compile the launches in this JSON file")
    args = parser.parse_args(argv)
    if args.gated:
        args.op = "gated_delta_rule"
    if args.compile:
        with open(args.compile) as f:
            return compile_all(json.load(f), args.arch, args.resources)
    os.environ["TRITON_INTERPRET"] = "1"
    launches = record(args)
    if not launches:
        raise SystemExit(f"no kernel of {MODULES[args.op]} launched: nothing to compile")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"launches-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(launches, f)
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    command = [args.compiler, "-m", "tests.ops.launch_shared", "--compile", path, "--arch", str(args.arch)]
    command += ["--resources"] if args.resources else []
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
