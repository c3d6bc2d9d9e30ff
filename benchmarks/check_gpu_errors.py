"""Print, per output and gradient, the Triton kernel's error against float64 beside the plain same-dtype error.

A quick diagnostic for the GPU (the same quantities tests/ops/test_triton_decay.py asserts on).
"""

from __future__ import annotations

import contextlib
import sys

import torch

sys.path.insert(0, ".")
from tests.ops.mechanisms import by_id  # noqa: E402
from tests.ops.tolerance import LowPrecisionMatmuls, max_err, run_with_grads  # noqa: E402

for cid in ("linear_attn", "simple_gla"):
    case = by_id[cid]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tensors, state = case.draw(B=2, T=300, H=2, K=128, V=128, dtype=dtype, seed=1)
        tensors, state = [t.cuda() for t in tensors], state.cuda()

        def call(impl, case=case):
            return lambda ts, s0: case(ts, initial_state=s0, output_final_state=True, impl=impl)

        kw = dict(cotangent_dtype=dtype)
        ref = run_with_grads(call("chunk"), [t.double() for t in tensors], state.double(), **kw)
        low = dtype != torch.float32
        with LowPrecisionMatmuls(dtype) if low else contextlib.nullcontext():
            plain = run_with_grads(call("chunk"), tensors, state, **kw)
        fast = run_with_grads(call("triton"), tensors, state, **kw)
        names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if case.gate else []) + ["dh0"]
        cells = []
        for n, f, p, r in zip(names, fast, plain, ref):
            floor = 8 * torch.finfo(torch.float32).eps * r.abs().max().item()
            ratio = max_err(f, r) / (2 * max_err(p, r) + floor)
            cells.append(f"{n} {max_err(f, r):.1e}/{max_err(p, r):.1e} {'OK' if ratio <= 1 else 'FAIL'}")
        print(cid, str(dtype)[6:], " | ".join(cells), flush=True)
