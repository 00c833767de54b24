"""``llavakit train CONFIG [--resume DIR]``: run the stages of a training config (see docs/training.md)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from a training config (stages, freezing, learning rates, checkpoints)"
    )
    parser.add_argument("config", help="training config file (YAML, TOML or JSON)")
    parser.add_argument(
        "--resume", metavar="DIR", default=None,
        help="continue from a checkpoint folder of this run (OUTPUT/checkpoints/step-NNNNNN)",
    )
    parser.add_argument("--output", metavar="DIR", default=None, help="run folder (default: the config's output)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the log file is still written)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavakit.registry.training import train

    final = train(args.config, resume=args.resume, output=args.output, progress=not args.no_progress)
    print(f"trained model saved to {final}")
    return 0
