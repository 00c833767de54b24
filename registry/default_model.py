"""The model ``llavakit generate``, ``llavakit chat`` and ``pipeline(...)`` use when none is named.

This module is the single place that decides it. Until a trained default ships inside the package, the
default is a stand-in: ``configs/default-random.yaml``, the shapes demo's architecture with seeded RANDOM
weights and a small bundled byte-level BPE tokenizer (``configs/default-tokenizer/``, trained with
:func:`llavakit.registry.tokenizer_training.train_bpe_tokenizer` on 4000 synthetic-shapes conversations
rendered with the shapes chat template). It lets the commands run end to end with no download; its
answers are noise, and :func:`untrained_notice` says so. To ship a trained default, put its checkpoint
folder in the package data and point :data:`DEFAULT_MODEL` at it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

#: Package-data path (under ``llavakit.registry``) of the default: a llavakit config file (assembled with
#: seeded random weights) or a checkpoint folder (loaded with :func:`~llavakit.registry.load_model`).
DEFAULT_MODEL = "configs/default-random.yaml"
#: Seed of the random weights, so the stand-in's noise is the same on every run.
DEFAULT_SEED = 0


def default_model_path() -> Path:
    return Path(str(resources.files("llavakit.registry").joinpath(DEFAULT_MODEL)))


def load_default_model(*, dtype: str | torch.dtype = "auto", attention: str = "sdpa", device=None):
    """The default model with its processor attached."""
    from llavakit.registry.assembly import build_from_config, resolve_dtype
    from llavakit.registry.config_files import read_model_config
    from llavakit.registry.loading import load_model

    path = default_model_path()
    if path.is_dir():
        return load_model(path, dtype=dtype, attention=attention, device=device)
    config = read_model_config(path).model_copy(update={"attention": attention})
    model = build_from_config(
        config, device=device, dtype=resolve_dtype(dtype, resolve_dtype(config.dtype)), seed=DEFAULT_SEED
    )
    model.source = str(path)
    return model


def untrained_notice(model, name: str) -> str | None:
    """A plain warning when some of ``model``'s parts have random weights (``None`` when all are trained)."""
    untrained = sorted(getattr(model, "untrained", ()) or ())
    if not untrained:
        return None
    return (
        f"note: {name} has RANDOM weights ({', '.join(untrained)} untrained): its answer is noise. "
        "Pass --model with a trained checkpoint (a folder or a hub id) for real answers."
    )
