"""The `linattn` command: a thin layer over library functions.

Each subcommand lives in its own module (``linattn/cli/<name>.py``) exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "bench": "time every mechanism against softmax attention as T grows",
    "train": "train a small language model from a config",
    "generate": "generate text from a checkpoint and a prompt",
    "audit": "measure an approximation's error against exact softmax attention",
}


def _module(name: str):
    return importlib.import_module(f"linattn.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linattn", description="Linear-time attention: benchmarks, training, audit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        try:
            module = _module(name)
        except ModuleNotFoundError as err:
            if err.name != f"linattn.cli.{name}":
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
