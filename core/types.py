"""Small value types shared by every layer. Sizes are always (height, width)."""

from __future__ import annotations

from typing import NamedTuple


class ImageSize(NamedTuple):
    """An image or canvas size in pixels, height first (as transformers' ``image_sizes``)."""

    height: int
    width: int


class TokenGrid(NamedTuple):
    """The grid of tokens one tile yields after the projector: ``rows * cols`` tokens per tile."""

    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols
