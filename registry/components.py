"""Component weights: ``build_model(..., weights={"vision": SRC, "llm": SRC, "projector": SRC, "tiler": SRC})``.

A source is a local folder or file, or a hub id (``owner/name[@revision]``). Its layout is recognised from
its config fields and tensor names, never from its file or folder name:

==================  =========================================================  =================
layout              recognised by                                              parts
==================  =========================================================  =================
``hf-clip``         config.json ``model_type`` ``clip`` / ``clip_vision_model``    vision
``hf-causal-lm``    config.json ``model_type`` ``llama`` / ``mistral``             llm
``llava-hf``        config.json ``model_type`` ``llava_next``                      any
``original-llava``  config.json ``llava_mistral`` / ``llava_llama`` + ``mm_*``     any
``open-clip``       ``visual.*`` tensors, or a folder with ``open_clip_config.json``  vision
``llava-projector`` ``mm_projector.*`` / ``multi_modal_projector.*`` tensors        projector
``llavakit``        anything else: the component's own parameter names           any
==================  =========================================================  =================

Before anything is built, each source's config is compared with the component it fills (a preset must
match the weights; a configurable family such as ``clip-vit`` or ``llama`` takes its sizes from them), so a
mismatch is explained in plain terms rather than as a list of misshapen tensors. A stock LLM has no rows
for ``<image>``/``<pad>``: its embedding and ``lm_head`` grow to the model's vocabulary (or, when nothing
says where the image token goes, to ``vocabulary + 2`` rounded up to a multiple of 64, as the llava-hf
conversion does), the new rows start at the mean of the existing ones, and the model lists them in
``untrained_rows``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavakit.core.config import ComponentRef, ModelConfig
from llavakit.core.errors import ConfigError, StateDictError
from llavakit.plugins.clip_vit import ClipVisionTower
from llavakit.registry import hub
from llavakit.registry.checkpoints import (
    LLAVA_HF_KEYMAP,
    ORIGINAL_LLAVA_KEYMAP,
    Checkpoint,
    Keymap,
    SafetensorsCheckpoint,
    TensorDictCheckpoint,
    grow_rows_with_mean,
    index_files,
    is_ignored,
    load_weights,
    open_checkpoint,
    read_json,
)
from llavakit.registry.hf_config import (
    FAMILY_COMPONENTS,
    LLAVA_NEXT_VISION_DEFAULT,
    ORIGINAL_LLAVA_FAMILIES,
    clip_vision_options,
    is_original_llava,
    llm_options,
    vision_options,
)

#: Our state-dict prefix of each part.
PART_PREFIXES: dict[str, str] = {
    "vision": "vision_tower.",
    "llm": "language_model.",
    "projector": "projector.",
    "tiler": "tiler.",
}

#: The built-in decoder's vocabulary matrices, which may grow when a stock LLM gets image/pad rows.
VOCAB_MATRICES: tuple[str, ...] = ("language_model.embed_tokens.weight", "language_model.lm_head.weight")

#: Key layouts of component checkpoints (see the module table). ``None`` targets are parts of the file
#: that are not this component (the text half of a ``CLIPModel``): documented and skipped.
COMPONENT_KEYMAPS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "hf-clip": (
        ("vision_model.", "vision_tower."),
        ("text_model.", None),
        ("text_projection.", None),
        ("visual_projection.", None),
        ("logit_scale", None),
        ("", "vision_tower."),  # transformers-5 CLIPVisionModel files have no "vision_model." prefix
    ),
    "hf-causal-lm": (("model.", "language_model."), ("lm_head.", "language_model.lm_head.")),
    "llava-hf": LLAVA_HF_KEYMAP,
    "original-llava": ORIGINAL_LLAVA_KEYMAP,
    "llava-projector": (
        *((f"{root}mm_projector.{2 * i}.", f"projector.linear_{i + 1}.") for root in ("model.", "") for i in range(8)),
        ("model.mm_projector.", "projector.linear_1."),
        ("mm_projector.", "projector.linear_1."),
        ("model.multi_modal_projector.", "projector."),
        ("multi_modal_projector.", "projector."),
    ),
}

#: Which layouts can fill which parts (a multi-part checkpoint fills any of them).
LAYOUT_PARTS: dict[str, tuple[str, ...]] = {
    "hf-clip": ("vision",),
    "hf-causal-lm": ("llm",),
    "llava-hf": ("vision", "llm", "projector", "tiler"),
    "original-llava": ("vision", "llm", "projector", "tiler"),
    "open-clip": ("vision",),
    "llava-projector": ("projector",),
    "llavakit": ("vision", "llm", "projector", "tiler"),
}

# ------------------------------------------------------------------------------------------ open_clip
#: open_clip / OpenAI CLIP ``visual.*`` names → our clip-vit names. ``{}`` is a block number; a source ending
#: in ``.`` is a prefix (weight and bias), others are whole keys. ``proj`` is CLIP's embedding projection,
#: which LLaVA features never reach: documented and skipped.
OPEN_CLIP_VISUAL_KEYMAP: tuple[tuple[str, str | None], ...] = (
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("ln_pre.", "pre_layrnorm."),
    ("ln_post.", "post_layernorm."),
    ("proj", None),
    ("transformer.resblocks.{}.ln_1.", "encoder.layers.{}.layer_norm1."),
    ("transformer.resblocks.{}.ln_2.", "encoder.layers.{}.layer_norm2."),
    ("transformer.resblocks.{}.attn.out_proj.", "encoder.layers.{}.self_attn.out_proj."),
    ("transformer.resblocks.{}.mlp.c_fc.", "encoder.layers.{}.mlp.fc1."),
    ("transformer.resblocks.{}.mlp.c_proj.", "encoder.layers.{}.mlp.fc2."),
)

#: open_clip packs q, k and v into one ``in_proj`` tensor (stacked on dim 0, in that order).
OPEN_CLIP_PACKED: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("transformer.resblocks.{}.attn.in_proj_weight", tuple(f"encoder.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkv")),
    ("transformer.resblocks.{}.attn.in_proj_bias", tuple(f"encoder.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv")),
)


def _template(source: str) -> re.Pattern[str]:
    pattern = re.escape(source).replace(r"\{\}", r"(\d+)")
    return re.compile(f"^{pattern}(.+)$" if source.endswith(".") else f"^{pattern}$")


_OPEN_CLIP_RULES = [(_template(s), t) for s, t in OPEN_CLIP_VISUAL_KEYMAP]
_OPEN_CLIP_PACKED_RULES = [(_template(s), t) for s, t in OPEN_CLIP_PACKED]


def _convert_open_clip(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(our names → tensors, our names → source keys); see :func:`open_clip_visual_to_clip_vit`."""
    prefixed = any(key.startswith("visual.") for key in state_dict)
    visual = {key.removeprefix("visual."): value for key, value in state_dict.items() if key.startswith("visual.") or not prefixed}
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in visual.items():
        source = f"visual.{key}" if prefixed else key
        for pattern, targets in _OPEN_CLIP_PACKED_RULES:
            match = pattern.match(key)
            if match:
                for target, part in zip(targets, tensor.chunk(3, dim=0)):
                    converted[target.format(match.group(1))] = part
                    origin[target.format(match.group(1))] = source
                break
        else:
            for pattern, target in _OPEN_CLIP_RULES:
                match = pattern.match(key)
                if match:
                    if target is not None:
                        groups = match.groups()
                        name = target.format(*groups[:-1]) + groups[-1] if target.endswith(".") else target.format(*groups)
                        converted[name], origin[name] = tensor, source
                    break
            else:
                if not is_ignored(key):
                    unknown.append(source)
    if unknown:
        raise StateDictError(
            f"open_clip state dict: {len(unknown)} tensor(s) that a plain CLIP ViT does not have: "
            + ", ".join(sorted(unknown)[:12])
            + ("…" if len(unknown) > 12 else "")
            + "; this tower is not a plain CLIP ViT: use the open_clip vision plugin instead of clip-vit"
        )
    return converted, origin


