"""Run a single-batch implementation once per packed sequence: the literal meaning of ``cu_seqlens``."""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_per_sequence(
    fn: Callable,
    cu_seqlens: torch.Tensor,
    tensors: tuple[torch.Tensor | None, ...],
    initial_state: torch.Tensor | None,
    output_final_state: bool,
):
    """Call ``fn(*tensors_n, initial_state=s_n, output_final_state=...)`` per sequence n and join the results.

    ``tensors`` are packed along T ([1, T, ...], or None); outputs are concatenated along T and the
    final states stacked into [N, ...].
    """
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = tuple(None if x is None else x[:, a:b] for x in tensors)
        s0 = None if initial_state is None else initial_state[n : n + 1]
        o, s = fn(*part, initial_state=s0, output_final_state=output_final_state)
        outs.append(o)
        finals.append(s)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(finals) if output_final_state else None)
