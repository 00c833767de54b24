"""``load_model(source)``: a llavakit config file or a local llava-hf checkpoint folder → a ready model."""

from __future__ import annotations

from pathlib import Path

import torch

from llavakit.core.config import ModelConfig
from llavakit.core.errors import CheckpointError, ConfigError
from llavakit.core.model import LlavaNextModel
from llavakit.registry.assembly import build_from_config, resolve_dtype
from llavakit.registry.checkpoints import LLAVA_HF_KEYMAP, SafetensorsCheckpoint, load_weights, read_json
from llavakit.registry.hf_config import from_llava_next

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attention: str = "sdpa",
    strict: bool = True,
) -> LlavaNextModel:
    """Load a model from a llavakit config file or a local llava-hf checkpoint folder.

    ``dtype="auto"`` keeps the checkpoint's own dtype; any other value casts each tensor as it is read.
    No tokenizer files are needed (a processor is attached separately when the folder has them).
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in CONFIG_SUFFIXES and path.name != "config.json":
        from llavakit.registry.config_files import read_model_config

        config = read_model_config(path)
        config = config.model_copy(update={"attention": attention}) if attention != "sdpa" else config
        return build_from_config(config, device=device, dtype=resolve_dtype(dtype, resolve_dtype(config.dtype)))
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"{source}: no such file or folder (load_model reads local folders and config files)")
    if not path.is_dir():
        raise CheckpointError(f"{source}: not a llavakit config file ({', '.join(CONFIG_SUFFIXES)}) or a checkpoint folder")
    hf = read_json(path / "config.json")
    model_type = hf.get("model_type")
    if model_type == "llava_next":
        return _load_llava_hf(path, hf, dtype=dtype, device=device, attention=attention, strict=strict)
    raise CheckpointError(
        f"{path / 'config.json'}: model_type {model_type!r} is not a layout load_model knows "
        "(supported: 'llava_next')"
    )


def _load_llava_hf(path: Path, hf: dict, *, dtype, device, attention: str, strict: bool) -> LlavaNextModel:
    config: ModelConfig = from_llava_next(hf, where=str(path / "config.json"))
    config = config.model_copy(update={"attention": attention})
    checkpoint = SafetensorsCheckpoint.open(path)
    target_dtype = resolve_dtype(dtype, resolve_dtype(config.dtype))
    model = build_from_config(config, device="meta", dtype=target_dtype, initialise=False)
    load_weights(
        model, checkpoint, LLAVA_HF_KEYMAP, dtype=target_dtype, device=device or "cpu", strict=strict, progress=True
    )
    _finish(model)
    model.untrained = set()
    model.source = str(path)
    return model


def _finish(model: LlavaNextModel) -> None:
    """Re-tie shared weights after tensors were assigned one by one, and refuse anything left on meta."""
    llm = model.language_model
    if getattr(getattr(llm, "config", None), "tie_word_embeddings", False):
        llm.lm_head.weight = llm.embed_tokens.weight
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ConfigError(f"parameters left unloaded: {', '.join(still_meta[:10])}")
