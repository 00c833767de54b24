"""Training data: (image, conversation) examples, their tokenisation with answer-only labels, and batching.

Two sources give examples by index, so a training run can resume at any sample:

- :class:`LlavaJsonDataset`: a JSON list or JSONL file of records in the LLaVA instruction format::

      {"id": "0001", "image": "images/0001.png",
       "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                         {"from": "gpt", "value": "Red."}]}

  ``image`` is relative to ``image_folder`` (default: the file's folder); a record without ``image`` is text
  only. Each problem (missing image, malformed turn, placeholder count) raises an error naming the file, the
  record (line and id) and the turn.
- :class:`SyntheticShapesSource`: the endless, seeded synthetic-shapes task
  (:mod:`llavakit.plugins.synthetic_shapes`), one multi-turn conversation per scene.

:func:`encode_example` renders a conversation with the model's chat template, tokenises it as a whole (so
training sees exactly the tokens inference will) and labels only the assistant answers (their text and the
end-of-turn token the template writes): every prompt token, template token and image token is ``-100``.
:func:`collate` pads on the right.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from llavakit.core.errors import ConfigError, ContextLengthError, ImageFileError
from llavakit.core.images import open_image
from llavakit.core.model import IGNORE_INDEX
from llavakit.core.processor import Processor

#: LLaVA's speaker names → chat roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Example:
    """One training example: images in placeholder order and a conversation of ``{"role", "content"}`` messages."""

    images: list[Image.Image]
    messages: list[dict[str, str]]
    where: str
    #: Identifies the images: examples with the same key share them, so their preprocessing is done once
    #: (see ``image_cache`` of :func:`encode_example`). ``None``: never shared.
    image_key: Any = None
    #: Several conversations about the same images, trained as one packed sequence (see :func:`encode_example`);
    #: ``messages`` is then the first of them. ``None``: the example is ``messages`` alone.
    branches: list[list[dict[str, str]]] | None = None


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # [num_images, max_tiles, 3, S, S]
    image_sizes: torch.Tensor | None  # [num_images, 2]
    #: A packed example's rotary positions and its tokens' parts: 0 for the shared prompt, ``i + 1`` for branch
    #: ``i``, which sees the prompt and itself only. ``None``: one conversation, positions ``0 … n-1``.
    position_ids: list[int] | None = None
    segments: list[int] | None = None


class ExampleSource(Protocol):
    """Examples by index. ``size`` is ``None`` for an endless source."""

    size: int | None

    def example(self, index: int) -> Example: ...

    def texts(self, limit: int) -> list[list[dict[str, str]]]:
        """Up to ``limit`` conversations without their images (the tokenizer's training text)."""


# ------------------------------------------------------------------------------------------ JSON records
class DatasetError(ConfigError):
    """A dataset record is malformed; the message names the file, the record and the field."""


def conversation_messages(record: Any, where: str, *, has_image: bool) -> list[dict[str, str]]:
    """Validate a LLaVA ``conversations`` list and turn it into chat messages.

    Turns must be human/gpt pairs (an optional leading system turn aside), each ``value`` a string, and the
    ``<image>`` placeholders must number exactly one per image, all in human turns.
    """
    if not isinstance(record, Mapping):
        raise DatasetError(f"{where}: expected an object with 'conversations', got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(turns):
        label = f"{where}, turn {index}"
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DatasetError(f"{label}: each turn needs 'from' and 'value' keys, got {turn!r:.80}")
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DatasetError(f"{label}: unknown speaker {turn['from']!r}; use 'human' or 'gpt' ('system' first)")
        if not isinstance(turn["value"], str):
            raise DatasetError(f"{label}: 'value' must be a string, got {type(turn['value']).__name__}")
        if role == "system" and index != 0:
            raise DatasetError(f"{label}: a system turn may only come first")
        messages.append({"role": role, "content": turn["value"]})
    dialogue = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(dialogue):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            turn_index = index + len(messages) - len(dialogue)
            raise DatasetError(
                f"{where}, turn {turn_index}: expected a {'human' if expected == 'user' else 'gpt'} turn here; "
                "turns must alternate human, gpt, human, gpt …"
            )
    if not dialogue or dialogue[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: the conversation must end with a gpt turn (the answer to learn)")
    placeholders = [m["content"].count(IMAGE_PLACEHOLDER) for m in messages]
    misplaced = [i for i, (m, n) in enumerate(zip(messages, placeholders)) if n and m["role"] != "user"]
    if misplaced:
        raise DatasetError(f"{where}, turn {misplaced[0]}: {IMAGE_PLACEHOLDER} may only appear in human turns")
    expected_images = 1 if has_image else 0
    if sum(placeholders) != expected_images:
        raise DatasetError(
            f"{where}: the conversation holds {sum(placeholders)} {IMAGE_PLACEHOLDER} placeholder(s) but the record "
            f"has {expected_images} image(s); put exactly one {IMAGE_PLACEHOLDER} in a human turn per image"
        )
    return messages


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs from a JSON list or a JSONL file; ``where`` names the file, line/index and id."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImageFileError(f"{path}: dataset file not found") from None
    records: list[tuple[str, Any]] = []
    if path.suffix.lower() == ".jsonl":
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            records.append((_where(f"{path}:{line_number}", record), record))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of records (or use a .jsonl file, one record per line)")
        records = [(_where(f"{path} record {index}", record), record) for index, record in enumerate(data)]
    if not records:
        raise DatasetError(f"{path}: the dataset holds no records")
    return records


def _where(location: str, record: Any) -> str:
    record_id = record.get("id") if isinstance(record, Mapping) else None
    return f"{location} (id {record_id!r})" if record_id is not None else location


class LlavaJsonDataset:
    """Records in the LLaVA instruction format, validated up front so a bad record fails before training."""

    def __init__(self, path: str | Path, image_folder: str | Path | None = None):
        self.path = Path(path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.records: list[tuple[str, str | None, list[dict[str, str]]]] = []
        for where, record in read_records(self.path):
            image = record.get("image") if isinstance(record, Mapping) else None
            if image is not None and not isinstance(image, str):
                raise DatasetError(f"{where}: 'image' must be a path string, got {type(image).__name__}")
            messages = conversation_messages(record, where, has_image=image is not None)
            if image is not None and not (self.image_folder / image).is_file():
                raise ImageFileError(
                    f"{where}: image {image!r} not found (looked for {self.image_folder / image}); fix the path or "
                    "pass image_folder= (data.image_folder in a training config)"
                )
            self.records.append((where, image, messages))
        self.size = len(self.records)

    def example(self, index: int) -> Example:
        where, image, messages = self.records[index]
        images = [] if image is None else [open_image(self.image_folder / image, label=f"{where} image {image!r}")]
        return Example(images=images, messages=[dict(m) for m in messages], where=where)

    def texts(self, limit: int) -> list[list[dict[str, str]]]:
        return [[dict(m) for m in messages] for _, _, messages in self.records[:limit]]


#: Rendered scenes a :class:`SyntheticShapesSource` keeps for the examples that share them.
_RENDERED_SCENES_KEPT = 64


class SyntheticShapesSource:
    """The synthetic-shapes task as an endless source.

    With ``samples_per_scene=1`` example ``i`` is scene ``i`` of the stream ``seed``, with one question of every
    form that applies (at most ``max_turns`` of them, favouring forms with a larger ``form_weights`` entry).
    With ``samples_per_scene=k`` examples ``k*s … k*s + k - 1`` all show scene ``s``, each a conversation of
    its own drawn from its own random stream: the scene is rendered once and (through ``image_key``) preprocessed
    once for all of them, and one batch holds several questions about the same image, which only reading the
    question tells apart.
    With ``independent_turns`` each question of a conversation becomes a single-turn conversation of its own
    (``Example.branches``): trained packed, every answer sees the image and its own question only, so a scene
    teaches several answers for one pass over its image tokens and none can be copied from another.
    """

    size = None

    def __init__(self, seed: int = 0, max_turns: int | None = None, form_weights: dict[str, float] | None = None,
                 balanced_negatives: bool = False, samples_per_scene: int = 1, independent_turns: bool = False,
                 every_question: bool = False):
        from llavakit.plugins import synthetic_shapes

        if samples_per_scene < 1:
            raise ConfigError(f"samples_per_scene must be at least 1, got {samples_per_scene}")
        self.seed = seed
        self.max_turns = max_turns
        self.form_weights = dict(form_weights or {})
        self.balanced_negatives = balanced_negatives
        self.samples_per_scene = samples_per_scene
        self.independent_turns = independent_turns
        if every_question and not independent_turns:
            raise ConfigError("every_question needs independent_turns: in one conversation later answers could be "
                              "copied from earlier ones")
        self.every_question = every_question
        self._task = synthetic_shapes
        self._rendered: dict[int, Image.Image] = {}
        self._lock = threading.Lock()

    def _scene(self, index: int):
        """Scene ``index`` and the random stream its questions continue from."""
        rng = self._task.scene_rng(self.seed, index)
        return self._task.sample_scene(rng), rng

    def _scene_conversation(self, scene_index: int):
        """Scene ``scene_index`` with its own conversation (the draw of ``samples_per_scene=1``)."""
        scene, rng = self._scene(scene_index)
        return scene, self._draw(scene, rng)

    def _draw(self, scene, rng):
        if self.every_question:
            return self._task.every_question(scene, rng, balanced_negatives=self.balanced_negatives)
        return self._task.training_conversation(scene, rng, self.max_turns, self.form_weights,
                                                balanced_negatives=self.balanced_negatives)

    def _conversation(self, index: int):
        """Example ``index``: its scene's index, the scene and its conversation."""
        if self.samples_per_scene == 1:
            return (index, *self._scene_conversation(index))
        scene_index, sample = divmod(index, self.samples_per_scene)
        scene, _ = self._scene(scene_index)
        rng = random.Random(f"synthetic-shapes:{self.seed}:{scene_index}:sample {sample}")
        return scene_index, scene, self._draw(scene, rng)

    def _render(self, scene_index: int, scene) -> Image.Image:
        """The scene's image, rendered once for the ``samples_per_scene`` examples that show it (the last few
        scenes are kept; prefetch threads may ask concurrently)."""
        if self.samples_per_scene == 1:
            return scene.render()
        with self._lock:
            image = self._rendered.get(scene_index)
        if image is None:
            image = scene.render()
            with self._lock:
                self._rendered[scene_index] = image
                while len(self._rendered) > _RENDERED_SCENES_KEPT:
                    del self._rendered[next(iter(self._rendered))]
        return image

    @staticmethod
    def _messages(turns) -> list[dict[str, str]]:
        messages = []
        for index, turn in enumerate(turns):
            prefix = IMAGE_PLACEHOLDER + "\n" if index == 0 else ""
            messages.append({"role": "user", "content": prefix + turn.question})
            messages.append({"role": "assistant", "content": turn.answer})
        return messages

    def example(self, index: int) -> Example:
        scene_index, scene, turns = self._conversation(index)
        where = f"synthetic scene {scene_index} (seed {self.seed})"
        if self.samples_per_scene > 1:
            where += f", sample {index}"
        branches = [self._messages([turn]) for turn in turns] if self.independent_turns else None
        return Example(images=[self._render(scene_index, scene)], messages=self._messages(turns[:1] if branches else turns),
                       where=where, image_key=("synthetic-shapes", self.seed, scene_index), branches=branches)

    def texts(self, limit: int) -> list[list[dict[str, str]]]:
        """One conversation for each of the first ``limit`` scenes, whatever ``samples_per_scene`` is (the
        tokenizer sees the same text distribution either way)."""
        return [self._messages(self._scene_conversation(index)[1]) for index in range(limit)]

    @property
    def patch_classes(self) -> tuple[str, ...]:
        """Names of the per-patch classes :meth:`patch_example` labels with (0 is background)."""
        return self._task.PATCH_CLASSES

    @property
    def patch_factors(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        """Each factor of the patch classes (shape, colour): its label names and every class's label in it."""
        return {name: (names, self._task.patch_factor_labels(name)) for name, names in self._task.PATCH_FACTORS.items()}

    @property
    def patch_places(self) -> tuple[str, ...]:
        """Names of the per-patch places from the left :meth:`patch_example` also labels with (0 is background)."""
        return self._task.PATCH_PLACES

    def patch_example(self, index: int, rows: int, cols: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Scene ``index`` (the same scene :meth:`example` gives) with, on a ``rows`` × ``cols`` grid of the whole
        image stretched to one tile, each patch's class and its shape's place from the left (both ``int64
        [rows, cols]``): the labels of a ``patch-labels`` training stage. (With ``samples_per_scene=1`` this is
        the scene :meth:`example` ``index`` shows.)"""
        scene, _ = self._scene(index)
        classes, places = scene.patch_labels_and_places(rows, cols)
        return scene.render(), torch.from_numpy(classes), torch.from_numpy(places)


# ------------------------------------------------------------------------------------------ encoding
def answer_spans(processor: Processor, messages: Sequence[Mapping[str, Any]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span is what rendering it adds after the generation prompt (its text and the template's
    end-of-turn marker), found by rendering growing prefixes of the conversation; the template must render
    each prefix as a prefix of the whole, as every LLaVA template does.
    """
    render = processor.apply_chat_template
    full = render(list(messages), add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = render(list(messages[:index]), add_generation_prompt=True)
        end_text = render(list(messages[: index + 1]), add_generation_prompt=False)
        if not (full.startswith(start_text) and full.startswith(end_text) and len(end_text) > len(start_text)):
            raise ConfigError(
                f"{where}: the chat template does not render the conversation turn by turn (the prompt for turn "
                f"{index} is not a prefix of the whole), so answers cannot be located for the labels; use a template "
                "whose generation prompt is the start of the assistant turn"
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def encode_example(processor: Processor, example: Example, *, max_length: int | None = None,
                   image_cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None = None) -> EncodedExample:
    """Token ids and labels of one example; labels are ``-100`` except on assistant answers.

    ``image_cache`` (a dict the caller keeps, e.g. for one batch) holds the preprocessed images of examples
    with an ``image_key``, so examples sharing a scene resize it once: resizing is most of the data cost.

    An example with ``branches`` is packed: each branch is encoded as the whole conversation it is, then the
    longest token prefix they all share (which must hold every image) is kept once and the branches' remaining
    tokens follow one another. Each branch keeps the positions it has alone and, through the mask
    :func:`collate` builds from ``segments``, sees only the shared prefix and itself, so its loss is exactly
    the loss of training on it alone, while the image tokens, most of the sequence, are computed once.
    """
    if example.branches is not None:
        return _encode_branches(processor, example, max_length=max_length, image_cache=image_cache)
    encoded = _encode_conversation(processor, example, image_cache)
    _check_length(encoded.input_ids, example.where, max_length)
    return encoded


def _encode_conversation(processor: Processor, example: Example,
                         image_cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None) -> EncodedExample:
    text, spans = answer_spans(processor, example.messages, example.where)
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token
    # A template that writes BOS itself gets no second one from the tokenizer (as apply_chat_template does).
    encoding = tokenizer.backend.encode(text, add_special_tokens=not (bos is not None and text.startswith(bos)))
    labels = []
    for token, (start, end) in zip(encoding.ids, encoding.offsets):
        inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    pixel_values = image_sizes = None
    counts: list[int] = []
    if example.images:
        key = example.image_key if image_cache is not None else None
        cached = image_cache.get(key) if key is not None else None
        if cached is None:
            cached = processor.preprocess_images(example.images)
            if key is not None:
                image_cache[key] = cached
        pixel_values, image_sizes = cached
        counts = [processor.num_image_tokens(size) for size in image_sizes.tolist()]
    image_id = processor.image_token_id
    found = encoding.ids.count(image_id)
    if found != len(counts):
        raise DatasetError(
            f"{example.where}: the tokenised conversation holds {found} image token(s) but the example has "
            f"{len(counts)} image(s); {IMAGE_PLACEHOLDER} must be a special token of the tokenizer"
        )
    input_ids: list[int] = []
    expanded_labels: list[int] = []
    images = iter(counts)
    for token, label in zip(encoding.ids, labels):
        repeat = next(images) if token == image_id else 1
        input_ids.extend([token] * repeat)
        expanded_labels.extend([IGNORE_INDEX if token == image_id else label] * repeat)
    if all(label == IGNORE_INDEX for label in expanded_labels):
        raise DatasetError(f"{example.where}: no answer tokens to learn from (every assistant turn is empty)")
    return EncodedExample(input_ids, expanded_labels, pixel_values, image_sizes)


def _check_length(input_ids: Sequence[int], where: str, max_length: int | None) -> None:
    if max_length is not None and len(input_ids) > max_length:
        raise ContextLengthError(
            f"{where}: the example is {len(input_ids)} tokens long (images included), more than "
            f"max_length={max_length}; shorten the conversation or raise the training config's max_length"
        )


def _encode_branches(processor: Processor, example: Example, *, max_length: int | None,
                     image_cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None) -> EncodedExample:
    """The packed form of an example with ``branches`` (see :func:`encode_example`)."""
    if not example.branches:
        raise DatasetError(f"{example.where}: branches is an empty list; give at least one conversation")
    # The branches show the same images: preprocess them once, in the caller's cache when the images have a
    # key, else in one of this example's own.
    key = example.image_key if example.image_key is not None else "shared images"
    cache = image_cache if image_cache is not None and example.image_key is not None else {}
    parts = [
        _encode_conversation(processor, Example(example.images, messages, f"{example.where}, branch {index}", key), cache)
        for index, messages in enumerate(example.branches)
    ]
    shared = min(len(part.input_ids) for part in parts)
    for part in parts[1:]:
        shared = next((i for i, (a, b) in enumerate(zip(parts[0].input_ids[:shared], part.input_ids)) if a != b), shared)
    # Each branch starts with at least one unlabelled token: the loss of a branch's first label is read off
    # the token just before it in the packed row, which must be that branch's own.
    first_labels = [next(i for i, label in enumerate(part.labels) if label != IGNORE_INDEX) for part in parts]
    shared = min(shared, min(first_labels) - 1)
    image_id = processor.image_token_id
    if any(image_id in part.input_ids[shared:] for part in parts):
        raise DatasetError(
            f"{example.where}: the branches differ before their last image token, so they cannot share the images; "
            "give every branch the same prompt up to and including its images"
        )
    input_ids, labels = list(parts[0].input_ids[:shared]), [IGNORE_INDEX] * shared
    position_ids, segments = list(range(shared)), [0] * shared
    for index, part in enumerate(parts):
        input_ids += part.input_ids[shared:]
        labels += part.labels[shared:]
        position_ids += range(shared, len(part.input_ids))
        segments += [index + 1] * (len(part.input_ids) - shared)
    _check_length(input_ids, example.where, max_length)
    return EncodedExample(input_ids, labels, parts[0].pixel_values, parts[0].image_sizes, position_ids, segments)


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding) and,
    when any example has images, ``pixel_values`` (tile axis zero-padded) and ``image_sizes``.

    With a packed example (``segments``) in the batch, ``attention_mask`` is the boolean ``[B, 1, L, L]``
    mask of every row (a token sees the earlier tokens of the shared prompt and of its own branch; a padding
    token sees itself) and ``position_ids`` ``[B, L]`` comes along."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.segments is not None for e in examples):
        batch.update(_tree_mask(examples, length))
    with_images = [e for e in examples if e.pixel_values is not None]
    if with_images:
        tiles = max(e.pixel_values.shape[1] for e in with_images)
        pixel_values = torch.zeros(sum(e.pixel_values.shape[0] for e in with_images), tiles, *with_images[0].pixel_values.shape[2:])
        start = 0
        for example in with_images:
            count, example_tiles = example.pixel_values.shape[:2]
            pixel_values[start : start + count, :example_tiles] = example.pixel_values
            start += count
        batch["pixel_values"] = pixel_values
        batch["image_sizes"] = torch.cat([e.image_sizes for e in with_images])
    return batch


def _tree_mask(examples: Sequence[EncodedExample], length: int) -> dict[str, torch.Tensor]:
    """``attention_mask`` ``[B, 1, L, L]`` and ``position_ids`` ``[B, L]`` of a batch holding packed examples."""
    segments = torch.full((len(examples), length), -1, dtype=torch.long)  # -1: padding
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        segments[row, :n] = torch.tensor(example.segments if example.segments is not None else [0] * n)
        position_ids[row, :n] = torch.tensor(example.position_ids if example.position_ids is not None else range(n))
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool)  # a padding query sees itself (no empty softmax row)
    return {"attention_mask": allowed[:, None], "position_ids": position_ids}
