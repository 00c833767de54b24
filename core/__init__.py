"""llavakit.core: the contracts every component honours, and the model that composes them.

Core imports no plugin and no registry code. Implementations live in ``llavakit.plugins``; discovery,
assembly and file formats live in ``llavakit.registry``.
"""

from llavakit.core.errors import (
    AttentionBackendError,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    DuplicateComponentError,
    ImageError,
    ImageFileError,
    LlavakitError,
    PluginError,
    StateDictError,
    TokenCountError,
    TokenizerError,
    UnknownComponentError,
)
from llavakit.core.types import ImageSize, TokenGrid

__all__ = [
    "AttentionBackendError",
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "DuplicateComponentError",
    "ImageError",
    "ImageFileError",
    "ImageSize",
    "LlavakitError",
    "PluginError",
    "StateDictError",
    "TokenCountError",
    "TokenGrid",
    "TokenizerError",
    "UnknownComponentError",
]
