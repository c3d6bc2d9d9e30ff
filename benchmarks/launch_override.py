"""Launch settings of the Triton ops, overridden from the environment: for trying settings on a GPU without
editing the library. Call ``apply_env()`` before the ops run, or load it into pytest with
``-p benchmarks.launch_override``; it reads LINATTN_LAUNCH, a ';'-separated list of assignments:

    gla.<kernel>.<option>=<int>        an entry of gla's per-kernel launch table (triton._launch), e.g.
                                       gla.intra.BK=32, gla.dqkg.num_warps=4
    <module>.<NAME>=<value>            a module constant of linattn.ops.<module>.triton, e.g.
                                       gated_delta_rule.FEW_PROGRAMS=100, simple_gla.NUM_WARPS=8
    <module>.<NAME>.<key>=<value>      an entry of such a constant that is a dict, e.g.
                                       gated_delta_rule.NUM_WARPS.forward=8, gated_delta_rule.LOWP_DOTS.forward=1

Values are ints (1 and 0 also stand for True and False where the constant is a bool). Used by
benchmarks/launch_variants.sh, which runs each variant's GPU tests and timings in processes of their own.
"""

from __future__ import annotations

import importlib
import os

ENV = "LINATTN_LAUNCH"


def parse(spec: str) -> list[tuple[list[str], int]]:
    """[(dotted path as a list, value)] from a LINATTN_LAUNCH string; a ValueError names a bad entry."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        path, sep, value = item.partition("=")
        parts = path.strip().split(".")
        if not sep or len(parts) < 2 or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{ENV}: expected <module>.<name>[.<key>]=<int>, got {item!r}")
        out.append((parts, int(value)))
    return out


def _gla_launch(original, overrides):
    def launch(dtype, K, V):
        cfg = original(dtype, K, V)
        for kernel, option, value in overrides:
            if kernel not in cfg:
                raise ValueError(f"{ENV}: gla has no kernel {kernel!r} in its launch table ({sorted(cfg)})")
            cfg[kernel][option] = value
        return cfg

    return launch


def apply(spec: str) -> list[str]:
    """Apply the assignments of ``spec``; returns them as applied, for the log."""
    applied, gla = [], []
    for parts, value in parse(spec):
        module = importlib.import_module(f"linattn.ops.{parts[0]}.triton")
        if parts[0] == "gla" and len(parts) == 3:
            gla.append((parts[1], parts[2], value))
        elif len(parts) == 2:
            old = getattr(module, parts[1])  # AttributeError names a constant that does not exist
            if isinstance(old, dict):  # (a scalar would replace the table, and the next call would fail on it)
                raise ValueError(
                    f"{ENV}: {'.'.join(parts)} is a table ({', '.join(map(str, old))}); set its entries one by one, "
                    f"as {'.'.join(parts)}.{next(iter(old), '<key>')}=<int>"
                )
            setattr(module, parts[1], type(old)(value) if isinstance(old, (bool, int)) else value)
        elif len(parts) == 3:
            table = getattr(module, parts[1])
            if not isinstance(table, dict) or parts[2] not in table:
                raise ValueError(f"{ENV}: {parts[0]}.{parts[1]} has no entry {parts[2]!r}")
            old = table[parts[2]]
            table[parts[2]] = type(old)(value) if isinstance(old, (bool, int)) else value
        else:
            raise ValueError(f"{ENV}: too many parts in {'.'.join(parts)!r}")
        applied.append(f"{'.'.join(parts)}={value}")
    if gla:
        module = importlib.import_module("linattn.ops.gla.triton")
        module._launch = _gla_launch(module._launch, gla)
    return applied


def apply_env() -> None:
    """Apply LINATTN_LAUNCH, if set, and say what it changed."""
    if os.environ.get(ENV):
        print(f"[{ENV}] " + ", ".join(apply(os.environ[ENV])), flush=True)


def pytest_configure(config) -> None:
    """As a pytest plugin (-p benchmarks.launch_override): after tests/conftest.py has chosen the interpreter
    or not, since the kernel modules read TRITON_INTERPRET when they are imported."""
    apply_env()
