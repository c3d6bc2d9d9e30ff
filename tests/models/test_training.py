"""Training: data sharding, the schedule, exact resume, and DDP (torchrun, gloo) against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linattn.data import ByteBatches, load_bytes
from linattn.models import LMConfig
from linattn.models.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


def tiny_run(out_dir, **kw) -> TrainConfig:
    model = LMConfig(vocab_size=256, d_model=16, n_heads=2, layers=["gated_deltanet", "softmax"])
    options = dict(
        model=model,
        out_dir=str(out_dir),
        steps=6,
        batch_size=4,
        seq_len=32,
        eval_every=3,
        eval_windows=8,
        save_every=3,
        log_every=1,
        warmup_steps=2,
        device="cpu",
    )
    return TrainConfig(**{**options, **kw})


def test_ranks_split_the_global_batch_of_one_process():
    data = load_bytes()[:20_000]
    one = ByteBatches(data, seq_len=32, batch_size=6, seed=5)
    ranks = [ByteBatches(data, seq_len=32, batch_size=3, rank=r, world=2, seed=5) for r in range(2)]
    for step in (0, 1, 7, one.steps_per_epoch, 3 * one.steps_per_epoch + 2):
        assert torch.equal(torch.cat([r.windows(step) for r in ranks]), one.windows(step))
    epoch = torch.cat([one.windows(s) for s in range(one.steps_per_epoch)])
    assert len(epoch.unique()) == len(epoch) == one.usable  # each window once per epoch
    x, y = one.batch(0)
    assert x.shape == y.shape == (6, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert cfg.lr_at(0) == pytest.approx(1e-4) and cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3) and cfg.lr_at(100) == pytest.approx(1e-4)
    lrs = [cfg.lr_at(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)  # one thread: bitwise-reproducible CPU kernels
    try:
        whole = train(tiny_run(tmp_path / "whole"), progress=False)
        train(tiny_run(tmp_path / "split", steps=3), progress=False)
        resumed = train(tiny_run(tmp_path / "split"), resume=True, progress=False)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert resumed.step == whole.step == 6
    assert resumed.losses == whole.losses[3:]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_train_config():
    with pytest.raises(ValueError, match="vocab_size must be 256"):
        TrainConfig(model=LMConfig(vocab_size=100))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="fewer than one step's batch_size"):
        train(tiny_run("unused", batch_size=100_000), progress=False)
    with pytest.raises(ValueError, match="cannot resume"):
        train(tiny_run("/nonexistent/run"), resume=True, progress=False)


def run_command(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run cmd in its own process group; on a time-out, end the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:6]} timed out:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_on_two_cpu_ranks_matches_one_process(tmp_path):
    """torchrun, 2 ranks x batch 2 (gloo) = 1 process x batch 4: same losses, same weights."""
    args = [
        "--layers",
        "gated_deltanet,softmax",
        "--d-model",
        "16",
        "--n-heads",
        "2",
        "--steps",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "4",
        "--save-every",
        "4",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "linattn"]
    code, ddp = run_command([*torchrun, "train", *args, "--batch-size", "2", "--out", str(tmp_path / "ddp")], env)
    assert code == 0, ddp[-3000:]
    code, one = run_command(
        [sys.executable, "-m", "linattn", "train", *args, "--batch-size", "4", "--out", str(tmp_path / "one")], env
    )
    assert code == 0, one[-3000:]
    assert "2 x 2 x 32 tokens per step" in ddp and "1 x 4 x 32 tokens per step" in one
    logs = [
        [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("ddp", "one")
    ]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    for a, b in zip(*logs):  # the logged loss is the mean over ranks: the one-process loss
        assert a.get("loss", a.get("eval_loss")) == pytest.approx(b.get("loss", b.get("eval_loss")), rel=1e-5)
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for k in a:  # 4 AdamW steps of ~2e-3 each: summation order differs by a few float32 roundings
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_evaluate_is_the_mean_next_byte_cross_entropy():
    """evaluate's token-weighted mean over windows in batches that do not divide them, against one direct sum."""
    import torch.nn.functional as F

    from linattn.models import CausalLM
    from linattn.models.training import _Dist, evaluate

    torch.manual_seed(0)
    cfg = tiny_run("unused")
    model = CausalLM(cfg.model)
    windows = torch.randint(0, 256, (7, 33))
    got = evaluate(model, windows, 3, cfg, _Dist())
    with torch.no_grad():
        logits = model(windows[:, :-1])
    want = F.cross_entropy(logits.double().flatten(0, 1), windows[:, 1:].flatten()).item()
    assert got == pytest.approx(want, rel=1e-6) and model.training
