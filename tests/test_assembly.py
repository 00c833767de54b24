"""build_model, config files and load_model options: presets, overrides, names, sizes and errors."""

from __future__ import annotations

import json

import pytest
import torch

from llavakit.core.errors import (
    AttentionBackendError,
    ConfigError,
    LlavakitError,
    TokenCountError,
    UnknownComponentError,
)
from llavakit.registry import build_model, load_model

#: Total parameter counts of the published llava-hf checkpoints (every tensor, see the facts file).
PUBLISHED_COUNTS = {
    "mistral-7b": 7_566_747_648,
    "vicuna-7b": 7_063_431_168,
    "vicuna-13b": 13_351_499_776,
    "hermes-yi-34b": 34_752_083_968,
}

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 3, "num_heads": 4}
TINY_LLM = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


def tiny(**kwargs):
    args = dict(
        vision="clip-l336", llm="mistral-7b", vision_options=TINY_VISION, llm_options=TINY_LLM,
        image_token_index=399, seed=0,
    )
    args.update(kwargs)
    return build_model(**args)


@pytest.mark.parametrize("preset", sorted(PUBLISHED_COUNTS))
def test_meta_build_has_the_published_parameter_count(preset):
    model = build_model(vision="clip-l336", llm=preset, device="meta")
    assert sum(t.numel() for t in model.state_dict().values()) == PUBLISHED_COUNTS[preset]
    assert all(p.is_meta for p in model.parameters())


def test_presets_carry_their_image_token_index():
    assert build_model(vision="clip-l336", llm="hermes-yi-34b", device="meta").image_token_index == 64000
    assert build_model(vision="clip-l336", llm="vicuna-7b", device="meta").image_token_index == 32000


def test_options_override_preset_fields_and_sizes_follow():
    model = tiny()
    assert model.language_model.hidden_size == 64
    assert model.language_model.config.rope_theta == 1e6  # kept from the mistral-7b preset
    assert model.projector.in_features == 32 and model.projector.out_features == 64
    assert model.tiler.image_newline.shape == (64,)
    assert model.tiler.tile_size == 336


def test_seed_makes_random_init_reproducible():
    a, b = tiny(seed=3), tiny(seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_unknown_names_list_alternatives_and_closest_match():
    with pytest.raises(UnknownComponentError) as info:
        build_model(vision="clip-l336", llm="mistral-7", device="meta")
    message = str(info.value)
    assert "Did you mean 'mistral-7b'?" in message and "vicuna-13b" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, LlavakitError)
    with pytest.raises(UnknownComponentError, match="unknown attention backend 'flashy'"):
        build_model(vision="clip-l336", llm="mistral-7b", attention="flashy", device="meta")


def test_original_llava_spelling_maps_to_hyphenated_name():
    model = tiny(projector="mlp2x_gelu")
    assert model.config.projector.name == "mlp2x-gelu"
    assert tiny(projector="mlp3x-gelu").projector.depth == 3
    assert tiny(projector="linear").projector.depth == 1


def test_bad_option_names_the_field():
    with pytest.raises(ConfigError, match=r"llm\.options\.hidden_sise"):
        build_model(vision="clip-l336", llm="mistral-7b", llm_options={"hidden_sise": 3}, device="meta")
    with pytest.raises(ConfigError, match="num_heads 4 is not a multiple of num_kv_heads 32"):
        build_model(vision="clip-l336", llm="vicuna-7b", llm_options={"num_heads": 4}, device="meta")
    with pytest.raises(ConfigError, match="not divisible"):
        build_model(vision="clip-l336", llm="mistral-7b", llm_options={"hidden_size": 100}, device="meta")


def test_dimension_mismatch_is_explained():
    with pytest.raises(ConfigError, match="takes 48-wide features but the vision encoder 'clip-l336' produces 32"):
        tiny(projector_options={"in_features": 48})
    with pytest.raises(ConfigError, match="image_token_index 500 is outside the vocabulary"):
        tiny(image_token_index=500)


