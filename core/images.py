"""Image inputs: what the processor accepts, how it becomes RGB, and the resize every tiler shares.

Accepted inputs are PIL images, file paths (``str`` or ``pathlib.Path``; ``http(s)://`` and ``file://`` URLs
too), and uint8 arrays or tensors. Every one goes through the same policy before tiling:

- **Size limits.** Images with a zero side are refused, as are images above ``max_pixels``
  (:data:`DEFAULT_MAX_PIXELS`, PIL's own decompression-bomb threshold of 89,478,485 pixels, about
  9459 x 9459); files are checked from their header, before any pixel is decoded. Images smaller than a
  patch are fine: the tiler scales them up.
- **Orientation.** The EXIF orientation tag is applied (a phone photo shot in portrait is upright).
- **Colour.** Images with transparency (an alpha band: ``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``; or a
  ``transparency`` entry: palette and ``L``/``RGB`` images with a tRNS chunk) are composited on white, as
  transformers does (which, unlike llavakit, reads the premultiplied ``La``/``RGBa`` as opaque). 16-bit and
  32-bit integer grey (``I;16*``, ``I``) are scaled to 8 bits (``round(v / 257)``, clipped); float grey
  (``F``) is read as 0-255 and clipped; ``1`` (bilevel) becomes 0/255; ``L``, ``P``, ``CMYK`` (no colour
  management), ``YCbCr`` and ``HSV`` use PIL's conversion.
- **Arrays and tensors** must be uint8: height x width (grey), or height x width x channels with 1, 3 or 4
  channels; ``channels_first=True`` reads channels x height x width. Without it, arrays are read as HWC, and
  one that only makes sense as CHW (3 x 480 x 640, say) is refused with a hint rather than guessed.

Errors about values are :class:`~llavakit.core.errors.ImageError` (a ``ValueError``); errors about files are
:class:`~llavakit.core.errors.ImageFileError` (an ``OSError``). Both name the image (its index in the call and
its file) and say what to do.

:func:`resize_chw` reproduces PIL's ``BICUBIC`` resize byte for byte, several times faster: PIL's fixed-point
passes run as vectorised numba kernels (:mod:`llavakit.core.resample`) on all cores, in the order PIL picks.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from llavakit.core.errors import ImageError, ImageFileError
from llavakit.core.resample import coefficients, kernels
from llavakit.core.types import ImageSize

#: Images with more pixels than this are refused (PIL's ``Image.MAX_IMAGE_PIXELS`` default).
DEFAULT_MAX_PIXELS = 89_478_485

#: What the processor accepts as one image.
ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]

URL_TIMEOUT_S = 30
EXIF_ORIENTATION = 0x0112
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(
    image: ImageInput,
    *,
    label: str = "image",
    channels_first: bool | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Turn any accepted image input into an upright RGB PIL image, applying the policy above.

    ``label`` names the image in error messages (``"image 3"``); a file's path is added to it.
    ``max_pixels=None`` lifts the pixel limit.
    """
    if isinstance(image, Image.Image):
        _check_size(image.height, image.width, label, max_pixels)
        return to_rgb(upright(image), label)
    if isinstance(image, (str, os.PathLike)):
        return to_rgb(upright(open_image(image, label=label, max_pixels=max_pixels)), label)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return array_to_image(image, label=label, channels_first=channels_first, max_pixels=max_pixels)
    raise ImageError(
        f"{label}: unsupported image type {type(image).__name__}; pass a PIL image, a file path or URL, or a "
        "uint8 array/tensor"
    )


def _check_size(height: int, width: int, label: str, max_pixels: int | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"{label} has size {height}x{width} (height x width); every image needs at least 1x1 pixels")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageError(
            f"{label} has {height}x{width} = {height * width:,} pixels, above the limit of {max_pixels:,} "
            "(a guard against decompression bombs); downscale it first, or pass a larger max_image_pixels if you "
            "trust the source"
        )


