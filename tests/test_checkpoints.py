"""Checkpoint layouts load and match transformers; every bad checkpoint fails with a message naming the file
or tensor. Tiny random models from ``tests/tiny.py`` are written in each real on-disk layout."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from llavakit.core.errors import CheckpointError, ConfigError, StateDictError
from llavakit.registry import load_model
from llavakit.registry.checkpoints import checkpoint_dtype, open_checkpoint
from llavakit.registry.loading import folder_config
from tiny import (
    IMAGE_TOKEN_INDEX,
    VOCAB_SIZE,
    hub_layout_state,
    original_llava_config,
    save_hub_layout,
    save_original_llava,
    save_tiny_llava_hf,
    tiny_hf_model,
    write_safetensors_shards,
)

TOLERANCE = 1e-4
IMAGE_SIZE = (480, 640)
#: An original LLaVA vocabulary has no <image>: its image token is the first id past the vocabulary.
ORIGINAL_IMAGE_TOKEN = VOCAB_SIZE


def assert_same_logits(model, reference, image_token: int = IMAGE_TOKEN_INDEX, seed: int = 0) -> None:
    """Logits of a prompt with one image and of a text-only prompt agree with transformers'."""
    generator = torch.Generator().manual_seed(seed)
    count = model.num_image_tokens(IMAGE_SIZE)
    ids = torch.cat(
        [torch.randint(3, 300, (1, 5), generator=generator), torch.full((1, count), image_token),
         torch.randint(3, 300, (1, 4), generator=generator)], dim=1,
    )
    pixel_values = torch.randn(1, model.tiler.num_tiles(IMAGE_SIZE), 3, 336, 336, generator=generator)
    sizes = torch.tensor([IMAGE_SIZE])
    with torch.no_grad():
        ours = model(ids, pixel_values=pixel_values, image_sizes=sizes).logits
        theirs = reference(
            input_ids=ids.masked_fill(ids == image_token, IMAGE_TOKEN_INDEX), pixel_values=pixel_values, image_sizes=sizes
        ).logits
        assert (ours - theirs).abs().max().item() < TOLERANCE
        assert theirs.std(dim=1).mean() > 0.1  # the logits carry signal
        text = torch.randint(3, 300, (1, 9), generator=generator)
        assert (model(text).logits - reference(input_ids=text).logits).abs().max().item() < TOLERANCE


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """A tiny model saved by transformers (transformers-5 layout), shared by the error tests."""
    folder = tmp_path_factory.mktemp("t5-layout")
    return folder, save_tiny_llava_hf(folder, "mistral", seed=3)


