"""Synthetic shapes: seeded scenes of coloured shapes with questions and answers, the task of llavakit's demo model.

A scene is a plain light background of a varied size and aspect ratio (336×336 up to 1344×1008, square to
4:3, portrait or landscape) holding 1–4 non-overlapping shapes (circle, square, triangle in red, green, blue, yellow, purple or
orange); no two shapes of a scene share both shape and colour. Each scene supports five question forms:

==============  ==================================  ======================================
form            question                            answer
==============  ==================================  ======================================
``color``       What color is the {shape}?          {Color}.  (the shape is unique)
``shape``       What shape is {color}?              A {shape}.  (the colour is unique)
``count``       How many shapes are there?          {n}.
``exists``      Is there a {color} {shape}?         Yes. / No.
``describe``    Describe the image.                 A red circle, a blue square.  (left to right)
==============  ==================================  ======================================

Everything is a pure function of a seed: scene ``i`` of a stream seeded ``s`` is the same on every machine,
which makes training resumable step for step and held-out evaluation sets reproducible. This module is data
generation only; it imports nothing from the registry.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
#: The five question forms, in the order tables list them; the first four are the "short" forms.
FORMS: tuple[str, ...] = ("color", "shape", "count", "exists", "describe")
SHORT_FORMS: tuple[str, ...] = FORMS[:4]

#: Image sides in pixels, from 336×336 to 1344×1008: the short side 336–1008, the long side at most 4/3 of it
#: (square to 4:3, portrait or landscape) and at most 1344.
MIN_SIDE, MAX_SHORT_SIDE, MAX_LONG_SIDE, MAX_ASPECT = 336, 1008, 1344, 4 / 3
#: Shape sizes as fractions of the image's shorter side. The issue's floor is 1/14; staying well above it
#: keeps every shape wider than a 14-px patch even when the image is shrunk onto a 112-px AnyRes tile.
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 1 / 6, 2 / 7
#: Two centres must be this far apart horizontally (in mean shape widths): no two shapes share a column of
#: the image, so "left to right" is unambiguous.
MIN_HORIZONTAL_GAP = 1.0
MAX_SHAPES = 4
#: Classes of the per-patch labels (:meth:`Scene.patch_labels`): 0 is background, then one per (colour, shape).
PATCH_CLASSES: tuple[str, ...] = ("background",) + tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)
#: The two factors of a patch class, each with its own background label: what a factored patch head predicts.
PATCH_FACTORS: dict[str, tuple[str, ...]] = {"shape": ("background", *SHAPES), "color": ("background", *COLORS)}
#: Labels of :meth:`Scene.patch_places`: background, then each place from the left a shape can take.
PATCH_PLACES: tuple[str, ...] = ("background", *(f"shape {k} from the left" for k in range(1, MAX_SHAPES + 1)))


def patch_factor_labels(factor: str) -> tuple[int, ...]:
    """For each of :data:`PATCH_CLASSES`, its label in ``factor`` (an index into ``PATCH_FACTORS[factor]``)."""
    names = PATCH_FACTORS[factor]
    labels = [0]
    for name in PATCH_CLASSES[1:]:
        color, shape = name.split(" ")
        labels.append(names.index(shape if factor == "shape" else color))
    return tuple(labels)


def patch_class(shape: str, color: str) -> int:
    """The :data:`PATCH_CLASSES` index of a ``color`` ``shape``."""
    return PATCH_CLASSES.index(f"{color} {shape}")


@dataclass(frozen=True)
class PlacedShape:
    """One shape: its kind, colour name, centre ``(x, y)`` and side/diameter ``size``, in pixels."""

    shape: str
    color: str
    center_x: int
    center_y: int
    size: int

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        half = self.size // 2
        return (self.center_x - half, self.center_y - half, self.center_x - half + self.size, self.center_y - half + self.size)


@dataclass(frozen=True)
class Scene:
    """A scene: image ``height`` × ``width``, a light ``background`` colour and its shapes (left to right)."""

    height: int
    width: int
    background: tuple[int, int, int]
    shapes: tuple[PlacedShape, ...]

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height), self.background)
        draw = ImageDraw.Draw(image)
        for item in self.shapes:
            left, top, right, bottom = item.box
            _draw_shape(draw, item.shape, (left, top, right - 1, bottom - 1), (left + right) / 2, COLORS[item.color])
        return image

    def patch_labels(self, rows: int, cols: int, *, min_cover: float = 0.15, oversample: int = 8) -> np.ndarray:
        """Per-patch classes (:data:`PATCH_CLASSES`) of the image stretched onto a ``rows`` × ``cols`` patch grid,
        as an AnyRes base tile stretches it: ``int64 [rows, cols]``.

        A patch takes the class of the shape covering most of it, if that shape covers at least ``min_cover``
        of the patch (edge patches see part of a shape and must still name it), else background. Coverage is
        measured on a label map drawn ``oversample`` pixels per patch side with the scene's geometry scaled
        the same way (circles become the ellipses the stretched tile shows).
        """
        return self.canvas_patch_labels(rows, cols, (0, 0, rows, cols), min_cover=min_cover, oversample=oversample)

    def patch_places(self, rows: int, cols: int, *, min_cover: float = 0.15, oversample: int = 8) -> np.ndarray:
        """Per-patch place from the left (:data:`PATCH_PLACES`: 0 background, ``k`` the k-th shape by centre,
        left to right) of the image stretched onto a ``rows`` × ``cols`` grid, as :meth:`patch_labels` (the
        same patches are background): ``int64 [rows, cols]``. A description lists the shapes in this order, so
        features that carry it let the language model find "the next shape" by matching one direction."""
        return self._canvas_winners(rows, cols, (0, 0, rows, cols), min_cover=min_cover, oversample=oversample)

    def patch_labels_and_places(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`patch_labels` and :meth:`patch_places` together, from one drawing of the label map."""
        places = self.patch_places(rows, cols)
        return self._classes_by_place()[places], places

    def _classes_by_place(self) -> np.ndarray:
        """The :data:`PATCH_CLASSES` index of background (0) and of each shape, left to right."""
        return np.array([0] + [patch_class(item.shape, item.color) for item in self.shapes], dtype=np.int64)

    def canvas_patch_labels(self, rows: int, cols: int, placement: tuple[float, float, float, float], *,
                            min_cover: float = 0.15, oversample: int = 8) -> np.ndarray:
        """Per-patch classes of a ``rows`` × ``cols`` patch canvas on which the image occupies ``placement``
        ``(top, left, height, width)``, in patches (fractions allowed); the rest of the canvas is background.
        An AnyRes grid is such a canvas: the image resized keeping its aspect and centred on it, then cut into
        tiles (see :meth:`patch_labels` for how a patch's class is chosen)."""
        winner = self._canvas_winners(rows, cols, placement, min_cover=min_cover, oversample=oversample)
        return self._classes_by_place()[winner]

    def _canvas_winners(self, rows: int, cols: int, placement: tuple[float, float, float, float], *,
                        min_cover: float, oversample: int) -> np.ndarray:
        """Per patch of the canvas, ``1 + `` the index in :attr:`shapes` (left to right) of the shape covering it
        most, if at least ``min_cover``; else 0 (background)."""
        height, width = rows * oversample, cols * oversample
        top0, left0 = placement[0] * oversample, placement[1] * oversample
        scale_x, scale_y = placement[3] * oversample / self.width, placement[2] * oversample / self.height
        label_map = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(label_map)
        for index, item in enumerate(self.shapes, start=1):
            left, top, right, bottom = item.box
            box = (left0 + left * scale_x, top0 + top * scale_y, left0 + right * scale_x - 1, top0 + bottom * scale_y - 1)
            _draw_shape(draw, item.shape, box, (box[0] + box[2]) / 2, index)
        objects = np.asarray(label_map, dtype=np.int64).reshape(rows, oversample, cols, oversample)
        objects = objects.transpose(0, 2, 1, 3).reshape(rows, cols, oversample * oversample)
        cover = np.stack([(objects == k).mean(-1) for k in range(len(self.shapes) + 1)])  # [1 + n, rows, cols]
        cover[0] = min_cover  # background wins unless a shape covers at least min_cover
        return cover.argmax(0).astype(np.int64)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], apex_x: float,
                fill) -> None:
    """Draw ``shape`` filling ``box`` (inclusive corners); a triangle points up, its apex at ``apex_x``."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(apex_x, top), (right, bottom), (left, bottom)], fill=fill)


@dataclass(frozen=True)
class QuestionAnswer:
    form: str
    question: str
    answer: str


def sample_scene(rng: random.Random) -> Scene:
    """Draw one scene. Sizes, shapes, colours and positions all come from ``rng``."""
    short_side = rng.randint(MIN_SIDE, MAX_SHORT_SIDE)
    long_side = min(round(short_side * rng.uniform(1, MAX_ASPECT)), MAX_LONG_SIDE)
    height, width = (short_side, long_side) if rng.random() < 0.5 else (long_side, short_side)
    background = tuple(rng.randint(225, 250) for _ in range(3))
    count = rng.randint(1, MAX_SHAPES)
    kinds = rng.sample([(shape, color) for shape in SHAPES for color in COLORS], count)
    while True:
        placed = _place(kinds, height, width, rng)
        if placed is not None:
            break
    return Scene(height, width, background, tuple(sorted(placed, key=lambda s: s.center_x)))


def _place(kinds: Sequence[tuple[str, str]], height: int, width: int, rng: random.Random) -> list[PlacedShape] | None:
    """Rejection-sample non-overlapping positions for ``kinds``; ``None`` if this draw of sizes does not fit."""
    short = min(height, width)
    placed: list[PlacedShape] = []
    for shape, color in kinds:
        size = rng.randint(round(short * MIN_SIZE_FRACTION), round(short * MAX_SIZE_FRACTION))
        margin = max(2, size // 10)
        for _ in range(200):
            cx = rng.randint(size // 2 + margin, width - size // 2 - margin)
            cy = rng.randint(size // 2 + margin, height - size // 2 - margin)
            candidate = PlacedShape(shape, color, cx, cy, size)
            if all(_apart(candidate, other) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def _apart(a: PlacedShape, b: PlacedShape) -> bool:
    gap = max(a.size, b.size) // 10 + 2
    overlap_x = abs(a.center_x - b.center_x) * 2 < a.size + b.size + 2 * gap
    overlap_y = abs(a.center_y - b.center_y) * 2 < a.size + b.size + 2 * gap
    distinct_x = abs(a.center_x - b.center_x) >= MIN_HORIZONTAL_GAP * (a.size + b.size) / 2
    return distinct_x and not (overlap_x and overlap_y)


def with_article(phrase: str) -> str:
    """``"red circle"`` → ``"a red circle"``, ``"orange square"`` → ``"an orange square"``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(scene: Scene) -> str:
    """The ``describe`` answer: every shape left to right by its centre, e.g. ``A red circle, a blue square.``"""
    text = ", ".join(with_article(item.phrase) for item in sorted(scene.shapes, key=lambda s: s.center_x))
    return text[0].upper() + text[1:] + "."


