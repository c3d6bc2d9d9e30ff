"""`linattn train`: train a byte-level language model from a config (see linattn.models.training).

linattn train                                   # the default 4-layer hybrid on the built-in corpus
linattn train --data book.txt --layers gated_deltanet,mamba2,softmax --steps 2000 --out runs/mine
linattn train --out runs/mine --resume --steps 4000
torchrun --nproc_per_node=4 -m linattn train --out runs/ddp    # data-parallel on 4 GPUs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from linattn.models.config import LMConfig
from linattn.models.training import TrainConfig, train

# Flags that override a TrainConfig field of the same name; unset flags leave the config alone.
_TRAIN_FLAGS = {
    "data": (str, "a text file to train on (default: the built-in corpus)"),
    "steps": (int, "total optimizer steps (default 500)"),
    "batch_size": (int, "sequences per step and per rank (default 8)"),
    "seq_len": (int, "bytes per sequence (default 256)"),
    "lr": (float, "peak learning rate (default 2e-3)"),
    "min_lr": (float, "final learning rate of the cosine schedule (default 2e-4)"),
    "warmup_steps": (int, "linear warm-up steps (default 50)"),
    "eval_every": (int, "evaluate every this many steps (default 100)"),
    "save_every": (int, "write a checkpoint every this many steps (default 100)"),
    "log_every": (int, "log the loss every this many steps (default 10)"),
    "seed": (int, "seed of the initialisation and the data order (default 0)"),
    "device": (str, "cpu, cuda, cuda:1, ... (default: CUDA when present)"),
    "precision": (str, "float32, bfloat16 or auto (default: bfloat16 on CUDA, float32 on CPU)"),
}
_MODEL_FLAGS = {
    "d_model": (int, "model width (default 128)"),
    "n_heads": (int, "heads per layer (default 4)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a JSON file with TrainConfig fields ('model' holds LMConfig fields)")
    parser.add_argument("--out", dest="out_dir", help="run folder for checkpoints and the log (default runs/default)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--layers", help="comma-separated layer names, e.g. gated_deltanet,mamba2,softmax")
    for name, (kind, help_text) in {**_TRAIN_FLAGS, **_MODEL_FLAGS}.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the saved one when resuming, else --config or the defaults; then the flags given."""
    base: dict = {}
    out_dir = Path(args.out_dir or TrainConfig.out_dir)
    if args.resume:
        saved = out_dir / "train_config.json"
        if not saved.is_file():
            raise SystemExit(f"linattn train: cannot resume: {saved} does not exist")
        base = json.loads(saved.read_text())
    elif args.config:
        base = json.loads(Path(args.config).read_text())
    train_fields = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    model_fields = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    if args.layers:
        model_fields["layers"] = [name.strip() for name in args.layers.split(",") if name.strip()]
    if args.resume and model_fields:
        raise SystemExit(f"linattn train: a resumed run keeps its model; drop {sorted(model_fields)}")
    model = base.pop("model", None)
    model = LMConfig.from_dict({**(model or TrainConfig().model.to_dict()), **model_fields})
    return TrainConfig.from_dict({**base, **train_fields, "model": model, "out_dir": str(out_dir)})


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        raise SystemExit(f"linattn train: {err}") from None
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if result.rank != 0:
        return 0
    last_eval = f", eval loss {result.eval_losses[-1][1]:.4f}" if result.eval_losses else ""
    print(
        f"trained to step {result.step}{last_eval}; {result.tokens_per_second:,.0f} tokens/s; "
        f"checkpoint in {result.out_dir}"
    )
    return 0
