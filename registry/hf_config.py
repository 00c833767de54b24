"""Translate transformers ``config.json`` files (llava_next, CLIP vision, Llama/Mistral) into llavakit configs.

Hugging Face configs omit fields equal to the class defaults, so the defaults of each ``model_type`` are
data here (as of transformers 4.40–5.x). Three directions:

- :func:`from_llava_next`: a llava-hf ``config.json`` → :class:`ModelConfig`;
- :func:`from_original_llava`: an original LLaVA ``config.json`` (``llava_mistral`` / ``llava_llama``, the
  LLM's config plus ``mm_*`` fields) → :class:`ModelConfig`;
- :func:`to_llava_next`: a model built from the built-in components → a ``config.json`` that transformers'
  ``LlavaNextConfig`` reads back to the same architecture.
"""

from __future__ import annotations

import re
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


def component_ref(kind: str, options: dict[str, Any]) -> ComponentRef:
    """A preset's name when ``options`` are exactly its defaults, else the configurable family with ``options``."""
    preset = match_preset(kind, options)
    return ComponentRef(name=preset, options={}) if preset else ComponentRef(name=FAMILY_COMPONENTS[kind], options=options)


#: The configurable built-in component of each kind that Hugging Face configs translate to.
FAMILY_COMPONENTS = {"vision": "clip-vit", "llm": "llama"}


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
    return ModelConfig(
        vision=component_ref("vision", vision),
        llm=component_ref("llm", text),
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


# ------------------------------------------------------------------------------------------ CLIP towers
#: Vision towers that original LLaVA configs name by hub id (``mm_vision_tower``), as built-in components, so
#: those folders load offline (their tower weights are inside the LLaVA checkpoint).
WELL_KNOWN_VISION_TOWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "openai/clip-vit-large-patch14-336": ("clip-l336", {}),
    "openai/clip-vit-large-patch14": (
        "clip-vit",
        dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16),
    ),
    "openai/clip-vit-base-patch16": (
        "clip-vit",
        dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
    ),
    "openai/clip-vit-base-patch32": (
        "clip-vit",
        dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
    ),
}


