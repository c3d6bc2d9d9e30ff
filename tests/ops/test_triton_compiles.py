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
