"""Timing every mechanism against softmax attention as T grows: forward, forward+backward, one decode step, memory.

`linattn bench` and benchmarks/bench_cpu_ops.py are thin layers over this module.

What is measured, per mechanism and sequence length T (inputs [B, T, H, K], [B, T, H, V]):
    fwd        the op's forward pass (impl="auto": chunked for T > 16), median wall time
    fwd+bwd    forward and backward with a fixed random cotangent, median wall time
    decode     one new token given the history: a recurrent step from a [B, H, K, V] state for the
               linear mechanisms; one query against a KV cache of T keys for softmax attention
    peak       extra memory during forward+backward, beyond the inputs: on CUDA the allocator's peak
               (torch.cuda.max_memory_allocated); on CPU the peak of bytes allocated minus bytes freed
               by CPU tensors, read from the profiler's memory events (profile_memory=True)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from linattn import ops
from linattn.layers import KVCache, attend_with_kvcache

MECHANISMS = ["linear_attn", "retention", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "softmax_attn"]
RECURRENT = MECHANISMS[:-1]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _randn(gen: torch.Generator, device, dtype):
    return lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _gates(name: str, B: int, T: int, H: int, K: int, randn) -> list[torch.Tensor]:
    """The mechanism's extra inputs (float32): log-decays near 1 (logsigmoid(x + 3)) and write strengths."""
    return {
        "simple_gla": lambda: [F.logsigmoid(randn(B, T, H) + 3)],
        "gla": lambda: [F.logsigmoid(randn(B, T, H, K) + 3)],
        "delta_rule": lambda: [torch.sigmoid(randn(B, T, H))],
        "gated_delta_rule": lambda: [F.logsigmoid(randn(B, T, H) + 3), torch.sigmoid(randn(B, T, H))],
    }.get(name, lambda: [])()


def make_call(name: str, B: int, T: int, H: int, K: int, V: int, device, dtype: torch.dtype = torch.float32):
    """Return (leaves, fn(impl) -> o): the inputs that need gradients and a closure that runs the op."""
    if name not in MECHANISMS:
        raise ValueError(f"bench: unknown mechanism {name!r}; the mechanisms are {MECHANISMS}")
    randn = _randn(torch.Generator().manual_seed(T), device, dtype)
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    if name in ("delta_rule", "gated_delta_rule"):
        k = F.normalize(k, dim=-1)  # the stable regime of the delta rules
    extra = [
        g.float() for g in _gates(name, B, T, H, K, _randn(torch.Generator().manual_seed(T + 1), device, torch.float32))
    ]
    leaves = [x.requires_grad_() for x in (q, k, v, *extra)]
    op = getattr(ops, name)
    if name == "softmax_attn":
        return leaves, lambda impl: op(*leaves, causal=True, impl=impl)[0]
    return leaves, lambda impl: op(*leaves, impl=impl)[0]


def sdpa_call(B: int, T: int, H: int, K: int, V: int, device, dtype: torch.dtype = torch.float32):
    """torch's causal SDPA in its own [B, H, T, D] layout: (leaves, fn(impl) -> o), impl ignored."""
    randn = _randn(torch.Generator().manual_seed(T), device, dtype)
    leaves = [randn(B, H, T, D).requires_grad_() for D in (K, K, V)]
    return leaves, lambda impl: F.scaled_dot_product_attention(*leaves, is_causal=True)


