"""Every Triton kernel variant the launchers use compiles for Hopper (sm_90), with or without a GPU here.

The interpreter tests check the kernels' logic; only the compiler catches what the interpreter lets
through (type rules, layouts, unsupported ops). Each group compiles in a fresh process, because the
interpreter (TRITON_INTERPRET=1, set by conftest on CPU) replaces compilation in this one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")

GROUPS = ["simple_gla", "gated_delta_rule", "gla", "recurrent"]


@pytest.mark.parametrize("group", GROUPS)
def test_kernels_compile_for_sm90(group):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-m", "tests.ops.compile_kernels", group], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{group} kernels failed to compile:\n{done.stdout}\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("norms", ["read", "formed"])
@pytest.mark.parametrize(
    "call",
    [["--qk-l2norm"], ["--qk-l2norm", "--no-grad"], ["--qk-l2norm", "--gated"]],
    ids=["delta", "delta_no_grad", "gated"],
)
def test_float16_launches_fit_hopper_shared_memory(call, norms):
    """The launches of a float16 call with qk_l2norm at K = V = 128 and few programs (B = H = 2), as the launchers
    make them on a GPU, compiled for sm_90: each within the 227 KiB of shared memory a program may take. Two stages
    took the delta rule's forward and backward_state past it (OutOfResources on the card, session 20), in the card's
    Triton 3.6; Triton 3.9 (CI's) allocates less and fits them either way. To compile with the card's Triton, set
    LINATTN_CARD_PYTHON to a python that has it (tests/ops/compile_kernels.py says how to make one). With the row
    norms read (NORMS_IN) or formed in each kernel."""
    compiler = os.environ.get("LINATTN_CARD_PYTHON", sys.executable)
    args = [sys.executable, "-m", "tests.ops.launch_shared", "--dtype", "float16", "--compiler", compiler, *call]
    env = os.environ | dict(LINATTN_LAUNCH=f"gated_delta_rule.NORMS_IN={int(norms == 'read')}")
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"a launch is over Hopper's shared memory:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "_backward_chunk_kernel" in done.stdout or "--no-grad" in call, done.stdout


NARROW_EIGHT = ";".join(
    f"gated_delta_rule.{name}" for name in ("FEW_PROGRAMS_WARPS.gated_backward_state=8", "NARROW_AT_FEW_WARPS=1")
)
SCORES_FEW = ";".join(
    f"gated_delta_rule.{name}"
    for name in ("KEEP_SCORES.gated=1", "KEEP_SCORES.ungated=1", "KEEP_SCORES_FEW=1", "SCORES_PIPELINED=1")
)


@pytest.mark.parametrize("l2norm", [False, True], ids=["plain", "l2norm"])
@pytest.mark.parametrize(
    "op, launch, state",
    [
        ("gated_delta_rule", "", "warps=4 stages=3"),
        ("delta_rule", "", "warps=8 stages=3"),
        ("gated_delta_rule", NARROW_EIGHT, "warps=8 stages=2"),
        ("gated_delta_rule", SCORES_FEW, "warps=4 stages=3"),
        ("delta_rule", SCORES_FEW, "warps=8 stages=2"),
    ],
    ids=["gated", "delta", "gated_narrow_eight_warps", "gated_scores", "delta_scores"],
)
def test_few_programs_fit_hopper_shared_memory(op, launch, state, l2norm):
    """The per-sequence launches of few programs at value blocks of 64 (T = 16384, B = 4, H = 16 on the card: 128
    programs; here FULL_GPU = 1 keeps the blocks wide at B = H = 1), bfloat16, compiled for sm_90: within Hopper's
    227 KiB with FEW_PROGRAMS_STAGES' three stages, the gated op's with NARROW_FEW's narrow decays, the delta rule's
    backward_state at FEW_PROGRAMS_WARPS' 8 warps; and the gated backward_state at 8 warps with its narrow decays
    (NARROW_AT_FEW_WARPS, off) at two; and backward_state reading the forward's scores there (KEEP_SCORES with
    KEEP_SCORES_FEW, off) by a pipelined load (SCORES_PIPELINED, off), the delta rule's at two stages
    (SCORES_AT_FEW_WARPS_STAGES). Without qk_l2norm the gated backward_state takes 229,888 B of the 232,448 (Triton
    3.6 and 3.9 alike; session 25), the delta rule's 221,184 and the gated one at 8 warps 164,096 (Triton 3.6;
    session 26); with scores, at three stages, the gated one 221,696 and the delta rule's 245,760, over (Triton 3.6;
    session 27)."""
    compiler = os.environ.get("LINATTN_CARD_PYTHON", sys.executable)
    call = ["--op", op, "--dtype", "bfloat16", "--B", "1", "--H", "1", "--T", "65"]
    args = [sys.executable, "-m", "tests.ops.launch_shared", *call, "--compiler", compiler]
    args += ["--qk-l2norm"] if l2norm else []
    env = os.environ | dict(LINATTN_LAUNCH=f"gated_delta_rule.FULL_GPU=1;{launch}")
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"a launch is over Hopper's shared memory:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert f"_backward_state_kernel {state}" in done.stdout, done.stdout


@pytest.mark.parametrize(
    "arch, call",
    [
        (80, ["--op", "gla", "--dtype", "float16"]),
        (89, ["--op", "gla", "--dtype", "float16"]),
        (89, ["--op", "gated_delta_rule", "--dtype", "float32"]),
        (89, ["--op", "delta_rule", "--dtype", "float32", "--qk-l2norm"]),
        (80, ["--op", "delta_rule", "--dtype", "bfloat16", "--qk-l2norm", "--no-grad"]),
        (89, ["--op", "delta_rule", "--dtype", "float16", "--qk-l2norm", "--no-grad"]),
    ],
    ids=[
        "gla_float16_sm80",
        "gla_float16_sm89",
        "gated_float32_sm89",
        "delta_float32_l2norm_sm89",
        "delta_bfloat16_l2norm_inference_sm80",
        "delta_float16_l2norm_inference_sm89",
    ],
)
def test_launches_fit_smaller_gpus(arch, call):
    """Launches as the launchers make them for an A100 (sm_80, 163 KiB a program) or an sm_89 card (99 KiB), at few
    programs: each within that GPU's shared memory. GLA's float16 forward state kernel at Triton's default 3 stages
    took 172,032 B, and float32's backward_chunk over whole rows 114,688 B at value blocks of 64 or 8 warps
    (session 20). On an A100 the delta rules' few-program launches in bfloat16 (tf32 tiles there, without the fixed
    ptxas) took 212,992 B at the three stages Hopper takes (the no-gradient forward with qk_l2norm; session 21), so
    they keep two below Hopper's shared memory. And there, in float16, the delta rule's no-gradient forward with
    qk_l2norm took 147,456 B on sm_89 forming the row norms itself, so it reads them (session 21)."""
    args = [sys.executable, "-m", "tests.ops.launch_shared", *call, "--arch", str(arch), "--B", "1", "--H", "1"]
    done = subprocess.run([*args, "--T", "65"], capture_output=True, text=True)
    assert done.returncode == 0, f"a launch is over sm_{arch}'s shared memory:\n{done.stdout}\n{done.stderr[-3000:]}"
    launched = ("_state_kernel", "_backward_chunk_kernel", "_forward_kernel")
    assert any(name in done.stdout for name in launched), done.stdout


SCORES_LOADS = """
import re, torch
from tests.ops.compile_kernels import compile_variant
from linattn.ops.gated_delta_rule import triton as tri
from linattn.ops.gated_delta_rule.triton_kernels import _backward_state_kernel
w = {torch.bfloat16: "bf16", torch.float32: "fp32"}[tri._w_dtype(torch.bfloat16, gpu=True)]
ptrs = dict(q="bf16", k="bf16", do="bf16", w=w, tinv="bf16", dx="bf16", scores="bf16", cu_seqlens="i32",
            chunk_start="i32")
