"""A tiny llava-hf checkpoint that both transformers and llavakit can chat with: the tiny random model of
:mod:`tiny` widened to the llava-v1.6-mistral vocabulary (so real prompts tokenize into it), saved with
transformers' ``LlavaNextProcessor`` (the Mistral tokenizer, image processor settings and chat template)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import tiny_hf_model

#: The llava-v1.6-mistral vocabulary: 32000 SentencePiece tokens, ``<image>`` 32000, ``<pad>`` 32001, padded to 32064.
VOCAB_SIZE = 32064
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001


def save_tiny_chat_checkpoint(folder: Path, tokenizer_dir: Path, *, family: str = "mistral", seed: int = 0):
    """Write model, tokenizer, processor settings and the Mistral chat template to ``folder``; return the model."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

    from llavakit.registry import get_registry

    model = tiny_hf_model(family, seed=seed)
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(VOCAB_SIZE, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old_rows:] = torch.randn(weight[old_rows:].shape, generator=generator) * 0.2
    model.config.image_token_id = IMAGE_TOKEN_ID
    model.config.text_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = 2
    template = get_registry().get("chat_template", "mistral").factory.source
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        chat_template=template,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model
