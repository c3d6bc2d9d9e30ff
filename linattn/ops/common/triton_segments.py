"""Segments: long sequences cut into pieces that the per-sequence kernels run side by side.

A per-sequence kernel (one program per sequence, head and state block, walking every chunk) runs too few
programs when sequences and heads are few (T = 65536, B = 1). Each sequence is then cut into NS segments of
whole chunks, and the kernel runs them as N NS sequences: first each from a zero state, giving its own
change of state; then a scan chains those changes; then each again from its true entering state.

Where a segment's transition is a decay (the decay family and GLA: S <- exp(D_s) S + R_s, with D_s the
segment's summed log-decay, one per head or one per head and key), ``chain_segments`` is that scan, one
Triton program per block of state entries. The delta rules' transitions are [K, K] matrices, chained in
their own launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linattn.ops.common.triton_utils import cached_table


@triton.jit
def scan_order(i, n, REVERSE: tl.constexpr):
    """The item (segment, chunk) that a scan over n of them visits at its step i: from the first, or with REVERSE
    from the last."""
    if REVERSE:
        s = n - 1 - i
    else:
        s = i
    return s


@triton.jit
def segment_scan_kernel(
    dS,
    gsum,
    h0,
    hin,
    ht,
    NS,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_G: tl.constexpr,
    PER_KEY: tl.constexpr,
    HAS_H0: tl.constexpr,
    REVERSE: tl.constexpr,
):
    # dS, hin: [N, NS, H, K * V]; gsum: [N, NS, H] (or [N, NS, H, K] with PER_KEY) the summed log-decay of each
    # segment; h0, ht: [N, H, K * V]. Forward: hin[s] = S entering segment s, S <- exp(gsum[s]) S + dS[s].
    # REVERSE: segments from the last, hin[s] = what enters segment s from its end (a state gradient).
    i_b, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    o_e = i_b * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < K * V
    S = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + o_e, mask=m_e, other=0.0)
    for i in range(0, NS):
        off = ((i_n * NS + scan_order(i, NS, REVERSE)) * H + i_h).to(tl.int64)
        tl.store(hin + off * K * V + o_e, S, mask=m_e)
        if HAS_G:
            if PER_KEY:
                S = S * tl.exp(tl.load(gsum + off * K + o_e // V, mask=m_e, other=0.0))
            else:
                S = S * tl.exp(tl.load(gsum + off))
        S += tl.load(dS + off * K * V + o_e, mask=m_e, other=0.0)
    tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + o_e, S, mask=m_e)


SCAN_BLOCK = 1024  # state entries per program of the scan


def chain_segments(
    dS: torch.Tensor, gsum: torch.Tensor | None, h0: torch.Tensor | None, reverse: bool, ht: torch.Tensor | None = None
):
    """The scan over segments: dS [N, NS, H, K, V] float32 each segment's own change of state (from a zero
    state), gsum each segment's summed log-decay, [N, NS, H] or [N, NS, H, K] float32 (None: no decay), h0
    [N, H, K, V] what enters the first segment (the last, with reverse; None: zeros). Returns hin [N, NS, H, K, V],
    what enters each segment, and ht [N, H, K, V] (filled if given), what leaves the last (the first, with
    reverse)."""
    N, NS, H, K, V = dS.shape
    hin = torch.empty_like(dS)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=dS.device) if ht is None else ht
    segment_scan_kernel[(triton.cdiv(K * V, SCAN_BLOCK), N * H)](
        dS, gsum if gsum is not None else dS, h0 if h0 is not None else dS, hin, ht, NS, H=H, K=K, V=V,
        BLOCK=SCAN_BLOCK, HAS_G=gsum is not None, PER_KEY=gsum is not None and gsum.dim() == 4,
        HAS_H0=h0 is not None, REVERSE=reverse,
    )  # fmt: skip
    return hin, ht


def segment_count(
    N: int, H: int, T: int, BT: int, cu_seqlens, forced: int | None, heads: int, min_chunks: int, min_segments: int
) -> int:
    """Segments per sequence (1: none): ``forced`` if given (tests), else enough that N H NS reaches ``heads``,
    in segments of at least ``min_chunks`` chunks, if that gives at least ``min_segments``; never with
    cu_seqlens or with heads <= 0."""
    NT = triton.cdiv(T, BT)
    if forced is not None:
        return max(1, min(forced, NT))
    if cu_seqlens is not None or heads <= 0:
        return 1
    ns = min(triton.cdiv(heads, N * H), NT // min_chunks)
    return ns if ns >= min_segments else 1


class Segments:
    """A batch of N sequences of T tokens cut into NS segments each, of whole chunks of BT tokens (the last of a
    sequence may be shorter), laid out for the per-sequence kernels as N * NS sequences: cu [N NS + 1] and first
    [N NS], each segment's first chunk in the ChunkTable's numbering; ``per`` chunks a segment. Read-only:
    ``Segments.get`` may hand the same table to later calls."""

    @classmethod
    def get(cls, N: int, T: int, NS: int, BT: int, device) -> Segments:
        """The table for these shapes, kept across calls (see triton_utils.cached_table)."""
        return cached_table(lambda: cls(N, T, NS, BT, device), ("segments", N, T, NS, BT), device)

    @staticmethod
    def count(T: int, NS: int, BT: int) -> int:
        """The segments a sequence of T tokens is cut into when NS are asked for (whole chunks each: maybe fewer)."""
        NT = triton.cdiv(T, BT)
        return triton.cdiv(NT, triton.cdiv(NT, NS)) if NT else 1

    def __init__(self, N: int, T: int, NS: int, BT: int, device):
        NT = triton.cdiv(T, BT)
        self.per = triton.cdiv(NT, NS)  # chunks per segment
        self.NS = self.count(T, NS, BT)
        starts = torch.arange(self.NS, device=device, dtype=torch.int64) * self.per * BT  # within a sequence
        seq = torch.arange(N, device=device, dtype=torch.int64)[:, None]
        lo = (seq * T + starts[None, :]).reshape(-1)
        self.cu = torch.cat([lo, lo.new_full((1,), N * T)]).to(torch.int32)  # no host-to-device copy (a sync)
        self.first = (seq * NT + (starts // BT)[None, :]).reshape(-1).to(torch.int32)
        self.N = N

    def sum_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """x [N NT, ...] per chunk (float32) summed over each segment's chunks, in float64: [N, NS, ...] float32."""
        NT = x.shape[0] // self.N
        x = x.double().view(self.N, NT, *x.shape[1:])
        pad = self.NS * self.per - NT
        x = torch.cat([x, x.new_zeros(self.N, pad, *x.shape[2:])], dim=1) if pad else x
        return x.view(self.N, self.NS, self.per, *x.shape[2:]).sum(2).float()
