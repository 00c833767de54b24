"""The model ``llavakit generate``, ``llavakit chat`` and ``pipeline(...)`` use when none is named.

This module is the single place that decides it. The default is llavakit's own demo model: a small
LLaVA-NeXT (CLIP-style ViT with 112-px AnyRes tiles, MLP projector, Llama-family decoder) trained from scratch
by ``llavakit train`` on the synthetic-shapes task, with its own byte-level BPE tokenizer and chat template
(see docs/demo.md for how it was trained and how well it answers). It ships as a llava-hf folder in the
package data, so it runs offline on a fresh install.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

#: Package-data path (under ``llavakit.registry``) of the default model's llava-hf folder.
DEFAULT_MODEL = "models/shapes-demo"


def default_model_path() -> Path:
    return Path(str(resources.files("llavakit.registry").joinpath(DEFAULT_MODEL)))


def load_default_model(*, dtype: str | torch.dtype = "auto", attention: str = "sdpa", device=None):
    """The default model with its processor attached."""
    from llavakit.registry.loading import load_model

    return load_model(default_model_path(), dtype=dtype, attention=attention, device=device)


def untrained_notice(model, name: str) -> str | None:
    """A plain warning when some of ``model``'s parts have random weights (``None`` when all are trained)."""
    untrained = sorted(getattr(model, "untrained", ()) or ())
    if not untrained:
        return None
    return (
        f"note: {name} has RANDOM weights ({', '.join(untrained)} untrained): its answer is noise. "
        "Pass --model with a trained checkpoint (a folder or a hub id) for real answers."
    )