def _unique(scene: Scene, item: PlacedShape, attribute: str) -> bool:
    """Whether no other shape of ``scene`` shares ``item``'s ``attribute`` (``"shape"`` or ``"color"``)."""
    return sum(getattr(o, attribute) == getattr(item, attribute) for o in scene.shapes) == 1


# The wording of each form, shared by ask() (one question of a form) and every_question() (all of them).
def _color_question(item: PlacedShape) -> QuestionAnswer:
    return QuestionAnswer("color", f"What color is the {item.shape}?", f"{item.color.capitalize()}.")


def _shape_question(item: PlacedShape) -> QuestionAnswer:
    return QuestionAnswer("shape", f"What shape is {item.color}?", f"A {item.shape}.")


def _count_question(scene: Scene) -> QuestionAnswer:
    return QuestionAnswer("count", "How many shapes are there?", f"{len(scene.shapes)}.")


def _describe_question(scene: Scene) -> QuestionAnswer:
    return QuestionAnswer("describe", "Describe the image.", describe(scene))


def _exists_question(shape: str, color: str, truth: bool) -> QuestionAnswer:
    return QuestionAnswer("exists", f"Is there {with_article(f'{color} {shape}')}?", "Yes." if truth else "No.")


def ask(scene: Scene, form: str, rng: random.Random, *, exists_answer: bool | None = None,
        balanced_negatives: bool = False) -> QuestionAnswer | None:
    """One question of ``form`` about ``scene``, or ``None`` if the scene has no valid question of that form.

    ``exists_answer`` forces the truth of an ``exists`` question (evaluation sets alternate it for an exact
    half/half split); by default it is a coin flip. ``balanced_negatives``: see :func:`_absent_pair`.
    """
    if form == "color":
        unique = [s for s in scene.shapes if _unique(scene, s, "shape")]
        return _color_question(rng.choice(unique)) if unique else None
    if form == "shape":
        unique = [s for s in scene.shapes if _unique(scene, s, "color")]
        return _shape_question(rng.choice(unique)) if unique else None
    if form == "count":
        return _count_question(scene)
    if form == "exists":
        truth = rng.random() < 0.5 if exists_answer is None else exists_answer
        if truth:
            item = rng.choice(scene.shapes)
            shape, color = item.shape, item.color
        else:
            shape, color = _absent_pair(scene, rng, balanced=balanced_negatives)
        return _exists_question(shape, color, truth)
    if form == "describe":
        return _describe_question(scene)
    raise ValueError(f"unknown question form {form!r}; use one of {', '.join(FORMS)}")


