"""Tiny shapes-demo models, tokenizers and training configs for the training and dataset tests.

The model is the shapes demo's architecture shrunk to a few thousand parameters (28-px tiles of 2×2 patches,
one vision block, one decoder layer), so a training step takes milliseconds; the tokenizer is the demo's
byte-level BPE trained on a couple of hundred synthetic conversations.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

CHAT_TEMPLATE = Path(str(resources.files("llavakit.registry").joinpath("configs/shapes-chat-template.jinja")))

TINY_MODEL = {
    "vision": {"name": "clip-vit", "options": {"image_size": 28, "patch_size": 14, "hidden_size": 32,
                                               "intermediate_size": 64, "num_layers": 1, "num_heads": 2}},
    "llm": {"name": "llama", "options": {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
                                         "num_layers": 1, "num_heads": 2, "max_position_embeddings": 512}},
    "projector": "mlp2x-gelu",
    "tiler": "anyres",
    "image_token_index": 3,
    "vision_feature_layer": -1,
}


def tiny_training_config(folder: Path, *, stages: list[dict], data: dict | None = None, **fields) -> Path:
    """Write a training config for the tiny model into ``folder``; returns its path."""
    config = {
        "model": TINY_MODEL,
        "tokenizer": {"vocab_size": 384, "training_conversations": 200},
        "chat_template": str(CHAT_TEMPLATE),
        "data": data or {"source": "synthetic-shapes", "seed": 0},
        "output": str(folder / "run"),
        "seed": 0,
        "threads": 1,
        "log_every": 1,
        "stages": stages,
        **fields,
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def tiny_model_with_processor(folder: Path):
    """The tiny model (seeded random weights) with a processor on a freshly trained shapes tokenizer."""
    from llavakit.core.config import ModelConfig
    from llavakit.registry.assembly import build_from_config
    from llavakit.registry.datasets import SyntheticShapesSource
    from llavakit.registry.processing import processor_for_model
    from llavakit.registry.training import TokenizerConfig, TrainingConfig, load_chat_template, prepare_tokenizer

    template = load_chat_template(str(CHAT_TEMPLATE))
    config = TrainingConfig.model_validate(
        {"model": TINY_MODEL, "tokenizer": {"vocab_size": 384, "training_conversations": 200},
         "data": {"source": "synthetic-shapes"}, "output": str(folder), "stages": [{"name": "s", "steps": 1, "lr": 1e-3}]}
    )
    assert isinstance(config.tokenizer, TokenizerConfig)
    tokenizer_folder = prepare_tokenizer(config, template, SyntheticShapesSource(0), folder)
    model = build_from_config(ModelConfig.model_validate(TINY_MODEL), seed=0)
    model.processor = processor_for_model(model, tokenizer_folder, chat_template=template)
    return model
