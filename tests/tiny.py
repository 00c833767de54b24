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


# ------------------------------------------------------------------------------------------ other layouts
def hub_layout_state(model) -> dict[str, torch.Tensor]:
    """A transformers LLaVA-NeXT model's tensors under the llava-hf *hub* names (older transformers):
    ``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``, ``image_newline``."""
    renames = (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    )
    state = {}
    for key, tensor in model.state_dict().items():
        source, target = next((s, t) for s, t in renames if key.startswith(s))
        state[target + key[len(source) :]] = tensor.contiguous()
    return state


def write_safetensors_shards(folder: Path, state: dict[str, torch.Tensor], num_shards: int = 1, basename: str = "model"):
    """Write ``state`` with the safetensors library, as one file or ``num_shards`` shards plus an index."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if num_shards == 1:
        save_file(state, str(folder / f"{basename}.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for index in range(num_shards):
        name = f"{basename}-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[index::num_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{basename}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_hub_layout(path: Path, family: str = "mistral", *, seed: int = 0, num_shards: int = 1):
    """A tiny model in the llava-hf hub layout (as the published repos hold it); returns the model."""
    model = tiny_hf_model(family, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    write_safetensors_shards(path, hub_layout_state(model), num_shards)
    return model


def save_clip_vision(path: Path, model, *, full_clip: bool = False, prefixed: bool = False) -> None:
    """The tiny model's vision tower as an HF ``CLIPVisionModel`` folder (``full_clip``: a ``CLIPModel`` with a
    text tower; ``prefixed``: the older ``vision_model.*`` key names, written by hand)."""
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    tower_state = {k.removeprefix("model.vision_tower."): v for k, v in model.state_dict().items() if k.startswith("model.vision_tower.")}
    if full_clip:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        clip = CLIPModel(CLIPConfig(vision_config=dict(TINY_VISION), text_config=text, projection_dim=32))
        clip.vision_model.load_state_dict(tower_state)
        clip.save_pretrained(path)
        return
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    tower.load_state_dict(tower_state)
    if not prefixed:
        tower.save_pretrained(path)
        return
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(tower.config.to_dict()))
    write_safetensors_shards(path, {f"vision_model.{k}": v.contiguous() for k, v in tower_state.items()})


def save_causal_lm(path: Path, model, family: str = "mistral", *, vocab_size: int | None = None):
    """The tiny model's LLM as an HF causal LM folder; ``vocab_size`` keeps only the first rows (a stock LLM
    without the ``<image>``/``<pad>`` rows). Returns the transformers causal LM."""
    from transformers import AutoModelForCausalLM

    text_config = model.config.text_config
    state = {k.removeprefix("model.language_model."): v for k, v in model.state_dict().items() if k.startswith("model.language_model.")}
    state = {f"model.{k}": v for k, v in state.items()}
    state["lm_head.weight"] = model.lm_head.weight
    if vocab_size is not None:
        text_config = type(text_config)(**{**text_config.to_dict(), "vocab_size": vocab_size, "pad_token_id": None})
        state = {k: (v[:vocab_size] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in state.items()}
    lm = AutoModelForCausalLM.from_config(text_config).eval()
    lm.load_state_dict(state)
    lm.save_pretrained(path)
    return lm


def original_llava_state(model, *, include_tower: bool = True) -> dict[str, torch.Tensor]:
    """A transformers LLaVA-NeXT model's tensors under the original LLaVA names, with the rotary
    ``inv_freq`` buffers the original checkpoints carry."""
    renames = (
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.image_newline", "model.image_newline"),
    )
    state = {}
    for key, tensor in model.state_dict().items():
        source, target = next((s, t) for s, t in renames if key.startswith(s))
        if not include_tower and source == "model.vision_tower.":
            continue
        state[target + key[len(source) :]] = tensor.contiguous()
    head_dim = model.config.text_config.head_dim
    for layer in range(model.config.text_config.num_hidden_layers):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)
    return state


def original_llava_config(model, family: str, *, vision_tower: str) -> dict:
    """An original LLaVA-NeXT config.json: the LLM's config plus the ``mm_*`` fields."""
    text = model.config.text_config.to_dict()
    text.pop("rope_parameters", None)
    return {
        **text,
        "model_type": "llava_mistral" if FAMILIES[family]["model_type"] == "mistral" else "llava_llama",
        "architectures": ["LlavaMistralForCausalLM"],
        "rope_theta": FAMILIES[family]["rope_theta"],
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": TINY_VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "torch_dtype": "float32",
    }


def save_original_llava(path: Path, family: str = "mistral", *, seed: int = 0, include_tower: bool = True,
                        num_shards: int = 1):
    """A tiny model in the original LLaVA layout whose ``mm_vision_tower`` is a local CLIP folder (holding the
    tower's config, and its weights too). Returns the transformers model with the same weights."""
    import json

    model = tiny_hf_model(family, seed=seed)
    tower = path.parent / f"{path.name}-clip-tower"
    save_clip_vision(tower, model)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(original_llava_config(model, family, vision_tower=str(tower))))
    write_safetensors_shards(path, original_llava_state(model, include_tower=include_tower), num_shards)
    return model
