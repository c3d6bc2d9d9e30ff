"""benchmarks/bisect_delta.py: one kernel at a time takes the forced setting, the others keep theirs, and the
child's run of the op computes the delta rule."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from benchmarks import bisect_delta  # noqa: E402
from linattn.ops.gated_delta_rule import triton as delta  # noqa: E402


def test_forced_reaches_only_its_kernel_and_is_undone():
    seen = {}

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.setdefault(self.name, kwargs)

    originals = {k: getattr(delta, f"_{k}_kernel") for k in bisect_delta.KERNELS}
    try:
        for k in bisect_delta.KERNELS:
            setattr(delta, f"_{k}_kernel", Kernel(k))
        fakes = {k: getattr(delta, f"_{k}_kernel") for k in bisect_delta.KERNELS}
        with bisect_delta.forced("lowp", "forward"):
            for k in bisect_delta.KERNELS:
                getattr(delta, f"_{k}_kernel")[(1,)](num_warps=4, LOWP=False)
        assert seen["forward"] == dict(num_warps=4, LOWP=True)
        assert all(seen[k] == dict(num_warps=4, LOWP=False) for k in bisect_delta.KERNELS if k != "forward")
        assert {k: getattr(delta, f"_{k}_kernel") for k in bisect_delta.KERNELS} == fakes  # undone
    finally:
        for k, kernel in originals.items():
            setattr(delta, f"_{k}_kernel", kernel)


@pytest.mark.parametrize("kernel", ["forward", "output", "backward_chunk"])
def test_one_forced_kernel_keeps_the_gradients(kernel):
    """The child's computation end to end. In the interpreter only the warps8 mode can run (num_warps does not
    change what it computes): its bfloat16 dots multiply the operands' raw bits (Triton 3.9; see kernel_flags'
    UPCAST_QK), so the lowp mode can only be judged on a GPU."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU this is the experiment itself (python -m benchmarks.bisect_delta warps8)")
    out = bisect_delta.run_one("warps8", kernel, K=16, B=1, T=70, H=2, V=16)
    errs = dict(zip(out.split()[::2], map(float, out.split()[1::2])))
    assert set(errs) == {"o", "dq", "dk", "dv", "dg", "dbeta"}
    assert max(errs.values()) < 0.05, out  # bf16 inputs and outputs against float64: about 1e-2 at most


def test_parent_runs_one_child_per_kernel_and_key_dim(monkeypatch, capsys):
    calls = []

    class Done:
        returncode, stderr = 0, ""
        stdout = "o 1.0e-03 dq 1.0e-03 dk 2.0e-03 dv 3.0e-03 dg 4.0e-03 dbeta 5.0e-03\n"

    monkeypatch.setattr(bisect_delta.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    bisect_delta.main(["lowp", "--keys", "128,16"])
    assert [c[-3:] for c in calls] == [["lowp", k, str(K)] for K in (128, 16) for k in bisect_delta.KERNELS]
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "dbeta 5.0e-03" in ln]
    assert len(rows) == 2 * len(bisect_delta.KERNELS)
    calls.clear()
    bisect_delta.main(["lowp", "--keys", "128", "--wide"])  # the children get --wide
    assert [c[-4:] for c in calls] == [["lowp", k, "128", "--wide"] for k in bisect_delta.KERNELS]
    with pytest.raises(SystemExit, match="usage"):
        bisect_delta.main(["nonsense"])
