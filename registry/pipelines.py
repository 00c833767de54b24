"""``pipeline("image-text-to-text", model=SRC)``: transformers' high-level task, called and answering the same way.

::

    pipe = pipeline("image-text-to-text", model="llava-hf/llava-v1.6-mistral-7b-hf", dtype="auto")
    pipe(text=[{"role": "user", "content": [{"type": "image", "url": "https://…/cat.png"},
                                            {"type": "text", "text": "What is this?"}]}],
         max_new_tokens=20, return_full_text=False)
    # → [{"input_text": [...the conversation...], "generated_text": "A cat sitting on a mat."}]

(The module is ``pipelines``, as in transformers, so that ``llavakit.registry.pipeline`` stays the function.)

A conversation's image parts carry ``url`` (http, https or file), ``path`` or a PIL ``image``. One
conversation gives a list with one record; a list of conversations gives one such list per conversation
(they run as one left-padded batch). ``return_full_text=True`` (the default, as in transformers) returns
the conversation with the assistant's reply appended as ``generated_text``. Plain prompts work too:
``pipe(images, text="<image>\\nWhat is this?")``, with ``generated_text`` the prompt plus the reply.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from llavakit.core.errors import ConfigError, ImageError, TokenizerError

TASK = "image-text-to-text"
URL_SCHEMES = ("http", "https", "file")


def pipeline(
    task: str = TASK,
    model: Any = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attention: str = "sdpa",
) -> ImageTextToTextPipeline:
    """A pipeline for ``task`` over ``model``: a checkpoint folder, hub id, config file, a loaded model, or
    ``None`` for the bundled default model."""
    if task != TASK:
        raise ConfigError(f"pipeline task {task!r} is not provided by llavakit; use {TASK!r}")
    if model is None:
        from llavakit.registry.default_model import load_default_model

        model = load_default_model(dtype=dtype, attention=attention, device=device)
    elif isinstance(model, (str, os.PathLike)):
        from llavakit.registry.loading import load_model

        model = load_model(model, dtype=dtype, device=device, attention=attention)
    if getattr(model, "processor", None) is None:
        raise TokenizerError(
            f"{getattr(model, 'source', None) or 'the model'} has no processor (tokenizer): the pipeline needs one to "
            "read text; load a folder with tokenizer.json, or attach one with model.processor = load_processor(...)"
        )
    return ImageTextToTextPipeline(model)


def is_conversation(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and all(
        isinstance(message, Mapping) and "role" in message for message in value
    )


def check_image_urls(conversation: Sequence[Mapping[str, Any]]) -> None:
    """Refuse malformed ``url`` parts up front, naming the message; download errors come from the loader."""
    for index, message in enumerate(conversation):
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for part in content:
            url = part.get("url") if part.get("type") == "image" else None
            if url is None:
                continue
            if not isinstance(url, str):
                raise ImageError(f"message {index}: an image 'url' must be a string, got {type(url).__name__}")
            try:
                parsed = urllib.parse.urlparse(url)
                parsed.port  # noqa: B018 - parsing the port validates it
            except ValueError as err:
                raise ImageError(f"message {index}: image url {url!r} is malformed ({err})") from None
            if parsed.scheme not in URL_SCHEMES or (parsed.scheme != "file" and not parsed.netloc):
                raise ImageError(
                    f"message {index}: image url {url!r} is not an http(s):// or file:// URL; use 'path' for a "
                    "local file"
                )


class ImageTextToTextPipeline:
    """Conversations (or prompts with images) in, generated text out, in transformers' record format."""

    def __init__(self, model):
        self.model = model
        self.processor = model.processor

    def __call__(
        self,
        images: Any = None,
        text: Any = None,
        *,
        max_new_tokens: int | None = None,
        return_full_text: bool = True,
        generate_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> list:
        """Generate for one conversation or prompt (a list of one record) or several (a list of lists).

        Generation options (``do_sample``, ``temperature``, ``top_p``, ``seed``…) may be given directly or
        in ``generate_kwargs``, as transformers allows.
        """
        if text is None and images is not None and (is_conversation(images) or _is_conversation_list(images)):
            images, text = None, images  # transformers accepts a chat as the first argument
        if text is None:
            raise ConfigError("the pipeline needs text: a conversation, a list of conversations, or a prompt string")
        options = {**(generate_kwargs or {}), **options}
        if is_conversation(text) or _is_conversation_list(text):
            return self._run_chats(text, images, max_new_tokens, return_full_text, options)
        if isinstance(text, str) or (isinstance(text, Sequence) and all(isinstance(t, str) for t in text)):
            return self._run_prompts(text, images, max_new_tokens, return_full_text, options)
        raise ConfigError(
            f"text must be a conversation (a list of {{'role', 'content'}} messages), a list of conversations, or a "
            f"prompt string; got {type(text).__name__}"
        )

    def _run_chats(self, text, images, max_new_tokens, return_full_text, options) -> list:
        if images is not None:
            raise ConfigError("with conversations, give images inside the messages ({'type': 'image', 'url': ...})")
        single = is_conversation(text)
        conversations = [list(text)] if single else [list(c) for c in text]
        for conversation in conversations:
            check_image_urls(conversation)
        inputs = self.processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, padding_side="left"
        )
        replies = self._generate(inputs, max_new_tokens, options)
        records = [
            {
                "input_text": conversation,
                "generated_text": [*conversation, {"role": "assistant", "content": reply}] if return_full_text else reply,
            }
            for conversation, reply in zip(conversations, replies)
        ]
        return records if single else [[record] for record in records]

    def _run_prompts(self, text, images, max_new_tokens, return_full_text, options) -> list:
        single = isinstance(text, str)
        prompts = [text] if single else list(text)
        inputs = self.processor(images, text, padding_side="left")
        replies = self._generate(inputs, max_new_tokens, options)
        records = [
            {"input_text": prompt, "generated_text": prompt + reply if return_full_text else reply}
            for prompt, reply in zip(prompts, replies)
        ]
        return records if single else [[record] for record in records]

    def _generate(self, inputs, max_new_tokens, options) -> list[str]:
        """Generate for the batch; each reply ends before the first stop string (the template's by default)."""
        template = self.processor.chat_template
        stops = options.pop("stop_strings", None)
        if stops is None:
            stops = template.stop_strings if template is not None else ()
        stops = [stops] if isinstance(stops, str) else list(stops)
        output = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, tokenizer=self.processor, stop_strings=stops or None, **options
        )
        replies = []
        for prompt_row, output_row in zip(inputs["input_ids"], output):
            reply = reply_text(self.processor, prompt_row, output_row)
            for stop in stops:
                reply = reply.split(stop)[0]
            replies.append(reply)
        return replies


def reply_text(processor, prompt_ids: torch.Tensor, output_ids: torch.Tensor) -> str:
    """The reply as transformers' pipeline cuts it: the whole sequence decoded, minus the decoded prompt.

    Decoding the new tokens alone would lose the reply's leading space under SentencePiece tokenizers.
    """
    prompt = processor.decode(prompt_ids, skip_special_tokens=True)
    full = processor.decode(output_ids, skip_special_tokens=True)
    start = full.find(prompt)
    # As transformers: the prompt may follow up to two residual characters; otherwise keep everything.
    return full[start + len(prompt):] if 0 <= start <= 2 else full


def _is_conversation_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and all(
        is_conversation(item) for item in value
    )
