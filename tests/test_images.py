"""Image loading policy (modes, EXIF, limits, arrays) and the strip-parallel resize's identity with PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llavakit.core.errors import ImageError, ImageFileError
from llavakit.core import images
from llavakit.core.images import load_image, parallel_map, resize_chw
from llavakit.core.resample import PRECISION_BITS, coefficients
from llavakit.core.types import ImageSize


def rgb_noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ resize
RESIZE_CASES = [
    ((768, 1024), (336, 336)), ((768, 1024), (504, 672)), ((1000, 100), (336, 336)), ((2000, 50), (1008, 26)),
    ((64, 64), (336, 672)), ((1, 1), (336, 336)), ((5, 700), (336, 336)), ((337, 673), (336, 671)),
    ((1080, 1920), (378, 672)), ((300, 200), (336, 224)), ((900, 120), (900, 336)), ((120, 900), (336, 900)),
    ((700, 500), (700, 500)), ((3000, 2000), (1008, 672)),
]


@pytest.fixture(params=["numba", "pil"])
def resize_path(request, monkeypatch):
    """Both implementations: the vectorised kernels and the PIL fallback used without numba."""
    if request.param == "numba":
        assert images.kernels() is not None, "numba is a dependency; the vectorised path must be available"
    else:
        monkeypatch.setattr(images, "kernels", lambda: None)
    return request.param


@pytest.mark.parametrize(("source", "target"), RESIZE_CASES)
def test_resize_is_pils_bicubic_byte_for_byte(resize_path, source, target):
    image = Image.fromarray(rgb_noise(*source, seed=sum(source)))
    expected = np.asarray(image.resize((target[1], target[0]), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    (result,) = resize_chw(image, [ImageSize(*target)])
    assert result.shape == expected.shape and np.array_equal(result, expected)


@given(
    height=st.integers(1, 700), width=st.integers(1, 700), out_height=st.integers(1, 700), out_width=st.integers(1, 700),
)
@settings(max_examples=60, deadline=None)
def test_resize_matches_pil_on_random_sizes(height, width, out_height, out_width):
    image = Image.fromarray(rgb_noise(height, width, seed=height * 7 + width))
    expected = np.asarray(image.resize((out_width, out_height), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(resize_chw(image, [ImageSize(out_height, out_width)])[0], expected)


def test_several_sizes_share_one_input_and_work_inside_pool_workers():
    pictures = [Image.fromarray(rgb_noise(400 + 37 * i, 300 + 11 * i, seed=i)) for i in range(4)]
    sizes = [ImageSize(336, 336), ImageSize(504, 336), ImageSize(120, 900)]
    results = parallel_map(lambda picture: resize_chw(picture, sizes), pictures)
    for picture, resized in zip(pictures, results):
        for size, result in zip(sizes, resized):
            expected = np.asarray(picture.resize((size.width, size.height), Image.Resampling.BICUBIC))
            assert np.array_equal(result, expected.transpose(2, 0, 1))


def test_coefficients_are_pils_fixed_point_weights():
    """Each output's 22-bit weights sum to 2**22 within rounding, start where PIL's window starts."""
    bounds, weights = coefficients(1024, 336)
    assert weights.dtype == np.int32 and bounds[0, 0] == 0 and bounds[-1].sum() == 1024
    assert np.all(np.abs(weights.sum(axis=1) - (1 << PRECISION_BITS)) <= weights.shape[1])


# ------------------------------------------------------------------------------------------ modes
def test_rgb_images_pass_through_unchanged():
    image = Image.fromarray(rgb_noise(20, 30))
    assert load_image(image) is image


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "YCbCr", "HSV", "1"])
def test_opaque_modes_use_pils_conversion(mode):
    source = Image.fromarray(rgb_noise(16, 24)).convert(mode)
    result = load_image(source)
    assert result.mode == "RGB" and result.size == (24, 16)
    assert result.tobytes() == source.convert("RGB").tobytes()


def rgba_image(mode: str) -> Image.Image:
    rgba = np.concatenate([rgb_noise(16, 24), np.random.default_rng(1).integers(0, 256, (16, 24, 1), dtype=np.uint8)], -1)
    rgba[0, 0, 3] = 0  # fully transparent: must come out white
    return Image.fromarray(rgba).convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_composited_on_white_as_transformers_does(mode):
    from transformers.image_transforms import convert_to_rgb

    source = rgba_image(mode)
    result = np.asarray(load_image(source))
    assert np.array_equal(result, convert_to_rgb(source, return_numpy=True))
    assert tuple(result[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_premultiplied_alpha_is_composited_too(mode):
    """transformers misses the lower-case alpha band of premultiplied modes; llavakit composites them as well."""
    source = rgba_image(mode)
    white = Image.new("RGBA", source.size, (255, 255, 255, 255))
    straight = source.convert("LA" if mode == "La" else "RGBA").convert("RGBA")
    expected = Image.alpha_composite(white, straight).convert("RGB")
    assert load_image(source).tobytes() == expected.tobytes()


def test_palette_with_a_transparent_index_is_composited():
    source = Image.new("P", (4, 4), 1)
    source.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    source.info["transparency"] = 1
    assert np.asarray(load_image(source))[0, 0].tolist() == [255, 255, 255]


def test_wide_grey_is_scaled_to_8_bits():
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    sixteen = Image.fromarray(values)
    assert sixteen.mode == "I;16"
    result = np.asarray(load_image(sixteen))
    assert result[0, :, 0].tolist() == [0, 1, 255, 128]
    assert np.array_equal(np.asarray(load_image(Image.fromarray(values.astype(np.int32)))), result)
    floats = Image.fromarray(np.array([[-5.0, 12.4, 300.0]], dtype=np.float32))
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 12, 255]


def test_unconvertible_mode_names_the_image(monkeypatch):
    """Older Pillows cannot convert every mode (LAB, say); simulate that on this one."""
    convert = Image.Image.convert

    def refuse_lab(self, mode=None, *args, **kwargs):
        if self.mode == "LAB":
            raise ValueError("conversion from LAB to RGB not supported")
        return convert(self, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", refuse_lab)
    with pytest.raises(ImageError, match="image 2: PIL cannot convert mode 'LAB'.*convert it to RGB first"):
        load_image(Image.new("LAB", (4, 4)), label="image 2")


# ------------------------------------------------------------------------------------------ orientation
def test_exif_orientation_is_applied(tmp_path):
    source = Image.fromarray(rgb_noise(10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    source.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (10, 20)  # width and height swapped
    in_memory = Image.open(path)
    assert load_image(in_memory).size == (10, 20)


# ------------------------------------------------------------------------------------------ files
def test_files_paths_and_urls(tmp_path):
    source = Image.fromarray(rgb_noise(12, 9))
    source.save(tmp_path / "a.png")
    for value in (tmp_path / "a.png", str(tmp_path / "a.png"), (tmp_path / "a.png").as_uri()):
        assert load_image(value).tobytes() == source.tobytes()


def test_missing_truncated_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ImageFileError, match=r"image 3 \(.*nope.png\): no such file"):
        load_image(tmp_path / "nope.png", label="image 3")
    buffer = io.BytesIO()
    Image.fromarray(rgb_noise(200, 200)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageFileError, match=r"cut.jpg.*truncated or corrupt") as caught:
        load_image(tmp_path / "cut.jpg")
    assert isinstance(caught.value, OSError)
    (tmp_path / "junk.png").write_bytes(b"definitely not an image")
    with pytest.raises(ImageFileError, match=r"junk.png.*not a readable image"):
        load_image(tmp_path / "junk.png")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (5000, 4000)).save(path)
    with pytest.raises(ImageError, match=r"big.png.*20,000,000 pixels, above the limit of 10,000,000"):
        load_image(path, max_pixels=10_000_000)
    assert load_image(path, max_pixels=None).size == (5000, 4000)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(np.zeros((101, 100, 3), np.uint8), max_pixels=10_000)


def test_zero_size_and_tiny_images():
    with pytest.raises(ImageError, match="has size 0x4"):
        load_image(Image.new("RGB", (4, 0)))
    assert load_image(np.full((1, 1, 3), 7, np.uint8)).size == (1, 1)
    assert load_image(Image.new("RGB", (1, 1))).size == (1, 1)


# ------------------------------------------------------------------------------------------ arrays
def test_arrays_and_tensors_in_each_layout():
    hwc = rgb_noise(10, 20)
    expected = Image.fromarray(hwc).tobytes()
    chw = hwc.transpose(2, 0, 1)
    assert load_image(hwc).tobytes() == expected
    assert load_image(torch.from_numpy(hwc)).tobytes() == expected
    assert load_image(chw, channels_first=True).tobytes() == expected
    assert load_image(torch.from_numpy(chw.copy()), channels_first=True).tobytes() == expected
    grey = hwc[:, :, 0]
    assert load_image(grey).tobytes() == Image.fromarray(grey).convert("RGB").tobytes()
    assert load_image(grey[:, :, None]).tobytes() == Image.fromarray(grey).convert("RGB").tobytes()


def test_ambiguous_and_invalid_arrays_are_refused():
    with pytest.raises(ImageError, match=r"shape \(3, 10, 20\) looks channels-first.*channels_first=True"):
        load_image(np.zeros((3, 10, 20), np.uint8))
    assert load_image(np.zeros((3, 10, 4), np.uint8)).size == (10, 3)  # HWC unless told otherwise
    assert load_image(np.zeros((3, 10, 4), np.uint8), channels_first=True).size == (4, 10)
    with pytest.raises(ImageError, match="must be uint8"):
        load_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageError, match="must be uint8"):
        load_image(torch.zeros(10, 10, 3))
    with pytest.raises(ImageError, match=r"7 channels in an array of shape \(10, 10, 7\); use 1, 3 or 4"):
        load_image(np.zeros((10, 10, 7), np.uint8))
    with pytest.raises(ImageError, match="pass a batch as a list"):
        load_image(np.zeros((2, 10, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="unsupported image type int"):
        load_image(5)


def test_the_pool_works_in_a_forked_child():
    """DataLoader workers fork after the parent used the pool; the child must not wait on threads it lacks."""
    import multiprocessing

    picture = Image.fromarray(rgb_noise(300, 400))
    expected = resize_chw(picture, [ImageSize(336, 336), ImageSize(336, 448)])[0].tobytes()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result = pool.apply_async(_resize_in_child, (picture,)).get(timeout=60)
    assert result == expected


def _resize_in_child(picture):
    return resize_chw(picture, [ImageSize(336, 336), ImageSize(336, 448)])[0].tobytes()
