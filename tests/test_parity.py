"""Forward parity with transformers' LlavaNextForConditionalGeneration on tiny random checkpoints.

Each family is saved with transformers' ``save_pretrained`` and loaded by ``llavakit.registry.load_model``
from that folder, so the on-disk format is part of what is tested.
"""

from __future__ import annotations

import pytest
import torch

from llavakit.registry import load_model
from tiny import FAMILIES, IMAGE_TOKEN_INDEX, save_tiny_llava_hf

#: (height, width): tall, square-small, the facts file's float-truncation case, wider than 3:1,
#: a real photo size, tiny, and one that picks the 2x2 grid with odd padding.
IMAGE_SIZES = [(1000, 100), (336, 336), (110, 352), (300, 1000), (899, 1024), (64, 64), (480, 640), (2000, 50)]
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    reference = save_tiny_llava_hf(folder, request.param, seed=7)
    return request.param, folder, reference


def prompt_with_image(num_image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    before = torch.randint(3, 300, (1, 5), generator=generator)
    after = torch.randint(3, 300, (1, 7), generator=generator)
    return torch.cat([before, torch.full((1, num_image_tokens), IMAGE_TOKEN_INDEX), after], dim=1)


def test_logits_match_transformers_for_every_image_size_and_backend(checkpoint):
    family, folder, reference = checkpoint
    models = {backend: load_model(folder, attention=backend) for backend in ("eager", "sdpa", "flash")}
    generator = torch.Generator().manual_seed(0)
    for size in IMAGE_SIZES:
        model = models["sdpa"]
        tiles = model.tiler.num_tiles(size)
        pixel_values = torch.randn(1, tiles, 3, 336, 336, generator=generator)
        input_ids = prompt_with_image(model.num_image_tokens(size), generator)
        image_sizes = torch.tensor([size])
        with torch.no_grad():
            expected = reference(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
            results = {
                backend: m(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
                for backend, m in models.items()
            }
        for backend, logits in results.items():
            diff = (logits - expected).abs().max().item()
            assert diff < TOLERANCE, f"{family} {size} {backend}: max abs logit diff {diff:.2e}"
        for backend in ("eager", "flash"):
            diff = (results[backend] - results["sdpa"]).abs().max().item()
            assert diff < TOLERANCE, f"{family} {size}: {backend} vs sdpa differ by {diff:.2e}"
        # Sanity: the logits carry signal (a constant output would make parity meaningless).
        assert expected.std(dim=1).mean() > 0.1


def test_batch_of_two_images_and_text_only_rows(checkpoint):
    family, folder, reference = checkpoint
    model = load_model(folder)
    generator = torch.Generator().manual_seed(1)
    sizes = [(480, 640), (1000, 100)]
    tiles = max(model.tiler.num_tiles(s) for s in sizes)
    pixel_values = torch.zeros(2, tiles, 3, 336, 336)
    for index, size in enumerate(sizes):
        pixel_values[index, : model.tiler.num_tiles(size)] = torch.randn(
            model.tiler.num_tiles(size), 3, 336, 336, generator=generator
        )
    # Both images in one prompt: the batch dimension of pixel_values counts images, as in transformers.
    first = prompt_with_image(model.num_image_tokens(sizes[0]), generator)
    second = prompt_with_image(model.num_image_tokens(sizes[1]), generator)
    input_ids = torch.cat([first, second], dim=1)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values, image_sizes=torch.tensor(sizes)).logits
        actual = model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=torch.tensor(sizes)).logits
        assert (actual - expected).abs().max().item() < TOLERANCE
        text_only = torch.randint(3, 300, (2, 9), generator=generator)
        assert (model(input_ids=text_only).logits - reference(input_ids=text_only).logits).abs().max() < TOLERANCE


def test_get_image_features_match_transformers(checkpoint):
    _, folder, reference = checkpoint
    model = load_model(folder)
    sizes = [(110, 352), (899, 1024)]
    tiles = max(model.tiler.num_tiles(s) for s in sizes)
    pixel_values = torch.randn(2, tiles, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.get_image_features(pixel_values, torch.tensor(sizes))
        theirs = reference.get_image_features(pixel_values, torch.tensor(sizes)).pooler_output
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-5
