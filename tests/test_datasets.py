"""Training data: LLaVA-format records, clear errors for bad ones, answer-only labels and right padding."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from shapes_tiny import tiny_model_with_processor

from llavakit.core.errors import ConfigError, ContextLengthError, ImageFileError
from llavakit.core.model import IGNORE_INDEX
from llavakit.plugins import synthetic_shapes
from llavakit.registry.datasets import (
    DatasetError,
    Example,
    LlavaJsonDataset,
    SyntheticShapesSource,
    collate,
    encode_example,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_with_processor(tmp_path_factory.mktemp("shapes-tokenizer"))


@pytest.fixture(scope="module")
def processor(model):
    return model.processor


def write_jsonl(folder, records):
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(**overrides):
    base = {
        "id": "r1",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    return {**base, **overrides}


@pytest.fixture
def image_folder(tmp_path):
    Image.new("RGB", (40, 30), (250, 250, 250)).save(tmp_path / "a.png")
    return tmp_path


def test_jsonl_and_json_records_load(image_folder):
    second = record(id="r2", conversations=record()["conversations"] + [
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "1."}])
    jsonl = LlavaJsonDataset(write_jsonl(image_folder, [record(), second]))
    assert jsonl.size == 2
    example = jsonl.example(1)
    assert example.images[0].size == (40, 30)
    assert [m["role"] for m in example.messages] == ["user", "assistant", "user", "assistant"]
    assert "r2" in example.where and "data.jsonl:2" in example.where
    (image_folder / "data.json").write_text(json.dumps([record()]))
    assert LlavaJsonDataset(image_folder / "data.json").example(0).messages == jsonl.example(0).messages


def test_text_only_record_needs_no_placeholder(image_folder):
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    dataset = LlavaJsonDataset(write_jsonl(image_folder, [text_only]))
    assert dataset.example(0).images == []


def test_image_folder_option(tmp_path, image_folder):
    data = tmp_path / "elsewhere"
    data.mkdir()
    path = write_jsonl(data, [record()])
    with pytest.raises(ImageFileError, match=r"data.jsonl:1 \(id 'r1'\): image 'a.png' not found"):
        LlavaJsonDataset(path)
    assert LlavaJsonDataset(path, image_folder=image_folder).size == 1


BAD_RECORDS = [
    (record(image="missing.png"), ImageFileError, r"data.jsonl:1 \(id 'r1'\): image 'missing.png' not found"),
    (record(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "gpt"}]), DatasetError,
     r"id 'r1'\), turn 1: each turn needs 'from' and 'value'"),
    (record(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "robot", "value": "A"}]), DatasetError,
     r"turn 1: unknown speaker 'robot'"),
    (record(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "Q2"}]), DatasetError,
     r"turn 1: expected a gpt turn here"),
    (record(conversations=[{"from": "human", "value": "<image>\nQ"}]), DatasetError, r"must end with a gpt turn"),
    (record(conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]), DatasetError,
     r"holds 0 <image> placeholder\(s\) but the record has 1 image"),
    (record(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "<image>"}]), DatasetError,
     r"turn 1: <image> may only appear in human turns"),
    (record(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": 3}]), DatasetError,
     r"turn 1: 'value' must be a string"),
    (record(conversations=[]), DatasetError, r"'conversations' must be a non-empty list"),
    (record(image=5), DatasetError, r"'image' must be a path string"),
]


@pytest.mark.parametrize("bad, error, message", BAD_RECORDS)
def test_bad_records_name_the_record_and_turn(image_folder, bad, error, message):
    path = write_jsonl(image_folder, [bad])
    with pytest.raises(error, match=message):
        LlavaJsonDataset(path)


def test_unparsable_files_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"conversations": []}\n{not json\n')
    with pytest.raises(DatasetError, match=r"data.jsonl:2: not valid JSON"):
        LlavaJsonDataset(path)
    (tmp_path / "data.json").write_text('{"a": 1}')
    with pytest.raises(DatasetError, match="expected a JSON list of records"):
        LlavaJsonDataset(tmp_path / "data.json")
    with pytest.raises(ImageFileError, match="dataset file not found"):
        LlavaJsonDataset(tmp_path / "nope.jsonl")


def test_errors_are_value_and_os_errors():
    assert issubclass(DatasetError, ValueError) and issubclass(DatasetError, ConfigError)
    assert issubclass(ImageFileError, OSError)


def test_labels_cover_exactly_the_answers(processor):
    example = SyntheticShapesSource(seed=3).example(0)
    encoded = encode_example(processor, example)
    ids, labels = encoded.input_ids, encoded.labels
    assert len(ids) == len(labels)
    image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    height, width = encoded.image_sizes[0].tolist()
    assert len(image_positions) == processor.num_image_tokens((height, width))
    assert image_positions == list(range(image_positions[0], image_positions[0] + len(image_positions)))
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    # Every labelled token is its own input id, and the labelled tokens read back as the answers, each
    # followed by the end-of-turn token; everything else (prompt, template, image) is masked.
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in labelled)
    answers = [m["content"] for m in example.messages if m["role"] == "assistant"]
    eos = processor.tokenizer.eos_token
    # (the shapes tokenizer's decoder drops the one leading space of a decoded text)
    assert processor.decode([ids[i] for i in labelled]) == "".join(f" {a}{eos}" for a in answers).removeprefix(" ")
    runs = [labelled[0]] + [b for a, b in zip(labelled, labelled[1:]) if b != a + 1]
    assert len(runs) == len(answers)
    masked_text = processor.decode([t for i, t in enumerate(ids) if i not in set(labelled) and t != processor.image_token_id])
    for message in example.messages:
        if message["role"] == "user":
            assert message["content"].replace("<image>", "") in masked_text


def test_training_tokens_match_the_inference_prompt(processor):
    example = SyntheticShapesSource(seed=3).example(1)
    encoded = encode_example(processor, example)
    first_question = example.messages[0]["content"].removeprefix("<image>\n")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": example.images[0]}, {"type": "text", "text": first_question}]}],
        tokenize=True, return_dict=True,
    )
    prompt_ids = prompt["input_ids"][0].tolist()
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert torch.equal(prompt["pixel_values"], encoded.pixel_values)
    assert encoded.labels[len(prompt_ids)] != IGNORE_INDEX  # the first answer token follows the prompt
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(prompt_ids)])


def test_collate_pads_on_the_right(processor):
    source = SyntheticShapesSource(seed=4)
    encoded = [encode_example(processor, source.example(i)) for i in range(3)]
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    lengths = [len(e.input_ids) for e in encoded]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, example in enumerate(encoded):
        n = lengths[row]
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        tiles = example.pixel_values.shape[1]
        assert torch.equal(batch["pixel_values"][row, :tiles], example.pixel_values[0])
        assert (batch["pixel_values"][row, tiles:] == 0).all()
    assert batch["image_sizes"].tolist() == [e.image_sizes[0].tolist() for e in encoded]


def test_batch_trains_the_model(model, processor):
    source = SyntheticShapesSource(seed=4)
    batch = collate([encode_example(processor, source.example(i)) for i in range(2)], processor.tokenizer.pad_token_id)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_too_long_example_is_refused(processor):
    example = SyntheticShapesSource(seed=4).example(0)
    with pytest.raises(ContextLengthError, match=r"synthetic scene 0 \(seed 4\): the example is \d+ tokens long"):
        encode_example(processor, example, max_length=10)


def test_images_and_placeholders_must_agree(processor):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A."}]
    assert encode_example(processor, Example(images=[], messages=messages, where="record 9")).pixel_values is None
    unplaced = Example(images=[Image.new("RGB", (30, 30))], messages=messages, where="record 9")
    with pytest.raises(DatasetError, match="record 9: the tokenised conversation holds 0 image token"):
        encode_example(processor, unplaced)


def test_written_synthetic_dataset_matches_the_stream(tmp_path, processor):
    path = synthetic_shapes.write_dataset(tmp_path, 2, seed=6)
    from_file = LlavaJsonDataset(path).example(1)
    from_stream = SyntheticShapesSource(seed=6).example(1)
    assert from_file.messages == from_stream.messages
    assert encode_example(processor, from_file).input_ids == encode_example(processor, from_stream).input_ids


def test_samples_of_one_scene_share_its_image_and_ask_their_own_questions(processor):
    source = SyntheticShapesSource(seed=7, max_turns=1, samples_per_scene=4)
    examples = [source.example(i) for i in range(8)]
    # Samples 0-3 show scene 0, 4-7 scene 1: the same rendered image object and key within a scene.
    assert all(e.images[0] is examples[0].images[0] for e in examples[:4])
    assert examples[4].images[0] is not examples[0].images[0]
    assert [e.image_key for e in examples] == [("synthetic-shapes", 7, 0)] * 4 + [("synthetic-shapes", 7, 1)] * 4
    assert examples[0].images[0].tobytes() == SyntheticShapesSource(seed=7).example(0).images[0].tobytes()
    assert "synthetic scene 1 (seed 7), sample 5" == examples[5].where
    # Each sample draws its own question (one conversation each, not turns of one conversation).
    questions = [e.messages[0]["content"] for e in examples]
    assert all(len(e.messages) == 2 for e in examples)
    assert len(set(questions[:4])) > 1 or len(set(questions[4:])) > 1
    # A fresh source gives the same samples (a pure function of seed and index).
    again = SyntheticShapesSource(seed=7, max_turns=1, samples_per_scene=4).example(6)
    assert again.messages == examples[6].messages
    # The tokenizer's text does not depend on how many samples a scene serves.
    assert source.texts(5) == SyntheticShapesSource(seed=7, max_turns=1).texts(5)


def test_examples_sharing_an_image_key_are_preprocessed_once(processor, monkeypatch):
    source = SyntheticShapesSource(seed=7, max_turns=1, samples_per_scene=3)
    calls = []
    original = processor.preprocess_images
    monkeypatch.setattr(processor, "preprocess_images", lambda images: calls.append(1) or original(images))
    cache: dict = {}
    shared = [encode_example(processor, source.example(i), image_cache=cache) for i in range(6)]
    assert len(calls) == 2
    alone = encode_example(processor, source.example(4))
    assert len(calls) == 3  # without a cache nothing is shared
    assert torch.equal(shared[4].pixel_values, alone.pixel_values)
    assert shared[4].input_ids == alone.input_ids and shared[4].labels == alone.labels
    with pytest.raises(ConfigError, match="samples_per_scene must be at least 1"):
        SyntheticShapesSource(seed=7, samples_per_scene=0)


def test_independent_turns_are_packed_and_each_computes_what_it_computes_alone(model, processor):
    source = SyntheticShapesSource(seed=3, independent_turns=True)
    examples = [source.example(i) for i in range(3)]
    plain = SyntheticShapesSource(seed=3)
    for index, example in enumerate(examples):
        # The branches are the turns of the scene's usual conversation, one single-turn conversation each.
        turns = plain.example(index).messages
        assert [m for branch in example.branches for m in branch][1::2] == turns[1::2]
        assert all(len(branch) == 2 and branch[0]["content"].startswith("<image>\n") for branch in example.branches)
        assert example.messages == example.branches[0]
    encoded = [encode_example(processor, e) for e in examples]
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    length = batch["input_ids"].shape[1]
    assert batch["attention_mask"].shape == (3, 1, length, length) and batch["attention_mask"].dtype == torch.bool
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    checked = 0
    for row, (example, packed_example) in enumerate(zip(examples, encoded)):
        segments = torch.tensor(packed_example.segments)
        image_positions = [i for i, t in enumerate(packed_example.input_ids) if t == processor.image_token_id]
        assert set(segments[image_positions].tolist()) == {0}  # the image tokens are computed once
        for branch_index, messages in enumerate(example.branches):
            alone = encode_example(processor, Example(example.images, messages, "alone"))
            mine = ((segments == 0) | (segments == branch_index + 1)).nonzero().flatten().tolist()
            assert [packed_example.input_ids[i] for i in mine] == alone.input_ids
            assert [packed_example.labels[i] for i in mine] == alone.labels
            assert [packed_example.position_ids[i] for i in mine] == list(range(len(alone.input_ids)))
            with torch.no_grad():
                logits = model(**collate([alone], processor.tokenizer.pad_token_id)).logits[0]
            torch.testing.assert_close(packed[row, mine], logits, rtol=0, atol=1e-5)
            checked += 1
    assert checked >= 10
    # The packed loss is the mean over every branch's answer tokens, so it trains.
    assert torch.isfinite(model(**batch).loss)


def test_every_question_comes_as_independent_turns(processor):
    source = SyntheticShapesSource(seed=3, independent_turns=True, every_question=True, balanced_negatives=True)
    example = source.example(2)
    scene, rng = source._scene(2)
    expected = synthetic_shapes.every_question(scene, rng, balanced_negatives=True)
    assert [(b[0]["content"], b[1]["content"]) for b in example.branches] == [
        ("<image>\n" + t.question, t.answer) for t in expected
    ]
    with pytest.raises(ConfigError, match="every_question needs independent_turns"):
        SyntheticShapesSource(seed=3, every_question=True)


def test_a_batch_may_mix_packed_and_plain_examples(model, processor):
    plain = encode_example(processor, SyntheticShapesSource(seed=3).example(0))
    packed = encode_example(processor, SyntheticShapesSource(seed=3, independent_turns=True).example(1))
    batch = collate([plain, packed], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        mixed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = model(**collate([plain], processor.tokenizer.pad_token_id)).logits
    n = len(plain.input_ids)
    torch.testing.assert_close(mixed[0, :n], alone[0], rtol=0, atol=1e-5)
    # A padding query sees only itself; real queries never see padding.
    mask = batch["attention_mask"][0, 0]
    assert mask[n:].equal(torch.eye(mask.shape[0], dtype=torch.bool)[n:]) and not mask[:n, n:].any()


def test_branches_must_share_their_images(processor):
    image = Image.new("RGB", (40, 30), "white")
    branches = [[{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A."}],
                [{"role": "user", "content": "Say <image>\nWhat?"}, {"role": "assistant", "content": "B."}]]
    with pytest.raises(DatasetError, match="record 4: the branches differ before their last image token"):
        encode_example(processor, Example([image], branches[0], "record 4", branches=branches))
    with pytest.raises(DatasetError, match="record 4: branches is an empty list"):
        encode_example(processor, Example([image], branches[0], "record 4", branches=[]))


def test_a_four_dimensional_mask_needs_positions_and_the_right_shape(model):
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(ConfigError, match="pass position_ids"):
        model(ids, attention_mask=mask)
    with pytest.raises(ConfigError, match=r"must be boolean \[batch, 1, 3, 3\].*torch.int64 \(1, 1, 3, 3\)"):
        model(ids, attention_mask=mask.long(), position_ids=torch.arange(3)[None])
    # The same causal pattern as a 4-D mask gives the plain causal result.
    torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=torch.arange(3)[None]).logits,
                               model(ids).logits, rtol=0, atol=1e-6)
