"""The component contracts: what a vision encoder, projector, language model and image tiler must provide.

Each is an ``nn.Module`` subclass with a few declared attributes and abstract methods. The composed
model (:mod:`llavakit.core.model`) only talks to components through these contracts, which is what makes
them swappable: a plugin that honours them can replace any built-in.

A component that loads its own weights when built (an open_clip tower's ``pretrained`` option, say) sets
``has_loaded_weights = True`` so the assembler does not report it as untrained.

Shapes use ``N`` for tiles, ``P`` for tokens per tile, ``C`` for vision width, ``D`` for LLM width,
``B`` for batch and ``L`` for sequence length. Floating tensors follow the module's parameter dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from llavakit.core.errors import ConfigError
from llavakit.core.kv_cache import KVCache
from llavakit.core.types import ImageSize, TokenGrid

SelectStrategy = Literal["default", "full"]


class VisionEncoder(nn.Module, ABC):
    """Encodes square tiles into per-patch features taken at an intermediate layer.

    Declared attributes (set by the implementation's ``__init__``):

    - ``image_size``: side ``S`` of the square tiles it accepts, in pixels.
    - ``patch_size``: side of one patch; the patch grid is ``image_size // patch_size`` square.
    - ``hidden_size``: width ``C`` of the features.
    - ``num_layers``: number of transformer blocks (all of them exist and load, even unused ones).
    - ``has_class_token``: whether position 0 of the sequence is a class token.
    - ``image_mean`` / ``image_std``: per-channel normalisation the processor must apply.
    """

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    has_class_token: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def patch_grid(self) -> TokenGrid:
        side = self.image_size // self.patch_size
        return TokenGrid(side, side)

    def feature_index(self, feature_layer: int) -> int:
        """Translate ``feature_layer`` (negative counts from the end, as in transformers) to a hidden-state index.

        Hidden state 0 is the embedding output; hidden state ``i`` is the output of block ``i - 1``.
        The returned index is also the number of blocks that must run.
        """
        index = feature_layer if feature_layer >= 0 else self.num_layers + 1 + feature_layer
        if not 0 <= index <= self.num_layers:
            raise ConfigError(
                f"vision_feature_layer={feature_layer} is out of range for a {self.num_layers}-block vision "
                f"encoder; use a value in [-{self.num_layers + 1}, {self.num_layers}]"
            )
        return index

    def select(self, hidden: torch.Tensor, strategy: SelectStrategy) -> torch.Tensor:
        """Apply the select strategy: ``default`` drops the class token, ``full`` keeps every position."""
        if strategy == "full":
            return hidden
        if strategy != "default":
            raise ConfigError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        if not self.has_class_token:
            raise ConfigError(
                f"vision_feature_select_strategy='default' drops a class token, but {type(self).__name__} has "
                "none; use 'full'"
            )
        return hidden[:, 1:]

    def num_features(self, strategy: SelectStrategy) -> int:
        """Tokens per tile the encoder returns under ``strategy``."""
        grid = self.patch_grid.num_tokens
        return grid + 1 if (strategy == "full" and self.has_class_token) else grid

    @abstractmethod
    def forward(
        self, pixel_values: torch.Tensor, *, feature_layer: int = -2, strategy: SelectStrategy = "default"
    ) -> torch.Tensor:
        """Encode ``[N, 3, S, S]`` tiles into ``[N, P, C]`` features at ``feature_layer``.

        No block past the feature layer may run: that work would be thrown away.
        """


class Projector(nn.Module, ABC):
    """Maps vision features ``[N, P, C]`` to LLM-width tokens ``[N, P', D]``.

    ``in_features`` (= C) and ``out_features`` (= D) are filled in by the assembler from the two
    components it connects, so the same projector name works for any pairing.
    """

    in_features: int
    out_features: int

    def token_grid(self, encoder_grid: TokenGrid) -> TokenGrid:
        """Grid of tokens emitted per tile. An MLP keeps the encoder's patch grid; a resampler overrides this."""
        return encoder_grid

    def num_tokens(self, num_input_tokens: int) -> int:
        """Tokens emitted per tile for ``num_input_tokens`` input features (identity for an MLP)."""
        return num_input_tokens

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``[N, P, C]`` features to ``[N, P', D]``."""


class LanguageModel(nn.Module, ABC):
    """A decoder-only language model that accepts embeddings, so image features can be spliced in.

    Declared attributes: ``vocab_size``, ``hidden_size``, ``num_layers``, ``num_kv_heads``, ``head_dim``,
    ``max_position_embeddings``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, L, D]`` for ``input_ids`` ``[B, L]``."""

    @abstractmethod
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        keep_last: int = 0,
    ) -> torch.Tensor:
        """Run the decoder over ``[B, L, D]`` embeddings and return final hidden states ``[B, L, D]``.

        ``position_ids`` is ``[B, L]`` (rotary positions). ``attention_mask`` is ``None``, a ``[B, K]``
        0/1 padding mask over every key position seen so far (cached + new, ``K = cache length + L``), or a
        boolean ``[B, 1, L, K]`` mask (``True`` where a query may attend) used exactly as given, causality
        included: the form of packed training sequences whose parts must not see each other.
        With a ``kv_cache`` the new keys/values are appended to it and the cache is advanced by ``L``.
        ``keep_last=n`` (``0 < n``) asks only for the last ``n`` positions' hidden states, ``[B, min(n, L), D]``
        (generation's prefill needs one): the decoder may skip the work no kept position depends on, such as the
        last layer's queries and MLP for the other positions. The cache still gets every position.
        """

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states ``[B, L, D]`` to vocabulary logits ``[B, L, V]``."""

    def decode_step(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """One generation step: next-token logits ``[B, V]`` for one new token per row (``tokens`` ``[B]``).

        ``position_ids`` is ``[B, 1]``; ``attention_mask`` is ``None`` or the ``[B, K]`` padding mask over
        cached and new positions. Implementations may override this with a faster path for single-token
        steps; it must give the logits that :meth:`forward` and :meth:`logits` give.
        """
        hidden = self(
            self.embed(tokens[:, None]), position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache
        )
        return self.logits(hidden)[:, -1]

    def decode_greedy(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """One greedy step: the next token of each row (``[B]``), the argmax of :meth:`decode_step`'s logits (the
        first index among equal maxima, as ``torch.argmax``). Greedy generation without logit processors calls
        this instead, so an implementation may skip work that cannot change the winner (writing out every
        logit, say); it must return exactly what the argmax of the logits would."""
        return self.decode_step(
            tokens, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache
        ).argmax(dim=-1)

    def new_kv_cache(
        self, batch_size: int, capacity: int, *, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """Allocate a cache sized for this model."""
        param = next(self.parameters())
        return KVCache(
            num_layers=self.num_layers,
            batch_size=batch_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            capacity=capacity,
            dtype=dtype or param.dtype,
            device=device or param.device,
        )


@dataclass(frozen=True)
class TileLayout:
    """How one image is cut: ``num_tiles`` tiles (including a base/overview tile where the tiler uses one)."""

    image_size: ImageSize
    grid_rows: int
    grid_cols: int
    canvas: ImageSize
    resized: ImageSize
    has_base_tile: bool

    @property
    def num_tiles(self) -> int:
        return self.grid_rows * self.grid_cols + (1 if self.has_base_tile else 0)


class ImageTiler(nn.Module, ABC):
    """Cuts images into encoder-sized tiles and arranges per-tile tokens into an image's token sequence.

    The tiler is the single owner of image-token arithmetic: :meth:`num_image_tokens` (used by the
    processor to expand ``<image>``) and :meth:`arrange` (used by the model) are both derived from
    :meth:`layout` and the per-tile token grid, so they cannot disagree.

    ``tile_size`` (the encoder's image size) and ``hidden_size`` (the LLM width, for learned separator
    tokens such as AnyRes' ``image_newline``) are filled in by the assembler.
    """

    tile_size: int
    hidden_size: int

    @abstractmethod
    def layout(self, image_size: ImageSize) -> TileLayout:
        """Decide how an image of ``image_size`` is tiled."""

    @abstractmethod
    def split(self, image) -> torch.Tensor:
        """Cut a PIL RGB image into ``uint8 [num_tiles, 3, tile_size, tile_size]`` tiles, in model order.

        Tiles stay uint8 so the processor can normalise every tile of a batch in one operation.
        """

    @abstractmethod
    def num_image_tokens(self, image_size: ImageSize, token_grid: TokenGrid) -> int:
        """Number of tokens :meth:`arrange` yields for this image size and per-tile grid."""

    @abstractmethod
    def arrange(self, tile_tokens: torch.Tensor, image_size: ImageSize, token_grid: TokenGrid) -> torch.Tensor:
        """Turn ``[num_tiles, rows*cols, D]`` projected tile tokens into the image's ``[num_image_tokens, D]`` sequence."""

    def num_tiles(self, image_size: ImageSize) -> int:
        return self.layout(image_size).num_tiles


def image_sizes_list(image_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[ImageSize]:
    """Normalise ``[num_images, 2]`` (height, width) sizes from a tensor or nested sequence."""
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.tolist()
    return [ImageSize(int(h), int(w)) for h, w in image_sizes]
