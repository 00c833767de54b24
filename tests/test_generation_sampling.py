"""Sampling: logits processors equal transformers', seeded draws match transformers' ``generate`` draw for draw,
and the empirical distribution of first tokens follows temperature, top-k and top-p (statistical tests)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llavakit.core.generation import (
    GenerationConfig,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process_logits,
)
from llavakit.registry import load_model
from tiny import save_tiny_llava_hf

SAMPLES = 4000


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling")
    reference = save_tiny_llava_hf(folder, "llama-gqa", seed=9)
    reference.generation_config.eos_token_id = None
    return reference, load_model(folder)


def random_scores(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(6, 384, generator=generator) * 3
    scores[:, 10:14] = scores[:, 9:10]  # ties at the cut-off must be kept, as transformers keeps them
    return scores


@pytest.mark.parametrize("top_k", [1, 5, 50, 1000])
def test_top_k_equals_transformers(top_k):
    scores = random_scores(top_k)
    assert torch.equal(apply_top_k(scores, top_k), TopKLogitsWarper(top_k)(None, scores))


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_equals_transformers(top_p):
    scores = random_scores(int(top_p * 100))
    assert torch.equal(apply_top_p(scores, top_p), TopPLogitsWarper(top_p)(None, scores))


def test_repetition_penalty_and_temperature_equal_transformers():
    scores = random_scores(1)
    previous = torch.randint(0, 384, (6, 30), generator=torch.Generator().manual_seed(4))
    seen = torch.zeros(6, 384, dtype=torch.bool).scatter_(1, previous, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(previous, scores.clone())
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.3), expected)
    config = GenerationConfig(do_sample=True, temperature=0.7, repetition_penalty=1.3)
    assert torch.equal(process_logits(scores, seen, config), TemperatureLogitsWarper(0.7)(None, expected))


def test_greedy_with_repetition_penalty_matches_transformers(pair):
    reference, model = pair
    input_ids = torch.tensor([[1, 17, 99, 17, 250, 31, 64, 64, 5]])
    expected = reference.generate(input_ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.5)
    output = model.generate(input_ids, max_new_tokens=20, repetition_penalty=1.5, eos_token_id=[])
    assert output.tolist() == expected.tolist()
    plain = model.generate(input_ids, max_new_tokens=20, eos_token_id=[])
    assert plain.tolist() != output.tolist(), "the penalty changed nothing: the test would not notice it missing"


@pytest.mark.parametrize("options", [
    dict(temperature=0.8, top_k=20),
    dict(temperature=1.3, top_p=0.9),
    dict(top_k=40, top_p=0.8, repetition_penalty=1.2),
])
def test_seeded_sampling_matches_transformers_draw_for_draw(pair, options):
    """Same seed, same processors, same multinomial draws: the sampled tokens are transformers' tokens."""
    reference, model = pair
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 90, 91, 92, 93, 94]])
    torch.manual_seed(1234)
    hf_options = {"top_k": None, **options}  # transformers would otherwise add its default top_k=50
    expected = reference.generate(input_ids, max_new_tokens=24, do_sample=True, **hf_options)
    output = model.generate(input_ids, max_new_tokens=24, do_sample=True, seed=1234, eos_token_id=[], **options)
    assert output.tolist() == expected.tolist()


def test_same_seed_same_sample_other_seed_other_sample(pair):
    _, model = pair
    input_ids = torch.tensor([[1, 40, 41, 42]])
    first = model.generate(input_ids, max_new_tokens=30, do_sample=True, seed=7, eos_token_id=[])
    again = model.generate(input_ids, max_new_tokens=30, do_sample=True, seed=7, eos_token_id=[])
    other = model.generate(input_ids, max_new_tokens=30, do_sample=True, seed=8, eos_token_id=[])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def first_token_counts(model, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical first-token frequencies over ``SAMPLES`` rows of one prompt, and the model's raw logits."""
    prompt = torch.tensor([[1, 200, 201, 202, 203]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].float()
    output = model.generate(prompt.repeat(SAMPLES, 1), max_new_tokens=1, do_sample=True, eos_token_id=[], **options)
    counts = torch.bincount(output[:, -1], minlength=logits.shape[0]).float()
    return counts / SAMPLES, logits


def assert_frequencies_follow(frequencies: torch.Tensor, probabilities: torch.Tensor) -> None:
    """Every token's frequency is within 5 binomial standard deviations (+ a small floor) of its probability."""
    tolerance = 5 * (probabilities * (1 - probabilities) / SAMPLES).sqrt() + 2e-3
    worst = ((frequencies - probabilities).abs() - tolerance).max()
    assert worst <= 0, f"a token's frequency is off its probability by {worst:.4f} beyond tolerance"


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_shapes_the_distribution(pair, temperature):
    _, model = pair
    frequencies, logits = first_token_counts(model, temperature=temperature, seed=3)
    assert_frequencies_follow(frequencies, (logits / temperature).softmax(-1))
    # And it is not the untempered distribution (the test can tell them apart).
    assert ((frequencies - logits.softmax(-1)).abs() > 0.02).any()


def test_top_k_samples_only_the_k_best(pair):
    _, model = pair
    frequencies, logits = first_token_counts(model, top_k=5, seed=4)
    allowed = logits.topk(5).indices
    assert set(frequencies.nonzero().flatten().tolist()) <= set(allowed.tolist())
    expected = torch.zeros_like(logits)
    expected[allowed] = logits[allowed].softmax(-1)
    assert_frequencies_follow(frequencies, expected)


def test_top_p_samples_only_the_nucleus(pair):
    _, model = pair
    frequencies, logits = first_token_counts(model, top_p=0.3, seed=5)
    probabilities = logits.softmax(-1)
    order = probabilities.argsort(descending=True)
    size = int((probabilities[order].cumsum(0) < 0.3).sum()) + 1
    nucleus = order[:size]
    assert set(frequencies.nonzero().flatten().tolist()) <= set(nucleus.tolist())
    expected = torch.zeros_like(probabilities)
    expected[nucleus] = probabilities[nucleus] / probabilities[nucleus].sum()
    assert_frequencies_follow(frequencies, expected)
    assert size > 1, "a one-token nucleus would not test the renormalisation"
