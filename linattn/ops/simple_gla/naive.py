"""Simple GLA's recurrence is GLA's with one decay per head: S_t = exp(g_t) S_{t-1} + k_t v_t^T."""

from linattn.ops.gla.naive import naive_gla as naive_simple_gla

__all__ = ["naive_simple_gla"]
