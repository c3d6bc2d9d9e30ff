"""Training a byte-level language model: AdamW, warm-up then cosine learning rate, periodic eval, checkpoints.

Run in one process, or under torchrun for data-parallel training (DDP: NCCL on CUDA, gloo on CPU).
A run's folder holds:

    model.safetensors   the weights, with the model config in the metadata (CausalLM.load reads it)
    train_state.pt      optimizer state and step, for resuming (torch.save of tensors and numbers only)
    train_config.json   the TrainConfig of the run
    log.jsonl           one JSON line per logged step and per evaluation
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_model
from tqdm import tqdm

from linattn.data import ByteBatches, eval_windows, load_bytes, split
from linattn.models.config import LMConfig
from linattn.models.lm import CausalLM


def _default_model() -> LMConfig:
    return LMConfig(
        vocab_size=256, d_model=128, n_heads=4, layers=["gated_deltanet", "gated_deltanet", "gated_deltanet", "softmax"]
    )


@dataclass
class TrainConfig:
    """Everything a training run needs. The defaults train a 4-layer hybrid on the built-in corpus.

    Args:
        model: the model's LMConfig (vocab_size must be 256: the data are bytes).
        data: a text file, or None for the built-in corpus.
        out_dir: where checkpoints and the log go.
        steps: optimizer steps in total (a resumed run continues up to here).
        batch_size: sequences per step and per rank; seq_len: tokens per sequence.
        lr, min_lr, warmup_steps: linear warm-up to lr, then cosine decay to min_lr at the last step.
        weight_decay: AdamW's, on matrices and embeddings only. grad_clip: max global gradient norm.
        eval_every, eval_windows: evaluate on this many fixed validation windows every eval_every steps.
        save_every: write a checkpoint every save_every steps (and at the end).
        log_every: log the training loss every log_every steps.
        val_fraction: the end of the data held out for validation.
        seed: model initialisation and data order.
        device: "cpu", "cuda", ... or None for CUDA when present (under torchrun: this rank's GPU).
        precision: "float32", "bfloat16" (autocast), or "auto" (bfloat16 on CUDA, float32 on CPU).
    """

    model: LMConfig = field(default_factory=_default_model)
    data: str | None = None
    out_dir: str = "runs/default"
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 64
    save_every: int = 100
    log_every: int = 10
    val_fraction: float = 0.05
    seed: int = 0
    device: str | None = None
    precision: str = "auto"

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = LMConfig.from_dict(self.model)
        if self.model.vocab_size != 256:
            raise ValueError(
                f"TrainConfig: the data are bytes, so model.vocab_size must be 256, got {self.model.vocab_size}"
            )
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "save_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"TrainConfig: need warmup_steps >= 0 and 0 <= min_lr <= lr, got warmup_steps="
                f"{self.warmup_steps}, min_lr={self.min_lr}, lr={self.lr}"
            )
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig: precision must be 'auto', 'float32' or 'bfloat16', got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}; the fields are {sorted(known)}")
        return cls(**d)

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, then cosine down to min_lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class TrainResult:
    """What train() returns: the last step, the logged losses and the training speed."""

    step: int
    losses: list = field(default_factory=list)  # (step, training loss averaged over ranks)
    eval_losses: list = field(default_factory=list)  # (step, validation loss)
    tokens_per_second: float = float("nan")  # over all ranks, training steps only
    out_dir: str = ""
    rank: int = 0  # this process's rank (0 without torchrun)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")


def _setup(device: str | None) -> _Dist:
    """One process, or one rank of a torchrun job (which sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev)


def _all_mean(x: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x)
        x = x / d.world
    return x


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings; none on norms, biases and per-head scalars."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, cfg: TrainConfig, d: _Dist) -> float:
    """Mean next-byte cross-entropy over the validation windows of all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # sum of losses, number of tokens
    for chunk in windows.split(batch_size):
        chunk = chunk.to(d.device)
        with _autocast(cfg, d.device):
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total[0] += loss.double()
        total[1] += chunk[:, 1:].numel()  # a Python number: no host-to-device copy (a wait for the GPU) per window
    if d.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def save_checkpoint(out_dir: Path, model: CausalLM, optimizer, step: int, cfg: TrainConfig) -> None:
    """Write the weights, the optimizer state and the config; each file replaces the old one only when complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "model.safetensors.tmp")
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, out_dir / "train_state.pt.tmp")
    (out_dir / "train_config.json.tmp").write_text(json.dumps(cfg.to_dict(), indent=1))
    for name in ("model.safetensors", "train_state.pt", "train_config.json"):
        os.replace(out_dir / f"{name}.tmp", out_dir / name)


