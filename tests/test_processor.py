"""The processor's behaviour: token counts shared with the model, any tiler/encoder, batching, truncation,
loading checks and bad input. Parity with transformers is in ``test_processor_parity.py``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from llavakit.core.errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    ImageError,
    TokenizerError,
)
from llavakit.core.interfaces import Projector
from llavakit.core.model import LlavaNextModel
from llavakit.core.types import ImageSize, TokenGrid
from llavakit.registry import build_model, load_model, load_processor
from llavakit.registry.processing import load_tokenizer, processor_for_model
from tiny import IMAGE_TOKEN_INDEX, save_tiny_llava_hf
from tiny_processor import tiny_backend, write_processor_folder

PROMPT = "[INST] <image>\nWhat is shown in this image? [/INST]"


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A complete tiny llava-hf folder: transformers weights + the tiny processor files."""
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    reference = save_tiny_llava_hf(folder, "mistral", seed=3)
    write_processor_folder(folder, layout="v5")
    return folder, reference


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint[0])


@pytest.fixture(scope="module")
def processor(model):
    return model.processor


# ------------------------------------------------------------------------------------------ model coupling
def test_load_model_attaches_the_processor_and_its_counts_are_the_models(model, processor):
    assert processor is not None and processor.tiler is model.tiler
    for size in [(1000, 100), (336, 336), (110, 352), (5, 7), (899, 1024)]:
        batch = processor(image(*size), PROMPT)
        placed = int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        assert placed == model.num_image_tokens(size) == processor.num_image_tokens(size)


def test_processor_output_runs_through_the_model_like_transformers(checkpoint, model, processor):
    _, reference = checkpoint
    images = [image(300, 200, 1), image(64, 64, 2), image(110, 352, 3)]
    batch = processor(images, [PROMPT, "USER: <image> <image>\nCompare. ASSISTANT:"])
    with torch.no_grad():
        expected = reference(**batch).logits
        result = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (result - expected)[mask].abs().max() < 1e-4


def test_folder_without_tokenizer_has_no_processor(tmp_path):
    save_tiny_llava_hf(tmp_path, "llama-mha", seed=1)
    assert load_model(tmp_path).processor is None


