"""PIL's BICUBIC resampling, bit for bit, as vectorised numba kernels.

transformers' PIL path is the pixel reference, and PIL resizes 8-bit images with fixed-point arithmetic:
per output position, coefficients from a bicubic filter (``a = -0.5``) widened by the downscale factor,
normalised, rounded to 22-bit integers; each pass sums ``pixel * coefficient`` into an int32 that starts at
``2**21`` and keeps ``clip(sum >> 22, 0, 255)``; the two passes (horizontal, vertical) meet in an 8-bit image.
:func:`coefficients` reproduces that arithmetic in float64 exactly as PIL's C code does it, and
:func:`resample_rows` applies one pass along the first axis of a 2-D array, over every other value at once, so
the inner loop is a SIMD multiply-add over contiguous memory instead of PIL's scalar per-pixel loop.

numba is imported on first use; :func:`kernels` returns ``None`` where it is not installed and callers fall back
to PIL itself (same pixels, slower).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

#: PIL's fixed-point precision for 8-bit images (``PRECISION_BITS`` in libImaging/Resample.c).
PRECISION_BITS = 22
BICUBIC_SUPPORT = 2.0
BICUBIC_A = -0.5


@functools.lru_cache(maxsize=512)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for resizing ``in_size`` to ``out_size``.

    Returns ``bounds`` (int64 ``[out_size, 2]``: first input index and tap count per output) and ``weights``
    (int32 ``[out_size, taps]``, zero past each output's count). Every float64 operation follows the C code's
    order, so the rounded integers are PIL's.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    inverse = 1.0 / filterscale
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    x = np.abs(((offsets[None, :] + first[:, None]).astype(np.float64) - center[:, None] + 0.5) * inverse)
    a = BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    filtered = np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
    filtered = np.where(offsets[None, :] < count[:, None], filtered, 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # sequential, as the C loop adds them (a pairwise sum could round differently)
        total = total + filtered[:, tap]
    normalised = np.where(total[:, None] != 0.0, filtered / np.where(total == 0.0, 1.0, total)[:, None], filtered)
    fixed = normalised * (1 << PRECISION_BITS)
    weights = np.where(normalised < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed)).astype(np.int32)
    return np.stack([first, count], axis=1), weights


def _resample_rows(source, bounds, weights, out, start, stop):
    """``out[o] = clip((2**21 + sum_j weights[o, j] * source[bounds[o, 0] + j]) >> 22, 0, 255)`` for ``o`` in
    ``[start, stop)``: one PIL pass along axis 0 of ``source`` (2-D uint8), every column at once."""
    width = source.shape[1]
    total = np.empty(width, np.int32)
    for o in range(start, stop):
        first, count = bounds[o, 0], bounds[o, 1]
        total[:] = HALF
        for tap in range(count):
            weight = weights[o, tap]
            row = source[first + tap]
            for m in range(width):
                total[m] += np.int32(row[m]) * weight
        for m in range(width):
            value = total[m] >> PRECISION_BITS
            out[o, m] = 0 if value < 0 else (255 if value > 255 else value)


def _transpose_pixels(source, out, start, stop):
    """``out[b, 3a:3a+3] = source[a, 3b:3b+3]`` for ``a`` in ``[start, stop)``: a cache-blocked transpose of an
    image stored as rows of RGB pixels (``[A, 3B]`` -> ``[B, 3A]``), which puts the axis the next pass resamples
    first."""
    block = 32
    pixels = source.shape[1] // 3
    for a0 in range(start, stop, block):
        a1 = min(a0 + block, stop)
        for b0 in range(0, pixels, block):
            b1 = min(b0 + block, pixels)
            for b in range(b0, b1):
                for a in range(a0, a1):
                    out[b, 3 * a] = source[a, 3 * b]
                    out[b, 3 * a + 1] = source[a, 3 * b + 1]
                    out[b, 3 * a + 2] = source[a, 3 * b + 2]


HALF = 1 << (PRECISION_BITS - 1)


@functools.cache
def kernels() -> SimpleNamespace | None:
    """The numba-compiled kernels (compiled on first use, cached on disk by numba), or ``None`` without numba."""
    try:
        import numba
    except ImportError:
        return None
    jit = numba.njit(nogil=True, cache=True)
    return SimpleNamespace(resample_rows=jit(_resample_rows), transpose_pixels=jit(_transpose_pixels))
