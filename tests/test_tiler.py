"""AnyRes arithmetic: worked values from the facts file and properties over thousands of image sizes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llavakit.core.types import ImageSize, TokenGrid
from llavakit.plugins.tilers import (
    AnyResConfig,
    AnyResTiler,
    SingleTileConfig,
    SingleTiler,
    select_best_resolution,
    unpadded_grid,
)

GRID_24 = TokenGrid(24, 24)
TILER = AnyResTiler(AnyResConfig(tile_size=336, hidden_size=4))
TILER.reset_parameters()


def test_worked_token_counts_from_the_facts_file():
    cases = {(899, 1024): 2634, (480, 640): 2340, (1080, 1920): 1948, (1000, 100): 1224, (336, 336): 1176}
    for size, tokens in cases.items():
        assert TILER.num_image_tokens(ImageSize(*size), GRID_24) == tokens, size
    assert select_best_resolution(ImageSize(899, 1024), TILER.grid_pinpoints) == (672, 672)
    assert select_best_resolution(ImageSize(1000, 100), TILER.grid_pinpoints) == (1008, 336)
    # Both sides <= 336: the first two pinpoints tie and transformers picks the wide one.
    assert select_best_resolution(ImageSize(336, 336), TILER.grid_pinpoints) == (336, 672)


def _arranged_length(tiler, size: ImageSize, grid: TokenGrid) -> int:
    tiles = tiler.num_tiles(size)
    features = torch.zeros(tiles, grid.num_tokens, 4)
    return tiler.arrange(features, size, grid).shape[0]


sides = st.integers(min_value=1, max_value=4000)


def _arranged_length(tiler, size: ImageSize, grid: TokenGrid) -> int:
    tiles = tiler.num_tiles(size)
    features = torch.zeros(tiles, grid.num_tokens, 4)
    return tiler.arrange(features, size, grid).shape[0]


sides = st.integers(min_value=1, max_value=4000)


@settings(max_examples=3000, deadline=None)
@given(height=sides, width=sides)
def test_count_equals_arranged_length_336(height, width):
    size = ImageSize(height, width)
    assert TILER.num_image_tokens(size, GRID_24) == _arranged_length(TILER, size, GRID_24)


SMALL = AnyResTiler(AnyResConfig(tile_size=112, hidden_size=4))
SMALL.reset_parameters()


@settings(max_examples=1500, deadline=None)
@given(height=sides, width=sides, rows=st.integers(1, 12), cols=st.integers(1, 12))
def test_count_equals_arranged_length_any_grid(height, width, rows, cols):
    """Other tile sizes and per-tile grids (e.g. a resampler's fixed grid) obey the same identity."""
    size, grid = ImageSize(height, width), TokenGrid(rows, cols)
    assert SMALL.num_image_tokens(size, grid) == _arranged_length(SMALL, size, grid)


@settings(max_examples=500, deadline=None)
@given(height=sides, width=sides)
def test_unpad_matches_the_reference_float_formula(height, width):
    """Integer unpad arithmetic equals transformers' ``int(round(x, 7))`` formula on random sizes."""
    layout = TILER.layout(ImageSize(height, width))
    rows, cols = layout.grid_rows * 24, layout.grid_cols * 24
    top, bottom, left, right = unpadded_grid(ImageSize(height, width), rows, cols)
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        assert (top, bottom, left, right) == (pad, rows - pad, 0, cols)
    else:
        new_cols = int(round(width * (rows / height), 7))
        pad = (cols - new_cols) // 2
        assert (top, bottom, left, right) == (0, rows, pad, cols - pad)


def test_arrangement_order_matches_row_major_tiles():
    """Grid tiles are placed row-major and their patches row-major into one map, then rows end with newline."""
    tiler = AnyResTiler(AnyResConfig(tile_size=336, hidden_size=1, grid_pinpoints=[(672, 672)]))
    with torch.no_grad():
        tiler.image_newline.fill_(-1.0)
    grid = TokenGrid(2, 2)
    size = ImageSize(672, 672)
    features = torch.arange(5 * 4, dtype=torch.float32).view(5, 4, 1)
    arranged = tiler.arrange(features, size, grid).flatten().tolist()
    base = [0, 1, 2, 3]
    # tiles 1..4 form a 2x2 grid of 2x2 patches: rows of the 4x4 map
    row0 = [4, 5, 8, 9, -1]
    row1 = [6, 7, 10, 11, -1]
    row2 = [12, 13, 16, 17, -1]
    row3 = [14, 15, 18, 19, -1]
    assert arranged == base + row0 + row1 + row2 + row3


def test_single_tiler_counts_one_tile():
    tiler = SingleTiler(SingleTileConfig(tile_size=336, hidden_size=4))
    assert tiler.num_tiles(ImageSize(500, 300)) == 1
    assert tiler.num_image_tokens(ImageSize(500, 300), GRID_24) == 576
