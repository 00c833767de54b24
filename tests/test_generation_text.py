"""Text out of generation: the incremental detokenizer, ``model.stream``, stop strings and transformers' streamers.

The tokenizer is the llava-v1.6-mistral one (SentencePiece with byte fallback, so multi-byte characters
arrive one byte token at a time); the tiny model's 384 ids are its first 384 tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, TextStreamer

from llavakit.core.errors import TokenizerError
from llavakit.core.generation import IncrementalText, StopStringMatcher, _is_boundary
from llavakit.registry import load_model
from tiny import save_tiny_llava_hf

SAMPLE = "Hello wörld 你好 ok 🦙 llama, «quoted» text.\nSecond line ends"


@pytest.fixture(scope="module")
def tokenizer(mistral_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    save_tiny_llava_hf(folder, "mistral", seed=21)
    return load_model(folder)


class WordTokenizer:
    """Decodes id ``i`` to the word ``w{i}``: the tiny random model's ids always form valid text with it
    (with the real tokenizer they are mostly stray bytes), so whole answers can be compared exactly."""

    pad_token_id = 0

    def decode(self, token_ids, skip_special_tokens=False, **_):
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i < 3))


def pieces_of(tokenizer, text: str, stop_strings=()) -> tuple[list[str], IncrementalText]:
    incremental = IncrementalText(tokenizer, stop_strings)
    pieces = [incremental.push(token) for token in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(incremental.finish())
    return [p for p in pieces if p], incremental


def test_pieces_are_whole_words_and_whole_characters(tokenizer):
    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids), "no byte-fallback token to test"
    pieces, _ = pieces_of(tokenizer, SAMPLE)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert all(_is_boundary(piece[-1]) for piece in pieces[:-1])
    assert "🦙" in pieces and "你" in pieces and "Second " in pieces


def test_text_from_a_stop_string_on_is_never_released(tokenizer):
    pieces, incremental = pieces_of(tokenizer, "The answer is 42 ###. and more", stop_strings=["###"])
    assert "".join(pieces) == "The answer is 42 "
    assert incremental.stopped
    # A stop string made of whitespace is held back while it could still complete.
    pieces, _ = pieces_of(tokenizer, "one two\n\nthree", stop_strings=["\n\n"])
    assert "".join(pieces) == "one two"


def test_stream_yields_the_decoded_answer(model):
    tokenizer = WordTokenizer()
    input_ids = torch.tensor([[1, 50, 60, 70, 80]])
    expected = model.generate(input_ids, max_new_tokens=30, eos_token_id=[])[0, 5:].tolist()
    stream = model.stream(input_ids, max_new_tokens=30, eos_token_id=[], tokenizer=tokenizer)
    pieces = list(stream)
    assert "".join(pieces) == tokenizer.decode(expected, skip_special_tokens=True) == stream.text
    assert stream.token_ids == expected
    assert stream.stats.new_tokens == 30 and stream.stats.prompt_tokens == 5 and stream.stats.image_tokens == 0
    assert stream.stats.ttft_s > 0 and stream.stats.tokens_per_s > 0


def test_stream_stops_at_eos_without_showing_it(model):
    tokenizer = WordTokenizer()
    input_ids = torch.tensor([[1, 50, 60, 70, 80]])
    free = model.generate(input_ids, max_new_tokens=20, eos_token_id=[])[0, 5:].tolist()
    eos = free[6]
    stream = model.stream(input_ids, max_new_tokens=20, eos_token_id=eos, tokenizer=tokenizer)
    text = "".join(stream)
    assert text == tokenizer.decode(free[: free.index(eos)], skip_special_tokens=True)
    assert stream.stats.new_tokens == free.index(eos) + 1


def test_stop_strings_end_generation(model):
    tokenizer = WordTokenizer()
    input_ids = torch.tensor([[1, 33, 44, 55]])
    free = model.generate(input_ids, max_new_tokens=30, eos_token_id=[])[0, 4:].tolist()
    # Stop on the two words generated at steps 11 and 12.
    stop = tokenizer.decode(free[10:12])
    steps = next(t + 1 for t in range(len(free)) if stop in tokenizer.decode(free[: t + 1], skip_special_tokens=False))
    output = model.generate(input_ids, max_new_tokens=30, eos_token_id=[], stop_strings=stop, tokenizer=tokenizer)
    assert output[0, 4:].tolist() == free[:steps]
    streamed = model.stream(input_ids, max_new_tokens=30, eos_token_id=[], stop_strings=[stop], tokenizer=tokenizer)
    shown = "".join(streamed)
    assert stop not in shown and shown == tokenizer.decode(free[:steps]).split(stop)[0]
    assert steps < 30, "the stop string never ended generation early"


def test_stop_string_matcher_sees_strings_split_over_byte_tokens(tokenizer):
    ids = tokenizer.encode("so 🦙!", add_special_tokens=False)
    matcher = StopStringMatcher(tokenizer, ["🦙"])
    hits = [matcher.matches(ids[: n + 1]) for n in range(len(ids))]
    first = hits.index(True)
    assert tokenizer.convert_ids_to_tokens(ids[first]) == "<0x99>"  # the character's last byte


def test_transformers_text_streamer_prints_the_answer(model):
    tokenizer = WordTokenizer()
    shown = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            shown.append(text)

    input_ids = torch.tensor([[1, 50, 60, 70, 80]])
    output = model.generate(input_ids, max_new_tokens=25, eos_token_id=[],
                            streamer=Collect(tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert "".join(shown) == tokenizer.decode(output[0, 5:], skip_special_tokens=True)


def test_text_features_without_a_tokenizer_say_what_to_do(model):
    input_ids = torch.tensor([[1, 50, 60]])
    assert getattr(model, "processor", None) is None
    with pytest.raises(TokenizerError, match="stream\\(\\) .* needs a tokenizer.*tokenizer.json"):
        model.stream(input_ids)
    with pytest.raises(TokenizerError, match="stop_strings .* needs a tokenizer"):
        model.generate(input_ids, stop_strings=["x"])
