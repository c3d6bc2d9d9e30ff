"""Which ptxas assembles the delta rules' kernels on Hopper, and whether their bfloat16 dots can be trusted to it.

Triton turns a kernel into PTX and hands it to ptxas, which it bundles. Triton 3.6 (the one PyTorch 2.11 pins)
assembles sm_90 code with its ptxas 12.8 and sm_100 code with a second one, ``ptxas-blackwell``, which is 12.9.
The delta rules' per-sequence and per-chunk kernels with bfloat16 dot operands (``LOWP``) come out of ptxas 12.8
broken: on an H200 they meet illegal memory accesses in the GPU tests and the benchmark (session 8, and sessions 6
and 7 before the cause was known). The same PTX assembled by the 12.9 in the same wheel passes every delta-rule GPU
test (101, with the property tests) and is faster (delta_rule fwd+bwd 11.29 ms against 12.35 with float32 dots). Later
Triton releases assemble sm_90 code with ``ptxas-blackwell`` themselves.

So, on a compute-capability 9 GPU, where the ptxas Triton would use is older than 12.9 and its ``ptxas-blackwell`` is
not, ``assembler()`` points Triton's ``knobs.nvidia.ptxas`` at the latter while linattn's kernels are compiled, and
puts it back after; ``lowp_trusted()`` says whether the bfloat16 dots are on. Triton keeps other kernels' choice.

- A ptxas named in TRITON_PTXAS_PATH is the user's choice: it is kept, and its version decides.
- LINATTN_PTXAS=triton keeps Triton's own choice: the bfloat16 dots then stay off below 12.9.
- Only compute capability 9 has been tested; elsewhere nothing is switched and the dots stay off.
- The choice is made once per device and process, at the first launch (environment changes after it are not seen).

Triton's cache key names the ptxas version it saw first in the process, whichever kernel that was for. So a cached
binary of a kernel whose constexprs do not depend on the choice (prepare, backward_chunk) may come from either ptxas,
both of which assemble those correctly; the four kernels with bfloat16 dots have LOWP among their constexprs, so their
binaries are never shared with a build that keeps them off.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

FIXED = (12, 9)  # the first ptxas that assembles the bfloat16 kernels correctly (H200, Triton 3.6)
OPT_OUT = "LINATTN_PTXAS"  # =triton: never switch
USER_PATH = "TRITON_PTXAS_PATH"


def _version(text: str | None) -> tuple[int, ...]:
    """'12.8' -> (12, 8); () when unknown."""
    try:
        return tuple(int(p) for p in str(text).split(".")[:2])
    except ValueError:
        return ()


@dataclass(frozen=True)
class Choice:
    """switch_to: the ptxas path to assemble with (None: Triton's own); trusted: whether bfloat16 dots are on."""

    switch_to: str | None
    trusted: bool


def choose(capability: tuple[int, int], own: str, spare: tuple[str, str] | None, user_path: bool,
           opt_out: bool) -> Choice:  # fmt: skip
    """The decision, from facts alone: the GPU's compute capability; the version of the ptxas Triton assembles that
    capability's code with (``own``); (path, version) of its other bundled one (``spare``, None if missing or the
    same binary); whether the user named a ptxas (TRITON_PTXAS_PATH); whether LINATTN_PTXAS=triton."""
    if capability[0] != 9:
        return Choice(None, False)
    if _version(own) >= FIXED:
        return Choice(None, True)
    if user_path or opt_out or spare is None or _version(spare[1]) < FIXED:
        return Choice(None, False)
    return Choice(spare[0], True)


@functools.cache
def _choice(device_index: int) -> Choice:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except (ImportError, AttributeError):  # a Triton laid out otherwise: keep its choice, and tf32
        return Choice(None, False)

    capability = torch.cuda.get_device_capability(device_index)
    arch = capability[0] * 10 + capability[1]
    own = get_ptxas(arch)
    spare = _spare()
    spare = spare if spare is not None and spare[0] != own.path else None
    user = bool(os.environ.get(USER_PATH))
    choice = choose(capability, own.version, spare, user, os.environ.get(OPT_OUT) == "triton")
    if choice.switch_to is not None and not _switches(arch, choice.switch_to):
        return Choice(None, False)  # this Triton does not read the knob the way 3.6 does
    return choice


def _spare() -> tuple[str, str] | None:
    """(path, version) of Triton's second bundled ptxas (for sm_100 in Triton 3.6), or None."""
    from triton import knobs

    try:
        tool = knobs.nvidia.ptxas_blackwell
    except (AttributeError, RuntimeError):  # no such knob in this Triton, or no such binary
        return None
    return tool.path, tool.version


def _switches(arch: int, path: str) -> bool:
    """Whether setting knobs.nvidia.ptxas makes Triton assemble ``arch`` code with ``path``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with _knob(path):
        return get_ptxas(arch).path == path


_lock = threading.Lock()
_held = 0  # blocks inside _knob now (threads, or nested calls)
_saved: tuple = (None, None)  # the knob's override and TRITON_PTXAS_PATH before the first of them


@contextmanager
def _knob(path: str):
    """Triton's sm_90 ptxas knob set to ``path`` inside the block; the first block in sets it and the last one out
    puts back what was there, so that overlapping blocks (threads, nesting) leave it set until all have left."""
    global _held, _saved
    from triton import knobs

    nvidia = knobs.nvidia
    with _lock:
        if _held == 0:
            _saved = (nvidia.__dict__.get("ptxas"), os.environ.get(USER_PATH))
            nvidia.ptxas = path  # also sets TRITON_PTXAS_PATH
        _held += 1
    try:
        yield
    finally:
        with _lock:
            _held -= 1
            if _held == 0:
                before, env = _saved
                if before is None:
                    nvidia.__dict__.pop("ptxas", None)
                else:
                    nvidia.__dict__["ptxas"] = before
                if env is None:
                    os.environ.pop(USER_PATH, None)
                else:
                    os.environ[USER_PATH] = env


def _current_choice() -> Choice:
    if not torch.cuda.is_available():
        return Choice(None, False)
    return _choice(torch.cuda.current_device())


def lowp_trusted() -> bool:
    """Whether the ptxas that assembles linattn's kernels on the current CUDA device is trusted with the delta rules'
    bfloat16 dots (see the module docstring). False without CUDA."""
    return _current_choice().trusted


@contextmanager
def assembler():
    """Compile the kernels launched inside with the chosen ptxas (a no-op unless a switch is needed)."""
    path = _current_choice().switch_to
    if path is None:
        yield
    else:
        with _knob(path):
            yield
