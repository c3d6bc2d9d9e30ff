"""Checks that every Triton op's tests share: extreme gates, auto dispatch, torch.compile."""

from __future__ import annotations

import torch

from tests.ops.tolerance import assert_same_result, run_with_grads

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def extreme(tensors: list, gates, index: int = 3) -> list:
    """Replace the gate ``tensors[index]`` by a constant, or, for "mixed", by a per-element draw of no decay,
    almost none, strong decay and resets (-1e4; -1e30, whose sums would overflow; -inf, log 0: see GATE_FLOOR)."""
    if gates == "mixed":
        choice = torch.tensor([0.0, -1e-7, -30.0, -1e4, -1e30, float("-inf")])
        pick = torch.randint(len(choice), tensors[index].shape, generator=torch.Generator().manual_seed(0))
        tensors[index] = choice[pick]
    else:
        tensors[index] = torch.full_like(tensors[index], gates)
    return tensors


def _on_launch(monkeypatch, module, name: str, record, with_args: bool = False) -> None:
    """Wrap the Triton kernel ``name`` of ``module`` (the launcher module that holds it) so that every launch,
    kernel[grid](*args, **kwargs), first calls record(kwargs) (``with_args``: record(args, kwargs)); monkeypatch
    undoes it."""
    kernel = getattr(module, name)

    class Wrapped:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                record(*((args, kwargs) if with_args else (kwargs,)))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(module, name, Wrapped())


def count_launches(monkeypatch, module, *names: str) -> list[str]:
    """Every launch of the named Triton kernels of ``module`` records the kernel's name in the returned list."""
    launches: list[str] = []
    for name in names:
        _on_launch(monkeypatch, module, name, lambda kwargs, name=name: launches.append(name))
    return launches


def launch_kwargs(monkeypatch, module, name: str, args: bool = False) -> list:
    """Every launch of the Triton kernel ``name`` of ``module`` records its keyword arguments (constexprs and
    launch options) in the returned list; with ``args``, (positional arguments, keyword arguments)."""
    kwargs: list = []
    _on_launch(monkeypatch, module, name, lambda *x: kwargs.append(x if args else x[0]), with_args=args)
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


def assert_checkpointed_equals_plain(case, tensors: list, state):
    """Under torch.utils.checkpoint (non-reentrant), what the Triton op's forward keeps for its backward (its
    KEEP_STATES, saved through save_for_backward, so dropped after the first forward) is formed again by the
    recomputed forward, which must save the same tensors (checkpoint raises otherwise): the same outputs and
    gradients as without it."""
    from torch.utils.checkpoint import checkpoint

    def run(ts, s0):
        return case(ts, initial_state=s0, output_final_state=True, impl="triton")

    def checkpointed(ts, s0):
        return checkpoint(lambda *a: run(list(a[:-1]), a[-1]), *ts, s0, use_reentrant=False)

    got, want = run_with_grads(checkpointed, tensors, state), run_with_grads(run, tensors, state)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_same_result(f"output {i}", a, b)


def _gpu_step(case, tensors: list, state, cu_seqlens=None):
    """(inputs, step): the case's leaves (and initial state) on the GPU, and a step that runs its Triton op forward
    with a final state and backward, returning [o, S, every input's gradient]."""
    leaves = [t.detach().cuda().requires_grad_() for t in tensors]
    s0 = None if state is None else state.detach().cuda().requires_grad_()
    inputs = leaves + ([s0] if s0 is not None else [])
    cu = None if cu_seqlens is None else cu_seqlens.cuda()

    def step():
        o, S = case(leaves, initial_state=s0, output_final_state=True, impl="triton", cu_seqlens=cu)
        loss = o.float().square().sum() + S.sum()
        return [o, S, *torch.autograd.grad(loss, inputs)]

    return inputs, step


def assert_no_host_sync(case, tensors: list, state, cu_seqlens=None):
    """The case's Triton op, forward and backward on the GPU with an initial and a final state, never waits for the
    device (torch's sync debug mode raises at any op that would), once its kernels are compiled and its cu_seqlens
    (if any, on the GPU) checked: so the host can run ahead of the GPU. A wait costs the GPU the host's launch time
    of whatever follows it, which at few, long sequences (segments: many short launches) is most of a fwd+bwd."""
    _, step = _gpu_step(case, tensors, state, cu_seqlens)
    step()  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def assert_cuda_graph_replays(case, tensors: list, state):
    """The case's Triton op, forward and backward with an initial and a final state, captured in one CUDA graph
    and replayed on new values of its inputs, gives what an eager run on those values gives: the launches wait on
    nothing (a wait breaks capture), and what the op builds while capturing (index tables, segment chains) is
    rebuilt by the graph, not taken from an eager call's cache. The same kernels on the same values: the two agree
    to float32 rounding of the float64 segment chain (cuBLAS may choose another algorithm in a graph)."""
    inputs, step = _gpu_step(case, tensors, state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, as capture needs
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():  # new values, in range: gates stay <= 0, beta in (0, 1)
        for x in inputs:
            x.mul_(0.75)
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    for i, (r, e) in enumerate(zip(captured, eager)):
        err = (r.float() - e.float()).abs().max().item()
        assert err <= 1e-3 * e.float().abs().max().item() + 1e-6, f"output {i}: replay differs by {err}"
