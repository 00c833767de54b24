"""Tiny tokenizers and processor folders for the processor tests, in the real on-disk layouts.

The tiny tokenizer is a Llama-style byte-fallback BPE (``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens, a few
dozen merges learned from a fixed corpus) whose ``<image>`` and ``<pad>`` ids match ``tests/tiny.py``'s tiny
model (320 and 321), so a tiny model folder plus these files is a complete llava-hf checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny import IMAGE_TOKEN_INDEX, PAD_TOKEN_ID

CORPUS = [
    "What is shown in this image? Describe the picture in detail.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "Answer the questions. USER: ASSISTANT: [INST] [/INST] system user assistant",
    "The cat sat on the mat; the dog lay in the sun. Compare the two images.",
]

#: llava-hf's chat template for llava-v1.6-mistral (images first in each user turn).
LLAVA_HF_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'][0]['text'] "
    "+ '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

IMAGE_SETTINGS = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}

PROCESSOR_SETTINGS = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaNextProcessor",
    "vision_feature_select_strategy": "default",
}


def tiny_backend():
    """A ``tokenizers.Tokenizer`` with exactly ``IMAGE_TOKEN_INDEX`` tokens before ``<image>`` and ``<pad>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=IMAGE_TOKEN_INDEX - len(byte_tokens), special_tokens=specials,
                                  show_progress=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learner.train_from_iterator(CORPUS, trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    vocab = {token: index for index, token in enumerate(specials + byte_tokens)}
    for token, _ in learned:
        if token not in vocab:
            vocab[token] = len(vocab)
    for filler in range(IMAGE_TOKEN_INDEX - len(vocab)):  # pad the vocabulary to the model's image id
        vocab[f"▁filler{filler}"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(learner.to_str())["model"]["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                                AddedToken("<pad>", special=True, normalized=False)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    assert backend.token_to_id("<image>") == IMAGE_TOKEN_INDEX and backend.token_to_id("<pad>") == PAD_TOKEN_ID
    return backend


def tokenizer_config(**overrides) -> dict:
    """A llava-hf style tokenizer_config.json (Llama tokenizer class, BOS added, left padding)."""
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "padding_side": "left",
        "processor_class": "LlavaNextProcessor",
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": 4096,
    }
    config.update(overrides)
    return config


def write_processor_folder(folder: Path, *, layout: str, backend=None, chat_template: str | None = LLAVA_HF_MISTRAL_TEMPLATE,
                           image_settings: dict | None = None, tokenizer_overrides: dict | None = None) -> Path:
    """Write a processor folder by hand in one of the two llava-hf layouts.

    ``layout="hub"``: ``preprocessor_config.json`` + ``processor_config.json`` + ``chat_template.json`` (the
    published repos); ``layout="v5"``: ``processor_config.json`` with a nested ``image_processor`` and
    ``chat_template.jinja`` (transformers >= 5 ``save_pretrained``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (backend or tiny_backend()).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(**(tokenizer_overrides or {})), indent=2))
    settings = dict(IMAGE_SETTINGS, **(image_settings or {}))
    if layout == "hub":
        (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
        (folder / "processor_config.json").write_text(json.dumps(PROCESSOR_SETTINGS, indent=2))
        if chat_template is not None:
            (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}))
    elif layout == "v5":
        (folder / "processor_config.json").write_text(json.dumps({"image_processor": settings, **PROCESSOR_SETTINGS}, indent=2))
        if chat_template is not None:
            (folder / "chat_template.jinja").write_text(chat_template)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return folder


def transformers_processor(folder: Path):
    """transformers' ``LlavaNextProcessor`` with the PIL image processor (the parity oracle) for ``folder``."""
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    settings_file = folder / "preprocessor_config.json"
    if settings_file.exists():
        settings = json.loads(settings_file.read_text())
    else:
        settings = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    settings = {k: v for k, v in settings.items() if k != "image_processor_type"}
    chat = None
    if (folder / "chat_template.jinja").exists():
        chat = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").exists():
        chat = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(**settings),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        patch_size=PROCESSOR_SETTINGS["patch_size"],
        vision_feature_select_strategy=PROCESSOR_SETTINGS["vision_feature_select_strategy"],
        num_additional_image_tokens=PROCESSOR_SETTINGS["num_additional_image_tokens"],
        chat_template=chat,
    )
