"""The choice of ptxas for the delta rules' kernels on Hopper (linattn/ops/common/ptxas.py), without a GPU: the
decision from facts, the knob set and put back, and the whole path with Triton 3.6's arrangement imitated."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402

from linattn.ops.common import ptxas  # noqa: E402

OLD = "12.8"  # the version of the ptxas Triton would use
NEW = ("/triton/bin/ptxas-blackwell", "12.9")  # its other one: (path, version)


@pytest.mark.parametrize(
    "capability, own, spare, user, opt_out, expected",
    [
        ((9, 0), OLD, NEW, False, False, ptxas.Choice(NEW[0], True)),  # Triton 3.6 on an H100 / H200
        ((9, 0), "13.4", None, False, False, ptxas.Choice(None, True)),  # a later Triton: nothing to do
        ((9, 0), OLD, ("/x/b", "12.8"), False, False, ptxas.Choice(None, False)),  # no newer one at hand
        ((9, 0), OLD, None, False, False, ptxas.Choice(None, False)),
        ((9, 0), OLD, NEW, True, False, ptxas.Choice(None, False)),  # the user named a ptxas: theirs decides
        ((9, 0), "13.0", NEW, True, False, ptxas.Choice(None, True)),
        ((9, 0), OLD, NEW, False, True, ptxas.Choice(None, False)),  # LINATTN_PTXAS=triton
        ((8, 0), OLD, NEW, False, False, ptxas.Choice(None, False)),  # untested outside compute capability 9
        ((10, 0), "12.9", None, False, False, ptxas.Choice(None, False)),
    ],
)
def test_choice_from_the_facts(capability, own, spare, user, opt_out, expected):
    assert ptxas.choose(capability, own, spare, user, opt_out) == expected


def test_versions_compare_as_numbers():
    assert ptxas._version("12.10") > ptxas._version("12.9") > ptxas._version("12.8")
    assert ptxas._version(None) == () < ptxas.FIXED


@pytest.fixture
def bundled():
    """A real ptxas of the installed Triton (its binaries are checked with --version when named)."""
    try:
        return knobs.nvidia.ptxas_blackwell.path
    except (AttributeError, RuntimeError):
        pytest.skip("this Triton carries no second ptxas")


def _untouched():
    return "ptxas" not in knobs.nvidia.__dict__ and ptxas.USER_PATH not in os.environ


def test_knob_is_set_inside_and_put_back(bundled, monkeypatch):
    monkeypatch.delenv(ptxas.USER_PATH, raising=False)
    assert _untouched()
    with ptxas._knob(bundled):
        assert knobs.nvidia.ptxas.path == bundled and os.environ[ptxas.USER_PATH] == bundled
    assert _untouched()
    with pytest.raises(KeyError), ptxas._knob(bundled):  # put back when the block raises too
        raise KeyError
    assert _untouched()
    with ptxas._knob(bundled):  # overlapping blocks (nested here, threads alike): set until the last one leaves
        with ptxas._knob(bundled):
            pass
        assert knobs.nvidia.ptxas.path == bundled
    assert _untouched() and ptxas._held == 0


def test_triton_36_arrangement_switches_and_trusts(bundled, monkeypatch):
    """As in Triton 3.6: sm_90 code goes to knobs.nvidia.ptxas (12.8) unless it is set; the second ptxas is newer."""
    import triton.backends.nvidia.compiler as compiler

    old = SimpleNamespace(path="/triton/bin/ptxas", version="12.8")

    def get_ptxas(arch):
        return knobs.nvidia.ptxas if "ptxas" in knobs.nvidia.__dict__ else old

    monkeypatch.setattr(compiler, "get_ptxas", get_ptxas)
    monkeypatch.setattr(ptxas, "_spare", lambda: (bundled, "12.9"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.delenv(ptxas.USER_PATH, raising=False)
    monkeypatch.delenv(ptxas.OPT_OUT, raising=False)
    assert ptxas._choice.__wrapped__(0) == ptxas.Choice(bundled, True)
    monkeypatch.setenv(ptxas.OPT_OUT, "triton")
    assert ptxas._choice.__wrapped__(0) == ptxas.Choice(None, False)
    monkeypatch.delenv(ptxas.OPT_OUT)
    # a Triton whose sm_90 ptxas is not that knob: the switch would do nothing, so nothing is trusted
    monkeypatch.setattr(compiler, "get_ptxas", lambda arch: old)
    assert ptxas._choice.__wrapped__(0) == ptxas.Choice(None, False)
    assert _untouched()


def test_a_triton_laid_out_otherwise_keeps_its_choice(monkeypatch):
    import triton.backends.nvidia.compiler as compiler

    monkeypatch.delattr(compiler, "get_ptxas")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert ptxas._choice.__wrapped__(0) == ptxas.Choice(None, False)


def test_assembler_switches_only_when_chosen(bundled, monkeypatch):
    monkeypatch.delenv(ptxas.USER_PATH, raising=False)
    monkeypatch.setattr(ptxas, "_current_choice", lambda: ptxas.Choice(bundled, True))
    with ptxas.assembler():
        assert knobs.nvidia.ptxas.path == bundled
    assert _untouched()
    monkeypatch.setattr(ptxas, "_current_choice", lambda: ptxas.Choice(None, True))
    with ptxas.assembler():
        assert _untouched()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_no_gpu_no_trust():
    assert not ptxas.lowp_trusted()
    before = (knobs.nvidia.__dict__.get("ptxas"), os.environ.get(ptxas.USER_PATH))
    with ptxas.assembler():
        assert (knobs.nvidia.__dict__.get("ptxas"), os.environ.get(ptxas.USER_PATH)) == before
