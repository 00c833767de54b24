"""llavakit model config files (YAML, TOML or JSON) validated against :class:`ModelConfig`.

Example (YAML)::

    vision: {name: clip-vit, options: {hidden_size: 64, num_layers: 2}}
    llm: {name: mistral-7b, options: {num_layers: 2, hidden_size: 64}}
    projector: mlp2x-gelu
    tiler: anyres
    attention: sdpa
    dtype: float32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llavakit.core.config import ModelConfig
from llavakit.core.errors import CheckpointError, ConfigError


def read_config_data(path: Path) -> dict[str, Any]:
    """Parse a YAML/TOML/JSON file into a mapping, with parse errors naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config file not found") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - each parser has its own error type
        raise ConfigError(f"{path}: cannot parse {suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


def validate_model_config(data: dict[str, Any], *, where: str) -> ModelConfig:
    """Validate ``data`` as a model config; every problem names its field (``llm.options``, ``dtype`` …)."""
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{where}: invalid model config:\n" + "\n".join(lines)) from None


def read_model_config(path: Path) -> ModelConfig:
    data = read_config_data(path)
    config = validate_model_config(data.get("model", data), where=str(path))
    # Relative weight and tokenizer paths are relative to the config file, not the working directory.
    base = Path(path).parent
    updates: dict[str, Any] = {}
    for part in ("vision", "llm", "projector", "tiler"):
        ref = getattr(config, part)
        if ref.weights and not Path(ref.weights).is_absolute() and (base / ref.weights).exists():
            updates[part] = ref.model_copy(update={"weights": str(base / ref.weights)})
    if config.tokenizer and not Path(config.tokenizer).is_absolute() and (base / config.tokenizer).exists():
        updates["tokenizer"] = str(base / config.tokenizer)
    return config.model_copy(update=updates) if updates else config
