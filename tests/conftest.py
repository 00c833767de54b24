"""Shared test fixtures. Everything is built from installed packages (never from ../shared)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest


def build_mistral_tokenizer(target: Path) -> Path:
    """The llava-v1.6-mistral tokenizer: Mistral's SentencePiece vocabulary from ``mistral_common``, converted
    by transformers, with ``<image>`` = 32000 and ``<pad>`` = 32001 (the published checkpoint's ids)."""
    from transformers import AutoTokenizer

    source = target / "source"
    source.mkdir(parents=True)
    model_file = resources.files("mistral_common").joinpath("data/tokenizer.model.v1")
    shutil.copyfile(str(model_file), source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", '
        '"add_bos_token": true, "add_eos_token": false}'
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    out = target / "tokenizer"
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with ``tokenizer.json`` + ``tokenizer_config.json`` of the llava-v1.6-mistral tokenizer."""
    return build_mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer"))
