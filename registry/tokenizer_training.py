"""Train a small byte-level BPE tokenizer for a model trained from scratch, and write it as a llava-hf folder.

Byte-level BPE (GPT-2's pre-tokenisation) can encode any text, so a user typing something the training data
never held still gets tokens, while the task's own words become single tokens after a few hundred merges.
Its pre-tokeniser splits before spaces and punctuation, so a prompt tokenised alone gives the same ids as
the start of the conversation it begins: the answer-only labels of training line up with inference.

Special tokens get the first ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<image>`` 3.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llavakit.core.chat import ChatTemplate
from llavakit.core.errors import ConfigError

SPECIAL_TOKENS: dict[str, str] = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "image_token": "<image>"}


def special_token_ids() -> dict[str, int]:
    """``{"pad_token": 0, …}``: the ids :func:`train_bpe_tokenizer` gives its special tokens."""
    return {name: index for index, name in enumerate(SPECIAL_TOKENS)}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``tokenizers.Tokenizer``: byte-level BPE trained on ``texts``, BOS added to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS.values())
    minimum = 256 + len(specials)
    if vocab_size <= minimum:
        raise ConfigError(
            f"tokenizer vocab_size {vocab_size} leaves no room for merges: the 256 bytes and {len(specials)} special "
            f"tokens take {minimum}; use at least {minimum + 64}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = byte_level_decoder()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Special-token strings are markup, not text: keep them out of the merge statistics.
    cleaned = (_strip_specials(text, specials) for text in texts)
    tokenizer.train_from_iterator(cleaned, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return tokenizer


def byte_level_decoder():
    """Byte-level decoding that drops the one space an answer starts with (``" Red."`` reads ``"Red."``), as
    Llama tokenizers drop their leading ``▁``."""
    from tokenizers import decoders

    return decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])


def _strip_specials(text: str, specials: list[str]) -> str:
    for token in specials:
        text = text.replace(token, " ")
    return text


def write_tokenizer_folder(tokenizer, folder: str | Path, chat_template: ChatTemplate | None = None) -> Path:
    """``tokenizer.json``, ``tokenizer_config.json`` and (with a template) ``chat_template.jinja`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS["bos_token"],
        "eos_token": SPECIAL_TOKENS["eos_token"],
        "pad_token": SPECIAL_TOKENS["pad_token"],
        "image_token": SPECIAL_TOKENS["image_token"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template.source, encoding="utf-8")
    return folder
