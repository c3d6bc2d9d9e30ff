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


def register_triton(impls: dict, module: str, name: str, check: str = "triton_unsupported"):
    """Add ``module.name`` to ``impls`` as "triton" where Triton imports, and return ``triton_check``.

    ``triton_check(*args)`` is the callable ``dispatch`` takes: it returns None when the kernels can
    serve the call, else the reason they cannot (``module.check(*args)``, or "Triton is not installed").
    """
    loaded = load_triton_impl(module, name, check)
    if loaded is not None:
        impls["triton"] = loaded[0]

    def triton_check(*args):
        return lambda: "Triton is not installed" if loaded is None else loaded[1](*args)

    return triton_check
