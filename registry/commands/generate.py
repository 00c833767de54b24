"""``llavakit generate [--model SRC] --image PATH … "question"``: the answer, printed as it streams.

The question and images become one user turn of the model's chat template; the answer streams to stdout
(``--json`` prints one JSON object at the end instead). Sampling is on when ``--temperature`` (above 0),
``--top-p`` or ``--top-k`` is given, greedy otherwise. Without ``--model`` the bundled default model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llavakit.core.errors import ImageFileError, TokenizerError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_CHOICES = ("eager", "sdpa", "flash")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``chat``: which model, how to run it, how to sample."""
    parser.add_argument("--model", help="checkpoint folder, hub id or llavakit config file (default: the bundled model)")
    parser.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: the model's, else 256)")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 means greedy")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: keep the best tokens up to this probability")
    parser.add_argument("--top-k", type=int, help="sample among the k best tokens")
    parser.add_argument("--seed", type=int, help="seed for sampling (reproducible answers)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="sdpa", help="attention backend")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a question about images, streaming the answer")
    parser.add_argument("question", help="the question (the text of the user turn)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file or URL (repeatable)")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: text, prompt_tokens, image_tokens, new_tokens, ttft_s, tokens_per_s")
    parser.set_defaults(func=run)


def check_image_files(images: list[str]) -> None:
    """Fail before loading any model when a local image file is missing."""
    for image in images:
        if "://" in image:
            continue
        path = Path(image).expanduser()
        if not path.is_file():
            raise ImageFileError(f"--image {image}: no such file" + (" (it is a folder)" if path.is_dir() else ""))


def load(args: argparse.Namespace):
    """The model named by ``--model`` (or the default) with its processor, after ``--threads`` is applied."""
    import torch

    from llavakit.registry.default_model import load_default_model, untrained_notice
    from llavakit.registry.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model = load_model(args.model, dtype=args.dtype, attention=args.attention)
    else:
        model = load_default_model(dtype=args.dtype, attention=args.attention)
    notice = untrained_notice(model, args.model or "the bundled default model")
    if notice:
        print(notice, file=sys.stderr)
    if model.processor is None:
        raise TokenizerError(
            f"{args.model}: has no tokenizer, so questions cannot be turned into tokens; use a folder with "
            "tokenizer.json (llava-hf layout) or a config file naming a tokenizer"
        )
    return model


def generation_options(args: argparse.Namespace, processor) -> dict[str, Any]:
    """``generate``/``stream`` keyword arguments from the command-line flags (``None`` = the model's default)."""
    sampling = (args.temperature is not None and args.temperature > 0) or args.top_p is not None or args.top_k is not None
    template = processor.chat_template
    stop_strings = list(template.stop_strings) if template is not None and template.stop_strings else None
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=True if sampling else (False if args.temperature == 0 else None),
        temperature=args.temperature if sampling and args.temperature else None,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_strings=stop_strings,
    )


def user_turn(text: str, images: list[str]) -> dict[str, Any]:
    """One user message in transformers' format: image parts first, then the text."""
    parts: list[dict[str, Any]] = [{"type": "image", "url" if "://" in image else "path": image} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def model_inputs(processor, conversation: list[dict[str, Any]]):
    """The conversation rendered with the model's chat template, tokenized, its images processed."""
    if processor.chat_template is not None:
        return processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    # No template: each turn's image placeholders, then its text, one turn per line.
    from llavakit.core.processor import images_in_conversation

    images = images_in_conversation(conversation)
    text = "\n".join(
        "".join(processor.image_token + "\n" for part in m["content"] if part["type"] == "image")
        + "".join(part.get("text", "") for part in m["content"] if part["type"] == "text")
        for m in conversation
    )
    return processor(images or None, text)


def run(args: argparse.Namespace) -> int:
    check_image_files(args.image)
    model = load(args)
    processor = model.processor
    inputs = model_inputs(processor, [user_turn(args.question, args.image)])
    stream = model.stream(**inputs, tokenizer=processor, **generation_options(args, processor))
    for piece in stream:
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        stats = stream.stats
        print(json.dumps({
            "text": stream.text,
            "prompt_tokens": stats.prompt_tokens,
            "image_tokens": stats.image_tokens,
            "new_tokens": stats.new_tokens,
            "ttft_s": stats.ttft_s,
            "tokens_per_s": stats.tokens_per_s,
        }))
    else:
        print()
    return 0