def open_clip_visual_to_clip_vit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an open_clip / OpenAI CLIP vision state dict to the parameter names of our ``clip-vit`` tower.

    Accepts a whole CLIP state dict (only the ``visual.*`` tensors are used) or the visual tower's own.
    The packed ``attn.in_proj_{weight,bias}`` are split into q, k and v (views, no copy); ``proj`` is left
    out. A tensor no plain CLIP ViT has (attention pooling, layer scale …) raises :class:`StateDictError`.
    OpenAI-trained weights need ``hidden_act="quick_gelu"`` (``clip-l336`` has it).
    """
    return _convert_open_clip(state_dict)[0]


# ------------------------------------------------------------------------------------------ sources
@dataclass
class WeightSource:
    """A component's weights, located and recognised: where, in which layout, and what its config says."""

    part: str
    source: str
    path: Path
    layout: str
    #: Component options the source's own config implies (``None`` when it has no config).
    options: dict[str, Any] | None = None
    allow_pickle: bool = False

    @property
    def keymap(self) -> Keymap:
        if self.layout in ("llavakit", "open-clip"):
            return (("", PART_PREFIXES[self.part]),)
        return COMPONENT_KEYMAPS[self.layout]

    def open(self) -> Checkpoint:
        """The tensors of this source (converted to our names for open_clip)."""
        if self.layout == "open-clip":
            checkpoint = _open_file_or_folder(self.path, ("open_clip_model", "model"), self.allow_pickle)
            state = dict(checkpoint.iter_tensors(list(checkpoint.keys())))
            converted, origin = _convert_open_clip(state)
            return TensorDictCheckpoint.from_state_dict(converted, where=checkpoint.where, files=checkpoint.files, origin=origin)
        if self.layout == "llavakit" and self.path.is_dir():
            return _open_file_or_folder(self.path, (self.part, "open_clip_model", "model"), self.allow_pickle)
        return _open_file_or_folder(self.path, ("model",), self.allow_pickle)


