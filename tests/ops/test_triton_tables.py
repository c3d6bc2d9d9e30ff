"""The Triton ops' shared utilities: the index tables (ChunkTable, Segments), kept across calls with the same
shapes, which calls the kernels serve (triton_unsupported), and the device they launch on (on_device_of)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

pytest.importorskip("triton")

from linattn.ops.common import triton_utils  # noqa: E402
from linattn.ops.common.triton_segments import Segments  # noqa: E402
from linattn.ops.common.triton_utils import ChunkTable  # noqa: E402


@pytest.fixture
def empty_cache(monkeypatch):
    monkeypatch.setattr(triton_utils, "_tables", type(triton_utils._tables)())
    return triton_utils._tables


def same_table(a, b) -> bool:
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("cu", "first")) and (
        not hasattr(a, "chunks") or torch.equal(a.chunks, b.chunks)
    )


def test_tables_kept_for_the_same_shapes(empty_cache):
    lay = ChunkTable.get(3, 130, None, 64, "cpu")
    assert ChunkTable.get(3, 130, None, 64, "cpu") is lay
    assert same_table(lay, ChunkTable(3, 130, None, 64, "cpu"))
    assert lay.chunks.tolist()[:4] == [[0, 64], [64, 128], [128, 130], [130, 194]]
    other = ChunkTable.get(3, 131, None, 64, "cpu")
    assert other is not lay and other.chunks.tolist()[2] == [128, 131]
    seg = Segments.get(2, 300, 3, 64, "cpu")
    assert Segments.get(2, 300, 3, 64, "cpu") is seg and Segments.get(2, 300, 2, 64, "cpu") is not seg
    assert seg.cu.tolist() == [0, 128, 256, 300, 428, 556, 600] and seg.cu.dtype == torch.int32
    assert len(empty_cache) == 4


def test_tables_with_cu_seqlens_built_for_each_call(empty_cache):
    cu = torch.tensor([0, 5, 70])
    lay = ChunkTable.get(1, 70, cu, 64, "cpu")
    assert ChunkTable.get(1, 70, cu, 64, "cpu") is not lay and not empty_cache
    cu[1] = 6  # so a kept table would now be wrong
    assert ChunkTable.get(1, 70, cu, 64, "cpu").chunks.tolist()[:2] == [[0, 6], [6, 70]]


def test_tables_built_in_inference_mode_serve_later_calls(empty_cache):
    with torch.inference_mode():
        lay = ChunkTable.get(2, 70, None, 64, "cpu")
    assert not lay.chunks.is_inference() and not lay.cu.is_inference()
    x = torch.ones(2, requires_grad=True)
    (x * lay.cu[:2].float()).sum().backward()  # an ordinary autograd op may read it
    assert x.grad.tolist() == [0.0, 70.0]


def test_tables_not_kept_while_compiling(empty_cache, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    a, b = ChunkTable.get(2, 70, None, 64, "cpu"), ChunkTable.get(2, 70, None, 64, "cpu")
    assert a is not b and same_table(a, b) and not empty_cache


def test_least_recently_used_table_dropped(empty_cache, monkeypatch):
    monkeypatch.setattr(triton_utils, "TABLE_CACHE_SIZE", 2)
    a = ChunkTable.get(1, 64, None, 64, "cpu")
    b = ChunkTable.get(2, 64, None, 64, "cpu")
    assert ChunkTable.get(1, 64, None, 64, "cpu") is a  # a is now the most recent
    ChunkTable.get(3, 64, None, 64, "cpu")  # drops b
    assert len(empty_cache) == 2 and ChunkTable.get(1, 64, None, 64, "cpu") is a
    assert ChunkTable.get(2, 64, None, 64, "cpu") is not b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: streams")
def test_gpu_tables_kept_per_stream(empty_cache):
    lay = ChunkTable.get(2, 70, None, 64, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = ChunkTable.get(2, 70, None, 64, "cuda")
    assert other is not lay and same_table(other, lay)
    assert ChunkTable.get(2, 70, None, 64, "cuda") is lay


def test_gpus_before_ampere_take_the_chunked_path(monkeypatch):
    """triton_unsupported turns GPUs of compute capability below 8.0 away (impl="auto" then takes the chunked path,
    impl="triton" raises naming why); 8.0 and newer are served. A CUDA tensor is faked by its attributes."""
    q = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float16, shape=(1, 8, 2, 64))
    for capability, served in [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 9), True), ((12, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        why = triton_utils.triton_unsupported(q, q)
        assert (why is None) == served, (capability, why)
        if not served:
            assert f"compute capability {capability[0]}.{capability[1]}" in why and "8.0" in why


def test_kernels_launch_on_the_device_of_their_inputs(monkeypatch):
    """on_device_of makes a CUDA tensor's device the current one (Triton launches on the current device), and
    leaves CPU tensors alone; a CUDA tensor on the second GPU is faked by its attributes."""
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    with triton_utils.on_device_of(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        assert entered == [torch.device("cuda", 1)]
    with triton_utils.on_device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_op_that_launches_kernels_enters_the_device_of_its_inputs(monkeypatch):
    """Each custom op whose body launches kernels (the decay family's and the delta rules' chunked forward and
    backward and decode step, and decay_decode_) enters on_device_of(q) once a call."""
    import linattn.ops.decode as decode
    from linattn import ops
    from linattn.ops.common import triton_ops
    from linattn.ops.gated_delta_rule import triton as delta_triton
    from tests.ops.mechanisms import by_id
    from tests.ops.tolerance import run_with_grads

    seen = []
    real = triton_utils.on_device_of

    def recording(t):
        seen.append(t)
        return real(t)

    for module in (triton_ops, delta_triton, decode):
        monkeypatch.setattr(module, "on_device_of", recording)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
    for case_id in ("simple_gla", "gated_delta_rule"):
        case = by_id[case_id]
        tensors, state = case.draw(B=1, T=20, H=2, K=16, V=16, seed=3)
        tensors, state = [t.to(device) for t in tensors], state.to(device)

        def run(ts, s0, case=case):
            return case(ts, initial_state=s0, output_final_state=True, impl="triton")

        seen.clear()
        run_with_grads(run, tensors, state)  # the chunked forward, then its backward
        assert len(seen) == 2 and all(t.shape == tensors[0].shape for t in seen), case_id
        seen.clear()
        with torch.no_grad():
            run([t[:, :4] for t in tensors], state)  # 4 tokens: the decode kernel
        assert len(seen) == 1, case_id
    seen.clear()
    q, k, v, g = (t[:, :1].to(device) for t in by_id["simple_gla"].draw(B=1, T=20, H=2, K=16, V=16)[0])
    with torch.no_grad():
        ops.decay_decode_(q, k, v, g, torch.zeros(1, 2, 16, 16, device=device))
    assert len(seen) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("case_id", ["simple_gla", "gla", "gated_delta_rule"])
def test_gpu_inputs_on_the_second_gpu(case_id):
    """With cuda:0 current and the inputs on cuda:1, the Triton path (forward, backward, decode) gives what it gives
    with cuda:1 current."""
    from tests.ops.mechanisms import by_id
    from tests.ops.tolerance import run_with_grads

    case = by_id[case_id]
    tensors, state = case.draw(B=2, T=200, H=2, K=64, V=64, dtype=torch.bfloat16, seed=5)
    tensors, state = [t.to("cuda:1") for t in tensors], state.to("cuda:1")

    def run(ts, s0):
        return case(ts, initial_state=s0, output_final_state=True, impl="triton")

    results = {}
    for current in (1, 0):
        with torch.cuda.device(current):
            got = run_with_grads(run, tensors, state)
            with torch.no_grad():
                got += list(run([t[:, :4] for t in tensors], state))
            torch.cuda.synchronize(1)
        results[current] = got
    for i, (a, b) in enumerate(zip(results[0], results[1], strict=True)):
        assert a.device == torch.device("cuda", 1), i
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"output {i}")