def decode_call(
    name: str, B: int, T: int, H: int, K: int, V: int, device, dtype: torch.dtype = torch.float32
) -> Callable[[], torch.Tensor]:
    """fn() -> o [B, 1, H, V]: one new token after T tokens of history, the way a decoder runs it."""
    randn = _randn(torch.Generator().manual_seed(T + 2), device, dtype)
    q, k, v = randn(B, 1, H, K), randn(B, 1, H, K), randn(B, 1, H, V)
    if name == "softmax_attn":
        cache = KVCache(randn(B, T + 1, H, K), randn(B, T + 1, H, V), length=T + 1, seen=T + 1)
        return lambda: attend_with_kvcache(q, cache)
    if name in ("delta_rule", "gated_delta_rule"):
        k = F.normalize(k, dim=-1)
    extra = [
        g.float() for g in _gates(name, B, 1, H, K, _randn(torch.Generator().manual_seed(3), device, torch.float32))
    ]
    state = randn(B, H, K, V).float() * 0.1
    op = getattr(ops, name)
    return lambda: op(q, k, v, *extra, initial_state=state, output_final_state=True)[0]


def median_ms(
    fn: Callable[[], torch.Tensor],
    leaves: list[torch.Tensor],
    backward: bool,
    reps: int,
    budget_s: float,
    min_time_s: float = 0.0,
) -> float:
    """Median wall time of fn() (and its backward) in ms, after one warm-up run.

    Runs `reps` times, stopping early once past budget_s; fast calls go on (up to 10 x reps) until
    min_time_s has passed, so that a median on a busy machine rests on enough samples.
    """

    def once():
        for x in leaves:
            x.grad = None
        sync(o.device)
        t0 = time.perf_counter()
        out = fn()
        if backward:
            out.backward(do)
        sync(out.device)
        return 1e3 * (time.perf_counter() - t0)

    o = fn()
    do = torch.randn_like(o) if backward else None
    once()
    times, start = [], time.perf_counter()
    for i in range(10 * reps):
        times.append(once())
        elapsed = time.perf_counter() - start
        if elapsed > budget_s or (i + 1 >= reps and elapsed >= min_time_s):
            break
    return statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler library's start/stop lines, which it writes to file descriptor 2 itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device) -> int | None:
    """Extra memory at the peak of fn() plus its backward, beyond what existed before (None if unreadable)."""
    for x in leaves:
        x.grad = None
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        o = fn()
        o.backward(torch.ones_like(o))
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        o = fn()
        o.backward(torch.ones_like(o))
        del o
    try:  # the raw allocation events, in time order; the public event list leaves out some of them
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


@dataclass
class BenchConfig:
    """What `linattn bench` measures. Defaults depend on the device: see defaults_for()."""

    mechanisms: list[str] = field(default_factory=lambda: list(MECHANISMS))
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    reps: int = 5
    budget_s: float = 2.0
    memory: bool = True

    def __post_init__(self):
        unknown = [m for m in self.mechanisms if m not in MECHANISMS]
        if unknown:
            raise ValueError(f"bench: unknown mechanisms {unknown}; the mechanisms are {MECHANISMS}")
        if not self.lengths or any(T < 1 for T in self.lengths):
            raise ValueError(f"bench: lengths must be positive, got {self.lengths}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"bench: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def defaults_for(device: str) -> dict:
    """CPU: float32 up to T = 4096 (a few minutes on 2 cores). CUDA: bfloat16 up to T = 32768."""
    if torch.device(device).type == "cuda":
        return dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768], dtype="bfloat16", batch=4, heads=8)
    return {}


