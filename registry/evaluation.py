"""Exact-answer accuracy of a model on freshly generated synthetic-shapes scenes (``llavakit eval-demo``).

Each scene gets one question of every form that applies to it (see
:mod:`llavakit.plugins.synthetic_shapes`); the model answers greedily, one single-turn conversation per
question, through its own processor and chat template, exactly as ``llavakit generate`` would. An answer
counts when it equals the expected one after trimming surrounding whitespace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

#: Long enough for the longest description (four shapes) with room to spare.
MAX_NEW_TOKENS = 40


@dataclass
class FormScore:
    correct: int = 0
    total: int = 0
    mistakes: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, answer)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@dataclass
class DemoScores:
    """Per-form scores plus the pooled score of the four short forms."""

    forms: dict[str, FormScore]
    num_scenes: int
    seed: int

    @property
    def short_pooled(self) -> FormScore:
        from llavakit.plugins.synthetic_shapes import SHORT_FORMS

        pooled = FormScore()
        for form in SHORT_FORMS:
            pooled.correct += self.forms[form].correct
            pooled.total += self.forms[form].total
        return pooled

    def table(self) -> str:
        """A Markdown table: one row per form, then the pooled short forms."""
        lines = [
            f"Exact answers on {self.num_scenes} held-out scenes (seed {self.seed}):",
            "",
            "| question form | example | correct | total | accuracy |",
            "|---|---|---:|---:|---:|",
        ]
        for form, score in self.forms.items():
            lines.append(f"| {form} | {FORM_EXAMPLES[form]} | {score.correct} | {score.total} | {score.accuracy:.1%} |")
        pooled = self.short_pooled
        lines.append(f"| **short forms pooled** | color, shape, count, exists | {pooled.correct} | {pooled.total} | "
                     f"**{pooled.accuracy:.1%}** |")
        return "\n".join(lines)


FORM_EXAMPLES = {
    "color": "What color is the circle?",
    "shape": "What shape is red?",
    "count": "How many shapes are there?",
    "exists": "Is there a blue square?",
    "describe": "Describe the image.",
}


def answer_questions(model, images: Sequence, questions: Sequence[str], *, batch_size: int = 16) -> list[str]:
    """Greedy answers of ``model`` to one question per image (single-turn conversations, batched)."""
    processor = model.processor
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = range(start, min(start + batch_size, len(questions)))
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": images[i]}, {"type": "text", "text": questions[i]}]}]
            for i in chunk
        ]
        batch = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, padding_side="left")
        with torch.inference_mode():
            output = model.generate(
                **batch.to(model.device), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                eos_token_id=processor.tokenizer.eos_token_id,
            )
        prompt_length = batch["input_ids"].shape[1]
        answers += [processor.decode(row[prompt_length:], skip_special_tokens=True).strip() for row in output]
    return answers


def evaluate_demo(model, num_scenes: int = 500, seed: int = 1234, *, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> DemoScores:
    """Score ``model`` on ``num_scenes`` scenes of the stream ``seed`` (training uses other seeds).

    Scenes are rendered when their questions come up (a scene is a few megabytes as pixels).
    """
    from llavakit.plugins.synthetic_shapes import FORMS, evaluation_set

    items = evaluation_set(num_scenes, seed)
    # Questions of one form together: a batch then stops as soon as its short answers are done.
    questions = sorted(
        ((FORMS.index(turn.form), index, turn) for index, (_, turns) in enumerate(items) for turn in turns),
        key=lambda item: item[:2],
    )
    scores = {form: FormScore() for form in FORMS}
    model.eval()
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        answers = answer_questions(
            model, [items[index][0].render() for _, index, _ in chunk], [turn.question for _, _, turn in chunk], batch_size=batch_size
        )
        for (_, _, turn), answer in zip(chunk, answers):
            score = scores[turn.form]
            score.total += 1
            if answer == turn.answer:
                score.correct += 1
            else:
                score.mistakes.append((turn.question, turn.answer, answer))
        if progress is not None:
            progress(len(chunk))
    return DemoScores(forms=scores, num_scenes=num_scenes, seed=seed)
