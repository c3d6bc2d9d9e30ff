"""Which delta-rule kernel breaks at 8 warps under Triton 3.6 (a step towards an upstream reproducer).

On an H200 (session 4), 8 warps over small tiles ended in illegal memory accesses or wrong gradients: keys of 16
channels, and keys of 128 with V blocks of 16. The library now refuses 8 warps there (``_warps`` in
gated_delta_rule/triton.py). This script lifts that guard for one kernel at a time, each in a process of its own
(a CUDA fault poisons the process), and prints per kernel whether the op ran and its worst gradient error
against the chunked PyTorch path in float64:

    python -m benchmarks.repro_8warps              # every kernel, K = 128 and V = 128 (BV 16), then K = 16
    python -m benchmarks.repro_8warps forward 128  # one kernel, one key dim (the child process)
"""

from __future__ import annotations

import subprocess
import sys

import torch

KERNELS = ("prepare", "forward", "backward_state", "backward_chunk")


def run_one(kernel: str, K: int) -> str:
    from linattn import ops
    from linattn.ops.gated_delta_rule import triton as tri

    tri._warps = lambda name, BK, BV: 8 if name == kernel else 4  # the guard lifted for this kernel only
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only with TRITON_INTERPRET=1 (checks the script)
    gen = torch.Generator(device=device).manual_seed(0)
    B, T, H, V = 2, 300, 2, 128  # B * H = 4 sequences: the per-sequence kernels take V blocks of 16

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q, k, v = randn(B, T, H, K), torch.nn.functional.normalize(randn(B, T, H, K), dim=-1), randn(B, T, H, V)
    g = torch.nn.functional.logsigmoid(randn(B, T, H) + 3)
    beta = torch.rand(B, T, H, generator=gen, device=device)
    do = randn(B, T, H, V)
    grads = {}
    for impl, dtype in (("chunk", torch.float64), ("triton", torch.bfloat16)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, g, beta)]
        o, _ = ops.gated_delta_rule(*leaves, impl=impl)
        o.backward(do.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()  # a fault surfaces here, inside this child
        grads[impl] = [x.grad.double() for x in leaves]
    errs = [
        (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(grads["triton"], grads["chunk"])
    ]
    return " ".join(f"{n} {e:.1e}" for n, e in zip(("dq", "dk", "dv", "dg", "dbeta"), errs))


def main(argv: list[str]) -> None:
    if len(argv) == 2:  # the child: one kernel, one key dim
        print(run_one(argv[0], int(argv[1])), flush=True)
        return
    print("| kernel at 8 warps | K | result (max error / max value, bf16 against float64) |\n|---|---|---|")
    for K in (128, 16):
        for kernel in KERNELS:
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.repro_8warps", kernel, str(K)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            out = child.stdout.strip().splitlines()[-1] if child.returncode == 0 and child.stdout.strip() else ""
            err = (child.stderr.strip().splitlines() or ["?"])[-1][:100]
            print(f"| {kernel} | {K} | {out or 'FAILED: ' + err} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
