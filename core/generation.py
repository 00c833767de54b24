"""Text generation: one prefill pass over text and image tokens, then one token per step over a KV cache.

The loop follows transformers' ``generate`` where users can observe it: the same logits processors in the
same order (repetition penalty, then temperature, top-k, top-p), the same streamer protocol (``put`` with
the prompt first, then each step's new tokens, then ``end``), the same output (``[B, prompt + new]`` with
rows that finished early padded with the pad id) and the same greedy tokens. Left-padded batches work
because positions count attended tokens only, so each row produces what it would produce alone.

Defaults for every option come from the checkpoint folder's ``generation_config.json`` when it has one
(only the fields below are read), else from :class:`GenerationConfig`.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from llavakit.core.errors import ConfigError, ContextLengthError, TokenizerError

if TYPE_CHECKING:
    from llavakit.core.model import LlavaNextModel

GENERATION_CONFIG_FILE = "generation_config.json"


class TextDecoder(Protocol):
    """What generation needs from a tokenizer or processor to turn ids into text (transformers' signature)."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class Streamer(Protocol):
    """transformers' streamer protocol: ``put`` gets the prompt ``[B, L]`` once, then each step's ``[B]`` tokens."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass(frozen=True)
class GenerationConfig:
    """Generation options; ``None`` for top-k, top-p and repetition penalty means the step is off."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_id", _int_tuple(self.eos_token_id, "eos_token_id"))
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings or ())
        object.__setattr__(self, "stop_strings", stops)
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy decoding")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 (or None to disable it), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (or None to disable it), got {self.top_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        if any(not stop for stop in self.stop_strings):
            raise ConfigError("stop_strings must not contain an empty string")

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with every override that is not ``None``."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = GENERATION_CONFIG_FILE) -> GenerationConfig:
        """Read the fields this class knows from a transformers ``generation_config.json`` mapping."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        try:
            return cls(**values)
        except (TypeError, ConfigError) as err:
            raise ConfigError(f"{where}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of generation options")
        return cls.from_dict(data, where=str(path))


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{name} must be an int or a list of ints, got {value!r}")
    return values


def generation_defaults(model: LlavaNextModel) -> GenerationConfig:
    """The model's default options: ``model.generation_config`` if set, else its folder's ``generation_config.json``.

    The file is read once and kept on the model, so a caller may also assign ``model.generation_config``.
    """
    config = getattr(model, "generation_config", None)
    if isinstance(config, GenerationConfig):
        return config
    source = getattr(model, "source", None)
    path = Path(source) / GENERATION_CONFIG_FILE if source else None
    config = GenerationConfig.from_file(path) if path is not None and path.is_file() else GenerationConfig()
    model.generation_config = config
    return config


def text_decoder(model: LlavaNextModel, tokenizer: TextDecoder | None, purpose: str) -> TextDecoder:
    """The tokenizer to decode with: the one passed, else the processor attached to the model."""
    decoder = tokenizer if tokenizer is not None else getattr(model, "processor", None)
    if decoder is None or not callable(getattr(decoder, "decode", None)):
        raise TokenizerError(
            f"{purpose} turns token ids into text and needs a tokenizer, but this model has none: load it from a "
            "folder with tokenizer files (tokenizer.json), or pass tokenizer=<any object with "
            "decode(ids, skip_special_tokens=...)>"
        )
    return decoder


# ------------------------------------------------------------------------------------------ logits processing
def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) scores of tokens already in the row by ``penalty`` (CTRL's rule)."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` best scores (and any tied with the k-th); the rest become ``-inf``."""
    kth_best = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
    return scores.masked_fill(scores < kth_best, -float("inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probabilities reach ``top_p`` (at least one token)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def process_logits(scores: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """Apply the configured processors to fp32 ``[B, V]`` scores, in transformers' order."""
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, config.repetition_penalty)
    if not config.do_sample:
        return scores
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k is not None:
        scores = apply_top_k(scores, config.top_k)
    if config.top_p is not None and config.top_p < 1.0:
        scores = apply_top_p(scores, config.top_p)
    return scores


def choose_tokens(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """``[B]`` next tokens: the argmax, or a draw from ``softmax(scores)``."""
    if not config.do_sample:
        return scores.argmax(dim=-1)
    probabilities = scores.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


# ------------------------------------------------------------------------------------------------- stopping
class StopStringMatcher:
    """Finds stop strings in each row's generated text, decoding only a window of recent tokens."""

    def __init__(self, decoder: TextDecoder, stop_strings: Sequence[str]):
        self.decoder = decoder
        self.stop_strings = tuple(stop_strings)
        # A character takes at most 4 byte-fallback tokens; a stop string can straddle one more token.
        self.window = 4 * max(len(s) for s in self.stop_strings) + 1

    def matches(self, generated: Sequence[int]) -> bool:
        text = self.decoder.decode(list(generated[-self.window :]), skip_special_tokens=False)
        return any(stop in text for stop in self.stop_strings)


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class PromptStats:
    """Token counts of the longest prompt row: all attended tokens, and how many of them are image tokens."""

    prompt_tokens: int
    image_tokens: int

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - self.image_tokens


def prompt_stats(model: LlavaNextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[PromptStats]:
    """Per-row prompt counts (padding excluded), the numbers the context check reports."""
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = attended.sum(dim=1).tolist()
    if model.image_token_index is None:
        images = [0] * len(lengths)
    else:
        images = ((input_ids == model.image_token_index) & attended).sum(dim=1).tolist()
    return [PromptStats(int(n), int(i)) for n, i in zip(lengths, images)]


def check_context_budget(model: LlavaNextModel, stats: Sequence[PromptStats], max_new_tokens: int) -> None:
    """Refuse, before any compute, a prompt that with ``max_new_tokens`` would not fit the model's context."""
    limit = model.language_model.max_position_embeddings
    for row, row_stats in enumerate(stats):
        needed = row_stats.prompt_tokens + max_new_tokens
        if needed <= limit:
            continue
        where = f"prompt row {row}" if len(stats) > 1 else "the prompt"
        room = limit - row_stats.prompt_tokens
        advice = (
            f"lower max_new_tokens to at most {room}" if room > 0
            else "the prompt alone is too long: use fewer or smaller images, or a shorter text"
        )
        raise ContextLengthError(
            f"{where} holds {row_stats.prompt_tokens} tokens ({row_stats.text_tokens} text + "
            f"{row_stats.image_tokens} image tokens) and max_new_tokens={max_new_tokens} asks for {needed} "
            f"positions, but the language model's context is {limit}; {advice}"
        )


@dataclass
class Prompt:
    """A batch of prompts on the model's device, ready for prefill."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    stats: list[PromptStats] = field(default_factory=list)


def prepare_prompt(model: LlavaNextModel, input_ids, attention_mask=None, pixel_values=None, image_sizes=None) -> Prompt:
    device = model.device
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
        if bool(attention_mask[:, -1].eq(0).any()):
            raise ConfigError(
                "attention_mask ends with padding: pad prompts on the left for generation (padding_side='left')"
            )
        if bool(attention_mask.all()):
            attention_mask = None  # nothing padded: take the unmasked fast path
    if pixel_values is not None:
        pixel_values = torch.as_tensor(pixel_values).to(device)
    if image_sizes is not None:
        image_sizes = torch.as_tensor(image_sizes, device=device)
    prompt = Prompt(input_ids, attention_mask, pixel_values, image_sizes)
    prompt.stats = prompt_stats(model, input_ids, attention_mask)
    return prompt


def resolve_config(model: LlavaNextModel, tokenizer: TextDecoder | None = None, **options: Any) -> GenerationConfig:
    """Explicit options over the model's defaults. Without an eos id in the defaults the tokenizer's is used;
    the pad id is the configured one, else the tokenizer's, else the first eos id, else 0."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    defaults = generation_defaults(model)
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if not defaults.eos_token_id and tokenizer_eos is not None:
        defaults = replace(defaults, eos_token_id=(int(tokenizer_eos),))
    config = defaults.updated(**options)
    if config.pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = config.eos_token_id[0] if config.eos_token_id else 0
        config = replace(config, pad_token_id=int(pad))
    return config


def tokens_seen(prompt: Prompt, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` booleans: which vocabulary ids occur in each row's attended prompt (for the repetition penalty).

    Ids outside the vocabulary (an image placeholder such as original LLaVA's -200) are ignored.
    """
    ids = prompt.input_ids
    counts = ids.new_zeros(ids.shape[0], vocab_size)
    valid = (ids >= 0) & (ids < vocab_size)
    if prompt.attention_mask is not None:
        valid &= prompt.attention_mask.bool()
    counts.scatter_add_(1, ids.clamp(0, vocab_size - 1), valid.long())
    return counts > 0


@torch.inference_mode()  # as a decorator it covers each resumption only, never the caller between steps
def generate_steps(
    model: LlavaNextModel, prompt: Prompt, config: GenerationConfig, *, stop_matcher: StopStringMatcher | None = None
) -> Iterator[torch.Tensor]:
    """Yield each step's ``[B]`` new tokens (finished rows get the pad id) until every row stops.

    The KV cache is allocated once for ``prompt + max_new_tokens`` positions; the prompt (text and image
    tokens) is prefilled in one pass and only the last position's logits are computed.
    """
    check_context_budget(model, prompt.stats, config.max_new_tokens)
    if config.max_new_tokens == 0:
        return
    language_model = model.language_model
    batch, prompt_length = prompt.input_ids.shape
    device = prompt.input_ids.device
    cache = language_model.new_kv_cache(batch, prompt_length + config.max_new_tokens)
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    seen = None
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        seen = tokens_seen(prompt, language_model.vocab_size)
    eos = torch.tensor(config.eos_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(batch)]

    full_mask = None
    if prompt.attention_mask is not None:
        full_mask = torch.ones(batch, prompt_length + config.max_new_tokens, dtype=torch.long, device=device)
        full_mask[:, :prompt_length] = prompt.attention_mask
    positions = torch.tensor([[s.prompt_tokens] for s in prompt.stats], device=device)

    logits = model(
        prompt.input_ids,
        prompt.attention_mask,
        prompt.pixel_values,
        prompt.image_sizes,
        kv_cache=cache,
        logits_to_keep=1,
    ).logits[:, -1]
    # Plain greedy decoding needs only each step's winner, which the language model may find without writing out
    # every logit (decode_greedy); the first step's comes from the prefill's logits as always.
    greedy = not config.do_sample and seen is None
    chosen = None  # the step's tokens, when the language model picked them
    for step in range(config.max_new_tokens):
        if chosen is not None:
            tokens = chosen
        else:
            tokens = choose_tokens(process_logits(logits.float(), seen, config), config, generator)
        tokens = tokens.masked_fill(finished, config.pad_token_id)
        finished_before = finished.tolist() if stop_matcher is not None else None
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if eos.numel():
            finished |= torch.isin(tokens, eos)
        if stop_matcher is not None:
            for row, token in enumerate(tokens.tolist()):
                if not finished_before[row]:
                    generated[row].append(token)
                    if not finished[row] and stop_matcher.matches(generated[row]):
                        finished[row] = True
        yield tokens
        if step + 1 == config.max_new_tokens or bool(finished.all()):
            return
        mask = None if full_mask is None else full_mask[:, : prompt_length + step + 1]
        if greedy:
            chosen = language_model.decode_greedy(tokens, position_ids=positions + step, attention_mask=mask,
                                                  kv_cache=cache)
        else:
            logits = language_model.decode_step(tokens, position_ids=positions + step, attention_mask=mask,
                                                kv_cache=cache)


def generate(
    model: LlavaNextModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    *,
    streamer: Streamer | None = None,
    tokenizer: TextDecoder | None = None,
    **options: Any,
) -> torch.Tensor:
    """``[B, prompt_len + new]`` token ids, as transformers' ``generate`` returns them.

    ``options`` are :class:`GenerationConfig` fields; ``None`` keeps the model's default.
    """
    prompt = prepare_prompt(model, input_ids, attention_mask, pixel_values, image_sizes)
    config = resolve_config(model, tokenizer if tokenizer is not None else getattr(model, "processor", None), **options)
    matcher = None
    if config.stop_strings:
        matcher = StopStringMatcher(text_decoder(model, tokenizer, "stop_strings"), config.stop_strings)
    if streamer is not None:
        streamer.put(prompt.input_ids.cpu())
    steps = []
    for tokens in generate_steps(model, prompt, config, stop_matcher=matcher):
        steps.append(tokens)
        if streamer is not None:
            streamer.put(tokens.cpu())
    if streamer is not None:
        streamer.end()
    if not steps:
        return prompt.input_ids
    return torch.cat([prompt.input_ids, torch.stack(steps, dim=1)], dim=1)


# ---------------------------------------------------------------------------------------------- text stream
def _is_boundary(char: str) -> bool:
    """Text may be released up to and including a whitespace or a CJK ideograph (which stands alone)."""
    return char.isspace() or unicodedata.east_asian_width(char) == "W"


class IncrementalText:
    """Turns tokens into text pieces that never split a word or a UTF-8 character.

    The whole generated sequence is decoded each time (so tokenizers that merge spaces across tokens decode
    correctly), and only text up to the last word boundary is released; a trailing ``U+FFFD`` means bytes of
    a character are still to come. Text from a stop string on is never released. For valid UTF-8 the pieces
    add up to the decoded answer; bytes that never form a character (an untrained model's output) are shown
    as the replacement characters they decoded to when released.
    """

    def __init__(self, decoder: TextDecoder, stop_strings: Sequence[str] = ()):
        self.decoder = decoder
        self.stop_strings = tuple(stop_strings)
        self.token_ids: list[int] = []
        self.released = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text (often empty)."""
        self.token_ids.append(token_id)
        self.text = self.decoder.decode(self.token_ids, skip_special_tokens=True)
        end = self._stop_index()
        if end is not None:
            self.stopped = True
            return self._release(end)
        safe = len(self.text)
        while safe > self.released and self.text[safe - 1] == "\ufffd":
            safe -= 1
        safe -= self._pending_stop_prefix(self.text[:safe])
        while safe > self.released and not _is_boundary(self.text[safe - 1]):
            safe -= 1
        return self._release(safe)

    def finish(self) -> str:
        """Release whatever is left (the end of the answer is a word boundary)."""
        end = self._stop_index()
        return self._release(len(self.text) if end is None else end)

    def _release(self, end: int) -> str:
        if end <= self.released:
            return ""
        piece, self.released = self.text[self.released : end], end
        return piece

    def _stop_index(self) -> int | None:
        found = [i for i in (self.text.find(s, max(0, self.released - len(s))) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _pending_stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that could be the start of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


@dataclass
class GenerationStats:
    """What ``llavakit generate --json`` reports: counts, time to first token, and decode speed.

    ``tokens_per_s`` is the decode rate: tokens after the first divided by the time after the first.
    """

    prompt_tokens: int
    image_tokens: int
    new_tokens: int = 0
    ttft_s: float | None = None
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s


class TextStream:
    """Iterator over decoded text pieces of one prompt's answer; ``.text``, ``.token_ids`` and ``.stats`` fill in."""

    def __init__(self, steps: Iterator[torch.Tensor], text: IncrementalText, stats: GenerationStats, eos: tuple[int, ...]):
        self._steps = steps
        self._text = text
        self._eos = set(eos)
        self.stats = stats

    @property
    def text(self) -> str:
        """The text released so far: the whole answer once the iterator is exhausted, without any stop string."""
        return self._text.text[: self._text.released]

    @property
    def token_ids(self) -> list[int]:
        return list(self._text.token_ids)

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        first = None
        for tokens in self._steps:
            token = int(tokens[0])
            self.stats.new_tokens += 1
            now = time.perf_counter()
            if first is None:
                first = now
                self.stats.ttft_s = now - start
            self.stats.decode_s = now - first
            if token in self._eos:
                break
            piece = self._text.push(token)
            if piece:
                yield piece
            if self._text.stopped:
                break
        rest = self._text.finish()
        if rest:
            yield rest


def stream(
    model: LlavaNextModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    *,
    tokenizer: TextDecoder | None = None,
    **options: Any,
) -> TextStream:
    """Generate for one prompt, yielding text pieces as they are produced (see :class:`IncrementalText`).

    Nothing runs until the first piece is asked for. The eos token and any stop string are not part of the text.
    """
    decoder = text_decoder(model, tokenizer, "stream()")
    prompt = prepare_prompt(model, input_ids, attention_mask, pixel_values, image_sizes)
    if prompt.input_ids.shape[0] != 1:
        raise ConfigError(
            f"stream() generates for one prompt, got a batch of {prompt.input_ids.shape[0]}; use generate() for batches"
        )
    config = resolve_config(model, decoder, **options)
    matcher = StopStringMatcher(decoder, config.stop_strings) if config.stop_strings else None
    stats = GenerationStats(prompt.stats[0].prompt_tokens, prompt.stats[0].image_tokens)
    check_context_budget(model, prompt.stats, config.max_new_tokens)
    steps = generate_steps(model, prompt, config, stop_matcher=matcher)
    return TextStream(steps, IncrementalText(decoder, config.stop_strings), stats, config.eos_token_id)
