"""``llavakit eval-demo [--n N] [--seed S] [--model SOURCE]``: exact-answer accuracy on fresh synthetic scenes."""

from __future__ import annotations

import argparse

#: Far from the training stream's seed (0), so the scenes are held out.
DEFAULT_SEED = 1234


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-demo", help="score a model (default: the bundled demo model) on freshly generated shape scenes"
    )
    parser.add_argument("--n", type=int, default=500, help="number of scenes (default 500)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"scene seed (default {DEFAULT_SEED})")
    parser.add_argument("--model", default=None, help="model folder (default: llavakit's default model)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions answered together (default 16)")
    parser.add_argument("--show-mistakes", type=int, default=0, metavar="K", help="print up to K wrong answers per form")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from llavakit.core.errors import ConfigError
    from llavakit.registry.evaluation import evaluate_demo

    if args.n <= 0:
        raise ConfigError(f"--n must be a positive number of scenes, got {args.n}")
    model = _load(args.model)
    with tqdm(desc="questions", unit="q", leave=False) as bar:
        scores = evaluate_demo(model, args.n, args.seed, batch_size=args.batch_size, progress=bar.update)
    print(scores.table())
    for form, score in scores.forms.items():
        for question, expected, answer in score.mistakes[: args.show_mistakes]:
            print(f"  {form}: {question!r} expected {expected!r}, got {answer!r}")
    return 0


def _load(source: str | None):
    from llavakit.registry.default_model import load_default_model
    from llavakit.registry.loading import load_model

    return load_model(source) if source is not None else load_default_model()