def _open_file_or_folder(path: Path, basenames: tuple[str, ...], allow_pickle: bool) -> Checkpoint:
    """A checkpoint file (safetensors, a safetensors index, or an allowed pickle) or a folder's weights."""
    if path.is_file() and path.name.endswith(".safetensors.index.json"):
        return SafetensorsCheckpoint.from_files(index_files(path, path.parent), where=str(path))
    if path.is_file():
        return open_checkpoint(path, allow_pickle=allow_pickle)
    for basename in basenames:
        single, index = path / f"{basename}.safetensors", path / f"{basename}.safetensors.index.json"
        if single.exists() or index.exists():
            return SafetensorsCheckpoint.open(path, basename=basename)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return SafetensorsCheckpoint.from_files(candidates, where=str(path))
    return open_checkpoint(path, basename=basenames[0], allow_pickle=allow_pickle)


def locate(part: str, source: str, *, allow_pickle: bool = False, clip_vit: bool = True) -> WeightSource:
    """Resolve ``source`` (local, or downloaded from the hub) and recognise its layout for ``part``.

    ``clip_vit`` says whether the vision component is the built-in CLIP ViT, the only tower that open_clip
    and HF CLIP layouts are converted into; any other tower reads its own parameter names.
    """
    patterns = (*hub.MODEL_FILES, *hub.OPEN_CLIP_FILES, *(hub.PICKLE_FILES if allow_pickle else ()))
    if allow_pickle:
        patterns = (*patterns, "open_clip_pytorch_model.bin")
    path = hub.resolve_source(source, patterns=patterns)
    layout, options = _recognise(part, path, allow_pickle, converts_to_clip_vit=clip_vit or part != "vision")
    if part not in LAYOUT_PARTS[layout]:
        raise ConfigError(
            f"weights for {part!r}: {source} is a {layout} checkpoint, which holds no {part} weights "
            f"(it fills: {', '.join(LAYOUT_PARTS[layout])})"
        )
    return WeightSource(part, str(source), path, layout, options=options, allow_pickle=allow_pickle)


