"""Triton pieces that every mechanism's kernels share: tf32 rounding, log-decay sums, launch helpers."""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from linattn.ops._contract import GATE_FLOOR, triton_interpret

MAX_HEAD_DIM = 256
# The kernels' launch settings are Hopper's; they have been timed on sm_90 only, and compiled for sm_80, sm_86, sm_89
# and sm_120 besides (sessions 17-18, without a GPU). On Turing (7.5) a program gets 64 KiB of shared memory, and
# the gated delta rule's forward and output kernels with qk_l2norm need 68-96 KiB even at one stage (compiled for
# sm_75 with Triton 3.6, float16, session 18); bfloat16 dots need 8.0. Older GPUs take the chunked path.
MIN_CAPABILITY = (8, 0)

HOPPER_SHARED = 227 * 1024  # the shared memory that Hopper (sm_90; and sm_100) gives a program


@functools.cache
def shared_per_program(index: int) -> int | None:
    """The shared memory a program may take on CUDA device ``index``, as Triton checks its launches against it
    (the opt-in maximum per block), or None where this Triton does not say."""
    try:
        return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except (AttributeError, KeyError, RuntimeError):
        return None


def gpu_shared_below(limit: int) -> bool:
    """Whether kernels launch on a GPU (the current CUDA device) that offers a program less than ``limit`` bytes of
    shared memory; False under the interpreter, or where Triton does not say."""
    if triton_interpret() or not torch.cuda.is_available():
        return False
    shared = shared_per_program(torch.cuda.current_device())
    return shared is not None and shared < limit


@triton.jit
def tf32_round(x, ROUND: tl.constexpr):
    """Round float32 to the nearest tf32 value (the tensor cores would otherwise drop the low 13 bits)."""
    if ROUND:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def chunk_bounds(chunks, i_c):
    """[lo, hi) of chunk i_c in the token axis (int64), from a ChunkTable's chunks [NC, 2]; empty past the last."""
    return tl.load(chunks + 2 * i_c).to(tl.int64), tl.load(chunks + 2 * i_c + 1).to(tl.int64)


@triton.jit
def chunk_and_block(NB: tl.constexpr):
    """(chunk, block) of this program, where grid axis 0 runs over chunks times NB blocks of each (key or value
    blocks), a chunk's blocks adjacent. Programs are scheduled in order of axis 0 first, so a chunk's blocks run
    together, and what each of them reads of the whole chunk (dO, V, U, dA ...) comes from L2 after the first
    read, rather than from memory once per block, as when the blocks are the slowest grid axis."""
    pid = tl.program_id(0)
    return pid // NB, pid % NB


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T, VARLEN: tl.constexpr):
    """[bos, eos) of sequence i_n in the token axis (int64): from cu_seqlens, or row i_n of T tokens."""
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


_GATE_FLOOR: tl.constexpr = tl.constexpr(GATE_FLOOR)


@triton.jit
def load_gates(ptr, mask):
    """Per-key log-decays (float32) loaded where ``mask`` (0 elsewhere), floored at GATE_FLOOR (-1e4, a decay of
    exactly 0: see linattn.ops._contract), as the ops floor their per-head gates before the kernels: GLA's gates are
    [B, T, H, K], and a pass over them in PyTorch would cost as much as a kernel of its own."""
    return tl.maximum(tl.load(ptr, mask=mask, other=0.0).to(tl.float32), _GATE_FLOOR)


@triton.jit
def chunk_log_decay(b_g):
    """Chunk-local cumulative log-decay of b_g [BT] (or [BT, BK]) along axis 0, as a float32 pair.

    The sum is formed in float64 and split into hi + lo: hi_t - hi_s is exact or carries only its
    own rounding (Sterbenz), so (hi_t - hi_s) + (lo_t - lo_s) keeps the precision of the float64 sums
    even when the sums are huge (gates of -1e4) and their difference is small. Returns (b, hi, lo, last)
    with b the float64 sums and last the chunk's total (float64).
    """
    b = tl.cumsum(b_g.to(tl.float64), axis=0)
    last = tl.sum(b_g.to(tl.float64), axis=0)
    hi = b.to(tl.float32)
    lo = (b - hi.to(tl.float64)).to(tl.float32)
    return b, hi, lo, last