def clip_vision_options(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Tower options from a ``CLIPVisionModel`` (``clip_vision_model``) or ``CLIPModel`` (``clip``) config.json."""
    model_type = config.get("model_type")
    if model_type == "clip":
        section = {"model_type": "clip_vision_model", **(config.get("vision_config") or {})}
        return vision_options(section, f"{where} vision_config")
    if model_type == "clip_vision_model":
        return vision_options(config, where)
    raise ConfigError(f"{where}: model_type {model_type!r} is not a CLIP vision model (clip or clip_vision_model)")


# ------------------------------------------------------------------------------------------ original LLaVA
#: ``model_type`` of original LLaVA configs → the Hugging Face family of the LLM at their root.
ORIGINAL_LLAVA_FAMILIES = {"llava_mistral": "mistral", "llava_llama": "llama", "llava": "llama"}

#: ``mm_vision_select_feature`` → ``vision_feature_select_strategy``.
ORIGINAL_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def is_original_llava(config: dict[str, Any]) -> bool:
    """An original LLaVA config: its model type, and the ``mm_vision_tower`` field the llava-hf configs lack."""
    return config.get("model_type") in ORIGINAL_LLAVA_FAMILIES and bool(
        config.get("mm_vision_tower") or config.get("vision_tower")
    )


def original_vision_tower(config: dict[str, Any]) -> str:
    return str(config.get("mm_vision_tower") or config.get("vision_tower"))


def from_original_llava(
    config: dict[str, Any], *, vision: ComponentRef, vision_width: int, where: str = "config.json"
) -> ModelConfig:
    """A :class:`ModelConfig` for an original LLaVA-NeXT ``config.json``; the caller resolves the tower
    (``mm_vision_tower`` is a hub id or a folder) into ``vision`` and its feature width."""
    family = ORIGINAL_LLAVA_FAMILIES.get(config.get("model_type"))
    if family is None:
        raise ConfigError(
            f"{where}: model_type {config.get('model_type')!r} is not an original LLaVA type "
            f"({', '.join(ORIGINAL_LLAVA_FAMILIES)})"
        )
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(flag):
            raise ConfigError(f"{where}: {flag}=true (extra image delimiter tokens) is not supported")
    text = llm_options({**config, "model_type": family}, where)
    if config.get("mm_hidden_size") not in (None, vision_width):
        raise ConfigError(
            f"{where}: mm_hidden_size is {config['mm_hidden_size']} but the vision tower "
            f"{original_vision_tower(config)!r} produces {vision_width}-wide features"
        )
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type != "linear" and not re.fullmatch(r"mlp[2-8]x_gelu", str(projector_type)):
        raise ConfigError(f"{where}: mm_projector_type {projector_type!r} is not supported (linear, mlp2x_gelu … mlp8x_gelu)")
    layer = config.get("mm_vision_select_layer")
    if not isinstance(layer, int):
        raise ConfigError(f"{where}: mm_vision_select_layer must be a layer index, got {layer!r}")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ORIGINAL_SELECT_FEATURE:
        raise ConfigError(f"{where}: mm_vision_select_feature {select!r} is not supported ({', '.join(ORIGINAL_SELECT_FEATURE)})")
    aspect, merge = config.get("image_aspect_ratio"), config.get("mm_patch_merge_type", "flat")
    if aspect != "anyres" or merge != "spatial_unpad":
        raise ConfigError(
            f"{where}: image_aspect_ratio={aspect!r} with mm_patch_merge_type={merge!r} is not LLaVA-NeXT's "
            "AnyRes; only image_aspect_ratio='anyres' with mm_patch_merge_type='spatial_unpad' is supported"
        )
    pinpoints = config.get("image_grid_pinpoints")
    if not isinstance(pinpoints, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints):
        raise ConfigError(f"{where}: image_grid_pinpoints must be a list of [height, width] pairs, got {pinpoints!r}")
    return ModelConfig(
        vision=vision,
        llm=component_ref("llm", text),
        projector=ComponentRef(name=projector_type),
        # Copied unchanged, as the llava-hf conversion does; llavakit reads them as (height, width).
        tiler=ComponentRef(name="anyres", options={"grid_pinpoints": [tuple(p) for p in pinpoints]}),
        # The original vocabulary has no <image> (its code splices a -200 placeholder in): the image token is
        # the first id past the vocabulary, where <image> lands when added to the tokenizer and where the
        # llava-hf conversion puts its row. Image positions are never embedded, so it needs no row here.
        image_token_index=text["vocab_size"],
        vision_feature_layer=layer,
        vision_feature_select_strategy=ORIGINAL_SELECT_FEATURE[select],
        dtype=_dtype_name(config.get("torch_dtype") or config.get("dtype")),
    )


# ------------------------------------------------------------------------------------------ to transformers
def to_llava_next(
    *,
    vision: dict[str, Any],
    llm: dict[str, Any],
    llm_family: str,
    projector_bias: bool,
    grid_pinpoints: list[tuple[int, int]],
    config: ModelConfig,
    dtype: str,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """A transformers ``llava_next`` config.json for a model of the built-in clip-vit / llama / mlp2x-gelu /
    anyres components, from their resolved options. Every field is written explicitly (no reliance on the
    class defaults, which moved between transformers versions)."""
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    text = dict(
        model_type=llm_family, vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_layers"],
        num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"], head_dim=llm["head_dim"],
        rms_norm_eps=llm["rms_norm_eps"], max_position_embeddings=llm["max_position_embeddings"],
        rope_theta=llm["rope_theta"], rope_parameters={"rope_type": "default", "rope_theta": llm["rope_theta"]},
        hidden_act="silu", attention_bias=False, tie_word_embeddings=llm["tie_word_embeddings"],
        torch_dtype=dtype,
    )
    if llm_family == "mistral":
        text["sliding_window"] = llm["sliding_window"]
    elif llm["sliding_window"] is not None:
        raise ConfigError("a sliding window needs a 'mistral' text config; llama configs have none")
    if pad_token_id is not None:
        text["pad_token_id"] = pad_token_id
    return dict(
        architectures=["LlavaNextForConditionalGeneration"],
        model_type="llava_next",
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"], num_hidden_layers=vision["num_layers"],
            num_attention_heads=vision["num_heads"], image_size=vision["image_size"],
            patch_size=vision["patch_size"], hidden_act=vision["hidden_act"], layer_norm_eps=vision["layer_norm_eps"],
            num_channels=3, projection_dim=vision["hidden_size"],
        ),
        text_config=text,
        image_token_index=config.image_token_index,
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
        projector_hidden_act="gelu",
        multimodal_projector_bias=projector_bias,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_seq_length=patches,
        tie_word_embeddings=llm["tie_word_embeddings"],
        torch_dtype=dtype,
    )
