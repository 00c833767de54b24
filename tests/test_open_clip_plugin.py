"""The ``open_clip:*`` vision encoders: features at the feature layer, class-token handling, token counts for
other patch sizes and towers without a class token, normalisation reaching the processor, local weights,
and parity with the native ``clip-l336`` on the same ViT-L-14-336-quickgelu weights. Nothing is downloaded."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from llavakit.core.errors import CheckpointError, ConfigError, StateDictError, UnknownComponentError
from llavakit.plugins.attention import EagerAttention
from llavakit.registry import build_model, get_registry
from llavakit.registry.cli import main
from llavakit.registry.components import open_clip_visual_to_clip_vit
from llavakit.registry.processing import processor_for_model

IMAGE_TOKEN_INDEX = 32000  # the mistral tokenizer fixture's <image>
TINY_LLM = dict(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, vocab_size=32064)
#: ViT-B-16's architecture (patch 16, 224 px, open_clip's own ViT with a class token), shrunk.
TINY_B16 = {"vision_cfg": {"layers": 3, "width": 64, "head_width": 32}}
#: SigLIP-style tower: a timm ViT with no class token, shrunk to 4x4 patches of 14 px.
TINY_SIGLIP = {"vision_cfg": {"timm_model_name": "llavakit_test_tiny_siglip"}}


@register_model
def llavakit_test_tiny_siglip(pretrained=False, **kwargs):
    """ViT-SO400M-14-SigLIP-384's shape (patch 14, no class token, attention-pool head), tiny."""
    head = {k: kwargs[k] for k in ("num_classes", "global_pool") if k in kwargs}  # what open_clip passes
    return VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=2, class_token=False, **head)


def tower(name: str, **options):
    spec = get_registry().get("vision", name)
    return spec.factory(spec.options(options), attention=EagerAttention()).eval()


def tiny_model(vision: str, vision_options: dict, **kwargs):
    return build_model(vision=vision, llm="vicuna-7b", vision_options=vision_options, llm_options=TINY_LLM,
                       image_token_index=IMAGE_TOKEN_INDEX, seed=0, **kwargs)


def test_plugins_command_lists_the_family_and_its_attention(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("open_clip:*"))
    assert "llavakit (built-in)" in line and "attention=open_clip's own" in line


def test_unknown_or_unsupported_open_clip_names():
    with pytest.raises(UnknownComponentError, match="'open_clip:ViT-B-61'. Did you mean 'open_clip:ViT-B-16'"):
        build_model(vision="open_clip:ViT-B-61", llm="vicuna-7b", device="meta")
    with pytest.raises(ConfigError, match="open_clip:RN50 builds a ModifiedResNet, not a ViT"):
        build_model(vision="open_clip:RN50", llm="vicuna-7b", device="meta")
    with pytest.raises(ConfigError, match="unknown open_clip vision_cfg field\\(s\\) \\['depth'\\]"):
        build_model(vision="open_clip:ViT-B-16", llm="vicuna-7b", vision_options={"vision_cfg": {"depth": 2}},
                    device="meta")


@pytest.mark.parametrize(
    "name, side, patch, grid, class_token, mean, tokens",
    [
        # 224 px tiles of 14x14 patches: base 196 + a 14x28 map unpadded to 14x14 with a newline per row.
        ("ViT-B-16", 224, 16, 14, True, (0.48145466, 0.4578275, 0.40821073), 196 + 14 * 15),
        # 384 px tiles of 27x27 patches, no class token: base 729 + a 27x54 map unpadded to 27x28 (+ newlines).
        ("ViT-SO400M-14-SigLIP-384", 384, 14, 27, False, (0.5, 0.5, 0.5), 729 + 27 * 29),
    ],
)
def test_full_size_towers_declare_their_geometry(name, side, patch, grid, class_token, mean, tokens):
    model = build_model(vision=f"open_clip:{name}", llm="vicuna-7b", device="meta",
                        vision_feature_select_strategy="default" if class_token else "full")
    vision = model.vision_tower
    assert (vision.image_size, vision.patch_size, vision.has_class_token) == (side, patch, class_token)
    assert tuple(vision.patch_grid) == (grid, grid) and vision.image_mean == mean
    assert model.tiler.tile_size == side
    assert model.num_image_tokens((side, side)) == tokens


def test_default_strategy_is_refused_for_a_tower_without_class_token():
    with pytest.raises(ConfigError, match="has none; set vision_feature_select_strategy='full'"):
        build_model(vision="open_clip:ViT-SO400M-14-SigLIP-384", llm="vicuna-7b", device="meta")


def test_open_clip_vit_features_are_open_clips_own():
    """Class-token tower: the last layer through ``ln_post`` is what open_clip's forward returns as tokens;
    the default strategy drops the class token; no block past the feature layer runs."""
    encoder = tower("open_clip:ViT-B-16", **TINY_B16)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    full = encoder(pixels, feature_layer=-1, strategy="full")
    assert full.shape == (2, 197, 64)
    encoder.visual.output_tokens = True
    _, tokens = encoder.visual(pixels)
    assert torch.allclose(encoder.visual.ln_post(full)[:, 1:], tokens, atol=1e-5)
    assert torch.equal(encoder(pixels, feature_layer=-1), full[:, 1:])

    ran = []
    for index, block in enumerate(encoder.visual.transformer.resblocks):
        block.register_forward_hook(lambda module, args, out, index=index: ran.append(index))
    encoder(pixels, feature_layer=-2)
    assert ran == [0, 1]
    with pytest.raises(ConfigError, match="open_clip towers expose block outputs only"):
        encoder(pixels, feature_layer=0)


