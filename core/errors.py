"""The llavakit error hierarchy.

Every error derives from :class:`LlavakitError` *and* from the built-in exception a Python user would
reach for (``ValueError`` for bad values and names, ``OSError`` for files), so callers can catch either.
Messages say what went wrong, where (file, tensor, image, field or plugin) and what to do next.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlavakitError(Exception):
    """Base class of every error llavakit raises on purpose."""


class ConfigError(LlavakitError, ValueError):
    """A configuration value or file field is invalid."""


class UnknownComponentError(ConfigError):
    """A component name (vision encoder, LLM, projector, tiler, attention backend, template) is not registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]):
        self.kind, self.name = kind, name
        self.available = sorted(available)
        close = difflib.get_close_matches(name, self.available, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(self.available) if self.available else "(none registered)"
        super().__init__(f"unknown {kind} {name!r}.{hint} Available {kind} names: {listing}.")


class PluginError(LlavakitError, RuntimeError):
    """A plugin failed to import or to register its components."""


class DuplicateComponentError(PluginError, ValueError):
    """Two providers registered the same component name."""


class CheckpointError(LlavakitError, OSError):
    """A checkpoint file or folder is missing, unreadable, corrupt or of an unknown layout."""


class StateDictError(LlavakitError, ValueError):
    """Tensors are missing, unexpected or misshapen when loading weights into a component."""


class ImageError(LlavakitError, ValueError):
    """An image value is unusable (zero size, ambiguous layout, too many pixels, wrong count...)."""


class ImageFileError(ImageError, OSError):
    """An image file is missing, truncated or corrupt."""


class TokenCountError(LlavakitError, ValueError):
    """The image-token placeholders in a prompt do not match the image features the model produced."""


class ContextLengthError(LlavakitError, ValueError):
    """A prompt plus the requested new tokens do not fit the model's context window."""


class TokenizerError(LlavakitError, ValueError):
    """A tokenizer is missing, or its special tokens disagree with the model configuration."""


class AttentionBackendError(LlavakitError, RuntimeError):
    """An attention backend cannot run on the requested device or dtype."""