def load_checkpoint(out_dir: Path, model: CausalLM, optimizer, device: torch.device) -> int:
    """Load weights and optimizer state from a run folder; returns the step to continue from."""
    for name in ("model.safetensors", "train_state.pt"):
        if not (out_dir / name).is_file():
            raise ValueError(f"train: cannot resume: {out_dir / name} does not exist")
    load_model(model, str(out_dir / "model.safetensors"), device=str(device))
    state = torch.load(out_dir / "train_state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train cfg.model on cfg.data up to cfg.steps steps; with resume, continue the run in cfg.out_dir.

    Shows a progress bar with the loss and tokens/s (rank 0), evaluates every eval_every steps, and
    writes a checkpoint every save_every steps and at the end.
    """
    d = _setup(cfg.device)
    try:
        result = _train(cfg, resume, progress, d)
        if d.world > 1:  # every rank done before any tears down: a rank that left early once took another's gloo
            # threads down with it (SIGABRT at exit, CI under load, session 20). The DDP wrapper _train made (held in
            # reference cycles) is freed here, while the process group lives, not at interpreter exit: a rank still
            # aborted once at exit ("terminate called without an active exception": one of session 25's four
            # clean-clone CI runs; none in 24 runs under load after, so the cause is not established).
            gc.collect()
            dist.barrier()
        return result
    finally:
        if d.world > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, progress: bool, d: _Dist) -> TrainResult:
    out_dir = Path(cfg.out_dir)
    train_data, val_data = split(load_bytes(cfg.data), cfg.val_fraction)
    batches = ByteBatches(train_data, cfg.seq_len, cfg.batch_size, d.rank, d.world, cfg.seed)
    val = eval_windows(val_data, cfg.seq_len, cfg.eval_windows, d.rank, d.world)
    torch.manual_seed(cfg.seed)
    model = CausalLM(cfg.model).to(d.device)
    optimizer = _optimizer(model, cfg)
    step = load_checkpoint(out_dir, model, optimizer, d.device) if resume else 0
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    main = d.rank == 0
    result = TrainResult(step=step, out_dir=str(out_dir), rank=d.rank)
    log = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "log.jsonl", "a")
        n_params = sum(p.numel() for p in model.parameters())
        tqdm.write(
            f"linattn train: {n_params / 1e6:.2f}M parameters, layers {cfg.model.layers}, {d.world} x "
            f"{cfg.batch_size} x {cfg.seq_len} tokens per step on {d.device}, {batches.steps_per_epoch} "
            f"steps per epoch" + (f", resuming at step {step}" if step else "")
        )
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and main), unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len * d.world
    train_seconds, train_steps = 0.0, 0
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        x, y = (t.to(d.device) for t in batches.batch(step))
        with _autocast(cfg, d.device):
            logits = net(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_value = _all_mean(loss.detach().float(), d).item()  # also waits for the device
        step += 1
        train_seconds += time.perf_counter() - t0
        train_steps += 1
        result.tokens_per_second = tokens_per_step * train_steps / train_seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{result.tokens_per_second:,.0f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            result.losses.append((step, loss_value))
            if log:
                log.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": loss_value,
                            "lr": cfg.lr_at(step - 1),
                            "tokens_per_s": result.tokens_per_second,
                        }
                    )
                    + "\n"
                )
                log.flush()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_loss = evaluate(model, val, cfg.batch_size, cfg, d)
            result.eval_losses.append((step, eval_loss))
            if log:
                bar.write(
                    f"step {step}: train loss {loss_value:.4f}, eval loss {eval_loss:.4f} "
                    f"({eval_loss / math.log(2):.3f} bits per byte)"
                )
                log.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                log.flush()
        if main and (step % cfg.save_every == 0 or step == cfg.steps):
            save_checkpoint(out_dir, model, optimizer, step, cfg)
    bar.close()
    if log:
        log.close()
    result.step = step
    return result
