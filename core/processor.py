"""The processor: prompts and images in, the model's inputs out (``input_ids``, ``attention_mask``,
``pixel_values``, ``image_sizes``), called like transformers' ``LlavaNextProcessor``.

Every ``<image>`` placeholder is expanded to exactly the number of tokens the model will produce for that
image, using the model's own count (:meth:`ImageTiler.num_image_tokens` over the projector's token grid),
so the two cannot disagree. Images are tiled by the model's tiler (``split`` gives uint8 tiles) and
normalised here, all tiles of a batch in one pass.

The processor works for any tiler and vision encoder: it holds the tiler, the per-tile token grid, the
encoder's normalisation and the tokenizer, nothing specific to 336-pixel CLIP.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from llavakit.core.chat import ChatTemplate, render_template
from llavakit.core.errors import ConfigError, ContextLengthError, ImageError, TokenizerError
from llavakit.core.images import DEFAULT_MAX_PIXELS, ImageInput, load_image, parallel_map
from llavakit.core.interfaces import ImageTiler
from llavakit.core.types import ImageSize, TokenGrid

PaddingSide = Literal["left", "right"]
#: Processor files of the older llava-hf layout that :meth:`Processor.save_pretrained` supersedes.
STALE_PROCESSOR_FILES = ("preprocessor_config.json", "chat_template.json", "special_tokens_map.json", "added_tokens.json")
PADDING_SIDES = ("left", "right")

#: transformers' ``clean_up_tokenization`` replacements (used when tokenizer_config asks for them).
CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
    (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus what ``tokenizer_config.json`` adds: named special tokens, the padding
    side and the decode clean-up. Built by the registry from a checkpoint folder."""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        padding_side: PaddingSide | None = None,
        clean_up_tokenization_spaces: bool = False,
        source: str = "tokenizer",
    ):
        self.backend = backend
        self.source = source
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """``{"bos_token": "<s>", ...}`` for the tokens that are set (the variables chat templates see)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": self.unk_token}
        return {key: value for key, value in named.items() if value is not None}

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (the backend's post-processor adds BOS/EOS when ``add_special_tokens``)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in CLEANUP_REPLACEMENTS:
                text = text.replace(old, new)
        return text


class ProcessorOutput(dict):
    """The processor's result: a dict of tensors (``model(**batch)`` works) with attribute access and
    ``.to(device, dtype)``, where ``dtype`` applies to floating tensors only (``pixel_values``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the processor output has no {name!r}; it holds {', '.join(self)}") from None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ProcessorOutput:
        moved = ProcessorOutput()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if (dtype is not None and value.is_floating_point()) else None)
            moved[key] = value
        return moved


