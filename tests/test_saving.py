"""save_pretrained: the llava-hf layout transformers loads with identical logits, the llavakit layout for
assemblies transformers cannot express, saving over the loaded folder, processor files, and `llavakit convert`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llavakit.core.errors import ConfigError
from llavakit.registry import build_model, load_model
from llavakit.registry.cli import main
from llavakit.registry.saving import parse_size, write_safetensors
from tiny import IMAGE_TOKEN_INDEX, PAD_TOKEN_ID, save_original_llava, save_tiny_llava_hf, write_safetensors_shards
from tiny_processor import tiny_backend, write_processor_folder

TOLERANCE = 1e-4
IMAGE_SIZE = (899, 1024)


def logits_with_image(model, *, transformers: bool = False, image_token: int = IMAGE_TOKEN_INDEX, seed: int = 0):
    """Logits of one prompt with a 899x1024 image, from our model or a transformers one (same inputs)."""
    generator = torch.Generator().manual_seed(seed)
    count = 2634  # the facts file's worked value for 899x1024 on 336-px tiles
    ids = torch.cat([torch.randint(3, 300, (1, 4), generator=generator), torch.full((1, count), image_token),
                     torch.randint(3, 300, (1, 3), generator=generator)], dim=1)
    pixel_values = torch.randn(1, 5, 3, 336, 336, generator=generator)
    sizes = torch.tensor([IMAGE_SIZE])
    with torch.no_grad():
        if transformers:
            return model(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes).logits
        return model(ids, pixel_values=pixel_values, image_sizes=sizes).logits


def tiny_assembly(projector: str = "mlp2x-gelu", *, vocab_size: int = 384, image_token_index: int = IMAGE_TOKEN_INDEX):
    """A randomly initialised tiny model of the mistral-7b preset's family (widths shrunk)."""
    return build_model(
        "clip-vit", "mistral-7b", projector,
        vision_options=dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=336, patch_size=14),
        llm_options=dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=vocab_size),
        image_token_index=image_token_index, seed=0,
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source")
    return folder, save_tiny_llava_hf(folder, "llama-gqa", seed=11)


@pytest.mark.parametrize("max_shard_size", ["5GB", "120KB"], ids=["single", "sharded"])
def test_saved_llava_hf_folder_loads_in_transformers_with_identical_logits(tmp_path, tiny_checkpoint, max_shard_size):
    from transformers import LlavaNextForConditionalGeneration

    _, reference = tiny_checkpoint
    model = load_model(tiny_checkpoint[0])
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    shards = sorted(tmp_path.glob("*.safetensors"))
    if max_shard_size == "120KB":
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    else:
        assert [p.name for p in shards] == ["model.safetensors"]
    with safe_open(str(shards[0]), "pt") as handle:  # the hub layout, readable by every transformers version
        assert all(k.startswith(("language_model.", "vision_tower.vision_model.", "multi_modal_projector.", "image_newline"))
                   for k in handle.keys())
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    expected = logits_with_image(reference, transformers=True)
    assert torch.equal(logits_with_image(reloaded, transformers=True), expected)
    assert (logits_with_image(load_model(tmp_path)) - expected).abs().max().item() < TOLERANCE


def test_assembled_preset_model_saves_for_transformers(tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    model = tiny_assembly(vocab_size=32064, image_token_index=32000)  # the preset's vocabulary and ids
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["model_type"] == "mistral" and config["text_config"]["pad_token_id"] == 32001
    assert config["image_token_index"] == 32000
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    theirs = logits_with_image(reloaded, transformers=True, image_token=32000)
    diff = (theirs - logits_with_image(model, image_token=32000)).abs().max().item()
    assert diff < TOLERANCE


@pytest.mark.parametrize("max_shard_size", ["5GB", "60KB"], ids=["single", "sharded"])
def test_llavakit_layout_round_trip(tmp_path, max_shard_size):
    model = tiny_assembly("mlp3x-gelu")  # three projector layers: not expressible by transformers
    with pytest.raises(ConfigError, match="not a two-layer GELU MLP.*layout='llavakit'"):
        model.save_pretrained(tmp_path, layout="llava-hf")
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    document = json.loads((tmp_path / "llavakit.json").read_text())
    assert document["format"] == "llavakit" and document["model"]["projector"]["name"] == "mlp3x-gelu"
    assert not (tmp_path / "config.json").exists()
    if max_shard_size == "60KB":
        assert document["model"]["llm"]["weights"] == "llm.safetensors.index.json"
        assert len(list(tmp_path.glob("llm-*-of-*.safetensors"))) > 1
    reloaded = load_model(tmp_path)
    assert reloaded.config.projector.name == "mlp3x-gelu"
    assert reloaded.untrained == model.untrained == {"vision", "projector", "tiler", "llm"}
    assert torch.equal(logits_with_image(reloaded), logits_with_image(model))


def test_saving_over_the_loaded_folder_is_safe_and_removes_stale_files(tmp_path):
    reference = save_tiny_llava_hf(tmp_path, "mistral", seed=2, max_shard_size="100KB")
    stale = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(stale) > 1
    model = load_model(tmp_path)  # zero-copy: its weights are the pages of the files about to be replaced
    expected = logits_with_image(reference, transformers=True)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert (logits_with_image(model) - expected).abs().max().item() < TOLERANCE
    assert (logits_with_image(load_model(tmp_path)) - expected).abs().max().item() < TOLERANCE
    model.save_pretrained(tmp_path, layout="llavakit")  # switching layouts leaves no llava-hf files behind
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits_with_image(load_model(tmp_path)), logits_with_image(model))


