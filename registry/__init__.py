"""llavakit.registry: plugin discovery, model assembly, checkpoints, config files and the command line.

Importing this package is light (no torch model code, no open_clip, no transformers); the public
functions import what they need on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_model", "get_registry", "load_model", "load_processor", "pipeline", "resolve_dtype"]

_EXPORTS = {
    "build_model": "llavakit.registry.assembly",
    "resolve_dtype": "llavakit.registry.assembly",
    "get_registry": "llavakit.registry.plugins",
    "load_model": "llavakit.registry.loading",
    "load_processor": "llavakit.registry.processing",
    "pipeline": "llavakit.registry.pipelines",
}

if TYPE_CHECKING:
    from llavakit.registry.assembly import build_model, resolve_dtype
    from llavakit.registry.loading import load_model
    from llavakit.registry.pipelines import pipeline
    from llavakit.registry.processing import load_processor
    from llavakit.registry.plugins import get_registry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llavakit.registry' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