def test_feature_strategy_needs_a_class_token_aware_encoder():
    with pytest.raises(ConfigError, match="vision_feature_layer=-30 is out of range"):
        tiny(vision_feature_layer=-30)
    with pytest.raises(ConfigError, match="'full' keeps the class token"):
        tiny(vision_feature_select_strategy="full")


def test_flash_refuses_fp32_on_cuda_before_allocating():
    with pytest.raises(AttentionBackendError, match="float16 or bfloat16"):
        build_model(vision="clip-l336", llm="mistral-7b", attention="flash", device="cuda", dtype="float32")


def test_token_count_mismatch_names_counts_per_image():
    model = tiny()
    size = (480, 640)
    tokens = model.num_image_tokens(size)
    pixel_values = torch.randn(1, model.tiler.num_tiles(size), 3, 336, 336)
    input_ids = torch.cat([torch.tensor([[1, 5]]), torch.full((1, tokens - 3), 399)], dim=1)
    with pytest.raises(TokenCountError) as info:
        model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=torch.tensor([size]))
    assert f"image 0 (480x640): {tokens}" in str(info.value) and f"row 0: {tokens - 3}" in str(info.value)


def test_vision_tower_runs_no_block_past_the_feature_layer():
    model = tiny()
    ran = []
    for index, block in enumerate(model.vision_tower.encoder.layers):
        block.register_forward_hook(lambda module, args, out, index=index: ran.append(index))
    model.vision_tower(torch.randn(1, 3, 336, 336), feature_layer=-2)
    assert ran == [0, 1]  # 3 blocks, feature layer -2 = output of block 1


def test_attention_setting_reaches_every_attention_layer():
    model = tiny(attention="eager")
    backends = {
        type(m.backend).__name__ for m in model.modules() if hasattr(m, "backend")
    }
    assert backends == {"EagerAttention"}
    assert len([m for m in model.vision_tower.modules() if hasattr(m, "backend")]) == 3


def test_dtype_names_and_torch_dtypes():
    assert tiny(dtype="bfloat16").dtype == torch.bfloat16
    assert tiny(dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ConfigError, match="dtype 'float8'"):
        tiny(dtype="float8")


CONFIG_YAML = """
vision: {name: clip-l336, options: {hidden_size: 32, intermediate_size: 64, num_layers: 3, num_heads: 4}}
llm:
  name: vicuna-7b
  options: {vocab_size: 400, hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 4}
projector: mlp2x_gelu
image_token_index: 399
attention: eager
"""


def test_config_files_in_yaml_toml_and_json_build_the_same_model(tmp_path):
    import yaml

    data = yaml.safe_load(CONFIG_YAML)
    (tmp_path / "m.yaml").write_text(CONFIG_YAML)
    (tmp_path / "m.json").write_text(json.dumps(data))
    toml = "\n".join(
        [
            'projector = "mlp2x_gelu"',
            "image_token_index = 399",
            'attention = "eager"',
            "[vision]",
            'name = "clip-l336"',
            "options = { hidden_size = 32, intermediate_size = 64, num_layers = 3, num_heads = 4 }",
            "[llm]",
            'name = "vicuna-7b"',
            "options = { vocab_size = 400, hidden_size = 64, intermediate_size = 128, num_layers = 2, num_heads = 4, "
            "num_kv_heads = 4 }",
        ]
    )
    (tmp_path / "m.toml").write_text(toml)
    models = [load_model(tmp_path / name) for name in ("m.yaml", "m.json", "m.toml")]
    for model in models:
        assert model.config == models[0].config
        assert model.config.attention == "eager"
        assert model.language_model.num_layers == 2


def test_config_file_errors_point_at_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vision: clip-l336\nllm: {name: vicuna-7b, option: {}}\ndtype: float64\n")
    with pytest.raises(ConfigError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "llm.option" in message and "dtype" in message
    path.write_text("vision: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_model(path)
