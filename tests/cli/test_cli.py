"""The `linattn` command: bench, train and generate, end to end on tiny configs (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linattn.cli import main
from linattn.models import CausalLM, LMConfig

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "linattn", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    for command in ("bench", "train", "generate"):
        assert command in out.stdout


def test_train_lowers_the_loss(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--layers",
            "gated_deltanet,softmax",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--seq-len",
            "64",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "5",
            "--eval-every",
            "20",
            "--log-every",
            "1",
            "--device",
            "cpu",
            "--out",
            str(run),
            "--no-progress",
        ]
    )
    assert code == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(losses) == 40 and len(evals) == 2
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.0  # about ln 256 = 5.55 for an untrained byte model
    assert last < first - 1.0, f"the loss did not fall: first five {first:.3f}, last five {last:.3f}"
    assert evals[1] < evals[0]
    assert "tokens/s" in capsys.readouterr().out
    for name in ("model.safetensors", "train_state.pt", "train_config.json"):
        assert (run / name).is_file()
    # resuming a finished run with more steps continues from its last step
    assert main(["train", "--out", str(run), "--resume", "--steps", "42", "--no-progress"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-2:] == [41, 42]


def test_generate_reports_speed_and_cache(tmp_path, capsys):
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=256, d_model=32, n_heads=2, layers=["gated_deltanet", "softmax"]))
    model.save(tmp_path / "model.safetensors")
    assert (
        main(
            [
                "generate",
                str(tmp_path),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "20",
                "--temperature",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")
    ids = torch.tensor([list(b"Hello")])
    expected = bytes(model.generate(ids, 20, temperature=0)[0].tolist()).decode("utf-8", errors="replace")
    assert captured.out.rstrip("\n") == expected
    assert "tokens/s when decoding" in captured.err and "cache" in captured.err
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["generate", str(tmp_path / "missing")])


def test_bench_prints_a_table_and_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert (
        main(
            [
                "bench",
                "--lengths",
                "8,40",
                "--mechanisms",
                "gated_delta_rule,softmax",
                "--reps",
                "1",
                "--budget",
                "0.05",
                "--heads",
                "2",
                "--head-dim",
                "16",
                "--device",
                "cpu",
                "--json",
                str(out_json),
                "--plot",
                str(out_png),
                "--no-progress",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| gated_delta_rule |     40 |" in table and "| softmax_attn     |      8 |" in table
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["mechanism"], r["T"]) for r in rows] == [
        ("gated_delta_rule", 8),
        ("softmax_attn", 8),
        ("gated_delta_rule", 40),
        ("softmax_attn", 40),
    ]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["decode_ms"] > 0 and r["peak_bytes"] > 0
    # softmax's backward keeps O(T) and more: its peak grows with T
    assert rows[3]["peak_bytes"] > rows[1]["peak_bytes"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main(["bench", "--mechanisms", "flash"])


def test_bench_cpu_ops_script_still_runs():
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_cpu_ops.py",
            "--lengths",
            "20",
            "--mechanisms",
            "simple_gla",
            "--impls",
            "chunk,naive",
            "--reps",
            "1",
            "--budget",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "| simple_gla        | naive |     20 |" in out.stdout and "| sdpa_causal       | sdpa  |" in out.stdout
