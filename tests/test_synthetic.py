"""The synthetic-shapes generator: seeded scenes within the issue's limits, and answers true to the scene."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from llavakit.plugins import synthetic_shapes as shapes

SCENES = [shapes.sample_scene(shapes.scene_rng(7, index)) for index in range(300)]


def test_scenes_are_a_pure_function_of_seed_and_index():
    again = [shapes.sample_scene(shapes.scene_rng(7, index)) for index in range(20)]
    assert again == SCENES[:20]
    other_seed = [shapes.sample_scene(shapes.scene_rng(8, index)) for index in range(20)]
    assert other_seed != SCENES[:20]
    assert shapes.scene_rng(7, 3).random() != shapes.scene_rng(7, 4).random()


@pytest.mark.parametrize("scene", SCENES[:100])
def test_scene_respects_the_limits(scene):
    short, long = sorted((scene.height, scene.width))
    assert 336 <= short <= 1008 and short <= long <= min(1344, round(short * 4 / 3))
    assert 1 <= len(scene.shapes) <= 4
    assert len({(s.shape, s.color) for s in scene.shapes}) == len(scene.shapes)
    for item in scene.shapes:
        assert item.shape in shapes.SHAPES and item.color in shapes.COLORS
        assert item.size >= short / 14
        left, top, right, bottom = item.box
        assert 0 <= left and right <= scene.width and 0 <= top and bottom <= scene.height
    for i, a in enumerate(scene.shapes):
        for b in scene.shapes[i + 1 :]:
            ax0, ay0, ax1, ay1 = a.box
            bx0, by0, bx1, by1 = b.box
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "shapes overlap"


def test_scenes_vary_in_size_orientation_and_count():
    assert {len(s.shapes) for s in SCENES} == {1, 2, 3, 4}
    assert any(s.height > s.width for s in SCENES) and any(s.width > s.height for s in SCENES)
    assert len({(s.height, s.width) for s in SCENES}) > 250


def test_render_draws_each_shape_in_its_colour_on_a_light_background():
    for scene in SCENES[:30]:
        image = scene.render()
        assert image.size == (scene.width, scene.height) and image.mode == "RGB"
        assert min(image.getpixel((0, 0))) >= 225
        for item in scene.shapes:
            # The centroid of the bounding box's lower middle lies inside circles, squares and triangles alike.
            point = (item.center_x, item.center_y + item.size // 6)
            assert image.getpixel(point) == shapes.COLORS[item.color]


def test_answers_are_true_to_the_scene():
    rng = random.Random(0)
    for scene in SCENES:
        for form in shapes.FORMS:
            qa = shapes.ask(scene, form, rng)
            if form == "color":
                unique_shapes = [s for s in scene.shapes if [o.shape for o in scene.shapes].count(s.shape) == 1]
                if not unique_shapes:
                    assert qa is None
                    continue
                item = next(s for s in scene.shapes if qa.question == f"What color is the {s.shape}?")
                assert item in unique_shapes and qa.answer == item.color.capitalize() + "."
            elif form == "shape":
                unique_colours = [s for s in scene.shapes if [o.color for o in scene.shapes].count(s.color) == 1]
                if not unique_colours:
                    assert qa is None
                    continue
                item = next(s for s in scene.shapes if qa.question == f"What shape is {s.color}?")
                assert item in unique_colours and qa.answer == f"A {item.shape}."
            elif form == "count":
                assert (qa.question, qa.answer) == ("How many shapes are there?", f"{len(scene.shapes)}.")
            elif form == "exists":
                present = any(qa.question == f"Is there {shapes.with_article(s.phrase)}?" for s in scene.shapes)
                assert qa.answer == ("Yes." if present else "No.")
            else:
                xs = sorted(scene.shapes, key=lambda s: s.center_x)
                expected = ", ".join(shapes.with_article(s.phrase) for s in xs)
                assert qa.answer == expected[0].upper() + expected[1:] + "."


def _negatives(balanced: bool) -> Counter:
    """How often false exists questions share a present colour / a present shape, over the test scenes."""
    rng = random.Random(1)
    shares = Counter()
    for scene in SCENES:
        qa = shapes.ask(scene, "exists", rng, exists_answer=False, balanced_negatives=balanced)
        assert qa.answer == "No."
        color, shape = qa.question.removeprefix("Is there ").removesuffix("?").split()[-2:]
        assert all((s.color, s.shape) != (color, shape) for s in scene.shapes)
        shares["color"] += any(s.color == color for s in scene.shapes)
        shares["shape"] += any(s.shape == shape for s in scene.shapes)
    return shares


def test_balanced_negatives_share_a_present_colour_as_often_as_a_shape():
    uniform, balanced = _negatives(False), _negatives(True)
    # Drawn uniformly, most near misses share a shape, so checking colours alone answers most of them ...
    assert uniform["color"] < 0.75 * uniform["shape"]
    # ... balanced, a present colour is named about as often as a present shape.
    assert abs(balanced["color"] - balanced["shape"]) < 0.25 * len(SCENES)
    assert balanced["color"] > uniform["color"] + 0.1 * len(SCENES)


def test_describe_lists_left_to_right_with_articles():
    scene = shapes.Scene(
        400, 600, (240, 240, 240),
        (shapes.PlacedShape("square", "orange", 450, 200, 60), shapes.PlacedShape("circle", "red", 100, 100, 60)),
    )
    assert shapes.describe(scene) == "A red circle, an orange square."
    qa = shapes.ask(scene, "exists", random.Random(0), exists_answer=True)
    assert qa.question in ("Is there an orange square?", "Is there a red circle?") and qa.answer == "Yes."


def test_left_to_right_order_is_unambiguous():
    for scene in SCENES:
        for a, b in zip(scene.shapes, scene.shapes[1:]):
            assert b.center_x - a.center_x >= shapes.MIN_HORIZONTAL_GAP * (a.size + b.size) / 2


def test_evaluation_set_has_every_form_and_half_true_exists_questions():
    items = shapes.evaluation_set(40, seed=99)
    forms = Counter(qa.form for _, turns in items for qa in turns)
    assert forms["count"] == forms["exists"] == forms["describe"] == 40
    assert 0 < forms["color"] <= 40 and 0 < forms["shape"] <= 40
    answers = Counter(qa.answer for _, turns in items for qa in turns if qa.form == "exists")
    assert answers == {"Yes.": 20, "No.": 20}
    assert shapes.evaluation_set(5, seed=99) == items[:5]


def test_training_conversations_cover_each_applicable_form_once():
    for index in range(50):
        rng = shapes.scene_rng(3, index)
        scene = shapes.sample_scene(rng)
        turns = shapes.training_conversation(scene, rng)
        forms = [t.form for t in turns]
        assert len(forms) == len(set(forms)) and {"count", "exists", "describe"} <= set(forms)


def test_every_question_asks_each_question_a_scene_answers_once():
    rng = random.Random(2)
    for scene in SCENES[:100]:
        turns = shapes.every_question(scene, rng, balanced_negatives=True)
        questions = [t.question for t in turns]
        assert len(questions) == len(set(questions))
        by_form = Counter(t.form for t in turns)
        unique_shapes = {s.shape for s in scene.shapes if [o.shape for o in scene.shapes].count(s.shape) == 1}
        unique_colours = {s.color for s in scene.shapes if [o.color for o in scene.shapes].count(s.color) == 1}
        assert {t.question for t in turns if t.form == "color"} == {f"What color is the {s}?" for s in unique_shapes}
        assert {t.question for t in turns if t.form == "shape"} == {f"What shape is {c}?" for c in unique_colours}
        assert by_form["count"] == by_form["describe"] == 1
        # "Is there …?" for every shape present, and as many absent pairs.
        answers = Counter(t.answer for t in turns if t.form == "exists")
        assert answers == Counter({"Yes.": len(scene.shapes), "No.": len(scene.shapes)})
        for qa in turns:  # each answer is the one ask() gives for that question
            if qa.form == "color":
                item = next(s for s in scene.shapes if qa.question == f"What color is the {s.shape}?")
                assert qa.answer == item.color.capitalize() + "."
            elif qa.form == "shape":
                item = next(s for s in scene.shapes if qa.question == f"What shape is {s.color}?")
                assert qa.answer == f"A {item.shape}."
            elif qa.form == "exists":
                present = any(qa.question == f"Is there {shapes.with_article(s.phrase)}?" for s in scene.shapes)
                assert qa.answer == ("Yes." if present else "No.")
            elif qa.form == "describe":
                assert qa.answer == shapes.describe(scene)


def test_training_conversations_can_be_capped():
    for index in range(20):
        full_rng, capped_rng = shapes.scene_rng(3, index), shapes.scene_rng(3, index)
        scene = shapes.sample_scene(full_rng)
        assert shapes.sample_scene(capped_rng) == scene
        full = shapes.training_conversation(scene, full_rng)
        capped = shapes.training_conversation(scene, capped_rng, max_turns=2)
        assert capped == full[:2]


def test_form_weights_set_how_often_a_form_is_asked_first():
    first = Counter()
    for index in range(600):
        rng = shapes.scene_rng(4, index)
        scene = shapes.sample_scene(rng)
        first[shapes.training_conversation(scene, rng, max_turns=1, weights={"describe": 4})[0].form] += 1
    assert 0.4 * 600 < first["describe"] < 0.6 * 600  # weight 4 of 8: about half
    assert all(first[form] > 0 for form in shapes.FORMS)


def test_write_dataset_writes_llava_records(tmp_path):
    path = shapes.write_dataset(tmp_path, 3, seed=5)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert (tmp_path / record["image"]).is_file()
        turns = record["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == 1
    as_json = shapes.write_dataset(tmp_path / "json", 2, seed=5, jsonl=False)
    assert json.loads(as_json.read_text())[0]["conversations"] == records[0]["conversations"]


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="unknown question form 'colour'"):
        shapes.ask(SCENES[0], "colour", random.Random(0))


def test_patch_labels_name_the_shape_covering_each_patch():
    square = shapes.PlacedShape("square", "blue", center_x=150, center_y=50, size=100)
    circle = shapes.PlacedShape("circle", "red", center_x=50, center_y=150, size=60)
    scene = shapes.Scene(height=200, width=400, background=(240, 240, 240), shapes=(circle, square))
    labels = scene.patch_labels(4, 8)  # 4 rows of 50 px, 8 columns of 50 px
    blue_square = shapes.PATCH_CLASSES.index("blue square")
    red_circle = shapes.patch_class("circle", "red")
    assert labels.shape == (4, 8) and labels.dtype.kind == "i"
    expected = torch.zeros(4, 8, dtype=torch.long)
    expected[0:2, 2:4] = blue_square  # x 100–200, y 0–100: four whole patches
    expected[2:4, 0:2] = red_circle   # x 20–80, y 120–180: a 60-px disc centred on the corner of 4 patches
    assert torch.equal(torch.from_numpy(labels), expected)
    # A shape covering less than min_cover of every patch leaves them background.
    assert (scene.patch_labels(4, 8, min_cover=0.5) == blue_square).sum() == 4
    assert (scene.patch_labels(4, 8, min_cover=0.5) == red_circle).sum() == 0
    # Places from the left: the circle (centre x 50) is first, the square (x 150) second, on the same patches.
    places = scene.patch_places(4, 8)
    assert torch.equal(torch.from_numpy(places), (expected == red_circle) * 1 + (expected == blue_square) * 2)
    assert shapes.PATCH_PLACES[1:3] == ("shape 1 from the left", "shape 2 from the left")


def test_patch_places_follow_the_order_of_a_description():
    for index in range(20):
        scene = shapes.sample_scene(shapes.scene_rng(4, index))
        classes, places = scene.patch_labels(8, 8), scene.patch_places(8, 8)
        assert ((classes == 0) == (places == 0)).all()
        together = scene.patch_labels_and_places(8, 8)
        assert (together[0] == classes).all() and (together[1] == places).all()
        # Each place's patches carry exactly the class of that shape in the description, left to right.
        listed = [{int(c) for c in classes[places == k]} for k in range(1, len(scene.shapes) + 1)]
        described = shapes.describe(scene).rstrip(".").lower().split(", ")
        assert [shapes.with_article(shapes.PATCH_CLASSES[c]).lower() for (c,) in listed] == described


def test_patch_labels_follow_the_stretch_of_a_base_tile():
    scene = shapes.sample_scene(shapes.scene_rng(0, 3))
    labels = scene.patch_labels(8, 8)
    for item in scene.shapes:
        row = int(item.center_y / scene.height * 8)
        col = int(item.center_x / scene.width * 8)
        assert labels[row, col] == shapes.patch_class(item.shape, item.color)
    present = {shapes.PATCH_CLASSES[c] for c in labels.ravel() if c}
    assert present == {item.phrase for item in scene.shapes}


def test_canvas_patch_labels_place_the_image_on_a_padded_canvas():
    rng = shapes.scene_rng(21, 0)
    scene = shapes.sample_scene(rng)
    whole = scene.patch_labels(8, 8)
    # The image fills the middle 8 of 12 patch columns (as AnyRes centres a resized image on its canvas):
    # the two padding columns on each side are background and the middle is the image's own labels.
    canvas = scene.canvas_patch_labels(8, 12, (0, 2, 8, 8))
    assert canvas.shape == (8, 12)
    assert (canvas[:, :2] == 0).all() and (canvas[:, 10:] == 0).all()
    assert (canvas[:, 2:10] == whole).all()
    assert (scene.canvas_patch_labels(8, 8, (0, 0, 8, 8)) == whole).all()