def every_question(scene: Scene, rng: random.Random, *, balanced_negatives: bool = False) -> list[QuestionAnswer]:
    """Every question ``scene`` answers, for training with independent turns: the colour of each shape that
    is unique in it, the shape of each colour that is unique, the count, the description, and "Is there …?"
    for each shape present and for as many absent (shape, colour) pairs (mostly near misses, see
    :func:`_absent_pair`), so yes and no stay even. In a random order."""
    turns: list[QuestionAnswer] = []
    for item in scene.shapes:
        if _unique(scene, item, "shape"):
            turns.append(_color_question(item))
        if _unique(scene, item, "color"):
            turns.append(_shape_question(item))
    turns += [_count_question(scene), _describe_question(scene)]
    absent: set[tuple[str, str]] = set()
    for _ in range(50):  # distinct absent pairs, as many as there are shapes (a handful of draws suffices)
        if len(absent) == len(scene.shapes):
            break
        absent.add(_absent_pair(scene, rng, balanced=balanced_negatives))
    turns += [_exists_question(item.shape, item.color, True) for item in scene.shapes]
    turns += [_exists_question(shape, color, False) for shape, color in sorted(absent)]
    rng.shuffle(turns)
    return turns


def _absent_pair(scene: Scene, rng: random.Random, *, balanced: bool = False) -> tuple[str, str]:
    """A (shape, colour) not in the scene; mostly a near miss sharing the shape or the colour of a present one,
    so answering needs the binding of colour to shape, not just either alone.

    Drawn uniformly, a near miss mostly shares a shape (a present shape has 5 other colours, a present colour
    only 2 other shapes), so checking the colour alone answers most of them, and a model learns exactly that.
    ``balanced`` (for training) first picks which of the two a near miss shares, each half the time.
    """
    present = {(s.shape, s.color) for s in scene.shapes}
    absent = [(shape, color) for shape in SHAPES for color in COLORS if (shape, color) not in present]
    near = [p for p in absent if any(p[0] == s.shape or p[1] == s.color for s in scene.shapes)]
    if not near or rng.random() >= 0.75:
        return rng.choice(absent)
    if balanced:
        same_color = [p for p in near if any(p[1] == s.color for s in scene.shapes)]
        same_shape = [p for p in near if any(p[0] == s.shape for s in scene.shapes)]
        return rng.choice(rng.choice([group for group in (same_color, same_shape) if group]))
    return rng.choice(near)