def _recognise(part: str, path: Path, allow_pickle: bool, *, converts_to_clip_vit: bool) -> tuple[str, dict[str, Any] | None]:
    """(layout, component options its config implies) of the weights at ``path``."""
    if not converts_to_clip_vit:
        return "llavakit", None
    if path.is_dir() and (path / "config.json").exists():
        config = read_json(path / "config.json")
        where = str(path / "config.json")
        model_type = config.get("model_type")
        if model_type in ("clip", "clip_vision_model"):
            return "hf-clip", clip_vision_options(config, where)
        if model_type in ("llama", "mistral"):
            return "hf-causal-lm", llm_options(config, where)
        if model_type == "llava_next":
            options = None
            if part == "vision":
                options = vision_options(config.get("vision_config") or LLAVA_NEXT_VISION_DEFAULT, f"{where} vision_config")
            elif part == "llm":
                options = llm_options(config.get("text_config") or {"model_type": "llama"}, f"{where} text_config")
            return "llava-hf", options
        if is_original_llava(config):
            family = ORIGINAL_LLAVA_FAMILIES[config["model_type"]]
            options = llm_options({**config, "model_type": family}, where) if part == "llm" else None
            return "original-llava", options
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not a layout llavakit reads component weights from "
            "(clip, clip_vision_model, llama, mistral, llava_next, llava_mistral, llava_llama)"
        )
    if path.is_dir() and (path / "open_clip_config.json").exists():
        return "open-clip", None
    keys = list(_open_file_or_folder(path, (part, "model"), allow_pickle).keys())
    if part == "vision" and any(k.startswith(("visual.", "transformer.resblocks.")) for k in keys):
        return "open-clip", None
    if part == "vision" and any(k.startswith("vision_model.") for k in keys):
        return "hf-clip", None
    projector_prefixes = ("mm_projector.", "model.mm_projector.", "multi_modal_projector.", "model.multi_modal_projector.")
    if part == "projector" and any(k.startswith(projector_prefixes) for k in keys):
        return "llava-projector", None
    return "llavakit", None


# ------------------------------------------------------------------------------------------ planning
def plan_weights(config: ModelConfig, *, allow_pickle: bool = False) -> tuple[ModelConfig, dict[str, WeightSource]]:
    """Locate every component's weights and fit the config to them, before anything is built.

    Returns the config to build (sizes taken from the weights where the component is a configurable
    family, vocabulary and image token planned for a stock LLM) and the sources to load afterwards.
    """
    from llavakit.registry.plugins import get_registry

    registry = get_registry()
    sources: dict[str, WeightSource] = {}
    updates: dict[str, Any] = {}
    clip_vit = registry.get("vision", config.vision.name).factory is ClipVisionTower
    for part in PART_PREFIXES:
        ref: ComponentRef = getattr(config, part)
        if not ref.weights:
            continue
        found = locate(part, ref.weights, allow_pickle=allow_pickle, clip_vit=clip_vit)
        sources[part] = found
        if found.options is not None:
            updates[part] = _fit_options(part, ref, found, registry)
    config = config.model_copy(update=updates)
    llm_source = sources.get("llm")
    if llm_source is not None and llm_source.options is not None:
        config = _plan_vocabulary(config, llm_source, registry)
    return config, sources


def _fit_options(part: str, ref: ComponentRef, found: WeightSource, registry) -> ComponentRef:
    """``ref`` with the options the weights imply; a disagreement with a preset or an explicit option is
    an error that names each field."""
    spec = registry.get(part, ref.name)
    if spec.config is None:
        return ref
    known = spec.config.model_fields
    implied = {k: v for k, v in (found.options or {}).items() if k in known}
    overrides = dict(ref.options) if spec.defaults else {**implied, **ref.options}
    resolved = spec.options(overrides, field_path=part).model_dump()
    resizable = {"vocab_size"} if part == "llm" else set()
    mismatched = [
        f"{name} is {implied[name]!r} in the weights but {resolved[name]!r} in the component"
        for name in implied
        if name not in resizable and resolved.get(name) != implied[name]
    ]
    if mismatched:
        family = FAMILY_COMPONENTS.get(part)
        hint = (
            f"use {part}={family!r}, which takes its sizes from the weights, or set {part}_options to match"
            if spec.defaults and family
            else f"drop or correct the conflicting {part}_options"
        )
        raise ConfigError(
            f"weights for {part!r} ({found.source}) do not fit the {part} component {ref.name!r}: "
            + "; ".join(mismatched)
            + f"; {hint}"
        )
    return ref.model_copy(update={"options": overrides})


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


