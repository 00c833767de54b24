"""The example plugin's own tests, run against the installed distribution (``pip install .`` first).

They are the tests every plugin should have: it is discovered through its entry point under its
distribution's name, each component honours its contract's shapes, and a model assembled with it runs
forward and generate.
"""

from __future__ import annotations

from importlib import metadata

import torch

from llavakit.registry import build_model, get_registry

TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 3, "num_heads": 2}
TINY_LLM = {"num_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 4,
            "vocab_size": 256}
IMAGE_TOKEN = 250


def tiny_model(**kwargs):
    return build_model(vision="example-tiny-vit", projector="example-resampler", llm="vicuna-7b",
                       vision_options=TINY_VIT, llm_options=TINY_LLM, image_token_index=IMAGE_TOKEN, seed=0, **kwargs)


def test_registered_through_the_entry_point():
    registry = get_registry()
    provider = f"llavakit-example-plugin {metadata.version('llavakit-example-plugin')}"
    assert registry.get("vision", "example-tiny-vit").provider == provider
    assert registry.get("projector", "example-resampler").provider == provider
    assert not [f for f in registry.failures if f.distribution == "llavakit-example-plugin"]


def test_contract_shapes():
    model = tiny_model()
    tiles = torch.randn(5, 3, 32, 32)
    features = model.vision_tower(tiles, feature_layer=-2, strategy="default")
    assert features.shape == (5, 16, 32)  # 4x4 patches, class token dropped
    assert model.vision_tower(tiles, strategy="full").shape == (5, 17, 32)
    tokens = model.projector(features)
    assert tokens.shape == (5, 64, 64)  # 8x8 latents at the LLM width
    # The per-tile grid comes from the resampler, not from the encoder's 4x4 patches.
    assert tuple(model.token_grid) == (8, 8) and tuple(model.vision_tower.patch_grid) == (4, 4)


def test_token_count_follows_the_resampler_grid():
    model = tiny_model()
    # (32, 64) fills a 1x2 grid of 32-px tiles exactly: base 64 + an 8x16 map with a newline per row.
    assert model.num_image_tokens((32, 64)) == 64 + 8 * 17
    features = model.get_image_features(torch.randn(1, 3, 3, 32, 32), torch.tensor([[32, 64]]))
    assert features[0].shape == (64 + 8 * 17, 64)


def test_forward_and_generate():
    model = tiny_model()
    count = model.num_image_tokens((48, 20))
    input_ids = torch.tensor([[1, 7] + [IMAGE_TOKEN] * count + [9, 11]])
    pixel_values = torch.randn(1, model.tiler.num_tiles((48, 20)), 3, 32, 32)
    image_sizes = torch.tensor([[48, 20]])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        generated = model.generate(input_ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=4)
    assert logits.shape == (1, input_ids.shape[1], TINY_LLM["vocab_size"]) and torch.isfinite(logits).all()
    assert generated.shape == (1, input_ids.shape[1] + 4)
    assert torch.equal(generated[:, : input_ids.shape[1]], input_ids)


def test_attention_setting_reaches_the_tower():
    eager, sdpa = tiny_model(attention="eager"), tiny_model(attention="sdpa")
    tiles = torch.randn(2, 3, 32, 32)
    assert all(block.backend.name == "eager" for block in eager.vision_tower.blocks)
    assert torch.allclose(eager.vision_tower(tiles), sdpa.vision_tower(tiles), atol=1e-5)
