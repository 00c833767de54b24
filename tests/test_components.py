"""Component assembly from separate weights: HF CLIP folders, HF causal LMs (with the <image>/<pad> rows
added), open_clip state dicts, projector files, llava-hf folders; untrained parts and rows are reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llavakit.core.errors import CheckpointError, ConfigError, StateDictError
from llavakit.registry import build_model
from llavakit.registry.components import open_clip_visual_to_clip_vit
from tiny import (
    FAMILIES,
    TINY_VISION,
    VOCAB_SIZE,
    save_causal_lm,
    save_clip_vision,
    save_tiny_llava_hf,
)

TOLERANCE = 1e-4
STOCK_VOCAB = 320  # the tiny LLM without its <image> (320) and <pad> (321) rows
TINY_VISION_OPTIONS = dict(
    hidden_size=TINY_VISION["hidden_size"], intermediate_size=TINY_VISION["intermediate_size"],
    num_layers=TINY_VISION["num_hidden_layers"], num_heads=TINY_VISION["num_attention_heads"],
    image_size=TINY_VISION["image_size"], patch_size=TINY_VISION["patch_size"],
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny transformers LLaVA-NeXT model and each of its parts saved as a separate checkpoint."""
    root = tmp_path_factory.mktemp("components")
    reference = save_tiny_llava_hf(root / "llava", "mistral", seed=5)
    save_clip_vision(root / "clip-vision", reference)
    save_clip_vision(root / "clip-full", reference, full_clip=True)
    save_clip_vision(root / "clip-prefixed", reference, prefixed=True)
    save_causal_lm(root / "stock-lm", reference, vocab_size=STOCK_VOCAB)
    save_causal_lm(root / "full-lm", reference)
    state = reference.state_dict()
    projector = {k.removeprefix("model."): v for k, v in state.items() if "multi_modal_projector" in k}
    save_file(projector, str(root / "projector.safetensors"))
    original_names = {
        k.replace("multi_modal_projector.linear_1.", "model.mm_projector.0.").replace(
            "multi_modal_projector.linear_2.", "model.mm_projector.2."
        ): v
        for k, v in projector.items()
    }
    torch.save(original_names, root / "mm_projector.bin")
    return root, reference


def text_logits(model, reference, rows: int = STOCK_VOCAB) -> float:
    ids = torch.randint(3, 300, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(ids).logits[..., :rows] - reference(input_ids=ids).logits[..., :rows]).abs().max().item()


def image_logits(model, reference) -> float:
    """Max logit difference on a prompt with one 480x640 image."""
    size = (480, 640)
    generator = torch.Generator().manual_seed(1)
    count = model.num_image_tokens(size)
    ids = torch.cat([torch.randint(3, 300, (1, 4), generator=generator), torch.full((1, count), model.image_token_index),
                     torch.randint(3, 300, (1, 3), generator=generator)], dim=1)
    pixel_values = torch.randn(1, model.tiler.num_tiles(size), 3, 336, 336, generator=generator)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixel_values, image_sizes=torch.tensor([size])).logits
        theirs = reference(input_ids=ids, pixel_values=pixel_values, image_sizes=torch.tensor([size])).logits
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("clip_folder", ["clip-vision", "clip-full", "clip-prefixed"])
def test_assembly_from_separate_checkpoints_matches_the_whole_model(parts, clip_folder):
    root, reference = parts
    model = build_model(
        "clip-vit",
        "llama",
        weights={
            "vision": str(root / clip_folder),
            "llm": str(root / "full-lm"),
            "projector": str(root / "projector.safetensors"),
            "tiler": str(root / "llava"),  # image_newline, taken from a llava-hf folder
        },
        image_token_index=320,
    )
    assert model.untrained == set() and model.untrained_rows == {}
    assert model.config.vision.options["hidden_size"] == TINY_VISION["hidden_size"]  # sizes from the weights
    assert image_logits(model, reference) < TOLERANCE


