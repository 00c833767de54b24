"""Plugin hook specifications and the marker plugins use to implement them.

They live in core (not in the registry) because plugins may import core only. Each hook receives a
``register`` callback rather than returning values (the simonw/llm design): a plugin calls it once per
component it provides. Built-in plugins go through exactly these hooks, like third-party ones.

``register(name, factory, *, config=None, defaults=None, description="", **metadata)``:

- ``name``: lower-case, hyphenated (``clip-l336``); third-party names should carry a prefix of their own.
- ``factory``: called by the assembler. Vision encoders and language models get
  ``factory(config, attention=backend)``; projectors and tilers get ``factory(config)``; attention
  backends get ``factory()``; chat templates register a :class:`~llavakit.core.chat.ChatTemplate` instead.
- ``config``: a pydantic model validating the options; ``defaults`` are preset values merged under the
  user's overrides. The assembler fills sizing fields (a projector's ``in_features``/``out_features``, a
  tiler's ``tile_size``/``hidden_size``) from the neighbouring components.
- ``metadata``: free-form facts shown by ``llavakit plugins`` and used by the assembler, e.g. an LLM
  preset's ``chat_template`` and ``image_token_index``, or a vision tower's ``attention`` note.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "llavakit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_vision_encoders(register: Register) -> None:
    """Register vision encoders (see :class:`~llavakit.core.interfaces.VisionEncoder`)."""


@hookspec
def register_language_models(register: Register) -> None:
    """Register language models (see :class:`~llavakit.core.interfaces.LanguageModel`)."""


@hookspec
def register_projectors(register: Register) -> None:
    """Register projectors (see :class:`~llavakit.core.interfaces.Projector`)."""


@hookspec
def register_tilers(register: Register) -> None:
    """Register image tilers (see :class:`~llavakit.core.interfaces.ImageTiler`)."""


@hookspec
def register_attention_backends(register: Register) -> None:
    """Register attention backends (see :class:`~llavakit.core.attention.AttentionBackend`)."""


@hookspec
def register_chat_templates(register: Register) -> None:
    """Register chat templates (see :class:`~llavakit.core.chat.ChatTemplate`)."""


#: hook name -> component kind, in the order the registry calls them.
HOOK_KINDS: dict[str, str] = {
    "register_vision_encoders": "vision",
    "register_language_models": "llm",
    "register_projectors": "projector",
    "register_tilers": "tiler",
    "register_attention_backends": "attention",
    "register_chat_templates": "chat_template",
}

Metadata = dict[str, Any]
