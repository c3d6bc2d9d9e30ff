"""Pieces of the chunked parallel form that every mechanism shares.

A sequence of length T is cut into chunks of C tokens. Inside a chunk the work is a few batched
matrix products; between chunks a [K, V] state is passed along. With ``cu_seqlens`` each packed
sequence is padded on its own to a multiple of C, so no chunk straddles two sequences, and the
state is reset to that sequence's initial state at its first chunk. Padding tokens carry k = 0,
v = 0, g = 0 and beta = 0, which leave every state unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ChunkLayout:
    """Where every token lives once the sequence is cut into chunks.

    Tensors in chunk layout are [R, H, NC, C, ...]: R rows (B, or 1 with cu_seqlens), NC chunks of C tokens.
    """

    rows: int
    T: int
    C: int
    NC: int
    index: torch.Tensor | None = None  # varlen: padded position of each packed token, [T]
    start_of: dict[int, int] = field(default_factory=dict)  # varlen: chunk -> sequence that starts there
    end_of: dict[int, int] = field(default_factory=dict)  # varlen: chunk -> sequence that ends there
    empty: list[int] = field(default_factory=list)  # varlen: sequences with no tokens
    chunk_seq: torch.Tensor | None = None  # varlen: sequence of each chunk, [NC]

    @property
    def varlen(self) -> bool:
        return self.index is not None

    @property
    def N(self) -> int:
        """Number of sequences: one state row each."""
        return len(self.start_of) + len(self.empty) if self.varlen else self.rows

    def start_state(self, initial_state: torch.Tensor | None, H: int, K: int, V: int, like: torch.Tensor):
        """The [N, H, K, V] state entering each sequence, in like's dtype (zeros when none is given)."""
        if initial_state is not None:
            return initial_state.to(like.dtype)
        return like.new_zeros(self.N, H, K, V)

    @classmethod
    def build(cls, B: int, T: int, C: int, cu_seqlens: torch.Tensor | None, device) -> ChunkLayout:
        if cu_seqlens is None:
            return cls(rows=B, T=T, C=C, NC=-(-T // C))
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        chunks = [-(-n // C) for n in lengths]
        layout = cls(rows=1, T=T, C=C, NC=sum(chunks))
        first, positions, seq_ids = 0, [], []
        for n, (length, nc) in enumerate(zip(lengths, chunks)):
            if nc == 0:
                layout.empty.append(n)
                continue
            layout.start_of[first] = n
            layout.end_of[first + nc - 1] = n
            positions.append(torch.arange(first * C, first * C + length))
            seq_ids += [n] * nc
            first += nc
        layout.index = torch.cat(positions).to(device) if positions else torch.zeros(0, dtype=torch.long, device=device)
        layout.chunk_seq = torch.tensor(seq_ids, dtype=torch.long, device=device)
        return layout

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[R, T, H, ...] -> [R, H, NC, C, ...], zero-padded."""
        rest = x.shape[3:]
        if self.varlen:
            padded = x.new_zeros(1, self.NC * self.C, *x.shape[2:])
            x = padded.index_copy(1, self.index, x)
        else:
            pad = self.NC * self.C - self.T
            if pad:
                x = F.pad(x, (0, 0) * len(rest) + (0, 0, 0, pad))
        x = x.reshape(self.rows, self.NC, self.C, *x.shape[2:])
        return x.movedim(3, 1).contiguous()

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        """[R, H, NC, C, ...] -> [R, T, H, ...]."""
        y = y.movedim(1, 3).flatten(1, 2)
        if self.varlen:
            return y.index_select(1, self.index)
        return y[:, : self.T]

    def sum_per_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a per-chunk quantity [R, H, NC, ...] over each sequence: [N, H, ...] (N = R without varlen)."""
        if not self.varlen:
            return x.sum(2)
        out = x.new_zeros(self.N, *x.shape[1:2], *x.shape[3:])
        return out.index_add(0, self.chunk_seq, x[0].movedim(1, 0))

    def per_chunk(self, s: torch.Tensor) -> torch.Tensor:
        """Spread a per-sequence quantity [N, H, ...] over the chunks: [R, H, NC, ...]."""
        if not self.varlen:
            return s.unsqueeze(2)
        return s.index_select(0, self.chunk_seq).movedim(0, 1).unsqueeze(0)


def scan_chunks(
    step: Callable,
    initial_state: torch.Tensor,
    layout: ChunkLayout,
    *per_chunk: torch.Tensor,
):
    """Pass the state from chunk to chunk.

    ``step(S, *xs_c) -> (piece, S_next)`` advances the [R, H, K, V] state over one chunk, where
    xs_c are the c-th chunks of ``per_chunk`` (each [R, H, NC, ...]). Returns the pieces stacked
    along dim 2 (a tuple if step returns tuples) and the final state per sequence, [N, H, K, V].

    The loop runs over chunks, never over tokens; ``unbind`` (not slicing) keeps the backward linear in NC.
    """
    slices = [x.unbind(2) for x in per_chunk]
    S = initial_state if not layout.varlen else None
    finals: dict[int, torch.Tensor] = {}
    pieces = []
    for c in range(layout.NC):
        if layout.varlen and c in layout.start_of:
            n = layout.start_of[c]
            S = initial_state[n : n + 1]
        piece, S = step(S, *(s[c] for s in slices))
        pieces.append(piece)
        if layout.varlen and c in layout.end_of:
            finals[layout.end_of[c]] = S
    if layout.varlen:
        for n in layout.empty:
            finals[n] = initial_state[n : n + 1]
        final = torch.cat([finals[n] for n in range(len(finals))])
    else:
        final = S
    if pieces and isinstance(pieces[0], tuple):
        stacked = tuple(torch.stack(p, 2) for p in zip(*pieces))
    else:
        stacked = torch.stack(pieces, 2) if pieces else None
    return stacked, final


def causal_mask(C: int, device, strict: bool = False) -> torch.Tensor:
    """[C, C] boolean mask of s <= t (s < t when strict)."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def segsum(g: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Segment sums of log-decays: out[t, s] = g_{s+1} + ... + g_t for s <= t, -inf for s > t.

    g has the sequence axis at ``dim`` (length L); the result has [L(t), L(s)] in its place. Each
    entry is summed from its own terms, not taken as a difference b_t - b_s of running sums: such
    a difference carries the rounding of the (possibly large) sums, and its gradient reaches every
    g_r through two paths that cancel only up to rounding. Here g_r gets gradient only from the
    segments that contain it, as in the recurrence.
    """
    x = g.movedim(dim, -1)  # [..., L]
    L = x.shape[-1]
    below = torch.ones(L, L, dtype=torch.bool, device=g.device)
    x = x.unsqueeze(-1).expand(*x.shape, L)  # [..., r, s] = g_r
    x = x.masked_fill(~below.tril(-1), 0).cumsum(-2)  # [..., t, s] = sum of g_r over s < r <= t
    x = x.masked_fill(~below.tril(0), float("-inf"))
    return x.movedim((-2, -1), (dim - 1, dim) if dim < 0 else (dim, dim + 1))


def suffix_sum(g: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """out_s = g_{s+1} + ... + g_L along dim: the log-decay from token s to the end of its chunk."""
    inclusive = g.flip(dim).cumsum(dim).flip(dim)
    return torch.cat([inclusive.narrow(dim, 1, g.shape[dim] - 1), torch.zeros_like(g.narrow(dim, 0, 1))], dim)


def decay_matrix(g: torch.Tensor) -> torch.Tensor:
    """[..., C, C] matrix exp(g_{s+1} + ... + g_t) for s <= t and 0 above the diagonal, from log-decays g [..., C].

    Every exponent used is <= 0 when g <= 0, and the masked half is exp(-inf) = 0, never inf * 0.
    """
    return torch.exp(segsum(g))
