"""Translate transformers ``config.json`` files (llava_next, CLIP vision, Llama/Mistral) into llavakit configs.

Hugging Face configs omit fields equal to the class defaults, so the defaults of each ``model_type`` are
data here (as of transformers 4.40–5.x). The translation goes both ways: :func:`to_hf_config` writes a
config transformers reads back unchanged.
"""

from __future__ import annotations

from typing import Any

from llavakit.core.config import ComponentRef, ModelConfig
from llavakit.core.errors import ConfigError

#: transformers' class defaults for fields the published configs leave out.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, head_dim=None, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048,
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False, sliding_window=None,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=None, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=4096 * 32, tie_word_embeddings=False, hidden_act="silu", sliding_window=4096,
    ),
}

#: LlavaNextConfig's vision defaults when ``vision_config`` is absent (CLIP ViT-L/14-336).
LLAVA_NEXT_VISION_DEFAULT = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14,
)


def _with_defaults(section: dict[str, Any], where: str) -> dict[str, Any]:
    model_type = section.get("model_type")
    if model_type not in HF_DEFAULTS:
        raise ConfigError(
            f"{where}.model_type {model_type!r} is not supported by the built-in loader "
            f"(supported: {', '.join(HF_DEFAULTS)}); a plugin can add more"
        )
    return {**HF_DEFAULTS[model_type], **{k: v for k, v in section.items() if v is not None or k == "sliding_window"}}


def _rope_theta(text: dict[str, Any], where: str) -> float:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported by the llama plugin (only default RoPE)")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def vision_options(vision: dict[str, Any], where: str = "vision_config") -> dict[str, Any]:
    v = _with_defaults(vision, where)
    if v["hidden_act"] not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{where}.hidden_act {v['hidden_act']!r} is not supported (quick_gelu or gelu)")
    return dict(
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], layer_norm_eps=v["layer_norm_eps"], hidden_act=v["hidden_act"],
    )


def llm_options(text: dict[str, Any], where: str = "text_config") -> dict[str, Any]:
    t = _with_defaults(text, where)
    if t.get("hidden_act", "silu") != "silu" or t.get("attention_bias") or t.get("mlp_bias"):
        raise ConfigError(f"{where}: only SiLU-gated, bias-free Llama-family decoders are supported")
    options = dict(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        num_kv_heads=t["num_key_value_heads"] or t["num_attention_heads"],
        rope_theta=_rope_theta(text, where), rms_norm_eps=t["rms_norm_eps"],
        max_position_embeddings=t["max_position_embeddings"],
        sliding_window=t.get("sliding_window") if t.get("use_sliding_window", True) else None,
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
    )
    if t.get("head_dim") and t["head_dim"] != t["hidden_size"] // t["num_attention_heads"]:
        options["head_dim"] = t["head_dim"]
    return options


def match_preset(kind: str, options: dict[str, Any]) -> str | None:
    """The registered preset whose defaults equal ``options`` (so a loaded 7B shows as ``mistral-7b``)."""
    from llavakit.registry.plugins import get_registry

    for spec in get_registry().components[kind].values():
        if not spec.defaults or spec.config is None:
            continue
        try:
            if spec.options(options).model_dump() == spec.options({}).model_dump():
                return spec.name
        except ConfigError:
            continue
    return None


def from_llava_next(config: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
    """A llavakit :class:`ModelConfig` for a transformers ``llava_next`` config.json."""
    if config.get("model_type") != "llava_next":
        raise ConfigError(f"{where}: model_type is {config.get('model_type')!r}, expected 'llava_next'")
    vision = vision_options(config.get("vision_config") or LLAVA_NEXT_VISION_DEFAULT, f"{where} vision_config")
    text = llm_options(config.get("text_config") or {"model_type": "llama"}, f"{where} text_config")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{where}: projector_hidden_act {config['projector_hidden_act']!r} is not supported (gelu)")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConfigError(f"{where}: vision_feature_layer {layer!r}: only a single layer index is supported")
    pinpoints = config.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    llm_name = match_preset("llm", text)
    vision_name = match_preset("vision", vision)
    return ModelConfig(
        vision=ComponentRef(name=vision_name or "clip-vit", options={} if vision_name else vision),
        llm=ComponentRef(name=llm_name or "llama", options={} if llm_name else text),
        projector=ComponentRef(name="mlp2x-gelu", options={"bias": bool(config.get("multimodal_projector_bias", True))}),
        tiler=ComponentRef(name="anyres", options={"grid_pinpoints": [tuple(p) for p in pinpoints]}),
        image_token_index=config.get("image_token_index", config.get("image_token_id", 32000)),
        vision_feature_layer=layer,
        vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
        dtype=_dtype_name(config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("torch_dtype")),
    )


def _dtype_name(value: Any) -> str:
    names = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    return names.get(str(value).removeprefix("torch."), "float32")