def run_bench(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """Measure every (mechanism, T); returns one dict per row (times in ms, peak memory in bytes)."""
    dtype = getattr(torch, cfg.dtype)
    rows = []
    jobs = [(T, name) for T in cfg.lengths for name in cfg.mechanisms]
    for T, name in tqdm(jobs, disable=not progress, desc="linattn bench", unit="run", dynamic_ncols=True):
        try:
            rows.append(_measure(name, T, cfg, dtype))
        except Exception as err:  # report it, go on with the other rows; the CLI exits non-zero
            tqdm.write(f"linattn bench: {name} at T={T} failed: {type(err).__name__}: {err}")
            rows.append(
                dict(
                    mechanism=name,
                    T=T,
                    fwd_ms=None,
                    fwd_bwd_ms=None,
                    decode_ms=None,
                    peak_bytes=None,
                    error=f"{type(err).__name__}: {err}",
                )
            )
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure(name: str, T: int, cfg: BenchConfig, dtype: torch.dtype) -> dict:
    B, H, K = cfg.batch, cfg.heads, cfg.head_dim
    leaves, call = make_call(name, B, T, H, K, K, cfg.device, dtype)
    fn = partial(call, "auto")
    row = dict(
        mechanism=name,
        T=T,
        fwd_ms=median_ms(fn, leaves, False, cfg.reps, cfg.budget_s, cfg.budget_s / 4),
        fwd_bwd_ms=median_ms(fn, leaves, True, cfg.reps, cfg.budget_s, cfg.budget_s / 4),
    )
    step = decode_call(name, B, T, H, K, K, cfg.device, dtype)
    row["decode_ms"] = median_ms(step, [], False, cfg.reps, cfg.budget_s, cfg.budget_s / 4)
    row["peak_bytes"] = peak_bytes(fn, leaves, cfg.device) if cfg.memory else None
    return row


def machine_line(cfg: BenchConfig) -> str:
    where = (
        torch.cuda.get_device_name()
        if torch.device(cfg.device).type == "cuda"
        else (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        )
    )
    return f"{where}; torch {torch.__version__}; B={cfg.batch} H={cfg.heads} K=V={cfg.head_dim}, {cfg.dtype}, impl=auto"


def format_table(rows: list[dict]) -> str:
    """A markdown table; 'vs softmax' is softmax attention's fwd+bwd time over the mechanism's, at the same T."""
    softmax = {r["T"]: r["fwd_bwd_ms"] for r in rows if r["mechanism"] == "softmax_attn" and not r.get("error")}
    lines = [
        f"| {'mechanism':16s} | {'T':>6s} | {'fwd ms':>9s} | {'fwd+bwd ms':>10s} | {'decode ms':>9s} | "
        f"{'peak MiB':>9s} | {'vs softmax':>10s} |",
        f"|{'-' * 18}|{'-' * 8}|{'-' * 11}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 12}|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['mechanism']:16s} | {r['T']:6d} | failed: {r['error'][:80]} |")
            continue
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        ratio = f"{softmax[r['T']] / r['fwd_bwd_ms']:.2f}x" if r["T"] in softmax else "-"
        lines.append(
            f"| {r['mechanism']:16s} | {r['T']:6d} | {r['fwd_ms']:9.2f} | {r['fwd_bwd_ms']:10.2f} | "
            f"{r['decode_ms']:9.3f} | {peak:>9s} | {ratio:>10s} |"
        )
    return "\n".join(lines)


def write_json(rows: list[dict], cfg: BenchConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(dict(machine=machine_line(cfg), config=asdict(cfg), rows=rows), f, indent=1)


def plot(rows: list[dict], cfg: BenchConfig, path: str) -> None:
    """Time against T on log-log axes, one line per mechanism: forward, forward+backward, decode, and peak memory."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("fwd_ms", "forward (ms)"),
        ("fwd_bwd_ms", "forward + backward (ms)"),
        ("decode_ms", "one decode step (ms)"),
        ("peak_bytes", "peak memory, fwd+bwd (MiB)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    for ax, (key, title) in zip(axes, panels):
        for name in dict.fromkeys(r["mechanism"] for r in rows):
            pts = [(r["T"], r[key]) for r in rows if r["mechanism"] == name and r[key] is not None]
            if key == "peak_bytes":
                pts = [(T, y / 2**20) for T, y in pts]
            if pts:
                style = dict(color="black", linewidth=2.5) if name == "softmax_attn" else {}
                ax.plot(*zip(*pts), marker="o", label=name, **style)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=title)
        lengths = sorted({r["T"] for r in rows})
        ax.set_xticks(lengths, [str(T) for T in lengths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"linattn bench: {machine_line(cfg)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