@triton.jit
def exp32(x, PRECISE: tl.constexpr):
    """exp of float32 x. tl.exp computes 2^(x log2 e) with an approximate exp2 on NVIDIA GPUs, whose relative
    error grows like |x| eps (1e-6 at x = -30): above a float32 reference's for strong decays. PRECISE takes
    libdevice's correctly rounded-to-an-ulp exp instead; worth it for float32 inputs only."""
    if PRECISE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


def precise_exp(dtype: torch.dtype, gpu: bool | None = None) -> bool:
    """Whether kernels should use exp32's precise path: float32 inputs on a GPU (the interpreter's exp is numpy's).

    gpu: compile for a GPU (default: unless TRITON_INTERPRET=1), as tests/ops/compile_kernels.py does anywhere.
    """
    gpu = not triton_interpret() if gpu is None else gpu
    return dtype == torch.float32 and gpu


@triton.jit
def dot_operand(x, ROUND: tl.constexpr, LOWP: tl.constexpr, LOWP_TY: tl.constexpr):
    """A float32 tile made ready for tl.dot: cast to the inputs' 16-bit dtype (LOWP), or tf32-rounded."""
    if LOWP:
        y = x.to(LOWP_TY)
    else:
        y = tf32_round(x.to(tl.float32), ROUND)
    return y


def lowp_dots(dtype: torch.dtype) -> bool:
    """Whether a kernel may feed bfloat16 operands to every tl.dot (float32 accumulation), as a plain
    bfloat16 PyTorch computation does. Only bfloat16: it has float32's range, so float32 states and
    sums (a normaliser grows like T) cannot overflow when cast; float16 could, and keeps tf32. Off
    in the interpreter, whose float32 -> bfloat16 casts truncate.
    """
    return dtype == torch.bfloat16 and not triton_interpret()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: exact float32 products for float32 inputs, tf32 (after tf32_round) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_flags(dtype: torch.dtype, long_sums: bool = False, gpu: bool | None = None) -> dict:
    """The constexprs that adapt a kernel to the input dtype and to Triton's interpreter.

    DOT_PREC: see dot_precision. With long_sums (a pass whose products feed long chains or sums over the
    sequence), float16 on the GPU takes "tf32x3": float16 carries tf32's 10 mantissa bits, so tf32 dots
    would err as much as a plain float16 run, and the chain would pile those errors up.
    UPCAST_QK: the interpreter (Triton 3.9) multiplies bfloat16 tl.dot operands as raw integers.
    ROUND: on the GPU, round float32 dot operands to the nearest tf32 instead of truncating them.
    gpu: compile for a GPU (default: unless TRITON_INTERPRET=1), as tests/ops/compile_kernels.py does anywhere.
    """
    gpu = not triton_interpret() if gpu is None else gpu
    prec = dot_precision(dtype)
    if long_sums and dtype == torch.float16 and gpu:
        prec = "tf32x3"
    return dict(DOT_PREC=prec, UPCAST_QK=dtype == torch.bfloat16 and not gpu, ROUND=prec == "tf32" and gpu)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel should write an output of ``dtype`` in.

    Triton's interpreter truncates float32 -> bfloat16 instead of rounding it: there, write float32
    and let torch round.
    """
    return torch.float32 if dtype == torch.bfloat16 and triton_interpret() else dtype


def triton_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if Triton kernels can serve these inputs, else the reason they cannot."""
    if not (q.is_cuda or (q.device.type == "cpu" and triton_interpret())):
        return f"tensors are on {q.device}; Triton needs CUDA (or CPU tensors with TRITON_INTERPRET=1)"
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    if capability is not None and capability < MIN_CAPABILITY:
        major, minor = capability
        return f"{q.device} has compute capability {major}.{minor}; linattn's Triton kernels need 8.0 or newer"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported (float32, bfloat16, float16 are)"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims K={q.shape[-1]}, V={v.shape[-1]} exceed {MAX_HEAD_DIM}"
    return None


