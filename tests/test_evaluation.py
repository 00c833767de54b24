"""``llavakit eval-demo``: held-out scenes, exact-answer scoring per form and pooled, the printed table."""

from __future__ import annotations

import pytest
from shapes_tiny import tiny_training_config

from llavakit.plugins import synthetic_shapes
from llavakit.registry import evaluation
from llavakit.registry.cli import main
from llavakit.registry.loading import load_model
from llavakit.registry.training import train


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-model")
    config = tiny_training_config(folder, stages=[{"name": "s", "steps": 1, "batch_size": 2, "lr": 1e-3}])
    return train(config, progress=False)


def test_scores_count_exact_answers_per_form(monkeypatch):
    items = synthetic_shapes.evaluation_set(6, 5)
    expected = {((s.width, s.height), t.question): t.answer for s, turns in items for t in turns}
    assert len(expected) == sum(len(turns) for _, turns in items)  # image size and question identify a question
    calls = []

    def oracle(model, images, questions, batch_size):
        calls.append(len(questions))
        # Right on everything except the count questions.
        return [expected[(image.size, q)] if not q.startswith("How many") else "9." for image, q in zip(images, questions)]

    monkeypatch.setattr(evaluation, "answer_questions", oracle)

    class Model:
        def eval(self):
            return self

    scores = evaluation.evaluate_demo(Model(), 6, 5, batch_size=4)
    assert scores.forms["count"].correct == 0 and scores.forms["count"].total == 6
    for form in ("color", "shape", "exists", "describe"):
        assert scores.forms[form].correct == scores.forms[form].total > 0
    pooled = scores.short_pooled
    assert pooled.total == sum(scores.forms[f].total for f in synthetic_shapes.SHORT_FORMS)
    assert pooled.correct == pooled.total - 6
    assert max(calls) <= 4 and sum(calls) == sum(s.total for s in scores.forms.values())
    table = scores.table()
    assert "| count | How many shapes are there? | 0 | 6 | 0.0% |" in table
    assert "| describe | Describe the image. | 6 | 6 | 100.0% |" in table
    assert "6 held-out scenes (seed 5)" in table


def test_answers_come_from_the_model_greedily(tiny_model_folder):
    model = load_model(tiny_model_folder)
    scene = synthetic_shapes.sample_scene(synthetic_shapes.scene_rng(1, 0))
    answers = evaluation.answer_questions(model, [scene.render()] * 3, ["Describe the image."] * 3, batch_size=2)
    assert len(answers) == 3 and answers[0] == answers[1] == answers[2]


def test_eval_demo_command_prints_the_table(tiny_model_folder, capsys):
    assert main(["eval-demo", "--n", "2", "--seed", "3", "--model", str(tiny_model_folder), "--show-mistakes", "1"]) == 0
    out = capsys.readouterr().out
    assert "Exact answers on 2 held-out scenes (seed 3)" in out
    assert "**short forms pooled**" in out
    assert main(["eval-demo", "--n", "0", "--model", str(tiny_model_folder)]) == 1
    assert "--n must be a positive number of scenes" in capsys.readouterr().err
