"""``llavakit convert SOURCE DESTINATION``: re-save a checkpoint in the llava-hf or llavakit layout."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (llava-hf, original LLaVA, llavakit layout, hub id) to the llava-hf or llavakit layout",
        description="Load SOURCE (a folder or hub id of any layout llavakit reads) and save it to DESTINATION. "
        "An original LLaVA checkpoint gets <image> and <pad> vocabulary rows on its way to the llava-hf layout.",
    )
    parser.add_argument("source", help="checkpoint folder, hub id (owner/name[@revision]) or llavakit config file")
    parser.add_argument("destination", help="folder to write (created if absent)")
    parser.add_argument("--layout", choices=("auto", "llava-hf", "llavakit"), default="auto",
                        help="auto: llava-hf whenever transformers can express the model, else llavakit")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="cast the weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--revision", help="branch, tag or commit of a hub SOURCE")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickle .bin checkpoints (weights only)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavakit.registry.saving import convert

    _, notes = convert(
        args.source, args.destination, layout=args.layout, dtype=args.dtype, max_shard_size=args.max_shard_size,
        revision=args.revision, allow_pickle=args.allow_pickle,
    )
    print("\n".join(notes))
    return 0
