"""The composed LLaVA-NeXT model: vision encoder → projector → tiler arrangement → language model.

It reproduces transformers' ``LlavaNextForConditionalGeneration`` forward pass: all tiles of all images
go through one vision forward, are projected, arranged per image by the tiler (AnyRes grid, unpad,
``image_newline``) and scattered into the ``<image>`` token positions of the embedded prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llavakit.core import generation
from llavakit.core.config import ModelConfig
from llavakit.core.errors import ConfigError, TokenCountError
from llavakit.core.interfaces import ImageTiler, LanguageModel, Projector, VisionEncoder, image_sizes_list
from llavakit.core.kv_cache import KVCache
from llavakit.core.types import ImageSize, TokenGrid

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """What a forward pass returns: ``logits`` ``[B, L, V]`` and, with labels, the mean token ``loss``."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    kv_cache: KVCache | None = None


class LlavaNextModel(nn.Module):
    """A vision-language model composed of four swappable components.

    Submodule names (``vision_tower``, ``projector``, ``tiler``, ``language_model``) are the prefixes of
    llavakit's own state-dict layout; checkpoint layouts are mapped onto them by the registry.
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        vision_tower: VisionEncoder,
        projector: Projector,
        tiler: ImageTiler,
        language_model: LanguageModel,
    ):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.tiler = tiler
        self.language_model = language_model
        self.image_token_index = config.image_token_index
        self.vision_feature_layer = config.vision_feature_layer
        self.vision_feature_select_strategy = config.vision_feature_select_strategy
        # Resolve once: a bad feature layer or strategy should fail at assembly, not at the first image.
        vision_tower.feature_index(config.vision_feature_layer)
        if config.vision_feature_select_strategy == "default" and not vision_tower.has_class_token:
            raise ConfigError(
                f"vision_feature_select_strategy='default' drops a class token, but the vision encoder "
                f"{config.vision.name!r} has none; set vision_feature_select_strategy='full'"
            )
        if config.vision_feature_select_strategy == "full" and vision_tower.has_class_token:
            # Tilers arrange and count tokens on the per-tile patch grid; a class token has no place on it.
            raise ConfigError(
                f"vision_feature_select_strategy='full' keeps the class token of {config.vision.name!r}, which the "
                "tiler cannot place on the patch grid (its token count would disagree with the features); use "
                "'default'"
            )

    # ----------------------------------------------------------------------------------------- tokens
    @property
    def token_grid(self) -> TokenGrid:
        """Tokens per tile after the projector (the grid the tiler arranges and counts)."""
        return self.projector.token_grid(self.vision_tower.patch_grid)

    def num_image_tokens(self, image_size: ImageSize | Sequence[int]) -> int:
        """Image tokens one image of ``(height, width)`` occupies in the prompt (the processor's count)."""
        return self.tiler.num_image_tokens(ImageSize(*image_size), self.token_grid)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    # ----------------------------------------------------------------------------------------- images
    def get_image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Per-image token sequences ``[num_image_tokens, D]``, as transformers' ``get_image_features``.

        ``pixel_values`` is ``[num_images, max_tiles, 3, S, S]`` (tile axis zero-padded) or the already
        flattened ``[total_tiles, 3, S, S]``; ``image_sizes`` is ``[num_images, 2]`` (height, width).
        """
        sizes = image_sizes_list(image_sizes)
        tiles_per_image = [self.tiler.num_tiles(size) for size in sizes]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ConfigError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes gives {len(sizes)} sizes"
                )
            for index, (count, size) in enumerate(zip(tiles_per_image, sizes)):
                if count > pixel_values.shape[1]:
                    raise ConfigError(
                        f"image {index} of size {tuple(size)} needs {count} tiles but pixel_values has room for "
                        f"{pixel_values.shape[1]}; were the images preprocessed with a different tiler?"
                    )
            tiles = torch.cat([pv[:count] for pv, count in zip(pixel_values, tiles_per_image)])
        elif pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(tiles_per_image):
                raise ConfigError(
                    f"pixel_values holds {pixel_values.shape[0]} tiles but the image sizes need "
                    f"{sum(tiles_per_image)} ({tiles_per_image} per image)"
                )
            tiles = pixel_values
        else:
            raise ConfigError(f"pixel_values must be 4- or 5-dimensional, got shape {tuple(pixel_values.shape)}")

        vision_dtype = next(self.vision_tower.parameters()).dtype
        features = self.vision_tower(
            tiles.to(vision_dtype),
            feature_layer=self.vision_feature_layer,
            strategy=self.vision_feature_select_strategy,
        )
        tokens = self.projector(features.to(next(self.projector.parameters()).dtype))
        grid = self.token_grid
        return [
            self.tiler.arrange(chunk, size, grid)
            for chunk, size in zip(torch.split(tokens, tiles_per_image), sizes)
        ]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Embed text and scatter image features into the ``<image>`` positions (``[B, L, D]``)."""
        image_mask = (
            input_ids == self.image_token_index if self.image_token_index is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        )
        # Image positions are never looked up in the embedding table: original-LLaVA vocabularies have no
        # row for the placeholder id at all.
        embeds = self.language_model.embed(input_ids.masked_fill(image_mask, 0))
        has_images = pixel_values is not None and pixel_values.shape[0] > 0
        if not has_images:
            if image_mask.any():
                raise TokenCountError(
                    f"the prompt holds {int(image_mask.sum())} image tokens (id {self.image_token_index}) "
                    "but no pixel_values were given"
                )
            return embeds
        if image_sizes is None:
            raise ConfigError("pixel_values were given without image_sizes ([num_images, 2], height and width)")
        if self.image_token_index is None:
            raise ConfigError("this model has no image_token_index configured, so it cannot place image features")
        features = self.get_image_features(pixel_values, image_sizes)
        self._check_token_counts(image_mask, features, image_sizes_list(image_sizes))
        flat = torch.cat(features).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), flat)

    @staticmethod
    def _check_token_counts(image_mask: torch.Tensor, features: list[torch.Tensor], sizes: list[ImageSize]) -> None:
        placed = int(image_mask.sum())
        produced = sum(f.shape[0] for f in features)
        if placed == produced:
            return
        per_image = ", ".join(
            f"image {i} ({s.height}x{s.width}): {f.shape[0]}" for i, (f, s) in enumerate(zip(features, sizes))
        )
        per_row = ", ".join(f"row {i}: {int(n)}" for i, n in enumerate(image_mask.sum(dim=1)))
        raise TokenCountError(
            f"image features and image tokens do not match: the images produce {produced} tokens "
            f"({per_image}) but the prompt holds {placed} image tokens ({per_row}). Expand each <image> with "
            "the processor of this model (its count comes from the same tiler)."
        )

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Called like transformers' model; returns :class:`ModelOutput` with ``.logits`` ``[B, L, V]``.

        ``position_ids`` default to the running count of attended tokens, so a left-padded row gets the
        same positions as the unpadded prompt alone (equal to ``arange`` when nothing is padded).
        ``logits_to_keep=n`` computes only the last ``n`` positions' logits (generation needs one).
        ``attention_mask`` may also be a boolean ``[B, 1, L, K]`` mask used as given (packed training sequences,
        see :func:`llavakit.registry.datasets.collate`); ``position_ids`` must then be given too.
        """
        if attention_mask is not None and attention_mask.dim() == 4 and position_ids is None:
            raise ConfigError(
                "a 4-D attention_mask states which tokens see which, not their positions; pass position_ids "
                "([batch, length]) with it"
            )
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, embeds.shape[1], past, input_ids.device)
        hidden = self.language_model(
            embeds, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache,
            keep_last=logits_to_keep,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=IGNORE_INDEX
            )
        return ModelOutput(logits=logits, loss=loss, kv_cache=kv_cache)

    # ------------------------------------------------------------------------------------- generation
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] | None = None,
        seed: int | None = None,
        streamer=None,
        tokenizer=None,
    ) -> torch.Tensor:
        """Generate like transformers: returns ``[B, prompt_len + new]`` ids; see :mod:`llavakit.core.generation`.

        Options left at ``None`` come from the checkpoint's ``generation_config.json`` (else
        ``max_new_tokens=256``, greedy). ``stop_strings`` needs a tokenizer (``model.processor`` or ``tokenizer=``).
        """
        return generation.generate(
            self, input_ids, attention_mask, pixel_values, image_sizes, streamer=streamer, tokenizer=tokenizer,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            stop_strings=stop_strings, seed=seed,
        )

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        *,
        tokenizer=None,
        **options,
    ):
        """Iterate over the answer's text pieces as they are generated (one prompt; needs a tokenizer).

        Takes the options of :meth:`generate`; the returned stream's ``.stats`` has counts and timings.
        """
        return generation.stream(
            self, input_ids, attention_mask, pixel_values, image_sizes, tokenizer=tokenizer, **options
        )


def positions_from_mask(
    attention_mask: torch.Tensor | None, length: int, past: int, device: torch.device
) -> torch.Tensor:
    """Rotary positions for ``length`` new tokens after ``past`` cached ones.

    With a ``[B, past + length]`` padding mask, positions count attended tokens only (left padding does not
    shift them); padded slots get position 0, which is harmless because nothing attends to them.
    """
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions[:, past : past + length].clamp(min=0)