def test_stock_llm_gets_image_and_pad_rows_initialised_to_the_mean(parts):
    root, reference = parts
    model = build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS, weights={"llm": str(root / "stock-lm")})
    # 320 + 2 new tokens, rounded up to a multiple of 64, as the llava-hf conversion does.
    assert model.language_model.vocab_size == 384
    assert model.image_token_index == STOCK_VOCAB
    rows = {"language_model.embed_tokens.weight": (320, 384), "language_model.lm_head.weight": (320, 384)}
    assert model.untrained_rows == rows
    assert model.untrained == {"vision", "projector", "tiler"}
    for name in rows:
        matrix = model.get_parameter(name)
        assert torch.allclose(matrix[320:], matrix[:320].mean(dim=0).expand(64, -1))
    assert text_logits(model, reference) < TOLERANCE
    summary = model.untrained_summary()
    assert "vision: initialised" in summary and "language_model.lm_head.weight: rows 320..383" in summary


def test_preset_vocabulary_larger_than_the_weights_is_filled_with_mean_rows(parts):
    root, reference = parts
    text = FAMILIES["mistral"]
    options = dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   rope_theta=text["rope_theta"], max_position_embeddings=8192, vocab_size=448)
    model = build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS, llm_options=options,
                        weights={"llm": str(root / "full-lm")}, image_token_index=320)
    assert model.untrained_rows["language_model.embed_tokens.weight"] == (VOCAB_SIZE, 448)
    assert text_logits(model, reference, rows=VOCAB_SIZE) < TOLERANCE


def test_projector_file_layouts(parts):
    root, reference = parts
    for source, allow_pickle in (("projector.safetensors", False), ("mm_projector.bin", True)):
        model = build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS,
                            llm_options=dict(hidden_size=64, num_heads=4, num_layers=1, intermediate_size=96, vocab_size=384),
                            weights={"projector": str(root / source)}, allow_pickle=allow_pickle, image_token_index=320)
        expected = reference.model.multi_modal_projector.linear_2.weight
        assert torch.equal(model.projector.linear_2.weight, expected)
        assert model.untrained == {"vision", "llm", "tiler"}
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS, weights={"projector": str(root / "mm_projector.bin")})


def test_weights_that_do_not_fit_the_component_are_explained(parts, tmp_path):
    root, _ = parts
    with pytest.raises(ConfigError, match=r"hidden_size is 32 in the weights but 1024 in the component.*vision='clip-vit'"):
        build_model("clip-l336", "llama", weights={"vision": str(root / "clip-vision")})
    with pytest.raises(ConfigError, match="holds no llm weights"):
        build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS, weights={"llm": str(root / "clip-vision")})
    with pytest.raises(ConfigError, match="320-token vocabulary but the language model 'llama' has 300 rows"):
        build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS, llm_options={"vocab_size": 300},
                    weights={"llm": str(root / "stock-lm")})
    with pytest.raises(ConfigError, match="num_layers is 2 in the weights but 1 in the component"):
        build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS, llm_options={"num_layers": 1},
                    weights={"llm": str(root / "stock-lm")})
    wrong = tmp_path / "wrong-projector.safetensors"
    save_file({"linear_1.weight": torch.zeros(64, 48), "linear_1.bias": torch.zeros(64)}, str(wrong))
    with pytest.raises(StateDictError) as caught:
        build_model("clip-vit", "llama", vision_options=TINY_VISION_OPTIONS,
                    llm_options=dict(hidden_size=64, num_heads=4, num_layers=1, intermediate_size=96),
                    weights={"projector": str(wrong)})
    message = str(caught.value)
    assert "misshapen: linear_1.weight (ours: projector.linear_1.weight) [projector]: expected [64, 32], found [64, 48]" in message
    assert "missing: linear_2.weight (ours: projector.linear_2.weight) [projector]" in message