#: The llava-hf conversion pads the vocabulary to a multiple of 64 after adding <image> and <pad>.
VOCAB_MULTIPLE = 64
ADDED_TOKENS = ("<image>", "<pad>")


def _plan_vocabulary(config: ModelConfig, found: WeightSource, registry) -> ModelConfig:
    """Vocabulary size and image token for LLM weights whose vocabulary may lack the image/pad rows."""
    spec = registry.get("llm", config.llm.name)
    resolved = spec.options(config.llm.options, field_path="llm")
    if not hasattr(resolved, "vocab_size"):
        return config
    trained, rows = found.options["vocab_size"], resolved.vocab_size
    index = config.image_token_index if config.image_token_index is not None else spec.metadata.get("image_token_index")
    if rows < trained:
        raise ConfigError(
            f"the weights in {found.source} have a {trained}-token vocabulary but the language model "
            f"{config.llm.name!r} has {rows} rows; set llm_options vocab_size to at least {trained}"
        )
    if rows == trained and (index is None or index >= trained):
        # A stock LLM: make room for <image> and <pad>, as the llava-hf conversion does.
        rows = round_up(trained + len(ADDED_TOKENS), VOCAB_MULTIPLE)
        index = trained if index is None else index
    options = dict(config.llm.options)
    if rows != resolved.vocab_size:
        options["vocab_size"] = rows
    return config.model_copy(update={"llm": config.llm.model_copy(update={"options": options}), "image_token_index": index})


# ------------------------------------------------------------------------------------------ loading
def load_sources(
    model: nn.Module, sources: Mapping[str, WeightSource], *, device: torch.device, dtype: torch.dtype | None
) -> None:
    """Fill each part of ``model`` (built on the meta device) from its source, strictly; rows grown for new
    tokens go to ``model.untrained_rows`` and the part leaves ``model.untrained``."""
    for part, found in sources.items():
        report = load_weights(
            model,
            found.open(),
            found.keymap,
            dtype=dtype,
            device=device,
            scope=(PART_PREFIXES[part],),
            grow_rows=VOCAB_MATRICES if part == "llm" else (),
            progress=True,
        )
        model.untrained.discard(part)
        model.untrained_rows.update(report.grown_rows)


def add_image_tokens(model) -> dict[str, int]:
    """Give a model whose vocabulary has no ``<image>``/``<pad>`` rows (an original LLaVA checkpoint) those
    rows, as the llava-hf conversion does: the embedding and ``lm_head`` grow to ``vocabulary + 2`` rounded up
    to a multiple of 64, new rows start at the mean row and are listed in ``model.untrained_rows``, and the
    image token becomes the first new id. Returns the new tokens' ids."""
    from llavakit.plugins.llama import LlamaDecoder

    llm = model.language_model
    if type(llm) is not LlamaDecoder:
        raise ConfigError(f"adding vocabulary rows is supported for the built-in Llama-family decoder, not {model.config.llm.name!r}")
    trained = llm.vocab_size
    rows = round_up(trained + len(ADDED_TOKENS), VOCAB_MULTIPLE)
    embedding = _mean_grown(llm.embed_tokens.weight, rows)
    llm.embed_tokens.weight, llm.embed_tokens.num_embeddings = embedding, rows
    if llm.config.tie_word_embeddings:
        llm.lm_head.weight = embedding
    else:
        llm.lm_head.weight = _mean_grown(llm.lm_head.weight, rows)
    llm.lm_head.out_features = llm.vocab_size = rows
    llm.config = llm.config.model_copy(update={"vocab_size": rows})
    for name in VOCAB_MATRICES:
        model.untrained_rows[name] = (trained, rows)
    model.image_token_index = trained
    options = {**model.config.llm.options, "vocab_size": rows}
    model.config = model.config.model_copy(
        update={"image_token_index": trained, "llm": model.config.llm.model_copy(update={"options": options})}
    )
    return {token: trained + offset for offset, token in enumerate(ADDED_TOKENS)}


def _mean_grown(weight: torch.Tensor, rows: int) -> nn.Parameter:
    with torch.no_grad():
        return nn.Parameter(grow_rows_with_mean(weight.detach(), rows), requires_grad=weight.requires_grad)