def test_timm_tower_without_class_token_features():
    encoder = tower("open_clip:ViT-SO400M-14-SigLIP-384", **TINY_SIGLIP)
    assert (encoder.image_size, encoder.patch_size, encoder.has_class_token, encoder.hidden_size) == (56, 14, False, 32)
    # The state dict is open_clip's visual.* once over (what loads and saves).
    assert set(encoder.state_dict()) == {f"visual.{k}" for k in encoder.visual.state_dict()}
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    full = encoder(pixels, feature_layer=-1, strategy="full")
    assert full.shape == (2, 16, 32)
    trunk = encoder.visual.trunk
    assert torch.allclose(trunk.norm(full), trunk.forward_features(pixels), atol=1e-5)
    with pytest.raises(ConfigError, match="drops a class token"):
        encoder(pixels, strategy="default")


@pytest.mark.parametrize(
    "vision_options, strategy, side",
    [(TINY_B16, "default", 224), (TINY_SIGLIP, "full", 56)],
    ids=["open_clip-vit-patch16", "timm-vit-no-class-token"],
)
def test_forward_and_generate_end_to_end(mistral_tokenizer_dir, vision_options, strategy, side):
    name = "open_clip:ViT-B-16" if "layers" in vision_options["vision_cfg"] else "open_clip:ViT-SO400M-14-SigLIP-384"
    model = tiny_model(name, vision_options, vision_feature_select_strategy=strategy)
    processor = processor_for_model(model, mistral_tokenizer_dir)
    # The processor tiles at the tower's size and normalises with its constants.
    assert processor.tile_size == side and processor.image_mean == model.vision_tower.image_mean
    images = [Image.new("RGB", (side * 2, side), (200, 30, 90)), Image.new("RGB", (side, side * 3), (10, 250, 40))]
    inputs = processor(images, ["<image>\nWhat is this?", "Compare: <image>"], padding_side="left")
    assert inputs["pixel_values"].shape[-2:] == (side, side)
    counts = (inputs["input_ids"] == IMAGE_TOKEN_INDEX).sum(dim=1).tolist()
    assert counts == [model.num_image_tokens(images[0].size[::-1]), model.num_image_tokens(images[1].size[::-1])]
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3)
    assert logits.shape == (2, inputs["input_ids"].shape[1], TINY_LLM["vocab_size"]) and torch.isfinite(logits).all()
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def write_tiny_b16_weights(folder, encoder, *, prefix: str = "visual.", with_config: bool = True):
    folder.mkdir()
    state = {f"{prefix}{k}": v.contiguous() for k, v in encoder.visual.state_dict().items()}
    state["text_projection"] = torch.zeros(4, 4)  # a full CLIP checkpoint: only visual.* is read
    save_file(state, str(folder / "open_clip_model.safetensors"))
    if with_config:
        model_cfg = open_clip.get_model_config("ViT-B-16")
        model_cfg["vision_cfg"].update(TINY_B16["vision_cfg"])
        preprocess = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))


def test_pretrained_weights_from_a_folder_or_a_file(tmp_path):
    torch.manual_seed(7)
    source = tower("open_clip:ViT-B-16", **TINY_B16)
    write_tiny_b16_weights(tmp_path / "hub-layout", source)
    # A Hub-layout folder brings its own model and preprocess config.
    from_folder = tower("open_clip:ViT-B-16", pretrained=str(tmp_path / "hub-layout"))
    assert from_folder.image_mean == (0.1, 0.2, 0.3) and from_folder.image_std == (0.4, 0.5, 0.6)
    for key, value in source.state_dict().items():
        assert torch.equal(from_folder.state_dict()[key], value), key
    # A visual-only file plus options.
    file = tmp_path / "visual.bin"
    torch.save(source.visual.state_dict(), file)
    from_file = tower("open_clip:ViT-B-16", pretrained=str(file), **TINY_B16)
    assert from_file.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert torch.equal(from_file.visual.conv1.weight, source.visual.conv1.weight)
    # Assembled with its own weights, the tower is not reported as untrained (the other parts still are).
    model = tiny_model("open_clip:ViT-B-16", {"pretrained": str(tmp_path / "hub-layout")})
    assert model.untrained == {"projector", "tiler", "llm"}
    assert "vision" in tiny_model("open_clip:ViT-B-16", TINY_B16).untrained


def test_unusable_weights_name_the_file_and_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        tower("open_clip:ViT-B-16", pretrained=str(tmp_path / "missing.safetensors"), **TINY_B16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no open_clip weights found; expected one of open_clip_model.safetensors"):
        tower("open_clip:ViT-B-16", pretrained=str(tmp_path / "empty"), **TINY_B16)
    other = tower("open_clip:ViT-B-16", vision_cfg={"layers": 2, "width": 64, "head_width": 32})
    write_tiny_b16_weights(tmp_path / "two-layers", other, with_config=False)
    with pytest.raises(StateDictError, match="open_clip_model.safetensors: does not fit .* missing: "
                       "transformer.resblocks.2.attn.in_proj_bias"):
        tower("open_clip:ViT-B-16", pretrained=str(tmp_path / "two-layers"), **TINY_B16)


def test_features_equal_native_clip_l336_on_the_same_weights():
    """One 336-px tile through the full-size ViT-L-14-336-quickgelu, as open_clip and as our native tower."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None)  # random, nothing downloaded
    visual_state = {f"visual.{k}": v for k, v in reference.visual.state_dict().items()}
    del reference
    encoder = tower("open_clip:ViT-L-14-336-quickgelu")
    encoder.load_state_dict(visual_state)
    native = tower("clip-l336")
    native.load_state_dict(open_clip_visual_to_clip_vit(visual_state))
    del visual_state
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = native(pixels), encoder(pixels)
    assert ours.shape == theirs.shape == (1, 576, 1024)
    assert (ours - theirs).abs().max().item() < 1e-5
