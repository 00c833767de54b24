"""Built-in image tilers: ``anyres`` (LLaVA-NeXT) and ``single`` (LLaVA-1.5: one tile per image).

All image-token arithmetic of AnyRes lives in :func:`select_best_resolution`, :func:`resized_within` and
:func:`unpadded_grid`; the token count and the feature arrangement both call them, so the processor's
``<image>`` expansion and the model's features cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llavakit.core.errors import ConfigError
from llavakit.core.hooks import hookimpl
from llavakit.core.images import resize_chw
from llavakit.core.interfaces import ImageTiler, TileLayout
from llavakit.core.types import ImageSize, TokenGrid

#: LLaVA-1.6 grid pinpoints for 336-px tiles, as (height, width).
V16_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(image_size: ImageSize, pinpoints: Sequence[Sequence[int]]) -> ImageSize:
    """The pinpoint that keeps the most of the image's resolution, ties broken by the least wasted area.

    Follows transformers (which works in (height, width)); see the facts file for where the original
    LLaVA code, working in (width, height), breaks ties the other way.
    """
    height, width = image_size
    best, best_effective, best_wasted = None, -1, math.inf
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = target_h * target_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = ImageSize(target_h, target_w), effective, wasted
    return best


def resized_within(image_size: ImageSize, target: ImageSize) -> ImageSize:
    """Size the image is resized to so it fits ``target`` keeping its aspect ratio (before centred padding)."""
    height, width = image_size
    scale_w, scale_h = target.width / width, target.height / height
    if scale_w < scale_h:
        return ImageSize(min(math.ceil(height * scale_w), target.height), target.width)
    return ImageSize(target.height, min(math.ceil(width * scale_h), target.width))


def unpadded_grid(image_size: ImageSize, rows: int, cols: int) -> tuple[int, int, int, int]:
    """Crop of a ``rows x cols`` feature map that removes the padding AnyRes added around the image.

    Returns ``(top, bottom, left, right)`` as slice bounds. Integer arithmetic reproduces transformers'
    ``round(x, 7)`` fix exactly on every size (the original's float truncation does not).
    """
    height, width = image_size
    if width * rows > cols * height:  # the image is wider than the map: padding is above and below
        new_rows = (height * cols) // width
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new_cols = (width * rows) // height
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


class AnyResConfig(BaseModel):
    """Options of the ``anyres`` tiler. ``tile_size`` and ``hidden_size`` are set by the assembler."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int = 336
    hidden_size: int = 4096
    grid_pinpoints: list[tuple[int, int]] | None = Field(
        default=None,
        description="candidate canvases as (height, width) multiples of tile_size; default: LLaVA-1.6's, scaled "
        "to the tile size",
    )


class AnyResTiler(ImageTiler):
    """LLaVA-NeXT AnyRes: a squashed base tile, then the best-fitting grid of tiles; features are arranged
    on the grid, unpadded back to the image's aspect ratio, and ``image_newline`` ends every row."""

    def __init__(self, config: AnyResConfig):
        super().__init__()
        self.config = config
        self.tile_size = config.tile_size
        self.hidden_size = config.hidden_size
        if config.grid_pinpoints is None:
            scale = config.tile_size / 336
            pinpoints = [(round(h * scale), round(w * scale)) for h, w in V16_PINPOINTS]
        else:
            pinpoints = [tuple(p) for p in config.grid_pinpoints]
        for height, width in pinpoints:
            if height % self.tile_size or width % self.tile_size or height <= 0 or width <= 0:
                raise ConfigError(
                    f"tiler.options.grid_pinpoints: ({height}, {width}) is not a positive multiple of the tile size "
                    f"{self.tile_size} (the vision encoder's image size)"
                )
        self.grid_pinpoints = pinpoints
        # Learned separator appended after every row of grid features (checkpoint key ``image_newline``).
        self.image_newline = nn.Parameter(torch.empty(config.hidden_size))

    def reset_parameters(self) -> None:
        """Documented random init: normal(0, 1/sqrt(hidden_size)), as transformers initialises it."""
        nn.init.normal_(self.image_newline, std=1 / math.sqrt(self.hidden_size))

    def layout(self, image_size: ImageSize) -> TileLayout:
        image_size = ImageSize(*image_size)
        if image_size.height <= 0 or image_size.width <= 0:
            raise ConfigError(f"image size {tuple(image_size)} has a zero side; every image needs at least 1x1 pixels")
        canvas = select_best_resolution(image_size, self.grid_pinpoints)
        return TileLayout(
            image_size=image_size,
            grid_rows=canvas.height // self.tile_size,
            grid_cols=canvas.width // self.tile_size,
            canvas=canvas,
            resized=resized_within(image_size, canvas),
            has_base_tile=True,
        )

    def _grid_bounds(self, image_size: ImageSize, token_grid: TokenGrid) -> tuple[TileLayout, tuple[int, int, int, int]]:
        layout = self.layout(image_size)
        rows, cols = layout.grid_rows * token_grid.rows, layout.grid_cols * token_grid.cols
        return layout, unpadded_grid(layout.image_size, rows, cols)

    def num_image_tokens(self, image_size: ImageSize, token_grid: TokenGrid) -> int:
        _, (top, bottom, left, right) = self._grid_bounds(image_size, token_grid)
        # base tile + the unpadded map with one image_newline closing each row
        return token_grid.num_tokens + (bottom - top) * (right - left + 1)

    def arrange(self, tile_tokens: torch.Tensor, image_size: ImageSize, token_grid: TokenGrid) -> torch.Tensor:
        layout, (top, bottom, left, right) = self._grid_bounds(image_size, token_grid)
        expected = (layout.num_tiles, token_grid.num_tokens)
        if tuple(tile_tokens.shape[:2]) != expected:
            raise ConfigError(
                f"anyres expected {expected[0]} tiles of {expected[1]} tokens for an image of size "
                f"{tuple(layout.image_size)}, got tokens of shape {tuple(tile_tokens.shape)}"
            )
        base, grid = tile_tokens[0], tile_tokens[1:]
        dim = grid.shape[-1]
        # (tile_row, tile_col, r, c, D) -> (tile_row, r, tile_col, c, D): one feature map, row-major.
        grid = grid.view(layout.grid_rows, layout.grid_cols, token_grid.rows, token_grid.cols, dim)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(
            layout.grid_rows * token_grid.rows, layout.grid_cols * token_grid.cols, dim
        )
        grid = grid[top:bottom, left:right]
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, dim)
        grid = torch.cat([grid, newline], dim=1).reshape(-1, dim)
        return torch.cat([base, grid])

    def split(self, image: Image.Image) -> torch.Tensor:
        layout = self.layout(ImageSize(image.height, image.width))
        size = self.tile_size
        tiles = np.zeros((layout.num_tiles, 3, size, size), dtype=np.uint8)
        base, resized = resize_chw(image, [ImageSize(size, size), layout.resized])
        tiles[0] = base
        # The resized image sits centred on a black canvas; each tile's share of it is copied straight into
        # the tile (no canvas is materialised: the zeros of ``tiles`` are the padding).
        top = (layout.canvas.height - layout.resized.height) // 2
        left = (layout.canvas.width - layout.resized.width) // 2
        for index in range(layout.grid_rows * layout.grid_cols):
            row, col = divmod(index, layout.grid_cols)
            y0, x0 = max(row * size, top), max(col * size, left)
            y1 = min((row + 1) * size, top + layout.resized.height)
            x1 = min((col + 1) * size, left + layout.resized.width)
            if y1 > y0 and x1 > x0:
                tiles[1 + index, :, y0 - row * size : y1 - row * size, x0 - col * size : x1 - col * size] = resized[
                    :, y0 - top : y1 - top, x0 - left : x1 - left
                ]
        return torch.from_numpy(tiles)


