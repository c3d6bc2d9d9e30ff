"""Which delta-rule kernel breaks under a launch setting that Triton 3.6 miscompiles (towards an upstream reproducer).

On an H200, two settings ended in illegal memory accesses or wrong gradients:
- 8 warps over small tiles (keys of 16 channels, or V blocks of 16; session 4): ``_warps`` refuses them;
- bfloat16 dot operands in the per-sequence and per-chunk forward kernels (``LOWP_DOTS``; sessions 4 to 7). Session 8
  found the cause: Triton 3.6's sm_90 ptxas (12.8). Assembled by its 12.9 they pass, and the library now switches to
  it for its kernels (linattn/ops/common/ptxas.py). LINATTN_PTXAS=triton keeps 12.8 (and the dots off): with
  ``lowp`` here that brings the faults back. Whether the 8-warp faults share the cause is not known.

This script turns a setting on for one kernel at a time, each in a process of its own (a CUDA fault poisons the
process), and prints per kernel whether the op ran and its worst gradient error against the chunked PyTorch path
in float64. With --sanitize each child runs under compute-sanitizer, and the first error it reports is printed.

    python -m benchmarks.bisect_delta lowp               # each kernel with bf16 operands, K = 128 then K = 16
    python -m benchmarks.bisect_delta warps8 --sanitize  # each kernel at 8 warps, under compute-sanitizer
    python -m benchmarks.bisect_delta lowp --keys 128    # only K = 128
    python -m benchmarks.bisect_delta lowp --wide        # per-sequence kernels with V blocks of 32 (as at B H >= 66)
    python -m benchmarks.bisect_delta lowp forward 128   # one kernel, one key dim (the child process)

Each child compiles its kernels afresh and, under compute-sanitizer, runs many times slower: give a device call about
a minute per child with --sanitize (eight children for both key dims).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import torch

KERNELS = ("prepare", "forward", "output", "local_du", "backward_state", "backward_chunk")
SETTINGS = {"lowp": dict(LOWP=True), "warps8": dict(num_warps=8)}  # what each mode forces on the chosen kernel
SANITIZER = "/usr/local/cuda/bin/compute-sanitizer"


class _Forced:
    """A Triton kernel whose launches get ``options`` on top of the launcher's own keyword arguments."""

    def __init__(self, kernel, options: dict):
        self.kernel, self.options = kernel, options

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **(kwargs | self.options))


@contextlib.contextmanager
def forced(mode: str, kernel: str):
    """Within the block, ``kernel`` (one of KERNELS) of the delta-rule launchers takes the setting of ``mode``; the
    others keep the library's. For "lowp", LOWP_DOTS stays as it is, and so does W's dtype.
    Once a kernel is cleared here, LINATTN_LAUNCH="gated_delta_rule.LOWP_DOTS.<kernel>=1" runs the GPU tests and
    the benchmark with it (benchmarks/launch_variants.sh)."""
    from linattn.ops.gated_delta_rule import triton as tri

    name = f"_{kernel}_kernel"
    original = getattr(tri, name)
    setattr(tri, name, _Forced(original, SETTINGS[mode]))
    try:
        yield
    finally:
        setattr(tri, name, original)


def run_one(mode: str, kernel: str, K: int, wide: bool = False, B: int = 2, T: int = 300, H: int = 2, V: int = 128):
    """The delta rule's output without a gradient and its gradients with ``kernel`` under ``mode``, as max error /
    max value of each. wide: the per-sequence kernels take V blocks of 32, as for many sequences and heads (else 16
    at this shape)."""
    from linattn import ops
    from linattn.ops.gated_delta_rule import triton as tri

    if wide:
        tri.FULL_GPU = 0

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only with TRITON_INTERPRET=1 (checks the script)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    # B * H = 4 sequences by default: the per-sequence kernels then take V blocks of 16
    q, k, v = randn(B, T, H, K), torch.nn.functional.normalize(randn(B, T, H, K), dim=-1), randn(B, T, H, V)
    g = torch.nn.functional.logsigmoid(randn(B, T, H) + 3)
    beta = torch.rand(B, T, H, generator=gen, device=device)
    do = randn(B, T, H, V)
    results = {}
    for impl, dtype in (("chunk", torch.float64), ("triton", torch.bfloat16)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, g, beta)]
        with forced(mode, kernel) if impl == "triton" else contextlib.nullcontext():
            with torch.no_grad():  # the forward without a gradient: the per-sequence loop forms the output itself
                o_plain = ops.gated_delta_rule(*leaves, impl=impl)[0]
            o, _ = ops.gated_delta_rule(*leaves, impl=impl)
            o.backward(do.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()  # a fault surfaces here, inside this child
        results[impl] = [o_plain.double()] + [x.grad.double() for x in leaves]
    errs = [
        (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
        for a, b in zip(results["triton"], results["chunk"])
    ]
    return " ".join(f"{n} {e:.1e}" for n, e in zip(("o", "dq", "dk", "dv", "dg", "dbeta"), errs))


def _first_sanitizer_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()]
    hits = [i for i, ln in enumerate(lines) if ln.startswith("========= Invalid") or "Error" in ln[:40]]
    return " / ".join(lines[hits[0] : hits[0] + 3])[:300] if hits else ""


def main(argv: list[str]) -> None:
    sanitize, wide = "--sanitize" in argv, "--wide" in argv
    argv = [a for a in argv if a not in ("--sanitize", "--wide")]
    keys = (128, 16)
    if "--keys" in argv:
        at = argv.index("--keys")
        keys = tuple(int(x) for x in argv[at + 1].split(","))
        argv = argv[:at] + argv[at + 2 :]
    if not argv or argv[0] not in SETTINGS:
        modes = ",".join(SETTINGS)
        usage = f"python -m benchmarks.bisect_delta {{{modes}}} [kernel K] [--keys 128,16] [--wide] [--sanitize]"
        raise SystemExit(f"usage: {usage}")
    mode = argv[0]
    if len(argv) == 3:  # the child: one kernel, one key dim (LINATTN_LAUNCH, if set, applies first)
        from benchmarks.launch_override import apply_env

        apply_env()
        print(run_one(mode, argv[1], int(argv[2]), wide), flush=True)
        return
    print(f"| kernel with {mode} | K | result (max error / max value, bf16 against float64) |\n|---|---|---|")
    for K in keys:
        for kernel in KERNELS:
            cmd = [sys.executable, "-m", "benchmarks.bisect_delta", mode, kernel, str(K)] + ["--wide"] * wide
            if sanitize and os.path.exists(SANITIZER):
                cmd = [SANITIZER, "--print-limit", "3", *cmd]
            try:
                child = subprocess.run(cmd, capture_output=True, text=True, timeout=300 if sanitize else 120)
            except subprocess.TimeoutExpired:
                print(f"| {kernel} | {K} | timed out |", flush=True)
                continue
            lines = child.stdout.strip().splitlines()
            result = next((ln for ln in reversed(lines) if ln.startswith("o ")), "")
            found = _first_sanitizer_error(child.stdout) if sanitize else ""
            err = (child.stderr.strip().splitlines() or ["?"])[-1][:100]
            print(f"| {kernel} | {K} | {result or 'FAILED: ' + err}{' | ' + found if found else ''} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