for gated, programs, bv in ((True, None, 32), (True, 100, 64), (False, 100, 64)):
    flags = tri._flags(torch.bfloat16, gated, False, "backward_state", gpu=True)
    flags |= tri._scores_in() | dict(SCORES_PIPELINED=True)
    flags |= tri._narrow("backward_state", gated, bv, programs)
    shape = dict(H=16, K=128, V=128, BT=tri.BT, BK=128, BV=bv, HAS_DHT=True, STORE_DH0=True, STORE_GRADS=True)
    opts = tri._launch("backward_state", torch.bfloat16, 128, bv, programs, gated, False, scores=True)
    ttgir = compile_variant(_backward_state_kernel, ptrs, shape | flags, divisible="pointers", **opts).asm["ttgir"]
    plain = re.findall(r"tt[.]load [^\\n]*tensor<[0-9]+x[0-9]+x!tt[.]ptr<bf16>", ttgir)
    print(f"gated={gated} programs={programs} stages={opts['num_stages']}: {len(plain)} plain bf16 tile loads")
"""


def test_scores_load_pipelined():
    """backward_state reading the forward's scores in their pipelined form (SCORES_IN with SCORES_PIPELINED;
    bfloat16, sm_90): at more than one stage, no bfloat16 tile load of its loop stays a plain (synchronous) load,
    the scores' included. With the scores' mask varying along their rows (the form without SCORES_PIPELINED), the
    load is unvectorised (2-byte elements) and Triton does not copy it asynchronously: its latency is exposed every
    chunk (session 27)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compiler = os.environ.get("LINATTN_CARD_PYTHON", sys.executable)
    done = subprocess.run([compiler, "-c", SCORES_LOADS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3 and all(" 0 plain" in line and "stages=1" not in line for line in lines), done.stdout
