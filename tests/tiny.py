"""Tiny random transformers LLaVA-NeXT checkpoints, written in the real on-disk formats (test oracle).

Every test that compares against transformers builds its reference here, so the families and sizes
under test are defined once.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Text-model families under test: a Mistral config, a Llama MHA config and a Llama GQA config with a
#: large rope theta (the shape of the 34B's decoder).
FAMILIES: dict[str, dict] = {
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, sliding_window=None, max_position_embeddings=8192,
    ),
    "llama-mha": dict(
        model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, rope_theta=1e4, max_position_embeddings=8192,
    ),
    "llama-gqa": dict(
        model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, rope_theta=5e6, max_position_embeddings=8192,
    ),
}

VOCAB_SIZE = 384
IMAGE_TOKEN_INDEX = 320
PAD_TOKEN_ID = 321

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336,
    patch_size=14, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def tiny_hf_config(family: str = "mistral", **overrides):
    """A transformers ``LlavaNextConfig`` for a tiny model of ``family``."""
    from transformers import LlavaNextConfig

    text = dict(FAMILIES[family], vocab_size=VOCAB_SIZE, rms_norm_eps=1e-5, tie_word_embeddings=False,
                pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)
    config = LlavaNextConfig(
        vision_config=dict(TINY_VISION, model_type="clip_vision_model"),
        text_config=text,
        image_token_index=IMAGE_TOKEN_INDEX,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        **overrides,
    )
    return config


def tiny_hf_model(family: str = "mistral", seed: int = 0, **overrides):
    """A tiny random transformers ``LlavaNextForConditionalGeneration`` in fp32 eval mode.

    Weights are re-drawn with a larger std than transformers' init so logits differ visibly between
    positions (the default 0.02 makes a 2-layer model's logits nearly constant and parity trivially easy).
    """
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_hf_config(family, **overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "image_newline" in name or "class_embedding" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.1)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def save_tiny_llava_hf(path: Path, family: str = "mistral", *, seed: int = 0, max_shard_size: str | None = None):
    """Save a tiny model with transformers' ``save_pretrained`` (transformers-5 layout); return the model."""
    model = tiny_hf_model(family, seed=seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model
