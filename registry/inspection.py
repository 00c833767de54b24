"""Model descriptions for ``llavakit inspect``, computed on the meta device (no weights are read)."""

from __future__ import annotations

from pathlib import Path

import torch

from llavakit.core.model import LlavaNextModel
from llavakit.core.types import ImageSize

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


def meta_model(source: str | Path) -> LlavaNextModel:
    """The model ``source`` describes (config file or checkpoint folder of any layout), built on the meta
    device from its config alone: no weight is read."""
    from llavakit.core.errors import CheckpointError
    from llavakit.registry.assembly import build_from_config
    from llavakit.registry.config_files import read_model_config
    from llavakit.registry.loading import CONFIG_SUFFIXES, folder_config

    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{source}: no such file or folder (inspect reads local folders and config files)")
    if path.is_file() and path.suffix.lower() in CONFIG_SUFFIXES and path.name != "config.json":
        config = read_model_config(path)
    else:
        config = folder_config(path.parent if path.name == "config.json" else path)
    return build_from_config(config, device="meta", initialise=False)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.2f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.2f} GiB"


def describe(source: str | Path, image_size: ImageSize) -> str:
    model = meta_model(source)
    config = model.config
    parts = [
        ("vision", config.vision.name, model.vision_tower),
        ("projector", config.projector.name, model.projector),
        ("tiler", config.tiler.name, model.tiler),
        ("llm", config.llm.name, model.language_model),
    ]
    total = count_parameters(model)
    lines = [f"{source}", "", f"{'component':<11}{'name':<22}{'parameters':>16}"]
    for kind, name, module in parts:
        lines.append(f"{kind:<11}{name:<22}{count_parameters(module):>16,}")
    lines.append(f"{'total':<33}{total:>16,}")
    lines.append("")
    lines.append("weight memory: " + ", ".join(f"{d} {human_bytes(total * b)}" for d, b in BYTES_PER_DTYPE.items()))
    lines.append(f"attention: {config.attention}; image token id: {config.image_token_index}; "
                 f"feature layer {config.vision_feature_layer} ({config.vision_feature_select_strategy})")
    layout = model.tiler.layout(image_size)
    lines.append(
        f"image {image_size.height}x{image_size.width}: {layout.num_tiles} tiles "
        f"(grid {layout.grid_rows}x{layout.grid_cols} on a {layout.canvas.height}x{layout.canvas.width} canvas), "
        f"{model.num_image_tokens(image_size)} image tokens"
    )
    return "\n".join(lines)
