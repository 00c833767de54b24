"""``load_model(source)``: a checkpoint folder, hub id or llavakit config file → a ready model.

Folder layouts, recognised from their files and config fields (never from the folder's name):

- llavakit layout: ``llavakit.json`` (components, options, per-component weight files);
- llava-hf: ``config.json`` with ``model_type: llava_next`` (hub and transformers-5 key layouts, single
  file or shards with an index);
- original LLaVA: ``config.json`` with ``model_type: llava_mistral`` / ``llava_llama`` and ``mm_*`` fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llavakit.core.config import ComponentRef, ModelConfig
from llavakit.core.errors import CheckpointError, ConfigError
from llavakit.registry import hub
from llavakit.registry.assembly import build_from_config, resolve_dtype
from llavakit.registry.checkpoints import (
    LLAVA_HF_KEYMAP,
    ORIGINAL_LLAVA_KEYMAP,
    Checkpoint,
    checkpoint_dtype,
    load_weights,
    open_checkpoint,
    read_json,
)
from llavakit.registry.hf_config import (
    WELL_KNOWN_VISION_TOWERS,
    clip_vision_options,
    component_ref,
    from_llava_next,
    from_original_llava,
    is_original_llava,
    original_vision_tower,
)
from llavakit.registry.model import LLAVAKIT_CONFIG, LlavakitModel

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attention: str = "sdpa",
    strict: bool = True,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> LlavakitModel:
    """Load a model from a checkpoint folder, a hub id (``owner/name[@revision]``) or a llavakit config file.

    ``dtype="auto"`` keeps the checkpoint's own dtype (the weights are then the file's memory-mapped pages,
    no copy); any other value casts each tensor as it is read. ``revision`` pins a hub download (a branch,
    tag or commit). Pickle ``.bin`` checkpoints are read only with ``allow_pickle=True``.
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in CONFIG_SUFFIXES and path.name != "config.json":
        return _load_config_file(path, dtype=dtype, device=device, attention=attention, allow_pickle=allow_pickle)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.exists():
        if not hub.is_hub_id(source):
            raise CheckpointError(f"{source}: no such file or folder, and not a hub id (owner/name[@revision])")
        patterns = (*hub.MODEL_FILES, *hub.PROCESSOR_FILES, *(hub.PICKLE_FILES if allow_pickle else ()))
        path = hub.resolve_source(str(source), patterns=patterns, revision=revision)
    if not path.is_dir():
        raise CheckpointError(f"{source}: not a llavakit config file ({', '.join(CONFIG_SUFFIXES)}) or a checkpoint folder")
    options = dict(dtype=dtype, device=device, attention=attention, strict=strict, allow_pickle=allow_pickle)
    if (path / LLAVAKIT_CONFIG).exists():
        model = _load_config_file(path / LLAVAKIT_CONFIG, dtype=dtype, device=device, attention=attention, allow_pickle=allow_pickle)
    else:
        hf = read_json(path / "config.json")
        if hf.get("model_type") == "llava_next":
            model = _load_llava_hf(path, hf, **options)
        elif is_original_llava(hf):
            model = _load_original_llava(path, hf, **options)
        else:
            raise CheckpointError(
                f"{path / 'config.json'}: model_type {hf.get('model_type')!r} is not a layout load_model knows "
                "(llava_next; llava_mistral/llava_llama with mm_vision_tower; or a llavakit.json folder)"
            )
    if model.processor is None:
        from llavakit.registry.processing import has_tokenizer_files, load_processor

        if has_tokenizer_files(path):
            model.processor = load_processor(path, model=model)
    model.source, model.source_folder = str(source), path
    return model


def _load_config_file(path: Path, *, dtype, device, attention: str, allow_pickle: bool) -> LlavakitModel:
    """A llavakit config file (or a llavakit-layout folder's ``llavakit.json``), weights included."""
    from llavakit.registry.config_files import read_config_data, read_model_config

    config = read_model_config(path)
    config = config.model_copy(update={"attention": attention}) if attention != "sdpa" else config
    model = build_from_config(
        config, device=device, dtype=resolve_dtype(dtype, resolve_dtype(config.dtype)), allow_pickle=allow_pickle
    )
    untrained = read_config_data(path).get("untrained")
    if isinstance(untrained, dict):  # written by save_pretrained in the llavakit layout
        model.untrained = set(untrained.get("parts", ()))
        model.untrained_rows = {name: (int(a), int(b)) for name, (a, b) in untrained.get("rows", {}).items()}
    return model


