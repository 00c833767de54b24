"""Chat templates: Jinja templates over transformers' conversation format, rendered in a sandbox.

A conversation is a list of ``{"role": ..., "content": ...}`` messages where ``content`` is a string or a
list of parts ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` (transformers' format). Templates
are data: built-in ones are registered by a plugin, and a checkpoint folder's own template wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from llavakit.core.errors import ConfigError


@dataclass(frozen=True)
class ChatTemplate:
    """A named Jinja chat template.

    ``stop_strings`` are strings that end an assistant turn in this format beyond the tokenizer's eos
    (ChatML's ``<|im_end|>``, say); generation stops on them.
    """

    name: str
    source: str
    stop_strings: tuple[str, ...] = ()
    description: str = ""
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    def render(
        self, conversation: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render ``conversation`` to a prompt string. ``variables`` (e.g. ``bos_token``) reach the template."""
        context = {**self.special_tokens, **variables}
        return render_template(self.source, conversation, add_generation_prompt=add_generation_prompt, **context)


@lru_cache(maxsize=32)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise ConfigError(f"chat template refused the conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_template(
    source: str, conversation: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **variables: Any
) -> str:
    """Render a Jinja chat template source in a sandbox (templates from checkpoint folders are untrusted)."""
    messages = [dict(message) for message in conversation]
    for index, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ConfigError(f"conversation message {index} needs 'role' and 'content' keys, got {sorted(message)}")
    return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