def reverse_cumsum_per_sequence(e: torch.Tensor, cu_seqlens, out_dtype=torch.float32) -> torch.Tensor:
    """sum_{r >= t} e_r within each sequence, for e [B, T, H, ...], in out_dtype.

    Summed in float64, so that the subtraction at sequence ends is exact.
    """
    e = e.double().movedim(1, -1)  # [B, H, ..., T]: scan along the innermost dim, which torch parallelises well
    total = e.flip(-1).cumsum(-1).flip(-1)  # suffix sums over the whole row
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long()
        after = torch.cat([total, total.new_zeros(*total.shape[:-1], 1)], dim=-1)[..., ends]  # past each end
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        total = total - torch.repeat_interleave(after, lengths, dim=-1, output_size=e.shape[-1])
    return total.movedim(-1, 1).to(out_dtype).contiguous()


def exclusive_cumsum_per_sequence(e: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """sum_{r < t} e_r within each sequence, for e [B, T, H, ...], in float64.

    Shifted, then summed, never formed as a difference of inclusive sums: a large last term would
    otherwise swamp the small sums before it. (With cu_seqlens, each sequence still subtracts the
    running total of the ones before it, so there its error is relative to that total.)
    """
    e = e.double().movedim(1, -1)  # [B, H, ..., T]
    shifted = torch.nn.functional.pad(e[..., :-1], (1, 0))
    if cu_seqlens is not None:
        starts = cu_seqlens[:-1].long()
        starts = starts[starts < e.shape[-1]]
        shifted[..., starts] = 0  # no carry into a sequence from the one before
    total = shifted.cumsum(-1)
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        before = torch.cat([total.new_zeros(*total.shape[:-1], 1), total], dim=-1)[..., cu_seqlens[:-1].long()]
        total = total - torch.repeat_interleave(before, lengths, dim=-1, output_size=e.shape[-1])
    return total.movedim(-1, 1).contiguous()


def narrow_bv(BV: int, V: int, blocks: int, target: int) -> int:
    """The value block of a per-sequence kernel that runs (V / BV) blocks programs: BV halved, down to 16, while
    those are fewer than target (long sequences, few of them, leave SMs idle otherwise)."""
    while BV > 16 and triton.cdiv(V, BV) * blocks < target:
        BV //= 2
    return BV


def short_for_recurrent(q: torch.Tensor, cu_seqlens, max_t: int) -> bool:
    """True when the call has at most max_t tokens per sequence on average (decoding)."""
    n = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.shape[1] <= max_t * n


@contextmanager
def on_device_of(t: torch.Tensor):
    """Inside, the current CUDA device is ``t``'s. Triton launches its kernels on the current device, which need not
    be the one that holds a layer's tensors (a model spread over GPUs in one process, as device_map="auto" does):
    every custom op that launches kernels enters this first. Nothing for CPU tensors (the interpreter)."""
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def plain_eager(*tensors) -> bool:
    """Outside torch.compile's tracing, on plain tensors (no fake or other tensor subclass): a launcher may then call
    its kernel directly, without the custom op's dispatch (which only torch.compile and fake tensors need)."""
    return not torch.compiler.is_compiling() and all(x is None or type(x) is torch.Tensor for x in tensors)


# Index tables built from shapes alone (ChunkTable without cu_seqlens, Segments), kept for the next call with
# the same shapes on the same device and stream: building one launches about a dozen small kernels, which at
# T = 65536 (few long sequences, segments) made the host, not the GPU, the bound on a delta rule's fwd+bwd.
TABLE_CACHE_SIZE = 64
_tables: collections.OrderedDict = collections.OrderedDict()
_tables_lock = threading.Lock()  # ops called from several threads (one stream each, say) share the tables


def cached_table(build: Callable[[], object], key: tuple, device) -> object:
    """build(), or what it returned for ``key`` before on this device and current stream (the last
    TABLE_CACHE_SIZE kept). Built afresh, and not kept, while a CUDA graph is captured or torch.compile traces
    (their tensors would not hold values outside that), and kept per stream, so that a table's kernels ran on
    the stream that reads it. Built outside inference mode, so that any later call may read it."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if torch.compiler.is_compiling() or (cuda and torch.cuda.is_current_stream_capturing()):
        return build()
    stream = torch.cuda.current_stream(device).cuda_stream if cuda else None
    full_key = (key, device, stream)
    with _tables_lock:
        table = _tables.get(full_key)
        if table is not None:
            _tables.move_to_end(full_key)
            return table
    with torch.inference_mode(False):
        table = build()
    with _tables_lock:
        _tables[full_key] = table
        while len(_tables) > TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    return table


class ChunkTable:
    """Where sequences and chunks of BT tokens lie in the packed token axis, for per-chunk kernels.

    cu: int32 [N + 1] sequence bounds (a batch of B rows of T tokens is B sequences); first: int32 [N]
    each sequence's first chunk; chunks: int32 [NC, 2] each chunk's token range (empty past the last).
    Read-only: ``ChunkTable.get`` may hand the same table to later calls.
    """

    @classmethod
    def get(cls, B: int, T: int, cu_seqlens, BT: int, device) -> ChunkTable:
        """The table, kept across calls without cu_seqlens (see cached_table); built for each call with them."""
        if cu_seqlens is not None:
            return cls(B, T, cu_seqlens, BT, device)
        return cached_table(lambda: cls(B, T, None, BT, device), ("chunks", B, T, BT), device)

    @staticmethod
    def count(B: int, T: int, cu_seqlens, BT: int) -> int:
        """NC: the chunks of B rows of T tokens, or with cu_seqlens a bound on them (no sync with the device to
        count them), from shapes alone (so fake tensors can allot what the kernels fill)."""
        if cu_seqlens is None:
            return B * triton.cdiv(T, BT)
        return triton.cdiv(T, BT) + cu_seqlens.shape[0] - 1

    def __init__(self, B: int, T: int, cu_seqlens, BT: int, device):
        self.NC = self.count(B, T, cu_seqlens, BT)
        if cu_seqlens is None:
            self.N = B
            NT = triton.cdiv(T, BT)
            self.cu = torch.arange(B + 1, device=device, dtype=torch.int32) * T
            self.first = torch.arange(B, device=device, dtype=torch.int32) * NT
            c = torch.arange(self.NC, device=device, dtype=torch.int32)
            lo = (c // NT) * T + (c % NT) * BT
            hi = torch.minimum(lo + BT, (c // NT + 1) * T)
        else:
            self.N = cu_seqlens.numel() - 1
            self.cu = cu_seqlens.to(torch.int32)
            per_seq = (self.cu[1:] - self.cu[:-1] + BT - 1) // BT
            ends = per_seq.cumsum(0).to(torch.int32)  # one past each sequence's last chunk
            self.first = ends - per_seq
            c = torch.arange(self.NC, device=device, dtype=torch.int32)
            n = torch.searchsorted(ends, c, right=True).clamp(max=self.N - 1)
            lo = self.cu[n] + (c - self.first[n]) * BT
            hi = torch.minimum(lo + BT, self.cu[n + 1])
            valid = c < ends[-1]
            lo, hi = torch.where(valid, lo, 0), torch.where(valid, hi, 0)
        self.chunks = torch.stack([lo, hi], dim=1).to(torch.int32).contiguous()
