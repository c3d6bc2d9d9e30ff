"""Compile Triton kernels for an NVIDIA GPU on a machine without one (Hopper, sm_90, by default).

The interpreter runs kernel logic on CPU but never runs the compiler, so a kernel can pass every
interpreter test and still fail to compile. Triton's front end and ptxas need no GPU, so CI compiles
the variants the launchers use here. Run in a fresh process: TRITON_INTERPRET must be unset at import.

    python -m tests.ops.compile_kernels simple_gla                # compile one group, print each variant
    python -m tests.ops.compile_kernels --resources gla [warps]   # also registers and stack (spills) per variant
    python -m tests.ops.compile_kernels --sass gated_delta_rule   # also the SASS instruction count by opcode
    python -m tests.ops.compile_kernels --layouts gated_delta_rule  # also the layout conversions, by tile

It compiles with the Triton that is installed (CI: the README's). For the card's compiler (Triton 3.6 with torch
2.11 on the device machine), in a second environment:

    python3 -m venv .venv36 && .venv36/bin/pip install torch==2.13.0 triton==3.6.0 einops safetensors tqdm
    .venv36/bin/pip install --no-deps -e . && .venv36/bin/python -m tests.ops.compile_kernels --sass gated_delta_rule

To compile the launches that one call makes, as the launchers choose them for a GPU (and to check that each fits
Hopper's shared memory): tests/ops/launch_shared.py.

Every variant is compiled with its pointers marked divisible by 16, as a launch of torch tensors specialises them;
before session 21 they were not, so the spill stacks and SASS counts quoted in the launchers' comments from then are
of scalar, masked code the card never runs (backward_chunk: 2,776 B of stack a thread then, 240 B so compiled).
Spills have not predicted speed well here; the opcode counts (--sass: shuffles for reductions, local loads and
stores for spills, shared-memory round trips for layout conversions, float64 and exp work) show what a variant
costs that another does not.
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linattn.ops.common.triton_utils import HOPPER_SHARED


def compile_variant(
    kernel, pointers: dict[str, str], constexprs: dict, scalars=None, arch: int = 90, divisible=(), **opts
):
    """Compile ``kernel`` for sm_``arch``.

    Every argument not in ``constexprs`` (a constexpr with a default takes it where left out, as at a launch) or
    ``scalars`` (name -> "fp32"/"i32"; default {"scale": "fp32"}) is a pointer, of dtype ``pointers[name]`` (default
    "fp32"; names the kernel lacks are ignored, so one table can serve several kernels). ``divisible``: the
    arguments a launch would specialise as divisible by 16 (Triton's "D": a pointer aligned to 16 bytes, an integer
    multiple of 16), which lets the compiler vectorise and pipeline their loads, and so take more shared memory
    ("pointers": every pointer, as torch's allocations are aligned). Without it the shared memory comes out lower
    than a launch's: session 21's float16 backward_state at three stages, 163,840 B here against the card's 233,472
    B, which the divisible pointers and sizes reproduce.
    Returns the compiled kernel.
    """
    names = kernel.arg_names
    constexprs = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default} | constexprs
    scalars = {"scale": "fp32"} if scalars is None else scalars
    scalars = {n: t for n, t in scalars.items() if n in names}
    unknown = set(constexprs) - set(names)
    if unknown:
        raise ValueError(f"{kernel.__name__} has no arguments {sorted(unknown)}")
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in scalars:
            sig[n] = scalars[n]
        else:
            sig[n] = "*" + pointers.get(n, "fp32")
    if divisible == "pointers":
        divisible = [n for n in names if sig[n].startswith("*")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in names and n not in constexprs}
    constants = {(names.index(c),): v for c, v in constexprs.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
    options = dict(num_warps=4, num_stages=2) | opts
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


GROUPS = ("simple_gla", "gated_delta_rule", "gla", "recurrent")


def _groups():
    """name -> callable yielding (label, kernel, pointers, constexprs, options) for each variant to compile."""
    groups = {}
    for name in GROUPS:
        module = "linattn.ops.common.triton_recurrent" if name == "recurrent" else f"linattn.ops.{name}.triton"
        mod = importlib.import_module(module)
        groups[name] = mod.compile_variants
    return groups


def resources(compiled) -> str:
    """Registers and stack bytes per thread (a stack means spills) of a compiled kernel, from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"{found.group(1)} registers, stack {found.group(2)} B" if found else "resources unknown"


def sass_counts(compiled, top: int = 12) -> str:
    """The ``top`` most frequent SASS opcodes of a compiled kernel (static counts, from cuobjdump) and the total."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    counts = collections.Counter(
        m.group(1).split(".")[0]
        for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", out, re.MULTILINE)
    )
    return f"{sum(counts.values())} instructions: " + " ".join(f"{op} {n}" for op, n in counts.most_common(top))


def layout_conversions(compiled, top: int = 8) -> str:
    """The layout conversions (ttg.convert_layout) of a compiled kernel's TTGIR, counted by the tile converted
    (e.g. 64x64xf32: a float32 tile through shared memory or shuffles), the most frequent ``top``, and the total."""
    tiles = re.findall(r"ttg\.convert_layout %\S+ : tensor<([0-9x]+x\w+),", compiled.asm["ttgir"])
    counts = collections.Counter(tiles)
    return f"{len(tiles)} layout conversions: " + " ".join(f"{t} {n}" for t, n in counts.most_common(top))


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    show = "--resources" in argv
    sass = "--sass" in argv
    layouts = "--layouts" in argv
    argv = [a for a in argv if a not in ("--resources", "--sass", "--layouts")]
    warps = [int(a) for a in argv if a.isdigit()]
    groups = _groups()
    over = 0
    for group in [a for a in argv if not a.isdigit()] or list(groups):
        for label, kernel, pointers, constexprs, opts in groups[group]():
            for w in warps or [opts.get("num_warps", 4)]:
                t0 = time.perf_counter()
                out = compile_variant(kernel, pointers, constexprs, divisible="pointers", **(opts | dict(num_warps=w)))
                extra = f", {w} warps, {resources(out)}" if show else ""
                flag = "  OVER Hopper's 227 KiB" if out.metadata.shared > HOPPER_SHARED else ""
                over += bool(flag)
                print(f"{group} {label}: shared {out.metadata.shared} B{flag}{extra}, {time.perf_counter() - t0:.1f} s")
                if sass:
                    print(f"    {sass_counts(out)}")
                if layouts:
                    print(f"    {layout_conversions(out)}")
    return int(over > 0)  # a launch over the shared memory a program may take fails on the card (OutOfResources)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
