"""The bundled default model: a complete llava-hf folder in the package data, trained, and right on the
README's first command."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image

from llavakit.plugins import synthetic_shapes
from llavakit.registry.cli import main
from llavakit.registry.default_model import default_model_path, load_default_model
from llavakit.registry.evaluation import answer_questions

#: Floors for 40 fresh scenes (192 questions): under what the shipped model scores on them (pooled 100%,
#: every short form 100%, describe 95%), so a regression (a wrong default, a broken processor or tokenizer)
#: fails while a change of rounding does not. They happen to equal the issue's targets, which are measured on
#: 500 scenes (docs/demo.md), not here.
SHORT_POOLED_FLOOR, SHORT_FORM_FLOOR, DESCRIBE_FLOOR = 0.95, 0.9, 0.8

EXAMPLE_IMAGE = Path(str(resources.files("llavakit.registry").joinpath("examples/shapes.png")))


@pytest.fixture(scope="module")
def model():
    return load_default_model()


def test_the_default_is_a_small_llava_hf_folder():
    folder = default_model_path()
    assert folder.is_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["image_token_index"] == 3
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (folder / name).is_file(), name
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert weights < 30 * 2**20


def test_the_default_is_trained_and_has_its_own_tokenizer_and_template(model):
    assert model.untrained == set()
    processor = model.processor
    assert len(processor.tokenizer) <= model.language_model.vocab_size <= 512
    assert processor.image_token_id == model.image_token_index == 3
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}])
    assert prompt == "User: <image>\nHi?\nAssistant:"


def test_the_readme_command_runs_offline_on_the_trained_default(capsys):
    # The README's first command, and what it prints.
    assert main(["generate", "--image", str(EXAMPLE_IMAGE), "What color is the circle?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "Red."
    assert "RANDOM" not in captured.err


def test_it_reads_the_readme_image(model):
    image = Image.open(EXAMPLE_IMAGE)
    questions = {"What shape is red?": "A circle.", "What shape is blue?": "A square.",
                 "What shape is yellow?": "A triangle.", "How many shapes are there?": "3.",
                 "What color is the square?": "Blue.", "What color is the triangle?": "Yellow.",
                 "Is there a red square?": "No.", "Is there a blue square?": "Yes.",
                 "Describe the image.": "A red circle, a blue square, a yellow triangle."}
    answers = answer_questions(model, [image] * len(questions), list(questions))
    assert dict(zip(questions, answers)) == questions


def test_its_colour_answers_follow_the_image(model):
    images = [
        synthetic_shapes.Scene(480, 640, (240, 240, 235), (synthetic_shapes.PlacedShape("circle", color, 320, 240, 120),)).render()
        for color in ("red", "green", "blue", "yellow")
    ]
    answers = answer_questions(model, images, ["What color is the circle?"] * 4)
    assert answers == ["Red.", "Green.", "Blue.", "Yellow."]


def test_it_answers_held_out_questions_of_every_form(model):
    # Fresh scenes (seed 4242, never trained on, not the seed of the table in docs/demo.md).
    items = synthetic_shapes.evaluation_set(40, seed=4242)
    pairs = [(scene, turn) for scene, turns in items for turn in turns]
    answers = answer_questions(model, [scene.render() for scene, _ in pairs], [turn.question for _, turn in pairs])
    right: dict[str, list[bool]] = {}
    for answer, (_, turn) in zip(answers, pairs):
        right.setdefault(turn.form, []).append(answer == turn.answer)
    accuracy = {form: sum(hits) / len(hits) for form, hits in right.items()}
    short = [hit for form in synthetic_shapes.SHORT_FORMS for hit in right[form]]
    assert sum(short) / len(short) >= SHORT_POOLED_FLOOR, accuracy
    assert all(accuracy[form] >= SHORT_FORM_FLOOR for form in synthetic_shapes.SHORT_FORMS), accuracy
    assert accuracy["describe"] >= DESCRIBE_FLOOR, accuracy
