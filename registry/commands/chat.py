"""``llavakit chat [--model SRC] [--image PATH]``: a multi-turn conversation over stdin.

Each input line is a user turn; the answer streams back, and the whole conversation is rendered with the
model's chat template for the next turn. Commands: ``/image PATH`` attaches an image to the next turn
(``--image`` attaches one to the first), ``/reset`` starts over, end of input quits. An error in one turn
(a missing image, a conversation grown past the context) is reported and the turn dropped; the chat goes on.
"""

from __future__ import annotations

import argparse
import sys

from llavakit.core.errors import LlavakitError
from llavakit.registry.commands.generate import (
    add_model_arguments,
    check_image_files,
    generation_options,
    load,
    model_inputs,
    user_turn,
)

HELP = "commands: /image PATH (attach to the next turn), /reset (start over); end of input (Ctrl-D) quits"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="multi-turn chat with the model's chat template (reads stdin)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image for the first turn")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_image_files(args.image)
    model = load(args)
    processor = model.processor
    options = generation_options(args, processor)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    conversation: list[dict] = []
    pending_images = list(args.image)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                check_image_files([path] if path else ["(no path given)"])
            except LlavakitError as err:
                print(f"llavakit chat: {err}", file=sys.stderr)
                continue
            pending_images.append(path)
            continue
        if text.strip() == "/reset":
            conversation, pending_images = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        turn = user_turn(text, pending_images)
        try:
            inputs = model_inputs(processor, [*conversation, turn])
            stream = model.stream(**inputs, tokenizer=processor, **options)
            for piece in stream:
                print(piece, end="", flush=True)
            print(flush=True)
        except LlavakitError as err:
            print(f"llavakit chat: {err} (this turn was dropped; /reset starts over)", file=sys.stderr)
            continue
        conversation += [turn, {"role": "assistant", "content": [{"type": "text", "text": stream.text}]}]
        pending_images = []