def _load_full(
    path: Path,
    config: ModelConfig,
    checkpoint: Checkpoint,
    keymap,
    *,
    dtype,
    device,
    attention: str,
    strict: bool,
    scope: tuple[str, ...] = (),
) -> LlavakitModel:
    """Build ``config`` on the meta device and fill it from one multi-part checkpoint."""
    config = config.model_copy(update={"attention": attention})
    target_dtype = resolve_dtype(dtype, checkpoint_dtype(checkpoint))
    model = build_from_config(config, device="meta", dtype=target_dtype, initialise=False)
    load_weights(
        model, checkpoint, keymap, dtype=target_dtype, device=device or "cpu", strict=strict, scope=scope, progress=True
    )
    model.untrained = set()
    return model


def _load_llava_hf(path: Path, hf: dict, *, dtype, device, attention: str, strict: bool, allow_pickle: bool) -> LlavakitModel:
    config = from_llava_next(hf, where=str(path / "config.json"))
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    model = _load_full(path, config, checkpoint, LLAVA_HF_KEYMAP, dtype=dtype, device=device, attention=attention, strict=strict)
    model.finish_loading()
    return model


def original_llava_config(path: Path, hf: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of an original LLaVA folder, its vision tower resolved from ``mm_vision_tower``:
    a well-known hub id maps to a built-in config (offline); another id or a local folder is read for its
    CLIP config (a hub id downloads ``config.json`` only)."""
    tower = original_vision_tower(hf)
    where = str(path / "config.json")
    if tower in WELL_KNOWN_VISION_TOWERS:
        name, options = WELL_KNOWN_VISION_TOWERS[tower]
        vision = ComponentRef(name=name, options=options)
    else:
        folder = _tower_folder(path, tower, patterns=("config.json",))
        vision = component_ref("vision", clip_vision_options(read_json(folder / "config.json"), str(folder / "config.json")))
    from llavakit.registry.plugins import get_registry

    width = get_registry().get("vision", vision.name).options(vision.options, field_path="vision").hidden_size
    return from_original_llava(hf, vision=vision, vision_width=width, where=where)


def _tower_folder(path: Path, tower: str, *, patterns) -> Path:
    """``mm_vision_tower`` as a local folder (absolute, or relative to the LLaVA folder) or a hub snapshot."""
    for candidate in (Path(tower).expanduser(), path / tower):
        if candidate.is_dir():
            return candidate
    if not hub.is_hub_id(tower):
        raise CheckpointError(
            f"{path / 'config.json'}: mm_vision_tower {tower!r} is neither a folder nor a hub id"
        )
    return hub.resolve_source(tower, patterns=patterns)


def _load_original_llava(path: Path, hf: dict, *, dtype, device, attention: str, strict: bool, allow_pickle: bool) -> LlavakitModel:
    """An original LLaVA folder, loaded as it is: its vocabulary has no ``<image>`` row, so the image token is
    the first id past the vocabulary, whose positions are never embedded. ``llavakit convert`` adds the rows."""
    config = original_llava_config(path, hf)
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    has_tower = any(key.startswith("model.vision_tower.") for key in checkpoint.keys())
    scope = () if has_tower else ("language_model.", "projector.", "tiler.")
    model = _load_full(
        path, config, checkpoint, ORIGINAL_LLAVA_KEYMAP, dtype=dtype, device=device, attention=attention, strict=strict, scope=scope
    )
    if not has_tower:
        # The tower was frozen in training and left out of the checkpoint: it is mm_vision_tower's own weights.
        from llavakit.registry.components import load_sources, locate

        tower = original_vision_tower(hf)
        folder = _tower_folder(path, tower, patterns=(*hub.MODEL_FILES, *(hub.PICKLE_FILES if allow_pickle else ())))
        source = locate("vision", str(folder), allow_pickle=allow_pickle)
        load_sources(model, {"vision": source}, device=torch.device(device or "cpu"), dtype=next(model.language_model.parameters()).dtype)
    model.untrained = set()
    model.finish_loading()
    return model


def folder_config(path: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint folder of any layout, without reading weights."""
    path = Path(path)
    if (path / LLAVAKIT_CONFIG).exists():
        from llavakit.registry.config_files import read_model_config

        return read_model_config(path / LLAVAKIT_CONFIG)
    hf = read_json(path / "config.json")
    if hf.get("model_type") == "llava_next":
        return from_llava_next(hf, where=str(path / "config.json"))
    if is_original_llava(hf):
        return original_llava_config(path, hf)
    raise ConfigError(f"{path / 'config.json'}: model_type {hf.get('model_type')!r} is not a layout llavakit reads")
