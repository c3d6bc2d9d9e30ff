"""Chunked parallel form of GLA (a log-decay per head, token and key channel), in PyTorch.

Between chunks it is simple GLA's state passing with a per-channel decay. Inside a chunk the
scores A_ts = sum_k q_tk k_sk exp(b_tk - b_sk) factor as (q exp(b - rho)) (k exp(rho - b))^T only
while exp(rho - b) stays inside float32's range, so the chunk is cut into sub-chunks of c tokens, c
chosen from the gates so that (c - 1) * max|g| <= 80 (the whole chunk for typical gates; one token
for a gate of -80 or below):

* inside a sub-chunk, rebased on its first token f: one matrix product of q exp(b_t - b_f) (<= 1)
  and k exp(b_f - b_s) (<= e^80) below the diagonal, and the plain q_t . k_t on it (a token's pair
  with itself has no decay, and leaving exp out keeps its gradient from cancelling in dg);
* between sub-chunks j < i, both sides are rebased on rho_i: exp(b_t - rho_i) and exp(rho_i - b_s)
  are each <= 1, at the cost of n (n - 1) / 2 tiles [c, K] for n = C / c sub-chunks (one per pair).

Every exponent is a segment sum of gates (common.chunking.segsum), not a difference of running sums.
Under torch.compile the gates cannot choose c (that reads them on the host): sub-chunks of a fixed length
there, with the scores inside each summed per key channel (COMPILED_SUB_CHUNK).
"""

from __future__ import annotations

import torch

from linattn.ops._contract import floor_gate, state_dtype
from linattn.ops.common.chunking import ChunkLayout, segsum
from linattn.ops.simple_gla.chunk import chunk_state_passing

MAX_EXPONENT = 80.0  # exp(80) ~ 5.5e34 and exp(-80) ~ 1.8e-35 are both normal float32 numbers
# Under torch.compile the sub-chunk length cannot come from the gates (sub_chunk_size reads them on the host, which
# fullgraph tracing forbids). There the sub-chunks are this long (or the largest power of two dividing the chunk
# below it), and the scores inside each are formed exactly per key channel, exp of segment sums <= 0, which holds
# for any gates at c / 2 times the memory of the rebased product (an [n, c, c, K] tile per chunk).
COMPILED_SUB_CHUNK = 8


def sub_chunk_size(g: torch.Tensor, C: int) -> int:
    """The largest power of two c dividing C with (c - 1) * max|g| <= MAX_EXPONENT (one host read of min g)."""
    worst = -float(g.detach().min()) if g.numel() else 0.0
    c = C
    while c > 1 and ((c - 1) * worst > MAX_EXPONENT or C % c):
        c //= 2
    return c


def _compiled_sub_chunk(C: int) -> int:
    """The largest power of two that divides C and is at most COMPILED_SUB_CHUNK."""
    c = 1
    while c * 2 <= COMPILED_SUB_CHUNK and C % (c * 2) == 0:
        c *= 2
    return c


def gate_sums(g: torch.Tensor, sub_chunk: int) -> dict[str, torch.Tensor]:
    """Every sum of log-decays the chunked form needs, from g [..., C, K], as one product with a 0/1 matrix.

    Returns [..., C, K] tensors: "b" (g summed over the chunk up to and including t), "to_end" (over
    t+1 .. C), "from_first" (over f+1 .. t, f the first token of t's sub-chunk) and, when the chunk has
    more than one sub-chunk, "sub_b" (over f .. t) and "sub_to_end" (over t+1 .. the sub-chunk's last).
    Each entry sums its own terms (the zeros of the mask contribute exact zeros), so none is a difference
    of running sums; on CPU one matrix product also beats torch's cumsum along a non-innermost axis and
    the flips of its backward.
    """
    C = g.shape[-2]
    c = sub_chunk
    t = torch.arange(C, device=g.device)[:, None]
    s = torch.arange(C, device=g.device)[None, :]
    same = t // c == s // c
    masks = {"b": s <= t, "to_end": s > t, "from_first": same & (s <= t) & (s % c != 0)}
    if c < C:
        masks |= {"sub_b": same & (s <= t), "sub_to_end": same & (s > t)}
    M = torch.cat(list(masks.values()))  # [m C, C]
    # The sums go into exp, so they need all of float32's bits. A float32 matmul may not keep them where a lower
    # matmul precision is allowed (TF32 on CUDA; on CPUs with AMX, "medium" gives bfloat16 products, measured): there,
    # and under torch.compile (which cannot trace the query), it runs in float64, at about +15% of the forward's time.
    eager = not torch.compiler.is_compiling()
    full = eager and g.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"
    work = g.dtype if g.dtype != torch.float32 or full else torch.float64
    return dict(zip(masks, (M.to(work) @ g.to(work)).to(g.dtype).split(C, dim=-2)))


