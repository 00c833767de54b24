"""``llavakit inspect SOURCE``: components, parameter counts, weight memory per dtype, image-token count."""

from __future__ import annotations

import argparse

from llavakit.core.errors import ConfigError
from llavakit.core.types import ImageSize


def parse_image_size(text: str) -> ImageSize:
    """``"768x1024"`` (height × width) → ``ImageSize(768, 1024)``."""
    try:
        height, width = (int(part) for part in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise ConfigError(f"--image-size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 768x1024") from None
    if height <= 0 or width <= 0:
        raise ConfigError(f"--image-size {text!r}: both sides must be positive")
    return ImageSize(height, width)


def image_size_arg(text: str) -> ImageSize:
    """argparse type: report a bad size through argparse's usage error."""
    try:
        return parse_image_size(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="describe a model: components, parameters, memory, image tokens")
    parser.add_argument("source", help="llava-hf checkpoint folder or llavakit config file")
    parser.add_argument(
        "--image-size", default="672x672", type=image_size_arg, metavar="HxW",
        help="image height x width in pixels for the token count (default 672x672)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavakit.registry.inspection import describe

    print(describe(args.source, args.image_size))
    return 0
