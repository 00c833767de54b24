"""Golden strings for the built-in chat templates (the original LLaVA conversation formats)."""

from __future__ import annotations

import pytest

from llavakit.core.errors import ConfigError
from llavakit.registry import get_registry

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)

SINGLE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
MULTI = [
    {"role": "user", "content": [{"type": "text", "text": "Q1"}, {"type": "image"}]},  # images go first anyway
    {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
    {"role": "user", "content": [{"type": "text", "text": "Q2"}]},
]

GOLDEN = {
    "mistral": (
        "[INST] <image>\nWhat is shown in this image? [/INST]",
        "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]",
    ),
    "vicuna": (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is shown in this image? ASSISTANT:",
        f"{VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    ),
    "chatml-34b": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in this image?"
        "<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
    ),
}


def template(name: str):
    return get_registry().get("chat_template", name).factory


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_single_and_multi_turn_golden_strings(name):
    single, multi = GOLDEN[name]
    assert template(name).render(SINGLE) == single
    assert template(name).render(MULTI) == multi


def test_each_llm_preset_names_a_registered_template():
    registry = get_registry()
    expected = {"mistral-7b": "mistral", "vicuna-7b": "vicuna", "vicuna-13b": "vicuna", "hermes-yi-34b": "chatml-34b"}
    for llm, name in expected.items():
        assert registry.get("llm", llm).metadata["chat_template"] == name
        assert registry.get("chat_template", name).factory.name == name


def test_system_messages_replace_the_default():
    system = [{"role": "system", "content": "Be brief."}]
    assert template("vicuna").render(system + SINGLE).startswith("Be brief. USER: <image>\n")
    assert template("chatml-34b").render(system + SINGLE).startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user")
    assert template("mistral").render(system + SINGLE) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is shown in this image? [/INST]"
    )


def test_plain_string_content_and_several_images():
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    assert template("mistral").render(conversation) == "[INST] <image>\n<image>\nCompare. [/INST]"
    assert template("mistral").render([{"role": "user", "content": "Hi"}]) == "[INST] Hi [/INST]"


def test_generation_prompt_is_optional_and_stop_strings_are_declared():
    chatml = template("chatml-34b")
    assert not chatml.render(SINGLE, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    assert chatml.stop_strings == ("<|im_end|>",)
    assert template("vicuna").render(SINGLE, add_generation_prompt=False).endswith("image? ")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_unknown_roles_are_refused(name):
    with pytest.raises(ConfigError, match="unknown role tool"):
        template(name).render([{"role": "tool", "content": "x"}])
