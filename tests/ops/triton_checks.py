"""Checks that every Triton op's tests share: extreme gates, auto dispatch, torch.compile."""

from __future__ import annotations

import torch

from tests.ops.tolerance import assert_same_result

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def extreme(tensors: list, gates, index: int = 3) -> list:
    """Replace the gate ``tensors[index]`` by a constant, or, for "mixed", by a per-element draw of no decay,
    almost none, strong decay and a reset."""
    if gates == "mixed":
        choice = torch.tensor([0.0, -1e-7, -30.0, -1e4])
        tensors[index] = choice[torch.randint(4, tensors[index].shape, generator=torch.Generator().manual_seed(0))]
    else:
        tensors[index] = torch.full_like(tensors[index], gates)
    return tensors


def count_launches(monkeypatch, module, *names: str) -> list[str]:
    """Wrap each named Triton kernel of ``module`` (the launcher module that holds it) so that every launch,
    kernel[grid](...), records the kernel's name in the returned list; monkeypatch undoes it."""
    launches: list[str] = []
    for name in names:
        kernel = getattr(module, name)

        class Counted:
            def __getitem__(self, grid, _kernel=kernel, _name=name):
                launches.append(_name)
                return _kernel[grid]

        monkeypatch.setattr(module, name, Counted())
    return launches


def launch_kwargs(monkeypatch, module, name: str) -> list[dict]:
    """Wrap the Triton kernel ``name`` of ``module`` (its launcher module) so that every launch records its keyword
    arguments (constexprs and launch options) in the returned list; monkeypatch undoes it."""
    kwargs: list[dict] = []
    kernel = getattr(module, name)

    class Recorded:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kw):
                kwargs.append(kw)
                return launch(*args, **kw)

            return run

    monkeypatch.setattr(module, name, Recorded())
    return kwargs


def triton_calls(op, call) -> int:
    """How many times ``call()`` reaches the Triton impl of the public ``op`` (dispatch's "auto" choice)."""
    impls = op.__globals__["IMPLS"]
    original, calls = impls["triton"], []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    impls["triton"] = spy
    try:
        call()
    finally:
        impls["triton"] = original
    return len(calls)


def assert_compiles_fullgraph(f, inputs: list):
    """torch.compile(f, fullgraph=True) traces f without a graph break and gives f's loss and gradients."""
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    leaves = [x.clone().requires_grad_() for x in inputs]
    leaves2 = [x.clone().requires_grad_() for x in inputs]
    loss, loss2 = f(*leaves), compiled(*leaves2)
    loss.backward()
    loss2.backward()
    assert_same_result("loss", loss2.detach(), loss.detach())
    for a, b in zip(leaves2, leaves):
        assert_same_result("grad", a.grad, b.grad)


def assert_segments_equal_one_pass(case, module, tensors: list, state, monkeypatch):
    """Without a gradient, the op with segments (as ``module.SEGMENTS`` is set now) gives the o and final state of one
    pass per sequence (SEGMENTS = 1), to the rounding of a reordered sum."""
    with torch.no_grad():
        o, S = case(tensors, initial_state=state, output_final_state=True, impl="triton")
        monkeypatch.setattr(module, "SEGMENTS", 1)
        o1, S1 = case(tensors, initial_state=state, output_final_state=True, impl="triton")
    assert_same_result("o", o, o1)
    assert_same_result("final state", S, S1)