def test_component_sources_from_the_hub_are_downloaded_with_patterns(parts, monkeypatch):
    import huggingface_hub

    root, _ = parts
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(root / "clip-vision")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = build_model("clip-vit", "llama", llm_options=dict(hidden_size=64, num_heads=4, num_layers=1, intermediate_size=96),
                        weights={"vision": "openai/tiny-clip@f00d"})
    assert model.untrained == {"llm", "projector", "tiler"}
    ((repo, kwargs),) = calls
    assert repo == "openai/tiny-clip" and kwargs["revision"] == "f00d"
    assert "config.json" in kwargs["allow_patterns"] and "*.safetensors" in kwargs["allow_patterns"]


# ------------------------------------------------------------------------------------------ open_clip
def tiny_open_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=8, mlp_ratio=2.0, patch_size=14, image_size=336),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=4, layers=1),
        quick_gelu=True,
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def open_clip_features(visual, pixel_values: torch.Tensor, block: int) -> torch.Tensor:
    """open_clip's hidden states after ``block`` (0-based), class token dropped, taken with a forward hook."""
    captured = []
    handle = visual.transformer.resblocks[block].register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        visual(pixel_values)
    handle.remove()
    return captured[0][:, 1:]


def test_open_clip_file_with_text_tower_loads_into_clip_vit(tmp_path):
    reference = tiny_open_clip()
    file = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(file))
    model = build_model("clip-vit", "llama", vision_options=dict(TINY_VISION_OPTIONS),
                        llm_options=dict(hidden_size=64, num_heads=4, num_layers=1, intermediate_size=96),
                        weights={"vision": str(file)})
    pixel_values = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.vision_tower(pixel_values, feature_layer=-2)
    expected = open_clip_features(reference.visual, pixel_values, block=1)
    assert (ours - expected).abs().max().item() < 1e-5


def test_open_clip_towers_with_extra_parts_are_refused():
    state = tiny_open_clip().visual.state_dict()
    state["attn_pool.query"] = torch.zeros(1, 32)
    with pytest.raises(StateDictError, match="attn_pool.query.*not a plain CLIP ViT"):
        open_clip_visual_to_clip_vit(state)


@pytest.mark.slow
def test_open_clip_vit_l_14_336_quickgelu_matches_clip_l336():
    """A full-size open_clip ViT-L-14-336-quickgelu (random weights, no download) into the clip-l336 preset."""
    import open_clip

    from llavakit.registry import get_registry

    reference = open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None).eval()
    converted = open_clip_visual_to_clip_vit(reference.state_dict())
    spec = get_registry().get("vision", "clip-l336")
    backend = get_registry().get("attention", "sdpa").factory()
    with torch.device("meta"):
        tower = spec.factory(spec.options({}), attention=backend)
    tower.load_state_dict(converted, strict=True, assign=True)
    pixel_values = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tower.eval()(pixel_values, feature_layer=-2)
    expected = open_clip_features(reference.visual, pixel_values, block=22)
    assert ours.shape == (1, 576, 1024)
    assert (ours - expected).abs().max().item() < 1e-5


def test_config_file_weights_are_loaded_relative_to_the_file(parts, tmp_path):
    import shutil

    from llavakit.registry import load_model

    root, reference = parts
    shutil.copytree(root / "clip-vision", tmp_path / "tower")
    shutil.copytree(root / "full-lm", tmp_path / "lm")
    (tmp_path / "model.yaml").write_text(
        "vision: {name: clip-vit, weights: tower}\n"
        "llm: {name: llama, weights: lm}\n"
        f"projector: {{name: mlp2x-gelu, weights: {root / 'projector.safetensors'}}}\n"
        "image_token_index: 320\n"
    )
    model = load_model(tmp_path / "model.yaml")
    assert model.untrained == {"tiler"}
    assert torch.equal(model.vision_tower.pre_layrnorm.weight, reference.model.vision_tower.pre_layrnorm.weight)
    assert text_logits(model, reference, rows=VOCAB_SIZE) < TOLERANCE
