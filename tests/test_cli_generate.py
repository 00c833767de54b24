"""``llavakit generate`` and ``llavakit chat`` end to end, in process, on a tiny local checkpoint and on the
bundled default model."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.core.generation import resolve_config
from llavakit.registry import load_model
from llavakit.registry.cli import main
from llavakit.registry.commands import chat as chat_command
from tiny_chat import save_tiny_chat_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mistral_tokenizer_dir):
    folder = tmp_path_factory.mktemp("cli-checkpoint")
    save_tiny_chat_checkpoint(folder, mistral_tokenizer_dir, seed=8)
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-images") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 450, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_answer(folder, image, question: str, max_new_tokens: int):
    """What the library gives for the same question: the prompt inputs and the decoded greedy answer."""
    model = load_model(folder)
    processor = model.processor
    chat = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(chat, tokenize=True, return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens)
    new = output[0, inputs["input_ids"].shape[1]:]
    return inputs, processor.decode(new[new != 2], skip_special_tokens=True), int(new.shape[0])


def test_generate_prints_the_streamed_answer(checkpoint, image, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", str(checkpoint), "--image", str(image),
                             "--max-new-tokens", "12", "What is this?")
    _, text, _ = expected_answer(checkpoint, image, "What is this?", 12)
    assert code == 0, err
    assert out == text + "\n"
    assert "RANDOM" not in err


def test_generate_json_reports_counts_and_speed(checkpoint, image, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", str(checkpoint), "--image", str(image),
                             "--max-new-tokens", "10", "--threads", "1", "--json", "Describe it.")
    assert code == 0, err
    report = json.loads(out)
    inputs, text, new_tokens = expected_answer(checkpoint, image, "Describe it.", 10)
    assert report["text"] == text
    assert report["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert report["image_tokens"] == int((inputs["input_ids"] == 32000).sum()) > 500
    assert report["new_tokens"] == new_tokens
    assert report["ttft_s"] > 0 and report["tokens_per_s"] > 0
    assert torch.get_num_threads() == 1


def test_sampling_flags_are_seeded(checkpoint, image, capsys):
    def sample(seed: str) -> str:
        code, out, err = run_cli(capsys, "generate", "--model", str(checkpoint), "--image", str(image), "--json",
                                 "--max-new-tokens", "15", "--temperature", "1.5", "--top-k", "200", "--seed", seed, "Hi")
        assert code == 0, err
        return json.loads(out)["text"]

    first = sample("1")
    assert sample("1") == first
    assert sample("2") != first


def test_missing_image_fails_before_loading_a_model(checkpoint, tmp_path, capsys, monkeypatch):
    import llavakit.registry.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    missing = tmp_path / "nope.jpg"
    code, out, err = run_cli(capsys, "generate", "--model", str(checkpoint), "--image", str(missing), "Hi")
    assert code == 1 and out == ""
    assert f"--image {missing}: no such file" in err


def test_default_model_runs_and_says_when_its_answer_is_noise(image, capsys):
    from llavakit.registry.default_model import load_default_model

    code, out, err = run_cli(capsys, "generate", "--image", str(image), "--max-new-tokens", "6", "--json",
                             "--dtype", "bfloat16", "What shape is blue?")
    assert code == 0, err
    report = json.loads(out)
    assert report["new_tokens"] <= 6 and report["image_tokens"] > 0
    assert ("RANDOM weights" in err and "noise" in err) == bool(load_default_model().untrained)


def test_untrained_notice():
    from llavakit.registry import build_model
    from llavakit.registry.default_model import untrained_notice

    model = build_model("clip-vit", "llama", vision_options=dict(image_size=28, patch_size=14, hidden_size=32,
                        intermediate_size=64, num_layers=1, num_heads=4),
                        llm_options=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                         num_heads=4), image_token_index=63)
    notice = untrained_notice(model, "my model")
    assert "my model has RANDOM weights" in notice and "noise" in notice and "llm" in notice
    model.untrained = set()
    assert untrained_notice(model, "my model") is None


def test_chat_keeps_the_conversation_and_resets(checkpoint, image, capsys, monkeypatch):
    seen = []

    def spy(processor, conversation):
        seen.append([dict(m) for m in conversation])
        return chat_command.model_inputs.__wrapped__(processor, conversation)

    spy.__wrapped__ = chat_command.model_inputs
    monkeypatch.setattr(chat_command, "model_inputs", spy)
    turns = f"/image {image}\nWhat is this?\nAnd the colours?\n/reset\nHello again\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    code, out, err = run_cli(capsys, "chat", "--model", str(checkpoint), "--max-new-tokens", "6")
    assert code == 0, err
    assert len(out.splitlines()) == 3  # three answers
    first, second, third = seen
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"][0] == {"type": "image", "path": str(image)}
    assert second[1]["content"][0]["text"] == out.splitlines()[0]
    assert [m["role"] for m in third] == ["user"] and all(p["type"] == "text" for p in third[0]["content"])


def test_chat_reports_a_bad_image_and_goes_on(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {tmp_path / 'gone.png'}\nHello\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(checkpoint), "--max-new-tokens", "4")
    assert code == 0
    assert "gone.png: no such file" in err
    assert len(out.splitlines()) == 1


def test_the_tokenizer_supplies_eos_and_pad_when_the_model_folder_does_not(checkpoint, tmp_path):
    folder = tmp_path / "no-generation-config"
    shutil.copytree(checkpoint, folder)
    (folder / "generation_config.json").unlink()
    model = load_model(folder)
    tokenizer = model.processor.tokenizer
    config = resolve_config(model, model.processor)
    assert config.eos_token_id == (tokenizer.eos_token_id,) == (2,)
    assert config.pad_token_id == tokenizer.pad_token_id == 32001
    assert resolve_config(model, model.processor, eos_token_id=[]).eos_token_id == ()


def test_generate_without_a_chat_template_uses_a_plain_prompt(checkpoint, image, tmp_path, capsys):
    folder = tmp_path / "no-template"
    shutil.copytree(checkpoint, folder)
    (folder / "chat_template.jinja").unlink()
    model = load_model(folder)
    assert model.processor.chat_template is None
    expected = model.processor([str(image)], "<image>\nWhat is this?")["input_ids"]
    code, out, err = run_cli(capsys, "generate", "--model", str(folder), "--image", str(image),
                             "--max-new-tokens", "3", "--json", "What is this?")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == expected.shape[1]
