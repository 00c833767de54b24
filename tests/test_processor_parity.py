"""Parity with transformers' ``LlavaNextProcessor`` + ``LlavaNextImageProcessorPil`` (the reference path).

Both llava-hf folder layouts are written by hand (published-repo and transformers-5 files), read by
``load_processor`` and, independently, by transformers; ``input_ids``, ``attention_mask`` and ``image_sizes``
must be identical and ``pixel_values`` within 1e-4. The real llava-v1.6-mistral tokenizer is compared too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.registry import load_processor
from llavakit.registry.processing import convert_sentencepiece, load_tokenizer
from tiny_processor import transformers_processor, write_processor_folder

#: (height, width): the issue's six, a photo, the facts file's worked sizes, sub-patch and thin extremes.
PARITY_SIZES = [
    (1000, 100), (2000, 50), (336, 336), (300, 200), (110, 352), (64, 64),
    (768, 1024), (899, 1024), (1080, 1920), (1, 1), (5, 700), (337, 673),
]
PIXEL_TOLERANCE = 1e-4

PROMPTS = [
    "[INST] <image>\nWhat is shown in this image? [/INST]",
    "USER: <image> <image>\nCompare the two images. ASSISTANT:",
    "A text-only prompt, no image at all: émoji 🙂 and bytes \x07 and\ttabs.",
    "<image><image>\n<image>\nDescribe the picture in detail.",
]


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Noise plus a gradient: noise makes any resize difference visible, the gradient gives structure."""
    height, width = size
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.int32)
    ramp = np.linspace(0, 255, width, dtype=np.int32)[None, :, None]
    return Image.fromarray(((noise + ramp) // 2).astype(np.uint8))


@pytest.fixture(scope="module", params=["hub", "v5"])
def folder(request, tmp_path_factory):
    return write_processor_folder(tmp_path_factory.mktemp(f"processor-{request.param}"), layout=request.param)


@pytest.fixture(scope="module")
def processors(folder):
    return load_processor(folder), transformers_processor(folder)


def assert_same_batch(ours, theirs) -> None:
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for key in ("input_ids", "attention_mask", "image_sizes"):
        if key in theirs:
            assert torch.equal(ours[key], theirs[key]), key
    if "pixel_values" in theirs:
        assert ours["pixel_values"].shape == theirs["pixel_values"].shape
        assert ours["pixel_values"].dtype == theirs["pixel_values"].dtype == torch.float32
        diff = (ours["pixel_values"] - theirs["pixel_values"]).abs().max().item()
        assert diff < PIXEL_TOLERANCE, f"pixel values differ by {diff}"


def test_each_image_size_alone(processors):
    ours, theirs = processors
    for index, size in enumerate(PARITY_SIZES):
        image = random_image(size, seed=index)
        prompt = PROMPTS[0]
        assert_same_batch(ours(image, prompt), theirs(images=image, text=prompt, return_tensors="pt"))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_mixed_sizes_and_prompts(processors, padding_side):
    ours, theirs = processors
    images = [random_image(size, seed=10 + i) for i, size in enumerate(PARITY_SIZES[:6])]
    expected = theirs(images=images, text=PROMPTS, return_tensors="pt", padding=True, padding_side=padding_side)
    result = ours(images, PROMPTS, padding_side=padding_side)
    assert_same_batch(result, expected)
    # One list per prompt means the same thing as the flat list in placeholder order.
    nested = [images[:1], images[1:3], [], images[3:]]
    assert_same_batch(ours(nested, PROMPTS, padding_side=padding_side), expected)


def test_text_only_and_images_only(processors):
    ours, theirs = processors
    assert_same_batch(ours(text=PROMPTS[2]), theirs(text=PROMPTS[2], return_tensors="pt"))
    image = random_image((480, 640), seed=3)
    images_only = ours(image)
    reference = theirs.image_processor(image, return_tensors="pt")
    assert torch.equal(images_only["image_sizes"], reference["image_sizes"])
    assert (images_only["pixel_values"] - reference["pixel_values"]).abs().max() < PIXEL_TOLERANCE


def test_chat_template_and_tokenized_conversation(processors, tmp_path):
    ours, theirs = processors
    image = random_image((300, 200), seed=5)
    path = tmp_path / "cat.png"
    image.save(path)
    conversation = [
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
    ]
    assert ours.apply_chat_template(conversation) == theirs.apply_chat_template(conversation)
    expected = theirs.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    result = ours.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert_same_batch(result, expected)
    ids = ours.apply_chat_template(conversation, tokenize=True)
    assert torch.equal(ids, expected["input_ids"])


def test_decode_matches(processors):
    ours, theirs = processors
    ids = theirs.tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[0], skip_special_tokens=skip) == theirs.decode(ids[0], skip_special_tokens=skip)


# ------------------------------------------------------------------------ the real mistral tokenizer
MISTRAL_TEXTS = [
    "[INST] <image>\nWhat is shown in this image? [/INST]",
    "<s>[INST] already has a BOS [/INST] answer </s>",
    "  leading spaces, trailing spaces  ",
    "Multi\n\nline\ttext with ünïcödé, 中文, and 🙂🙃.",
    "<image><image>\n<pad>literal special tokens",
]


def test_mistral_tokenizer_ids_match_transformers(mistral_tokenizer_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))
    ours = load_tokenizer(mistral_tokenizer_dir)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 32001)
    assert ours.token_to_id("<image>") == 32000
    for text in MISTRAL_TEXTS:
        expected = reference(text)["input_ids"]
        assert ours.encode_batch([text])[0] == expected, text
        assert ours.decode(expected, skip_special_tokens=True) == reference.decode(expected, skip_special_tokens=True)


