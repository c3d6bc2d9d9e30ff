"""Import a mechanism's Triton impl only where Triton is installed; elsewhere the op simply lacks it."""

from __future__ import annotations

import importlib


def load_triton_impl(module: str, *names: str):
    """Return the named attributes of ``module``, or None when Triton cannot be imported here."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] == "triton":
            return None
        raise
    return tuple(getattr(mod, n) for n in names)
