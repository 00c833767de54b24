"""Greedy generation against transformers' ``generate``, batching, stopping, streamers and the context check.

Tiny random checkpoints of each family are saved by transformers and loaded by llavakit from that folder.
Greedy outputs must be token-identical; a difference is accepted only where transformers' own top-2
logits at that step were within 1e-4 (a true tie), which :func:`assert_same_greedy_tokens` shows.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llavakit.core.errors import ConfigError, ContextLengthError
from llavakit.core.generation import GenerationConfig
from llavakit.registry import load_model
from tiny import FAMILIES, IMAGE_TOKEN_INDEX, PAD_TOKEN_ID, save_tiny_llava_hf

NEW_TOKENS = 24
TIE = 1e-4

#: Prompts as lists of image sizes (height, width); the text around them is random.
PROMPTS = {"text-only": [], "one-image": [(336, 500)], "two-images": [(200, 300), (500, 336)]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, folder, transformers model, llavakit model) for one tiny checkpoint."""
    folder = tmp_path_factory.mktemp(f"gen-{request.param}")
    reference = save_tiny_llava_hf(folder, request.param, seed=3)
    reference.generation_config.eos_token_id = None  # generate the full length on both sides
    return request.param, folder, reference, load_model(folder)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen-mistral-single")
    save_tiny_llava_hf(folder, "mistral", seed=5)
    return folder, load_model(folder)


def build_prompt(model, sizes, generator, *, text_before=4, text_after=6):
    """``input_ids [1, L]``, ``pixel_values [n, max_tiles, 3, S, S]`` (or None) and ``image_sizes`` for one row."""
    parts = [torch.tensor([1])]
    for size in sizes:
        parts += [torch.randint(3, 300, (text_before,), generator=generator),
                  torch.full((model.num_image_tokens(size),), IMAGE_TOKEN_INDEX)]
    parts.append(torch.randint(3, 300, (text_after,), generator=generator))
    input_ids = torch.cat(parts)[None]
    if not sizes:
        return input_ids, None, None
    tiles = [model.tiler.num_tiles(size) for size in sizes]
    pixel_values = torch.zeros(len(sizes), max(tiles), 3, 336, 336)
    for index, count in enumerate(tiles):
        pixel_values[index, :count] = torch.randn(count, 3, 336, 336, generator=generator)
    return input_ids, pixel_values, torch.tensor(sizes)


def assert_same_greedy_tokens(ours: list[int], theirs: list[int], their_logits: list[torch.Tensor], label: str) -> None:
    """Equal token by token; the first difference must be a tie in transformers' logits, after which the
    sequences legitimately diverge."""
    assert len(ours) == len(theirs), f"{label}: {len(ours)} new tokens vs transformers' {len(theirs)}"
    for step, (mine, reference) in enumerate(zip(ours, theirs)):
        if mine != reference:
            best, second = their_logits[step].topk(2).values.tolist()
            assert best - second < TIE, (
                f"{label}: step {step} gives {mine} but transformers gives {reference}, whose top-2 logits "
                f"differ by {best - second:.2e} (not a tie)"
            )
            return