def test_sentencepiece_model_converts_like_transformers(mistral_tokenizer_dir):
    """An original-LLaVA folder has only tokenizer.model: the in-memory conversion must tokenize like
    transformers' conversion of the same file (the fixture folder is that conversion)."""
    from importlib import resources

    from transformers import AutoTokenizer

    model_file = resources.files("mistral_common").joinpath("data/tokenizer.model.v1")
    backend = convert_sentencepiece(model_file)
    reference = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))
    for text in MISTRAL_TEXTS[1:4]:
        assert backend.encode(text, add_special_tokens=False).ids == reference(text, add_special_tokens=False)["input_ids"]


def test_a_saved_processor_reads_back_identically_in_both_libraries(processors, tmp_path):
    ours, _ = processors
    ours.save_pretrained(tmp_path)
    again, theirs = load_processor(tmp_path), transformers_processor(tmp_path)
    images = [random_image(size, seed=20 + i) for i, size in enumerate(PARITY_SIZES[:6])]
    expected = ours(images, PROMPTS)
    assert_same_batch(again(images, PROMPTS), expected)
    assert_same_batch(theirs(images=images, text=PROMPTS, return_tensors="pt", padding=True), expected)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert again.apply_chat_template(conversation) == theirs.apply_chat_template(conversation)


def test_real_mistral_vocabulary_with_images(mistral_tokenizer_dir, tmp_path):
    """The llava-v1.6-mistral tokenizer (<image> = 32000) in a hub-layout folder, images and chat template."""
    import shutil

    folder = write_processor_folder(tmp_path / "mistral", layout="hub")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(mistral_tokenizer_dir / name, folder / name)
    ours, theirs = load_processor(folder, image_token_index=32000), transformers_processor(folder)
    images = [random_image(size, seed=40 + i) for i, size in enumerate([(899, 1024), (480, 640), (64, 64)])]
    prompts = [PROMPTS[0], "[INST] <image><image>\nCompare them. [/INST]"]
    assert_same_batch(ours(images, prompts), theirs(images=images, text=prompts, return_tensors="pt", padding=True))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    assert ours.apply_chat_template(conversation) == theirs.apply_chat_template(conversation)