def test_folder_processor_settings_must_match_the_model(checkpoint, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(checkpoint[0], folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_processor"]["image_grid_pinpoints"] = [[336, 672], [672, 336]]
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        load_model(folder)
    settings["image_processor"]["image_grid_pinpoints"] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    settings["vision_feature_select_strategy"] = "full"
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="num_additional_image_tokens"):
        load_processor(folder)


# ------------------------------------------------------------------------------------------ any tiler/encoder
def small_encoder_model(tmp_path, tiler: str = "anyres") -> LlavaNextModel:
    """A 112-pixel tile, patch-14 CLIP with the tiny tokenizer (ids 320/321 like the tiny LLM)."""
    folder = write_processor_folder(tmp_path / "tok", layout="v5")
    return build_model(
        "clip-vit", "llama", tiler=tiler, device="cpu", seed=0, tokenizer=str(folder),
        vision_options=dict(image_size=112, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        llm_options=dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2),
        image_token_index=IMAGE_TOKEN_INDEX,
    )


@pytest.mark.parametrize("tiler", ["anyres", "single"])
def test_a_112_pixel_encoder_and_other_tilers(tmp_path, tiler):
    model = small_encoder_model(tmp_path, tiler)
    processor = model.processor
    assert processor.tile_size == 112 and processor.token_grid == TokenGrid(8, 8)
    images = [image(500, 90, 4), image(50, 50, 5)]
    batch = processor(images, ["<image>\nOne.", "<image>\nTwo, a longer prompt."])
    assert batch["pixel_values"].shape[-3:] == (3, 112, 112)
    assert batch["pixel_values"].shape[:2] == (2, max(model.tiler.num_tiles(ImageSize(*s)) for s in [(500, 90), (50, 50)]))
    with torch.no_grad():
        logits = model(**batch).logits  # the model refuses any count mismatch
    assert logits.shape[:2] == batch["input_ids"].shape


class FixedGridResampler(Projector):
    """A resampler-style projector: any patch grid in, a fixed 3 x 3 grid of tokens out."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.proj = nn.Linear(in_features, out_features)

    def token_grid(self, encoder_grid: TokenGrid) -> TokenGrid:
        return TokenGrid(3, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        side = int(features.shape[1] ** 0.5)
        grid = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
        pooled = nn.functional.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)
        return self.proj(pooled)


def test_a_resampler_with_a_fixed_grid(tmp_path):
    base = small_encoder_model(tmp_path)
    model = LlavaNextModel(
        config=base.config, vision_tower=base.vision_tower, projector=FixedGridResampler(32, 64),
        tiler=base.tiler, language_model=base.language_model,
    )
    processor = processor_for_model(model, tmp_path / "tok")
    assert processor.token_grid == TokenGrid(3, 3)
    batch = processor(image(200, 333, 6), "<image>\nWhat?")
    assert int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == model.num_image_tokens((200, 333))
    with torch.no_grad():
        model(**batch)


def test_build_model_with_a_tokenizer_uses_the_presets_template(mistral_tokenizer_dir):
    model = build_model("clip-l336", "mistral-7b", device="meta", tokenizer=str(mistral_tokenizer_dir))
    processor = model.processor
    assert processor.chat_template.name == "mistral" and processor.image_token_id == 32000
    assert (processor.pad_token_id, processor.eos_token_id) == (32001, 2)
    assert processor.image_mean == model.vision_tower.image_mean
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert processor.apply_chat_template(conversation) == "[INST] <image>\nHi [/INST]"


# ------------------------------------------------------------------------------------------ batching
def test_padding_sides_and_the_precedence_of_an_explicit_argument(tmp_path):
    left = load_processor(write_processor_folder(tmp_path / "left", layout="hub"))
    right = load_processor(write_processor_folder(tmp_path / "right", layout="hub",
                                                  tokenizer_overrides={"padding_side": "right"}))
    unset = load_processor(write_processor_folder(tmp_path / "unset", layout="hub",
                                                  tokenizer_overrides={"padding_side": None}))
    texts = ["short", "a much longer prompt than the first"]
    pad = left.tokenizer.pad_token_id
    assert left(text=texts)["input_ids"][0, 0] == pad
    assert unset(text=texts)["input_ids"][0, 0] == pad  # generation default: left
    assert right(text=texts)["input_ids"][0, -1] == pad
    assert right(text=texts, padding_side="left")["input_ids"][0, 0] == pad
    assert left(text=texts, padding_side="right")["attention_mask"][0, -1] == 0
    padded = left(text=texts, padding="max_length", max_length=40)
    assert padded["input_ids"].shape == (2, 40)
    lists = left(text=texts, padding=False, return_tensors=None)
    assert [len(r) for r in lists["input_ids"]] == [len(m) for m in lists["attention_mask"]]
    with pytest.raises(ConfigError, match="padding=True"):
        left(text=texts, padding=False)
    with pytest.raises(ConfigError, match="padding_side"):
        left(text=texts, padding_side="middle")


def test_to_moves_and_casts_only_floating_tensors(processor):
    batch = processor(image(64, 64), PROMPT).to("cpu", torch.bfloat16)
    assert batch.pixel_values.dtype == torch.bfloat16
    assert batch.input_ids.dtype == batch.image_sizes.dtype == batch.attention_mask.dtype == torch.long


def test_truncation_never_cuts_an_image(processor):
    batch = processor(image(336, 336), PROMPT)
    length = batch["input_ids"].shape[1]
    last_image = int((batch["input_ids"][0] == IMAGE_TOKEN_INDEX).nonzero().max()) + 1
    cut = processor(image(336, 336), PROMPT, truncation=True, max_length=last_image + 2)
    assert cut["input_ids"].shape[1] == last_image + 2 < length
    with pytest.raises(ContextLengthError, match=f"at least {last_image} tokens"):
        processor(image(336, 336), PROMPT, truncation=True, max_length=last_image - 10)


# ------------------------------------------------------------------------------------------ bad input
def test_placeholder_and_image_counts_must_agree(processor):
    with pytest.raises(ImageError, match=r"holds 1 <image> placeholder.*2 image"):
        processor([image(10, 10), image(20, 20)], PROMPT)
    with pytest.raises(ImageError, match=r"holds 2 <image> placeholder.*but 1 image"):
        processor([image(10, 10)], [PROMPT, PROMPT])
    with pytest.raises(ImageError, match=r"prompt 1 holds 1 <image> placeholder\(s\) but 0 image"):
        processor([[image(10, 10)], []], [PROMPT, PROMPT])
    with pytest.raises(ImageError, match="2 lists"):
        processor([[image(10, 10)], [image(10, 10)]], [PROMPT])
    with pytest.raises(ImageError, match="holds 1 <image>"):
        processor(text=PROMPT)


def test_images_come_first(processor):
    with pytest.raises(ConfigError, match="images come first"):
        processor(PROMPT, image(10, 10))


def test_image_errors_name_the_image(processor, tmp_path):
    with pytest.raises(ImageError, match="image 1 has size 0x5"):
        processor([image(8, 8), np.zeros((0, 5, 3), np.uint8)], "<image><image>")
    missing = tmp_path / "missing.png"
    with pytest.raises(OSError, match="image 0 .*missing.png.*no such file"):
        processor(str(missing), PROMPT)


# ------------------------------------------------------------------------------------------ loading checks
def test_the_image_token_must_map_to_the_models_id(checkpoint, tmp_path):
    folder = tmp_path / "wrong-id"
    shutil.copytree(checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_token_index"] = 300
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"'<image>' has id 320.*image_token_index is 300"):
        load_processor(folder)


def test_special_tokens_are_checked(tmp_path):
    folder = write_processor_folder(tmp_path / "pad-is-image", layout="v5", tokenizer_overrides={"pad_token": "<image>"})
    with pytest.raises(TokenizerError, match=r"pad_token has the image token's id 320.*bos_token='<s>' \(id 1\)"):
        load_processor(folder)
    (folder / "config.json").write_text(json.dumps({"pad_token_id": 5}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["pad_token"] = "<pad>"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(TokenizerError, match="pad_token_id=5"):
        load_processor(folder)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        load_processor(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or folder, and not a hub id"):
        load_processor(tmp_path / "absent")
    tiny_backend().save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="no config.json and no image settings"):
        load_processor(tmp_path)
    assert load_tokenizer(tmp_path / "tokenizer.json").token_to_id("<image>") == IMAGE_TOKEN_INDEX


def test_an_original_llava_folder_with_only_tokenizer_model(tmp_path):
    """tokenizer.model alone (no tokenizer_config.json) and no <image>: Llama's special-token defaults apply and
    the image token is added at the next free id, which must be the model's."""
    from importlib import resources

    folder = tmp_path / "original"
    folder.mkdir()
    shutil.copyfile(str(resources.files("mistral_common").joinpath("data/tokenizer.model.v1")), folder / "tokenizer.model")
    write_processor_folder(tmp_path / "settings", layout="hub")
    shutil.copyfile(tmp_path / "settings" / "preprocessor_config.json", folder / "preprocessor_config.json")
    shutil.copyfile(tmp_path / "settings" / "processor_config.json", folder / "processor_config.json")
    processor = load_processor(folder, image_token_index=32000)
    batch = processor(image(336, 336), PROMPT)
    assert batch["input_ids"][0, 0] == 1 and int((batch["input_ids"] == 32000).sum()) == processor.num_image_tokens((336, 336))
    with pytest.raises(TokenizerError, match="missing from the vocabulary.*image_token_index is 40000"):
        load_processor(folder, image_token_index=40000)


def test_chat_template_loaded_images_by_path_url_and_object(processor, tmp_path):
    picture = image(120, 90, 7)
    picture.save(tmp_path / "a.png")
    conversations = [
        [{"role": "user", "content": [{"type": "image", "url": (tmp_path / "a.png").as_uri()}, {"type": "text", "text": "A?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "B?"}]}],
    ]
    batch = processor.apply_chat_template(conversations, tokenize=True, return_dict=True)
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    with pytest.raises(ImageError, match="message 0 has an image part without"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True)



def test_saving_the_model_keeps_its_processor(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path).processor
    batch = processor([image(300, 200, 8)], PROMPT)
    for key, value in again([image(300, 200, 8)], PROMPT).items():
        assert torch.equal(value, batch[key]), key
    assert again.chat_template.source == processor.chat_template.source


def test_arrays_tensors_and_paths_give_the_same_batch(processor, tmp_path):
    picture = image(120, 90, 9)
    picture.save(tmp_path / "p.png")
    hwc = np.asarray(picture)
    expected = processor(picture, PROMPT)
    for value, options in [
        (hwc, {}), (torch.from_numpy(hwc.copy()), {}), (hwc.transpose(2, 0, 1).copy(), {"channels_first": True}),
        (tmp_path / "p.png", {}), (str(tmp_path / "p.png"), {}),
    ]:
        result = processor(value, PROMPT, **options)
        assert torch.equal(result["pixel_values"], expected["pixel_values"])
        assert torch.equal(result["input_ids"], expected["input_ids"])
    with pytest.raises(ImageError, match="looks channels-first"):
        processor(hwc.transpose(2, 0, 1).copy(), PROMPT)