def gla_intra_scores(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, sub_chunk: int, sums=None, exact_inside: bool = False
) -> torch.Tensor:
    """Causal in-chunk scores A [..., C, C] from q, k and log-decays g, all [..., C, K].

    sub_chunk must satisfy (sub_chunk - 1) * max|g| <= MAX_EXPONENT (see sub_chunk_size), unless
    exact_inside: then the scores inside each sub-chunk are summed per key channel, for any gates. ``sums``:
    gate_sums(g, sub_chunk), if already formed.
    """
    *lead, C, K = q.shape
    c = sub_chunk
    n = C // c
    sums = gate_sums(g, c) if sums is None else sums
    qs, ks = (x.reshape(*lead, n, c, K) for x in (q, k))  # [..., n, c, K]

    if exact_inside:
        # sum_k q_tk k_sk exp(g_(s+1)k + ... + g_tk): the segment sums are <= 0 (-inf above the diagonal, 0 on it)
        decay = torch.exp(segsum(g.reshape(*lead, n, c, K), dim=-2))  # [..., n, c(t), c(s), K]
        A_diag = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * decay).sum(-1)
    else:
        # Inside each sub-chunk, rebased on its first token f: b_t - b_f is the sum of g over (f, t], in [-80, 0].
        from_first = sums["from_first"].reshape(*lead, n, c, K)
        A_diag = (qs * torch.exp(from_first)) @ (ks * torch.exp(-from_first)).transpose(-1, -2)  # [..., n, c, c]
        A_diag = A_diag.tril(-1) + torch.diag_embed((qs * ks).sum(-1))
    if n == 1:
        return A_diag.reshape(*lead, C, C)

    # Between sub-chunks j < i, rebased on rho_i (the log-decay just before sub-chunk i): exp(b_t - rho_i)
    # sums g inside sub-chunk i; exp(rho_i - b_s) = exp(sub-chunks j+1 ... i-1) exp(rest of sub-chunk j after
    # s), each factor <= 1. Only the n (n - 1) / 2 pairs j < i are formed, as [P, ..., c, K] tiles.
    i_idx, j_idx = torch.tril_indices(n, n, offset=-1, device=q.device)  # the pairs, P of them
    sub_b = sums["sub_b"].reshape(*lead, n, c, K)
    q_r = (qs * torch.exp(sub_b)).movedim(-3, 0)  # [n(i), ..., c, K]
    k_r = (ks * torch.exp(sums["sub_to_end"].reshape(*lead, n, c, K))).movedim(-3, 0)  # [n(j), ..., c, K]
    totals = sub_b[..., -1, :]  # [..., n, K]: each sub-chunk's whole sum
    between = segsum(totals, dim=-2).movedim((-3, -2), (0, 1))  # [n, n, ..., K]: [r, j] sums sub-chunks j+1 ... r
    between = between[i_idx - 1, j_idx]  # [P, ..., K]: sub-chunks j+1 ... i-1, strictly between the pair
    blocks = (q_r[i_idx] * torch.exp(between).unsqueeze(-2)) @ k_r[j_idx].transpose(-1, -2)  # [P, ..., c, c]
    A = blocks.new_zeros(n, n, *blocks.shape[1:]).index_put((i_idx, j_idx), blocks)  # [n(i), n(j), ..., c, c]
    A = A + torch.eye(n, dtype=torch.bool, device=q.device).view(n, n, *[1] * (A.dim() - 2)) * A_diag.movedim(-3, 0)
    return A.movedim((0, 1), (-4, -2)).reshape(*lead, C, C)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 32,
):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] log-decay. Returns (o [B, T, H, V], state).

    Chunks of 32 tokens: with gates of typical size a chunk is then one sub-chunk, with no pairs between
    sub-chunks to form. On a 2-core CPU (T = 4096, H = 4, K = V = 64, float32, g = logsigmoid(x + 3)),
    fwd+bwd took 99 ms at 32 against 145 at 64, 119 at 16 and 164 at 128.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, state_dtype(q)
    layout = ChunkLayout.build(B, T, chunk_size, cu_seqlens, q.device)
    q, k, v = (layout.to_chunks(x.to(dtype)) for x in (q, k, v))  # [R, H, NC, C, D]
    q = q * scale
    S0 = layout.start_state(initial_state, H, K, V, like=q)

    g = layout.to_chunks(floor_gate(g.to(dtype)))  # [R, H, NC, C, K]; floored: see _contract.GATE_FLOOR
    compiling = torch.compiler.is_compiling()
    c = _compiled_sub_chunk(layout.C) if compiling else sub_chunk_size(g, layout.C)
    sums = gate_sums(g, c)
    b = sums["b"]
    dS = (k * torch.exp(sums["to_end"])).transpose(-1, -2) @ v  # [R, H, NC, K, V]
    states, final = chunk_state_passing(layout, S0, dS, torch.exp(b[..., -1:, :]).transpose(-1, -2))
    A = gla_intra_scores(q, k, g, c, sums, exact_inside=compiling)
    o = A @ v + (q * torch.exp(b)) @ states
    o = layout.from_chunks(o).to(out_dtype)
    return o, (final if output_final_state else None)