@pytest.mark.parametrize("prompt_kind", sorted(PROMPTS))
def test_greedy_matches_transformers_generate(pair, prompt_kind):
    family, _, reference, model = pair
    generator = torch.Generator().manual_seed(11)
    input_ids, pixel_values, image_sizes = build_prompt(model, PROMPTS[prompt_kind], generator)
    images = {} if pixel_values is None else {"pixel_values": pixel_values, "image_sizes": image_sizes}
    with torch.no_grad():
        expected = reference.generate(
            input_ids, **images, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
    output = model.generate(input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                            max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert output.shape == (1, input_ids.shape[1] + NEW_TOKENS)
    assert torch.equal(output[:, : input_ids.shape[1]], input_ids)
    assert_same_greedy_tokens(
        output[0, input_ids.shape[1]:].tolist(), expected.sequences[0, input_ids.shape[1]:].tolist(),
        [step[0] for step in expected.logits], f"{family}/{prompt_kind}",
    )
    # The test can fail: a random model's greedy tokens are not one repeated id.
    assert len(set(output[0, input_ids.shape[1]:].tolist())) > 1


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(row.shape[1] for row in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - row.shape[1]:] = row[0]
        attention_mask[index, length - row.shape[1]:] = 1
    return input_ids, attention_mask


def test_batch_rows_generate_what_they_generate_alone(pair):
    family, _, _, model = pair
    generator = torch.Generator().manual_seed(5)
    row_sizes = [[(500, 336)], [], [(150, 150), (300, 100)], [(200, 300)]]
    rows = [build_prompt(model, sizes, generator, text_after=3 + 4 * i) for i, sizes in enumerate(row_sizes)]
    alone = [model.generate(ids, pixel_values=pv, image_sizes=sz, max_new_tokens=NEW_TOKENS, eos_token_id=[])
             for ids, pv, sz in rows]
    input_ids, attention_mask = left_pad([ids for ids, _, _ in rows])
    images = [(pv[i], size) for _, pv, sz in rows if pv is not None for i, size in enumerate(sz.tolist())]
    max_tiles = max(pv.shape[0] for pv, _ in images)
    pixel_values = torch.zeros(len(images), max_tiles, 3, 336, 336)
    for index, (pv, _) in enumerate(images):
        pixel_values[index, : pv.shape[0]] = pv
    image_sizes = torch.tensor([size for _, size in images])
    batched = model.generate(input_ids, attention_mask, pixel_values, image_sizes,
                             max_new_tokens=NEW_TOKENS, eos_token_id=[])
    prompt_length = input_ids.shape[1]
    for index, single in enumerate(alone):
        assert batched[index, prompt_length:].tolist() == single[0, -NEW_TOKENS:].tolist(), f"{family} row {index}"


def test_eos_ids_stop_rows_and_pad_the_rest(mistral):
    _, model = mistral
    generator = torch.Generator().manual_seed(2)
    first, _, _ = build_prompt(model, [], generator, text_after=9)
    second, _, _ = build_prompt(model, [], generator, text_after=5)
    free = [model.generate(ids, max_new_tokens=12, eos_token_id=[])[0, -12:].tolist() for ids in (first, second)]
    # Stop row 0 at its 4th token with one eos id, and row 1 at the first occurrence of another one.
    stop_first = free[0][3]
    stop_second = next(t for t in free[1] if t not in free[0][:4])
    input_ids, attention_mask = left_pad([first, second])
    output = model.generate(input_ids, attention_mask, max_new_tokens=12, eos_token_id=[stop_first, stop_second])
    new = output[:, input_ids.shape[1]:].tolist()
    row0_end = free[0].index(stop_first) + 1
    assert new[0][:row0_end] == free[0][:row0_end]
    assert all(token == PAD_TOKEN_ID for token in new[0][row0_end:])
    if stop_second in free[1]:
        row1_end = free[1].index(stop_second) + 1
        assert new[1][:row1_end] == free[1][:row1_end]
    # The loop stops once every row is done: no more steps than the longest row needs.
    ends = [row0_end, free[1].index(stop_second) + 1 if stop_second in free[1] else 12]
    assert output.shape[1] == input_ids.shape[1] + max(ends)


def test_max_new_tokens_zero_returns_the_prompt(mistral):
    _, model = mistral
    input_ids = torch.tensor([[1, 5, 9, 7]])
    assert torch.equal(model.generate(input_ids, max_new_tokens=0), input_ids)


def test_transformers_streamer_protocol(mistral):
    _, model = mistral
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(("put", value.clone()))

        def end(self):
            calls.append(("end", None))

    input_ids = torch.tensor([[1, 40, 41, 42, 43]])
    output = model.generate(input_ids, max_new_tokens=6, eos_token_id=[], streamer=Recorder())
    assert calls[0][0] == "put" and torch.equal(calls[0][1], input_ids)
    assert [c[0] for c in calls[1:]] == ["put"] * 6 + ["end"]
    assert torch.cat([c[1] for c in calls[1:-1]]).tolist() == output[0, 5:].tolist()


def test_context_budget_refused_before_any_compute(mistral, monkeypatch):
    _, model = mistral

    def must_not_run(*args, **kwargs):
        raise AssertionError("computation started before the context check")

    monkeypatch.setattr(model.vision_tower, "forward", must_not_run)
    monkeypatch.setattr(model.language_model, "forward", must_not_run)
    generator = torch.Generator().manual_seed(0)
    input_ids, pixel_values, image_sizes = build_prompt(model, [(336, 500)], generator)
    image_tokens = model.num_image_tokens((336, 500))
    limit = model.language_model.max_position_embeddings
    too_many = limit - input_ids.shape[1] + 1
    with pytest.raises(ContextLengthError) as err:
        model.generate(input_ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=too_many)
    message = str(err.value)
    assert f"{input_ids.shape[1]} tokens ({input_ids.shape[1] - image_tokens} text + {image_tokens} image tokens)" in message
    assert f"context is {limit}" in message and f"at most {too_many - 1}" in message


def test_defaults_come_from_generation_config_json(mistral, tmp_path):
    folder, _ = mistral
    copy = tmp_path / "with-defaults"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config.update(max_new_tokens=3, eos_token_id=[])
    (copy / "generation_config.json").write_text(json.dumps(config))
    model = load_model(copy)
    input_ids = torch.tensor([[1, 30, 31, 32]])
    assert model.generate(input_ids).shape == (1, 7)
    assert model.generate(input_ids, max_new_tokens=5).shape == (1, 9)


def test_bad_options_and_inputs_are_refused(mistral):
    _, model = mistral
    input_ids = torch.tensor([[1, 30, 31]])
    with pytest.raises(ConfigError, match="temperature"):
        model.generate(input_ids, do_sample=True, temperature=0.0)
    with pytest.raises(ConfigError, match="top_p"):
        model.generate(input_ids, do_sample=True, top_p=1.5)
    with pytest.raises(ConfigError, match="left"):
        model.generate(input_ids, torch.tensor([[1, 1, 0]]))
    with pytest.raises(ConfigError, match="eos_token_id"):
        GenerationConfig(eos_token_id="2")