class Processor:
    """Turns prompts and images into model inputs; see the module docstring.

    ``tiler`` and ``token_grid`` must be the model's (``model.tiler``, ``model.token_grid``); ``image_mean``
    and ``image_std`` its vision encoder's normalisation, applied after ``rescale_factor`` (1/255).
    ``padding_side`` is the default for batches (``"left"`` for generation when not set).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        tiler: ImageTiler,
        token_grid: TokenGrid,
        *,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        rescale_factor: float = 1 / 255,
        image_token: str = "<image>",
        image_token_id: int | None = None,
        chat_template: ChatTemplate | None = None,
        padding_side: PaddingSide | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.tiler = tiler
        self.token_grid = TokenGrid(*token_grid)
        self.tile_size = int(tiler.tile_size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.rescale_factor = float(rescale_factor)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(
                f"image_mean {self.image_mean} and image_std {self.image_std} need 3 values each, std > 0"
            )
        found = tokenizer.token_to_id(image_token)
        if found is None:
            raise TokenizerError(
                f"{tokenizer.source}: the image token {image_token!r} is not in the vocabulary; add it as a special "
                f"token{f' with id {image_token_id}' if image_token_id is not None else ''}"
            )
        if image_token_id is not None and found != image_token_id:
            raise TokenizerError(
                f"{tokenizer.source}: the image token {image_token!r} has id {found} but the model expects "
                f"image_token_index {image_token_id}; use the tokenizer the model was trained with"
            )
        self.image_token = image_token
        self.image_token_id = found
        self.chat_template = chat_template
        self.padding_side = check_padding_side(padding_side or tokenizer.padding_side or "left")
        self.max_image_pixels = max_image_pixels
        # x * scale + shift == (x * rescale_factor - mean) / std.
        self._scale = torch.tensor([self.rescale_factor / s for s in self.image_std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.image_mean, self.image_std)]).view(3, 1, 1)

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------ counts
    def num_image_tokens(self, image_size: ImageSize | Sequence[int]) -> int:
        """Tokens one ``<image>`` of ``(height, width)`` expands to: the model's own count."""
        return self.tiler.num_image_tokens(ImageSize(*image_size), self.token_grid)

    # ------------------------------------------------------------------------------------ call
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        text: str | Sequence[str] | None = None,
        *,
        return_tensors: Literal["pt"] | None = "pt",
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = True,
        padding_side: PaddingSide | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        channels_first: bool | None = None,
    ) -> ProcessorOutput:
        """Process ``images`` (first, as in transformers) and ``text`` (one prompt or a list).

        ``images`` is one image, a flat list in placeholder order, or one list per prompt. Each ``<image>``
        in the prompts takes the next image. ``padding_side`` overrides the processor's default;
        ``truncation=True`` with ``max_length`` cuts long prompts, but never inside an image's tokens.
        """
        if text is not None and not isinstance(text, str) and not _is_text_list(text):
            raise ConfigError(
                f"text must be a string or a list of strings, got {type(text).__name__}; the processor is called as "
                "processor(images, text): images come first"
            )
        prompts = None if text is None else ([text] if isinstance(text, str) else list(text))
        flat_images, per_prompt = self._assign_images(images, prompts)
        output = ProcessorOutput()
        counts: list[int] = []
        if flat_images:
            output["pixel_values"], output["image_sizes"] = self.preprocess_images(flat_images, channels_first=channels_first)
            counts = [self.num_image_tokens(size) for size in output["image_sizes"].tolist()]
        if prompts is None:
            return output
        rows = self.tokenizer.encode_batch(prompts, add_special_tokens=add_special_tokens)
        rows = self._expand_image_tokens(rows, per_prompt, counts)
        if truncation and max_length is not None:
            rows = [self._truncate(row, max_length, index) for index, row in enumerate(rows)]
        text_out = self._pad(rows, padding=padding, padding_side=padding_side, max_length=max_length,
                             return_tensors=return_tensors)
        return ProcessorOutput({**text_out, **output})

    def preprocess_images(
        self, images: Sequence[ImageInput], *, channels_first: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` ``[N, max_tiles, 3, S, S]`` (tile axis zero-padded) and ``image_sizes`` ``[N, 2]``.

        Images are loaded and tiled on all cores, then every tile is normalised, again on all cores.
        """

        def load_and_split(item: tuple[int, ImageInput]) -> tuple[ImageSize, torch.Tensor]:
            index, image = item
            rgb = load_image(image, label=f"image {index}", channels_first=channels_first, max_pixels=self.max_image_pixels)
            return ImageSize(rgb.height, rgb.width), self.tiler.split(rgb)

        results = parallel_map(load_and_split, enumerate(images))
        tiles = [image_tiles for _, image_tiles in results]
        self._check_tiles(tiles)
        max_tiles = max((t.shape[0] for t in tiles), default=0)
        pixel_values = torch.empty(len(tiles), max_tiles, 3, self.tile_size, self.tile_size)
        target = pixel_values.numpy()
        scale, shift = self._scale.numpy(), self._shift.numpy()

        def normalise(job: tuple[int, int]) -> None:
            # numpy rather than torch: one uint8 -> float32 pass per tile, no OpenMP start-up per call.
            image, tile = job
            if tile < tiles[image].shape[0]:
                np.multiply(tiles[image][tile].numpy(), scale, out=target[image, tile])
                np.add(target[image, tile], shift, out=target[image, tile])
            else:
                target[image, tile] = 0.0

        parallel_map(normalise, [(image, tile) for image in range(len(tiles)) for tile in range(max_tiles)])
        sizes = torch.tensor([list(size) for size, _ in results], dtype=torch.long).view(-1, 2)
        return pixel_values, sizes

    def normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles ``[..., 3, H, W]`` as the float32 pixel values the model reads: rescaled, then normalised
        with the vision encoder's mean and std (what :meth:`__call__` does to every tile)."""
        return tiles.float() * self._scale + self._shift

    def _check_tiles(self, tiles: Sequence[torch.Tensor]) -> None:
        size = self.tile_size
        for index, image_tiles in enumerate(tiles):
            if tuple(image_tiles.shape[1:]) != (3, size, size) or image_tiles.dtype != torch.uint8:
                raise ConfigError(
                    f"the tiler {type(self.tiler).__name__} returned {image_tiles.dtype} tiles of shape "
                    f"{tuple(image_tiles.shape)} for image {index}; ImageTiler.split must return uint8 "
                    f"[num_tiles, 3, {size}, {size}]"
                )

    def _assign_images(
        self, images: Any, prompts: list[str] | None
    ) -> tuple[list[ImageInput], list[int]]:
        """The images in placeholder order, and how many belong to each prompt (checked against the text)."""
        if images is None:
            flat: list[ImageInput] = []
            nested = None
        elif isinstance(images, (list, tuple)):
            if any(isinstance(item, (list, tuple)) or item is None for item in images):
                nested = [[] if item is None else (list(item) if isinstance(item, (list, tuple)) else [item]) for item in images]
                flat = [image for group in nested for image in group]
            else:
                nested, flat = None, list(images)
        else:
            nested, flat = None, [images]
        if prompts is None:
            return flat, []
        placeholders = [prompt.count(self.image_token) for prompt in prompts]
        if nested is not None:
            if len(nested) != len(prompts):
                raise ImageError(
                    f"images were given as {len(nested)} lists (one per prompt) but there are {len(prompts)} prompts"
                )
            for index, (group, expected) in enumerate(zip(nested, placeholders)):
                if len(group) != expected:
                    raise ImageError(
                        f"prompt {index} holds {expected} {self.image_token} placeholder(s) but {len(group)} image(s) "
                        "were given for it; put one placeholder in the text per image"
                    )
        elif sum(placeholders) != len(flat):
            per_prompt = ", ".join(f"prompt {i}: {n}" for i, n in enumerate(placeholders))
            raise ImageError(
                f"the text holds {sum(placeholders)} {self.image_token} placeholder(s) ({per_prompt}) but "
                f"{len(flat)} image(s) were given; put one placeholder in the text per image"
            )
        return flat, placeholders

    def _expand_image_tokens(self, rows: list[list[int]], per_prompt: list[int], counts: list[int]) -> list[list[int]]:
        """Replace each image token id by the image's token count (in placeholder order)."""
        image_id = self.image_token_id
        expanded, next_image = [], 0
        for index, (row, expected) in enumerate(zip(rows, per_prompt)):
            found = row.count(image_id)
            if found != expected:
                raise TokenizerError(
                    f"prompt {index}: the text holds {expected} {self.image_token} placeholder(s) but the tokenizer "
                    f"produced {found} image token(s) (id {image_id}); the image token must be a special token"
                )
            if not found:
                expanded.append(row)
                continue
            out: list[int] = []
            for token in row:
                if token == image_id:
                    out.extend([image_id] * counts[next_image])
                    next_image += 1
                else:
                    out.append(token)
            expanded.append(out)
        return expanded

    def _truncate(self, row: list[int], max_length: int, index: int) -> list[int]:
        if len(row) <= max_length:
            return row
        image_id = self.image_token_id
        kept_images_end = max((i + 1 for i, token in enumerate(row) if token == image_id), default=0)
        if kept_images_end > max_length:
            raise ContextLengthError(
                f"prompt {index}: max_length={max_length} would cut inside its image tokens; it needs at least "
                f"{kept_images_end} tokens to keep every image whole ({len(row)} for the whole prompt). Raise "
                "max_length, or use fewer or smaller images"
            )
        return row[:max_length]

    def _pad(
        self,
        rows: list[list[int]],
        *,
        padding: bool | str,
        padding_side: PaddingSide | None,
        max_length: int | None,
        return_tensors: str | None,
    ) -> dict[str, Any]:
        side = check_padding_side(padding_side or self.padding_side)
        if padding in (True, "longest"):
            target = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ConfigError("padding='max_length' needs max_length")
            target = max([max_length] + [len(r) for r in rows])
        elif padding in (False, "do_not_pad"):
            target = None
        else:
            raise ConfigError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        masks = [[1] * len(r) for r in rows]
        if target is not None and any(len(r) != target for r in rows):
            pad_id = self.tokenizer.pad_token_id
            if pad_id is None:
                raise TokenizerError(
                    f"{self.tokenizer.source} has no pad token, so prompts of different lengths cannot be batched; "
                    "set pad_token in tokenizer_config.json"
                )
            rows, masks = zip(*(_pad_row(r, target, pad_id, side) for r in rows))
        if return_tensors is None:
            return {"input_ids": [list(r) for r in rows], "attention_mask": [list(m) for m in masks]}
        if return_tensors != "pt":
            raise ConfigError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if len({len(r) for r in rows}) > 1:
            raise ConfigError(
                "the prompts tokenize to different lengths and padding is off; pass padding=True to batch them "
                "as tensors, or return_tensors=None for lists"
            )
        return {
            "input_ids": torch.tensor(list(rows), dtype=torch.long),
            "attention_mask": torch.tensor(list(masks), dtype=torch.long),
        }

    # ------------------------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: Literal["pt"] | None = "pt",
        chat_template: ChatTemplate | str | None = None,
        **kwargs: Any,
    ) -> str | list[str] | ProcessorOutput | torch.Tensor:
        """Render a conversation (or a list of them) with the chat template, transformers-style.

        Messages are ``{"role": ..., "content": [{"type": "image", ...}, {"type": "text", "text": ...}]}``.
        With ``tokenize=True`` the images named in the messages (``image``: a PIL image or array, ``url``,
        ``path``) are loaded and the prompt is processed: ``return_dict=True`` returns the model inputs,
        otherwise the ``input_ids``. Extra keyword arguments go to :meth:`__call__` (``padding_side``, …).
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ConfigError(
                f"{self.tokenizer.source} has no chat template; pass chat_template= (a ChatTemplate or Jinja source), "
                "or format the prompt yourself"
            )
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        variables = self.tokenizer.special_tokens_map
        prompts = [
            template.render(c, add_generation_prompt=add_generation_prompt, **variables)
            if isinstance(template, ChatTemplate)
            else render_template(template, c, add_generation_prompt=add_generation_prompt, **variables)
            for c in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [images_in_conversation(c) for c in conversations]
        bos = self.tokenizer.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer (transformers' rule).
        add_special = not (bos is not None and prompts[0].startswith(bos))
        kwargs.setdefault("add_special_tokens", add_special)
        out = self(
            images if any(images) else None, prompts if batched else prompts[0], return_tensors=return_tensors, **kwargs
        )
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------------------------ decode
    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    # ------------------------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the processor in transformers 5's layout (``tokenizer.json``, ``tokenizer_config.json``,
        ``processor_config.json`` with an ``image_processor`` section, ``chat_template.jinja``), so that
        ``load_processor`` and transformers both read it back to the same token ids and pixels.

        The tokenizer is written as this processor reads it (special tokens and BOS handling included), with a
        generic tokenizer class, so no reader rebuilds it differently.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = self.tokenizer
        tokenizer.backend.save(str(folder / "tokenizer.json"))
        tokenizer_config = {
            **tokenizer.special_tokens_map,
            "clean_up_tokenization_spaces": tokenizer.clean_up_tokenization_spaces,
            "padding_side": self.padding_side,
            "processor_class": "LlavaNextProcessor",
            "tokenizer_class": "TokenizersBackend",
        }
        image_settings: dict[str, Any] = {
            "crop_size": {"height": self.tile_size, "width": self.tile_size},
            "size": {"shortest_edge": self.tile_size},
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "do_center_crop": True, "do_pad": True,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor, "resample": 3,
            "image_processor_type": "LlavaNextImageProcessor",
        }
        pinpoints = getattr(self.tiler, "grid_pinpoints", None)
        if pinpoints is not None:
            image_settings["image_grid_pinpoints"] = [list(p) for p in pinpoints]
        processor_config: dict[str, Any] = {
            "image_processor": image_settings,
            "image_token": self.image_token,
            "processor_class": "LlavaNextProcessor",
            # transformers adds num_additional_image_tokens and subtracts one for "default": net zero.
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        }
        rows, cols = self.token_grid
        if rows == cols and self.tile_size % rows == 0:
            processor_config["patch_size"] = self.tile_size // rows
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template.source)
        # Files of the older layout would be read before these; a template-less processor leaves none.
        stale = [*STALE_PROCESSOR_FILES, *([] if self.chat_template is not None else ["chat_template.jinja"])]
        for name in stale:
            (folder / name).unlink(missing_ok=True)
        return folder

    def __repr__(self) -> str:
        return (
            f"Processor(tokenizer={self.tokenizer.source!r}, tiler={type(self.tiler).__name__}, tile_size={self.tile_size}, "
            f"token_grid={tuple(self.token_grid)}, image_token={self.image_token!r} ({self.image_token_id}), "
            f"padding_side={self.padding_side!r}, chat_template={getattr(self.chat_template, 'name', None)!r})"
        )


def check_padding_side(side: str) -> PaddingSide:
    if side not in PADDING_SIDES:
        raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")
    return side  # type: ignore[return-value]


def _pad_row(row: list[int], target: int, pad_id: int, side: str) -> tuple[list[int], list[int]]:
    fill = target - len(row)
    if side == "left":
        return [pad_id] * fill + row, [0] * fill + [1] * len(row)
    return row + [pad_id] * fill, [1] * len(row) + [0] * fill


def _is_text_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def images_in_conversation(conversation: Sequence[Mapping[str, Any]]) -> list[ImageInput]:
    """The images a conversation names, in order: ``image`` parts with an ``image``, ``url`` or ``path`` key."""
    found: list[ImageInput] = []
    for index, message in enumerate(conversation):
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for part in content:
            if part.get("type") != "image":
                continue
            source = next((part[key] for key in ("image", "url", "path") if part.get(key) is not None), None)
            if source is None:
                raise ImageError(
                    f"message {index} has an image part without 'image', 'url' or 'path'; say which image it is"
                )
            found.append(source)
    return found