def open_image(source: str | os.PathLike, *, label: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and fully decode an image file or URL; the size limit is checked before decoding."""
    text = os.fspath(source)
    scheme = urllib.parse.urlparse(text).scheme if isinstance(text, str) else ""
    if scheme in ("http", "https"):
        where = f"{label} ({text})"
        try:
            with urllib.request.urlopen(text, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
        except OSError as err:
            raise ImageFileError(f"{where}: could not download the image: {err}") from err
    else:
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(text).path)) if scheme == "file" else Path(text)
        path = path.expanduser()
        where = f"{label} ({path})"
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise ImageFileError(f"{where}: no such file") from err
        except OSError as err:
            raise ImageFileError(f"{where}: cannot read the file: {err}") from err
    return decode_image(data, where=where, max_pixels=max_pixels)


def decode_image(data: bytes, *, where: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes; ``where`` names them in errors."""
    try:
        with warnings.catch_warnings():
            # llavakit applies its own limit below; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"{where}: refused as a decompression bomb by PIL ({err}); raise PIL.Image.MAX_IMAGE_PIXELS as well "
            "as max_image_pixels if you trust the file"
        ) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageFileError(f"{where}: not a readable image ({err}); the file is corrupt or not an image") from err
    _check_size(image.height, image.width, where, max_pixels)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageFileError(
            f"{where}: the image data cannot be decoded ({err}); the file is truncated or corrupt, re-export or "
            "re-download it"
        ) from err
    return image


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if any (without copying images that need no rotation)."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is treated as absent, like most viewers do
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def to_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """Convert any PIL mode to RGB following the module's documented policy."""
    mode = image.mode
    if mode == "RGB" and image.info.get("transparency") is None:
        return image
    if mode in WIDE_GREY_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        if mode in ALPHA_MODES or image.info.get("transparency") is not None:
            # PIL converts premultiplied grey only to LA.
            rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise ImageError(f"{label}: PIL cannot convert mode {mode!r} to RGB ({err}); convert it to RGB first") from err