def scene_rng(seed: int, index: int) -> random.Random:
    """The random stream of scene ``index`` in a set seeded ``seed`` (independent of every other scene)."""
    return random.Random(f"synthetic-shapes:{seed}:{index}")


def training_conversation(
    scene: Scene, rng: random.Random, max_turns: int | None = None, weights: dict[str, float] | None = None,
    *, balanced_negatives: bool = False,
) -> list[QuestionAnswer]:
    """Every form that applies to ``scene`` (or the first ``max_turns`` of them), in a random order: one
    multi-turn conversation per image. ``weights`` (default 1 per form) make a form come earlier in
    proportion to its weight, so with ``max_turns=1`` it is asked that much more often.
    ``balanced_negatives``: see :func:`_absent_pair`."""
    weights = weights or {}
    # Weighted random order (Efraimidis-Spirakis): sort by u ** (1 / weight), largest first.
    keys = {form: rng.random() ** (1 / weights.get(form, 1.0)) for form in FORMS}
    forms = sorted(FORMS, key=lambda form: -keys[form])
    turns: list[QuestionAnswer] = []
    for form in forms:
        if max_turns is not None and len(turns) == max_turns:
            break
        qa = ask(scene, form, rng, balanced_negatives=balanced_negatives)
        if qa is not None:
            turns.append(qa)
    return turns