def copy_folder(source, target):
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("layout", ["transformers-5", "hub"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_llava_hf_layouts_match_transformers(tmp_path, layout, sharded):
    folder = tmp_path / "model"
    if layout == "hub":
        reference = save_hub_layout(folder, "llama-gqa", seed=1, num_shards=3 if sharded else 1)
    else:
        reference = save_tiny_llava_hf(folder, "llama-gqa", seed=1, max_shard_size="150KB" if sharded else None)
    shards = list(folder.glob("*.safetensors"))
    assert (folder / "model.safetensors.index.json").exists() == sharded
    assert len(shards) >= 2 if sharded else len(shards) == 1
    model = load_model(folder)
    assert model.untrained == set() and model.untrained_rows == {}
    assert_same_logits(model, reference)


@pytest.mark.parametrize("include_tower", [True, False], ids=["tower-in-checkpoint", "tower-from-mm_vision_tower"])
def test_original_llava_layout_matches_transformers(tmp_path, include_tower):
    folder = tmp_path / "llava-v1.6-tiny"
    reference = save_original_llava(folder, "mistral", seed=2, include_tower=include_tower, num_shards=2)
    model = load_model(folder)
    # The image token has no row in an original vocabulary: image positions are never embedded.
    assert model.image_token_index == ORIGINAL_IMAGE_TOKEN == model.language_model.vocab_size
    assert model.config.vision_feature_layer == -2 and model.config.tiler.name == "anyres"
    assert_same_logits(model, reference, image_token=ORIGINAL_IMAGE_TOKEN)


def test_original_llava_with_a_well_known_tower_needs_no_network(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("network used"))
    model = tiny_hf_model("mistral")
    config = original_llava_config(model, "mistral", vision_tower="openai/clip-vit-large-patch14-336")
    config["mm_hidden_size"] = 1024
    (tmp_path / "config.json").write_text(json.dumps(config))
    resolved = folder_config(tmp_path)
    assert resolved.vision.name == "clip-l336"
    assert resolved.image_token_index == ORIGINAL_IMAGE_TOKEN
    assert resolved.projector.name == "mlp2x-gelu"


def test_original_llava_mm_fields_are_checked(tmp_path):
    folder = tmp_path / "orig"
    save_original_llava(folder, "mistral")
    config = json.loads((folder / "config.json").read_text())
    for field, value, message in [
        ("mm_hidden_size", 48, "mm_hidden_size is 48"),
        ("mm_patch_merge_type", "flat", "spatial_unpad"),
        ("mm_projector_type", "identity", "mm_projector_type 'identity'"),
        ("mm_use_im_start_end", True, "mm_use_im_start_end"),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ConfigError, match=message):
            load_model(folder)


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(CheckpointError, match="qwen2_vl"):
        load_model(tmp_path)


def test_dtype_auto_keeps_the_file_dtype_and_a_dtype_casts(tmp_path):
    reference = tiny_hf_model("mistral", seed=4)
    state = {k: v.to(torch.bfloat16) for k, v in hub_layout_state(reference).items()}
    reference.config.save_pretrained(tmp_path)
    write_safetensors_shards(tmp_path, state)
    assert checkpoint_dtype(open_checkpoint(tmp_path)) == torch.bfloat16
    assert {p.dtype for p in load_model(tmp_path).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(tmp_path, dtype="float32").parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------ bad checkpoints
def test_missing_unexpected_and_misshapen_tensors_raise_one_error(tmp_path, reference_folder):
    source, reference = reference_folder
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    state = hub_layout_state(reference)
    del state["language_model.model.norm.weight"]
    state["multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    state["image_newline"] = torch.zeros(63)
    write_safetensors_shards(folder, state)
    with pytest.raises(StateDictError) as caught:
        load_model(folder)
    message = str(caught.value)
    assert "3 problem(s)" in message
    assert "missing: language_model.model.norm.weight (ours: language_model.norm.weight) [language model]: expected [64]" in message
    assert "unexpected: multi_modal_projector.linear_3.weight" in message
    assert "misshapen: image_newline (ours: tiler.image_newline) [tiler]: expected [64], found [63]" in message


def test_truncated_safetensors_is_named(tmp_path, reference_folder):
    folder = copy_folder(reference_folder[0], tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(folder)
    weights.write_bytes(b"\x00\x00")
    with pytest.raises(CheckpointError, match="too short"):
        load_model(folder)
    weights.write_bytes((64).to_bytes(8, "little") + b"{not json" + b" " * 60)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(folder)


def test_git_lfs_pointer_is_named(tmp_path, reference_folder):
    folder = copy_folder(reference_folder[0], tmp_path / "m")
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n"
    )
    with pytest.raises(CheckpointError, match="Git LFS pointer.*git lfs pull"):
        load_model(folder)


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "m"
    save_hub_layout(folder, "mistral", num_shards=2)
    return folder


def test_absent_shard_is_named(tmp_path, sharded_folder):
    folder = copy_folder(sharded_folder, tmp_path / "m")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard 'model-00002-of-00002.safetensors', which is not in"):
        load_model(folder)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_escaping_the_folder_is_refused(tmp_path, sharded_folder, shard):
    folder = copy_folder(sharded_folder, tmp_path / "m")
    shutil.copy(folder / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
        load_model(folder)


def test_symlinked_shards_of_a_hub_cache_are_fine(tmp_path, sharded_folder):
    """The Hugging Face cache stores shards as symlinks into a blob folder outside the snapshot."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for path in sharded_folder.iterdir():
        shutil.copy(path, blobs / path.name)
        (snapshot / path.name).symlink_to(blobs / path.name)
    assert load_model(snapshot).untrained == set()


def test_pickle_needs_opt_in_and_is_read_weights_only(tmp_path, reference_folder):
    source, reference = reference_folder
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    torch.save(hub_layout_state(reference), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle files are read only with allow_pickle=True"):
        load_model(folder)
    assert_same_logits(load_model(folder, allow_pickle=True), reference)

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"image_newline": RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot be read as a weights-only pickle"):
        load_model(folder, allow_pickle=True)


def test_empty_folder_says_what_is_missing(tmp_path, reference_folder):
    shutil.copy(reference_folder[0] / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


def test_nonexistent_path_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "missing" / "deeper")


# ------------------------------------------------------------------------------------------ hub ids
def test_hub_id_downloads_only_needed_files_at_a_pinned_revision(tmp_path, monkeypatch, reference_folder):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(reference_folder[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("llava-hf/tiny-test", revision="0123abc")
    assert model.source == "llava-hf/tiny-test"
    ((repo, kwargs),) = calls
    assert repo == "llava-hf/tiny-test" and kwargs["revision"] == "0123abc"
    patterns = kwargs["allow_patterns"]
    assert "*.safetensors" in patterns and "config.json" in patterns and "tokenizer.json" in patterns
    assert not any(p.endswith(".bin") for p in patterns)  # no pickle files unless allowed
    assert kwargs["local_files_only"] is False
    load_model("llava-hf/tiny-test@v1.0")
    assert calls[-1][1]["revision"] == "v1.0"


def test_hf_hub_offline_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub

    seen = {}
    original = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        seen.update(kwargs)
        return original(repo_id, cache_dir=str(tmp_path / "empty-cache"), **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("llava-hf/not-cached-anywhere")
    assert seen["local_files_only"] is True


def test_local_folders_never_touch_the_network(monkeypatch, reference_folder):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("network used"))
    load_model(reference_folder[0])


def test_strict_false_tolerates_unexpected_tensors_only(tmp_path, reference_folder):
    source, reference = reference_folder
    shutil.copy(source / "config.json", tmp_path)
    state = hub_layout_state(reference)
    state["language_model.model.layers.0.self_attn.extra_buffer"] = torch.zeros(3)
    write_safetensors_shards(tmp_path, state)
    with pytest.raises(StateDictError, match="unexpected: language_model.model.layers.0.self_attn.extra_buffer"):
        load_model(tmp_path)
    assert_same_logits(load_model(tmp_path, strict=False), reference)
    state["image_newline"] = torch.zeros(63)
    write_safetensors_shards(tmp_path, state)
    with pytest.raises(StateDictError, match="misshapen: image_newline"):
        load_model(tmp_path, strict=False)