def array_to_image(
    array: np.ndarray | torch.Tensor,
    *,
    label: str = "image",
    channels_first: bool | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """An RGB PIL image from a uint8 ``HW``, ``HWC`` or (``channels_first=True``) ``CHW`` array or tensor."""
    if isinstance(array, torch.Tensor):
        if array.dtype != torch.uint8:
            raise ImageError(
                f"{label}: image tensors must be uint8 (0-255), got {array.dtype}; for 0-1 floats use "
                "(x * 255).round().to(torch.uint8)"
            )
        array = array.detach().cpu().numpy()
    if array.dtype != np.uint8:
        raise ImageError(
            f"{label}: image arrays must be uint8 (0-255), got {array.dtype}; for 0-1 floats use "
            "(x * 255).round().astype(np.uint8)"
        )
    if array.ndim == 2:
        hwc = array[:, :, None]
    elif array.ndim == 3:
        hwc = array.transpose(1, 2, 0) if _is_channels_first(array.shape, channels_first, label) else array
    else:
        raise ImageError(
            f"{label}: an image array must have 2 (H, W) or 3 (H, W, C) dimensions, got shape {tuple(array.shape)}; "
            "pass a batch as a list of images"
        )
    height, width, channels = hwc.shape
    if channels not in (1, 3, 4):
        raise ImageError(f"{label}: {channels} channels in an array of shape {tuple(array.shape)}; use 1, 3 or 4")
    _check_size(height, width, label, max_pixels)
    hwc = np.ascontiguousarray(hwc)
    if channels == 1:
        return Image.fromarray(hwc[:, :, 0], mode="L").convert("RGB")
    if channels == 3:
        return Image.fromarray(hwc, mode="RGB")
    return to_rgb(Image.fromarray(hwc, mode="RGBA"), label)


def _is_channels_first(shape: Sequence[int], channels_first: bool | None, label: str) -> bool:
    """HWC unless ``channels_first`` says otherwise; an array that only reads as CHW is refused, not guessed."""
    if channels_first is not None:
        return channels_first
    if shape[-1] not in (1, 3, 4) and shape[0] in (1, 3, 4):
        raise ImageError(
            f"{label}: an array of shape {tuple(shape)} looks channels-first (channels, height, width) but arrays "
            "are read as (height, width, channels) by default; pass channels_first=True"
        )
    return False


# ------------------------------------------------------------------------------------------- threads and resize
T = TypeVar("T")
R = TypeVar("R")

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_WORKER = threading.local()


@functools.cache
def num_workers() -> int:
    """Threads used for image work: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _mark_worker() -> None:
    _WORKER.active = True


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(num_workers(), thread_name_prefix="llavakit-images", initializer=_mark_worker)
        return _POOL


def _forget_pool_after_fork() -> None:
    """A forked child (a DataLoader worker, say) inherits the pool object but none of its threads."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere processes are spawned, not forked
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def parallel_map(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(x) for x in items]`` on the shared image thread pool, in order.

    PIL, numpy and the numba kernels release the GIL while they work, so threads use every core. Called from
    inside a pool worker (a tiler splitting one image of a batch the processor already spread over the pool),
    it runs serially instead of waiting on its own pool.
    """
    items = list(items)
    if len(items) <= 1 or num_workers() == 1 or getattr(_WORKER, "active", False):
        return [function(item) for item in items]
    return list(_pool().map(function, items))


def _even_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    step, extra = divmod(length, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + step + (1 if index < extra else 0)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


def _in_chunks(kernel: Callable[..., None], length: int, *args: Any) -> None:
    """Run ``kernel(*args, start, stop)`` over ``[0, length)``, cut in one range per core unless already inside
    a pool worker (the numba kernels release the GIL)."""
    parallel = not getattr(_WORKER, "active", False) and num_workers() > 1 and length >= 2 * num_workers()
    ranges = _even_bounds(length, num_workers()) if parallel else [(0, length)]
    parallel_map(lambda bounds: kernel(*args, *bounds), ranges)


def as_hwc_array(image: Image.Image) -> np.ndarray:
    """A read-only uint8 ``[H, W, 3]`` array of an RGB PIL image (one copy; faster than ``np.asarray``)."""
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.height, image.width, 3)


def resize_chw(image: Image.Image, sizes: Sequence[ImageSize]) -> list[np.ndarray]:
    """uint8 ``[3, h, w]`` arrays (strided views) of an RGB image resized to each ``(h, w)`` in ``sizes`` with
    PIL's ``BICUBIC``: the very bytes ``image.resize((w, h), BICUBIC)`` gives.

    With numba, :mod:`llavakit.core.resample` computes PIL's fixed-point passes vectorised, the transposed input
    is shared by all sizes, and the sizes go to separate cores (a single size has its passes split over them).
    Without numba, PIL resizes (the sizes on separate cores).
    """
    compiled = kernels()
    if compiled is None:
        resized = parallel_map(lambda size: image.resize((size.width, size.height), Image.Resampling.BICUBIC), sizes)
        return [as_hwc_array(r).transpose(2, 0, 1) for r in resized]
    rows = as_hwc_array(image).reshape(image.height, image.width * 3)
    sizes = [ImageSize(*size) for size in sizes]
    # The transposed input ([W, 3H]) is made once for every size that starts with the horizontal pass; then
    # several sizes go to separate cores whole (fewer hand-offs than splitting each pass).
    transposed = _transpose(compiled, rows) if any(_horizontal_first(rows, s) for s in sizes) else None
    resized = parallel_map(lambda size: _resize_rows(compiled, rows, size, transposed), sizes)
    return [r.reshape(size.height, size.width, 3).transpose(2, 0, 1) for r, size in zip(resized, sizes)]


def _horizontal_first(rows: np.ndarray, size: ImageSize) -> bool:
    """Whether PIL starts this resize with the horizontal pass (and there is one)."""
    height, width = rows.shape[0], rows.shape[1] // 3
    if size.width == width:
        return False
    shrink_h, shrink_w = height - size.height, width - size.width
    vertical_first = size.height != height and _pil_runs_vertical_first() and shrink_h > 0 and shrink_h > shrink_w * 2
    return not vertical_first


def _resize_rows(compiled, rows: np.ndarray, size: ImageSize, transposed: np.ndarray | None) -> np.ndarray:
    """``[h, 3w]`` pixel rows of ``rows`` (``[H, 3W]``) resized, the two passes in PIL's order."""
    height, width = rows.shape[0], rows.shape[1] // 3
    if size.width == width:
        return _pass(compiled, rows, size.height) if size.height != height else rows
    if not _horizontal_first(rows, size):
        shortened = _transpose(compiled, _pass(compiled, rows, size.height))
        return _transpose(compiled, _pass(compiled, shortened, size.width))
    narrowed = _transpose(compiled, _pass(compiled, transposed, size.width))
    return _pass(compiled, narrowed, size.height) if size.height != height else narrowed


def _pass(compiled, rows: np.ndarray, out_length: int) -> np.ndarray:
    """One PIL pass along axis 0 of ``[L, M]`` uint8 rows, to ``[out_length, M]``."""
    bounds, weights = coefficients(rows.shape[0], out_length)
    out = np.empty((out_length, rows.shape[1]), dtype=np.uint8)
    _in_chunks(compiled.resample_rows, out_length, rows, bounds, weights, out)
    return out


def _transpose(compiled, rows: np.ndarray) -> np.ndarray:
    """``[A, 3B]`` pixel rows -> ``[B, 3A]``."""
    out = np.empty((rows.shape[1] // 3, rows.shape[0] * 3), dtype=np.uint8)
    _in_chunks(compiled.transpose_pixels, rows.shape[0], rows, out)
    return out


@functools.cache
def _pil_runs_vertical_first() -> bool:
    """Whether this Pillow runs the vertical pass first when the height shrinks more than twice the width
    (Pillow 11+ does; older versions always start horizontally). The pass order changes the 8-bit image
    between the passes, so it is probed once on a small image rather than assumed."""
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 16, 3), dtype=np.uint8))
    whole = probe.resize((12, 16), Image.Resampling.BICUBIC)
    vertical_then_horizontal = probe.resize((16, 16), Image.Resampling.BICUBIC).resize((12, 16), Image.Resampling.BICUBIC)
    return whole.tobytes() == vertical_then_horizontal.tobytes()