class SingleTileConfig(BaseModel):
    """Options of the ``single`` tiler (LLaVA-1.5): resize the short side to ``tile_size``, centre-crop."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int = 336
    hidden_size: int = 4096


class SingleTiler(ImageTiler):
    """One tile per image: CLIP-style shortest-edge resize and centre crop; tokens are the tile's tokens."""

    def __init__(self, config: SingleTileConfig):
        super().__init__()
        self.config = config
        self.tile_size = config.tile_size
        self.hidden_size = config.hidden_size

    def layout(self, image_size: ImageSize) -> TileLayout:
        image_size = ImageSize(*image_size)
        if image_size.height <= 0 or image_size.width <= 0:
            raise ConfigError(f"image size {tuple(image_size)} has a zero side; every image needs at least 1x1 pixels")
        scale = self.tile_size / min(image_size)
        resized = ImageSize(max(self.tile_size, round(image_size.height * scale)), max(self.tile_size, round(image_size.width * scale)))
        canvas = ImageSize(self.tile_size, self.tile_size)
        return TileLayout(image_size, 1, 1, canvas, resized, has_base_tile=False)

    def num_image_tokens(self, image_size: ImageSize, token_grid: TokenGrid) -> int:
        self.layout(image_size)
        return token_grid.num_tokens

    def arrange(self, tile_tokens: torch.Tensor, image_size: ImageSize, token_grid: TokenGrid) -> torch.Tensor:
        if tile_tokens.shape[0] != 1:
            raise ConfigError(f"the single tiler expects 1 tile per image, got {tile_tokens.shape[0]}")
        return tile_tokens[0]

    def split(self, image: Image.Image) -> torch.Tensor:
        layout = self.layout(ImageSize(image.height, image.width))
        (resized,) = resize_chw(image, [layout.resized])
        top = (layout.resized.height - self.tile_size) // 2
        left = (layout.resized.width - self.tile_size) // 2
        crop = resized[:, top : top + self.tile_size, left : left + self.tile_size]
        return torch.from_numpy(np.ascontiguousarray(crop)[None])


@hookimpl
def register_tilers(register):
    register("anyres", AnyResTiler, config=AnyResConfig, description="LLaVA-NeXT AnyRes (grid pinpoints, unpad, image_newline)")
    register("single", SingleTiler, config=SingleTileConfig, description="LLaVA-1.5 single tile (resize + centre crop)")