def test_processor_files_travel_with_the_model(tmp_path):
    folder = tmp_path / "with-processor"
    save_tiny_llava_hf(folder, "mistral", seed=4)
    write_processor_folder(folder, layout="hub")
    model = load_model(folder)
    assert model.processor is not None
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").exists()
    reloaded = load_model(tmp_path / "saved").processor
    text = ["<image>\nWhat is shown in this image?"]
    assert reloaded.tokenizer.encode_batch(text) == model.processor.tokenizer.encode_batch(text)
    assert reloaded.num_image_tokens((480, 640)) == model.processor.num_image_tokens((480, 640))


def test_processor_files_are_copied_when_the_processor_cannot_save_itself(tmp_path):
    folder = tmp_path / "with-processor"
    save_tiny_llava_hf(folder, "mistral", seed=4)
    write_processor_folder(folder, layout="hub")
    model = load_model(folder)
    model.processor = None
    model.save_pretrained(tmp_path / "saved")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        assert (tmp_path / "saved" / name).read_bytes() == (folder / name).read_bytes()


def stock_tokenizer():
    """The tiny tokenizer without its <image> and <pad> tokens (like an original LLaVA tokenizer)."""
    from tokenizers import Tokenizer

    data = json.loads(tiny_backend().to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<image>", "<pad>")]
    return Tokenizer.from_str(json.dumps(data))


def test_convert_original_llava_to_llava_hf(tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import LlavaNextForConditionalGeneration

    source = tmp_path / "original"
    reference = save_original_llava(source, "mistral", seed=6)
    # Make it a stock vocabulary: 320 rows, no <image>/<pad>.
    state = load_file(source / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:320].contiguous()
    write_safetensors_shards(source, state)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 320, "pad_token_id": None}))
    stock_tokenizer().save(str(source / "tokenizer.json"))

    assert main(["convert", str(source), str(tmp_path / "hf"), "--max-shard-size", "100KB"]) == 0
    report = capsys.readouterr().out
    assert "wrote the llava-hf layout" in report and "<image> (id 320), <pad> (id 321)" in report
    assert "rows 320..383 initialised to the mean row" in report

    converted = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert converted.config.image_token_index == 320 and converted.config.text_config.vocab_size == 384
    embedding = converted.get_input_embeddings().weight
    assert torch.allclose(embedding[320:], embedding[:320].mean(dim=0).expand(64, -1))
    # Image features are unaffected by the new rows; logits over the original vocabulary are unchanged.
    ours = logits_with_image(converted, transformers=True)[..., :320]
    theirs = logits_with_image(reference, transformers=True)[..., :320]
    assert (ours - theirs).abs().max().item() < TOLERANCE
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert tokenizer.token_to_id("<image>") == IMAGE_TOKEN_INDEX and tokenizer.token_to_id("<pad>") == PAD_TOKEN_ID


def test_convert_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "llavakit convert: error:" in capsys.readouterr().err


def test_written_safetensors_are_aligned_and_readable(tmp_path):
    tensors = {
        "half": torch.arange(3, dtype=torch.bfloat16),  # odd byte count first by name...
        "int": torch.tensor([1, 2, 3], dtype=torch.int64),
        "float": torch.randn(2, 3),
        "scalar": torch.tensor(2.5),
        "flag": torch.tensor([True, False]),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors)
    with open(tmp_path / "x.safetensors", "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    assert (8 + header_length) % 8 == 0
    for key, info in header.items():
        if key != "__metadata__":
            assert info["data_offsets"][0] % tensors[key].element_size() == 0  # ...yet every tensor is aligned
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        for key, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(key), tensor)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 mb") == 500 * 10**6
    assert parse_size(1234) == 1234
    with pytest.raises(ConfigError, match="expected bytes or a size"):
        parse_size("five gigs")


def test_open_clip_tower_assembly_round_trips_through_the_llavakit_layout(tmp_path):
    """An open_clip tower is a plugin transformers cannot express: saved per component, read back exactly."""
    model = build_model(
        "open_clip:ViT-B-32", "llama", image_token_index=IMAGE_TOKEN_INDEX, seed=0,
        llm_options=dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, vocab_size=384),
    )
    model.save_pretrained(tmp_path)
    document = json.loads((tmp_path / "llavakit.json").read_text())
    assert document["model"]["vision"]["name"] == "open_clip:ViT-B-32"
    reloaded = load_model(tmp_path)
    size = (480, 640)
    ids = torch.cat([torch.randint(3, 300, (1, 4)), torch.full((1, model.num_image_tokens(size)), IMAGE_TOKEN_INDEX)], dim=1)
    pixel_values = torch.randn(1, model.tiler.num_tiles(size), 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, pixel_values=pixel_values, image_sizes=torch.tensor([size])).logits
        assert torch.equal(reloaded(ids, pixel_values=pixel_values, image_sizes=torch.tensor([size])).logits, expected)
