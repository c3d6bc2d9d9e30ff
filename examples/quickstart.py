"""Run every mechanism in linattn.ops once, forward and backward, and print shapes and timings.

python examples/quickstart.py [--device cpu|cuda] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from linattn import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    B, T, H, K, V = 1, args.seq_len, 4, 64, 64
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(args.device)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    k_unit = F.normalize(k, dim=-1)  # the delta rules want unit keys
    g = F.logsigmoid(randn(B, T, H) + 3)  # log-decays, <= 0
    g_k = F.logsigmoid(randn(B, T, H, K) + 3)
    beta = torch.sigmoid(randn(B, T, H))

    calls = {
        "linear_attn": lambda q, k, v: ops.linear_attn(q, k, v, output_final_state=True),
        "linear_attn (elu+1, normalized)": lambda q, k, v: ops.linear_attn(
            q, k, v, "elu1", True, output_final_state=True
        ),
        "retention": lambda q, k, v: ops.retention(q, k, v, output_final_state=True),
        "simple_gla": lambda q, k, v: ops.simple_gla(q, k, v, g, output_final_state=True),
        "gla": lambda q, k, v: ops.gla(q, k, v, g_k, output_final_state=True),
        "delta_rule": lambda q, k, v: ops.delta_rule(q, k_unit, v, beta, output_final_state=True),
        "gated_delta_rule": lambda q, k, v: ops.gated_delta_rule(q, k_unit, v, g, beta, output_final_state=True),
        "softmax_attn (exact)": lambda q, k, v: ops.softmax_attn(q, k, v),
    }
    print(f"linattn quickstart: B={B} T={T} H={H} K={K} V={V}, float32 on {args.device}, torch {torch.__version__}")
    print(f"{'mechanism':34s} {'output':>18s} {'final state':>18s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
    for name, fn in calls.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        do = torch.randn(B, T, H, V, generator=gen).to(args.device)
        fn(*leaves)[0].backward(do)  # warm up
        t0 = time.perf_counter()
        o, state = fn(*leaves)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        o.backward(do)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        shape = "none" if state is None else str(list(state.shape))
        print(f"{name:34s} {str(list(o.shape)):>18s} {shape:>18s} {1e3 * (t1 - t0):8.1f} {1e3 * (t2 - t0):11.1f}")


if __name__ == "__main__":
    main()