def llava_record(image: str, turns: Sequence[QuestionAnswer], record_id: str | None = None) -> dict:
    """A record in the LLaVA instruction format, ``<image>`` opening the first human turn."""
    conversations = []
    for index, turn in enumerate(turns):
        prefix = "<image>\n" if index == 0 else ""
        conversations.append({"from": "human", "value": prefix + turn.question})
        conversations.append({"from": "gpt", "value": turn.answer})
    record = {"image": image, "conversations": conversations}
    return {"id": record_id, **record} if record_id is not None else record


def iter_training_examples(seed: int, start: int = 0) -> Iterator[tuple[Image.Image, list[QuestionAnswer]]]:
    """An endless stream of ``(image, conversation)`` from scene ``start`` on (resuming is ``start=k``)."""
    index = start
    while True:
        rng = scene_rng(seed, index)
        scene = sample_scene(rng)
        yield scene.render(), training_conversation(scene, rng)
        index += 1


def evaluation_set(num_scenes: int, seed: int) -> list[tuple[Scene, list[QuestionAnswer]]]:
    """``num_scenes`` held-out scenes, each with one question of every applicable form.

    ``exists`` questions alternate Yes/No scene by scene, so exactly half (±1) of them are true.
    """
    items = []
    for index in range(num_scenes):
        rng = scene_rng(seed, index)
        scene = sample_scene(rng)
        questions = [ask(scene, form, rng, exists_answer=index % 2 == 0) for form in FORMS]
        items.append((scene, [qa for qa in questions if qa is not None]))
    return items


def write_dataset(folder: str | Path, num_scenes: int, seed: int, *, jsonl: bool = True) -> Path:
    """Render ``num_scenes`` scenes as PNGs plus a LLaVA-format ``data.jsonl`` (or ``data.json``) in ``folder``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, (image, turns) in zip(range(num_scenes), iter_training_examples(seed)):
        name = f"images/scene-{index:06d}.png"
        image.save(folder / name)
        records.append(llava_record(name, turns, record_id=f"scene-{index:06d}"))
    if jsonl:
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path = folder / "data.json"
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def task_text(num_scenes: int = 2000, seed: int = 0) -> Iterator[str]:
    """Every question and answer string of ``num_scenes`` scenes (the tokenizer's training text)."""
    for scene_index in range(num_scenes):
        rng = scene_rng(seed, scene_index)
        scene = sample_scene(rng)
        for form in FORMS:
            qa = ask(scene, form, rng)
            if qa is not None:
                yield qa.question
                yield qa.answer
