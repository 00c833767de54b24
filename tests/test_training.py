"""Training: the loss falls, frozen parts stay put, resuming repeats the same losses, configs fail clearly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from shapes_tiny import TINY_MODEL, tiny_model_with_processor, tiny_training_config

from llavakit.core.config import ModelConfig
from llavakit.core.errors import CheckpointError, ConfigError
from llavakit.plugins import synthetic_shapes
from llavakit.registry.assembly import build_from_config
from llavakit.registry.cli import main
from llavakit.registry.datasets import SyntheticShapesSource
from llavakit.registry.loading import load_model
from llavakit.registry.training import (
    StageConfig,
    TrainingState,
    configure_components,
    example_indices,
    lr_factor,
    read_log,
    read_training_config,
    train,
    answer_batches,
    training_step,
)


def stage(**fields):
    return {"name": "s1", "steps": 4, "batch_size": 2, "lr": 3e-3, **fields}


def test_loss_decreases_when_overfitting_a_tiny_dataset(tmp_path):
    data = synthetic_shapes.write_dataset(tmp_path / "data", 2, seed=11)
    config = tiny_training_config(
        tmp_path, data={"source": "llava-json", "path": str(data)}, autocast="none",
        stages=[stage(steps=40, batch_size=2, lr=1e-2, warmup_steps=2)],
    )
    final = train(config, progress=False)
    losses = [entry["loss"] for entry in read_log(tmp_path / "run" / "log.jsonl")]
    assert len(losses) == 40
    assert losses[-1] < 0.25 * losses[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (final / name).is_file(), name
    assert json.loads((final / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert (tmp_path / "run" / "loss.png").is_file()
    reloaded = load_model(final)
    assert reloaded.processor is not None and reloaded.processor.image_token_id == 3


def test_frozen_components_do_not_change(tmp_path):
    config = tiny_training_config(
        tmp_path,
        stages=[stage(steps=2, components={"vision": {"freeze": True}, "llm": {"freeze": True}})],
    )
    final = train(config, progress=False)
    initial = build_from_config(ModelConfig.model_validate(TINY_MODEL), seed=0)
    trained = load_model(final)
    before, after = initial.state_dict(), trained.state_dict()
    for name, tensor in before.items():
        unchanged = torch.equal(tensor, after[name])
        if name.startswith(("vision_tower.", "language_model.")):
            assert unchanged, f"{name} changed although its component was frozen"
        else:
            assert name.startswith(("projector.", "tiler.")) and not unchanged, f"{name} did not train"


def test_stage_one_runs_the_frozen_vision_tower_without_activations(tmp_path):
    model = tiny_model_with_processor(tmp_path)
    settings = StageConfig(name="align", steps=1, batch_size=2, lr=1e-3,
                           components={"vision": {"freeze": True}, "llm": {"freeze": True}})
    groups = configure_components(model, settings)
    assert {g["component"] for g in groups} == {"projector", "tiler"}
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    seen = {}
    model.vision_tower.register_forward_hook(lambda module, args, output: seen.update(vision=output.requires_grad))
    model.language_model.register_forward_hook(lambda module, args, output: seen.update(llm=output.requires_grad))
    optimizer = torch.optim.AdamW(groups)
    batches = answer_batches(model.processor, SyntheticShapesSource(0), settings, 0, seed=0, max_length=None)
    result = training_step(model, batches, settings, optimizer, autocast=None, frozen_vision=True)
    assert math.isfinite(result.loss)
    # No graph through the vision tower; the frozen LLM keeps its activations so the projector gets a gradient.
    assert seen == {"vision": False, "llm": True}
    assert all(p.grad is not None for p in model.projector.parameters())
    assert "forward" not in vars(model.vision_tower)  # the no-grad wrapper is removed after the step


def test_resume_repeats_the_same_steps_and_losses(tmp_path):
    two_stages = [stage(name="a", steps=3, save_every=2, warmup_steps=1),
                  stage(name="b", steps=2, save_every=1, components={"vision": {"freeze": True}})]
    config = tiny_training_config(tmp_path, stages=two_stages)
    train(config, progress=False)
    first = read_log(tmp_path / "run" / "log.jsonl")
    assert [(e["stage"], e["step"]) for e in first] == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000003", "step-000004", "step-000005"]

    resumed_run = tmp_path / "resumed"
    train(config, resume=tmp_path / "run" / "checkpoints" / "step-000002", output=resumed_run, progress=False)
    second = read_log(resumed_run / "log.jsonl")
    assert [(e["stage"], e["step"], e["samples"]) for e in second] == [
        (e["stage"], e["step"], e["samples"]) for e in first[2:]]
    assert [e["loss"] for e in second] == [e["loss"] for e in first[2:]]
    final_first = load_file(tmp_path / "run" / "model" / "model.safetensors")
    final_second = load_file(resumed_run / "model" / "model.safetensors")
    assert all(torch.equal(final_first[k], final_second[k]) for k in final_first)


def test_resume_needs_a_training_checkpoint(tmp_path):
    config = tiny_training_config(tmp_path, stages=[stage(steps=1)])
    final = train(config, progress=False)
    with pytest.raises(CheckpointError, match="no training_state.pt"):
        train(config, resume=final, progress=False)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    results = {}
    for name, fields in {"big": {"batch_size": 4}, "accumulated": {"batch_size": 2, "grad_accum": 2}}.items():
        folder = tmp_path / name
        folder.mkdir()
        config = tiny_training_config(folder, autocast="none", stages=[stage(steps=1, **fields)])
        final = train(config, progress=False)
        results[name] = (read_log(folder / "run" / "log.jsonl")[0]["loss"], load_file(final / "model.safetensors"))
    (big_loss, big), (acc_loss, acc) = results["big"], results["accumulated"]
    assert big_loss == pytest.approx(acc_loss, rel=1e-5)
    for key in big:
        torch.testing.assert_close(big[key], acc[key], rtol=1e-4, atol=1e-6)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = StageConfig(name="s", steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(step, settings) for step in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[10] == pytest.approx(0.1) and factors[6] == pytest.approx(0.55)


def test_finite_datasets_are_reshuffled_each_epoch():
    class Finite:
        size = 5

    first_epoch = example_indices(Finite(), 0, 5, seed=1)
    second_epoch = example_indices(Finite(), 5, 5, seed=1)
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(5))
    assert first_epoch != second_epoch
    assert example_indices(Finite(), 3, 4, seed=1) == (first_epoch + second_epoch)[3:7]
    assert example_indices(SyntheticShapesSource(0), 7, 3, seed=1) == [7, 8, 9]


@pytest.mark.parametrize("change, message", [
    ({"init": "somewhere"}, "give either model .* or init"),
    ({"stages": [{"name": "s", "steps": 1, "lr": 1e-3, "components": {"vision": {"freeze": True},
      "projector": {"freeze": True}, "tiler": {"freeze": True}, "llm": {"freeze": True}}}]}, "freezes every component"),
    ({"stages": [{"name": "s", "steps": 1, "lr": 1e-3, "components": {"eyes": {}}}]}, r"stages.0.components.eyes"),
    ({"stages": [{"name": "s", "steps": 0, "lr": 1e-3}]}, r"stages.0.steps"),
    ({"tokenizer": {"vocab_size": 300, "path": "x"}}, "either path .* or vocab_size"),
    ({"data": {"source": "llava-json"}}, "needs path"),
    ({"data": {"source": "llava-json", "path": "d.jsonl", "samples_per_scene": 2}}, "samples_per_scene is a synthetic-shapes setting"),
    ({"data": {"source": "synthetic-shapes", "samples_per_scene": 0}}, r"data.samples_per_scene"),
    ({"data": {"source": "llava-json", "path": "d.jsonl", "independent_turns": True}},
     "independent_turns is a synthetic-shapes setting"),
    ({"data": {"source": "synthetic-shapes", "every_question": True}}, "every_question needs independent_turns"),
])
def test_bad_configs_name_the_field(tmp_path, change, message):
    config = tiny_training_config(tmp_path, **{"stages": [stage()], **change})
    with pytest.raises(ConfigError, match=message):
        read_training_config(config)


def test_relative_paths_follow_the_config_file(tmp_path):
    config = tiny_training_config(tmp_path, stages=[stage()], chat_template="t.jinja",
                                  data={"source": "llava-json", "path": "d/data.jsonl", "image_folder": "d/img"})
    read = read_training_config(config)
    assert read.chat_template == str(tmp_path / "t.jinja")
    assert read.data.path == str(tmp_path / "d" / "data.jsonl") and read.data.image_folder == str(tmp_path / "d" / "img")


def test_a_too_small_embedding_is_refused(tmp_path):
    small = {**TINY_MODEL, "llm": {"name": "llama", "options": {**TINY_MODEL["llm"]["options"], "vocab_size": 64}}}
    config = tiny_training_config(tmp_path, stages=[stage()], model=small)
    with pytest.raises(ConfigError, match=r"embedding has 64 rows; set model.llm.options.vocab_size to at least"):
        train(config, progress=False)


def test_train_command(tmp_path, capsys):
    config = tiny_training_config(tmp_path, stages=[stage(steps=2)])
    assert main(["train", str(config), "--no-progress", "--output", str(tmp_path / "cli-run")]) == 0
    assert f"trained model saved to {tmp_path / 'cli-run' / 'model'}" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ patch-labels stages
def test_patch_labels_stage_trains_only_the_vision_tower_and_resumes_exactly(tmp_path):
    # With the fullest head (factored, with places), whose state must come back on resume too.
    stages = [stage(name="vision", objective="patch-labels", steps=3, batch_size=4, lr=3e-3, save_every=1,
                    patch_head="factored", patch_places=True),
              stage(name="answers", steps=1, components={"vision": {"freeze": True}})]
    config = tiny_training_config(tmp_path, stages=stages)
    final = train(config, progress=False)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [(e["stage"], e["objective"]) for e in log] == [("vision", "patch-labels")] * 3 + [("answers", "answers")]
    # Per-patch labels: a 28-px tile of 14-px patches has 4 patches per image.
    assert all(e["answer_tokens"] == 4 * 4 for e in log[:3])

    # After the vision stage only the tower has moved; its head is not part of the saved model.
    initial = build_from_config(ModelConfig.model_validate(TINY_MODEL), seed=0).state_dict()
    after_vision = load_file(tmp_path / "run" / "checkpoints" / "step-000003" / "model.safetensors")
    trained = load_model(tmp_path / "run" / "checkpoints" / "step-000003").state_dict()
    assert set(trained) == set(initial)
    for name, tensor in initial.items():
        moved = not torch.equal(tensor, trained[name])
        # post_layernorm is not on the path to LLaVA's features, so it gets no gradient.
        should_move = name.startswith("vision_tower.") and "post_layernorm" not in name
        assert moved == should_move, f"{name}: moved={moved}"
    assert set(after_vision) == set(load_file(final / "model.safetensors"))  # the same tensors as any llava-hf save
    head_state = torch.load(tmp_path / "run" / "checkpoints" / "step-000003" / "training_state.pt")["patch_head"]
    assert head_state["weight"].shape[0] == 4 + 7 + 5  # shape, colour and place softmaxes

    # Resuming inside the stage restores the head too: the same losses follow.
    resumed = tmp_path / "resumed"
    train(config, resume=tmp_path / "run" / "checkpoints" / "step-000001", output=resumed, progress=False)
    again = read_log(resumed / "log.jsonl")
    assert [e["loss"] for e in again] == [e["loss"] for e in log[1:]]
    assert torch.equal(load_file(final / "model.safetensors")["vision_tower.vision_model.embeddings.patch_embedding.weight"],
                       load_file(resumed / "model" / "model.safetensors")["vision_tower.vision_model.embeddings.patch_embedding.weight"])


@pytest.mark.parametrize("patch_head, patch_places", [("joint", False), ("factored", False), ("factored", True)])
def test_patch_labels_loss_falls_on_a_repeated_batch(tmp_path, patch_head, patch_places):
    from llavakit.registry.training import patch_batches, patch_label_head, patch_label_step

    model = tiny_model_with_processor(tmp_path)
    settings = StageConfig(name="vision", objective="patch-labels", steps=1, batch_size=8, lr=1e-2,
                           patch_head=patch_head, patch_places=patch_places)
    source = SyntheticShapesSource(5)
    head = patch_label_head(model, source, settings, seed=0)
    assert head.places == (5 if patch_places else 0)
    optimizer = torch.optim.AdamW(configure_components(model, settings, head))
    batches = patch_batches(model, source, settings, 0)
    assert all((places is not None) == patch_places for _, _, places in batches)
    losses = [patch_label_step(model, batches, settings, optimizer, head, autocast=None).loss for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]


def test_a_factored_patch_head_scores_shape_and_colour_separately():
    from llavakit.plugins.synthetic_shapes import PATCH_CLASSES, patch_class
    from llavakit.registry.training import PatchHead

    source = SyntheticShapesSource(0)
    factors = {name: (len(names), list(lookup)) for name, (names, lookup) in source.patch_factors.items()}
    head = PatchHead(4, factors)
    assert head.out_features == 4 + 7
    classes = torch.tensor([[0, patch_class("triangle", "orange"), patch_class("circle", "red")]])
    # Logits that put all weight on the right shape and colour give (almost) zero loss for both factors ...
    logits = torch.full((1, 3, 11), -30.0)
    for position, (shape_label, color_label) in enumerate([(0, 0), (3, 6), (1, 1)]):
        logits[0, position, shape_label] = logits[0, position, 4 + color_label] = 30.0
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    features = torch.zeros(1, 3, 4)
    head.forward = lambda x: logits  # the loss, not the linear map, is under test
    assert float(head.loss(features, classes)) < 1e-6
    # ... and a wrong colour alone costs the colour factor's full cross-entropy.
    logits[0, 1, 4 + 6], logits[0, 1, 4 + 1] = -30.0, 30.0
    assert float(head.loss(features, classes)) == pytest.approx(60.0 / 3, rel=1e-4)
    assert len(PATCH_CLASSES) == 19

    # A place softmax adds its own cross-entropy over labels given beside the classes, and must get them.
    placed = PatchHead(4, factors, places=5)
    assert placed.out_features == 4 + 7 + 5
    logits = torch.cat([logits, torch.full((1, 3, 5), -30.0)], dim=-1)
    for position, place in enumerate([0, 2, 1]):
        logits[0, position, 11 + place] = 30.0
    placed.forward = lambda x: logits
    assert float(placed.loss(features, classes, torch.tensor([[0, 2, 1]]))) == pytest.approx(60.0 / 3, rel=1e-4)
    assert float(placed.loss(features, classes, torch.tensor([[0, 2, 4]]))) == pytest.approx(120.0 / 3, rel=1e-4)
    with pytest.raises(ValueError, match="needs per-patch places"):
        placed.loss(features, classes)
    with pytest.raises(ValueError, match="takes no per-patch places"):
        head.loss(features, classes, torch.tensor([[0, 2, 1]]))


def test_an_unknown_training_device_is_refused(tmp_path):
    config = tiny_training_config(tmp_path, stages=[stage()], device="gpu0")
    with pytest.raises(ConfigError, match="device 'gpu0' is not a torch device"):
        read_training_config(config)


def test_data_workers_change_no_value(tmp_path):
    """Batches prepared ahead on worker threads are the batches the training thread would build."""
    runs = {}
    for workers in (0, 2):
        (tmp_path / f"w{workers}").mkdir()
        config = tiny_training_config(tmp_path / f"w{workers}", data={"source": "synthetic-shapes", "workers": workers},
                                      stages=[stage(objective="patch-labels", steps=2), stage(name="s2", steps=3)])
        final = train(config, progress=False)
        runs[workers] = ([e["loss"] for e in read_log(final.parent / "log.jsonl")], load_file(final / "model.safetensors"))
    assert runs[0][0] == runs[2][0]
    assert all(torch.equal(runs[0][1][name], runs[2][1][name]) for name in runs[0][1])


@pytest.mark.parametrize("fields, message", [
    ({"components": {"llm": {"freeze": True}}}, "trains only the vision tower; remove the settings of llm"),
    ({"objective": "answers", "patch_head": "factored"}, "sets patch_head, which only objective patch-labels uses"),
    ({"objective": "answers", "patch_places": True}, "sets patch_places, which only objective patch-labels uses"),
    ({"components": {"vision": {"freeze": True}}}, "freezes the vision tower it trains"),
])
def test_patch_labels_stage_configs_are_checked(tmp_path, fields, message):
    config = tiny_training_config(tmp_path, stages=[{**stage(objective="patch-labels"), **fields}])
    with pytest.raises(ConfigError, match=message):
        read_training_config(config)


def test_patch_places_need_a_source_that_labels_them(tmp_path):
    from llavakit.registry.training import patch_label_head

    class NoPlaces(SyntheticShapesSource):
        patch_places = None

    settings = StageConfig(name="vision", objective="patch-labels", steps=1, lr=1e-3, patch_places=True)
    with pytest.raises(ConfigError, match="stage 'vision' sets patch_places, but the data source NoPlaces does not"):
        patch_label_head(tiny_model_with_processor(tmp_path), NoPlaces(0), settings, seed=0)


def test_patch_labels_need_a_source_with_labels(tmp_path):
    data = synthetic_shapes.write_dataset(tmp_path / "data", 2, seed=3)
    config = tiny_training_config(tmp_path, data={"source": "llava-json", "path": str(data)},
                                  stages=[stage(objective="patch-labels")])
    with pytest.raises(ConfigError, match="LlavaJsonDataset has no per-patch labels"):
        train(config, progress=False)


def test_a_stage_can_reweight_the_question_forms(tmp_path, monkeypatch):
    from llavakit.registry import datasets

    seen = []
    original = datasets.SyntheticShapesSource.example
    monkeypatch.setattr(datasets.SyntheticShapesSource, "example",
                        lambda self, index: seen.append(dict(self.form_weights)) or original(self, index))
    stages = [stage(name="a", steps=1), stage(name="b", steps=1, form_weights={"count": 5.0})]
    train(tiny_training_config(tmp_path, stages=stages), progress=False)
    assert seen == [{}, {}, {"count": 5.0}, {"count": 5.0}]


def test_stage_form_weights_need_the_synthetic_source(tmp_path):
    data = synthetic_shapes.write_dataset(tmp_path / "data", 2, seed=3)
    config = tiny_training_config(tmp_path, data={"source": "llava-json", "path": str(data)},
                                  stages=[stage(form_weights={"count": 2.0})])
    with pytest.raises(ConfigError, match="only the synthetic-shapes source has"):
        train(config, progress=False)


def test_a_step_resizes_each_shared_scene_once(tmp_path, monkeypatch):
    model = tiny_model_with_processor(tmp_path)
    calls = []
    original = model.processor.preprocess_images
    monkeypatch.setattr(model.processor, "preprocess_images", lambda images: calls.append(1) or original(images))
    settings = StageConfig(name="s", steps=1, batch_size=3, grad_accum=2, lr=1e-3)
    source = SyntheticShapesSource(0, max_turns=1, samples_per_scene=2)
    batches = answer_batches(model.processor, source, settings, 0, seed=0, max_length=None)
    assert len(calls) == 3  # six samples, three scenes, across both micro-batches
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3]
    assert torch.equal(batches[0]["pixel_values"][0], batches[0]["pixel_values"][1])  # samples 0 and 1: scene 0
    assert torch.equal(batches[0]["pixel_values"][2], batches[1]["pixel_values"][0])  # samples 2 and 3: scene 1


def test_independent_turns_train_every_question_of_a_scene_in_one_row(tmp_path):
    data = {"source": "synthetic-shapes", "independent_turns": True, "every_question": True, "balanced_negatives": True}
    config = tiny_training_config(tmp_path, data=data, stages=[stage(steps=3)])
    final = train(config, progress=False)
    log = read_log(final.parent / "log.jsonl")
    # Each logged step counts the answer tokens of every branch of its two scenes.
    from llavakit.registry.datasets import encode_example

    model = load_model(final)
    source = SyntheticShapesSource(0, independent_turns=True, every_question=True, balanced_negatives=True)
    expected = [sum(sum(label != -100 for label in encode_example(model.processor, source.example(i)).labels[1:])
                    for i in (2 * step, 2 * step + 1)) for step in range(3)]
    assert [entry["answer_tokens"] for entry in log] == expected
    assert all(math.isfinite(entry["loss"]) for entry in log)
    assert min(expected) > 2 * 2 * 6  # at least six answers of two tokens or more per scene
