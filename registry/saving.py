"""Saving models: the llava-hf hub layout when transformers can express the model, else the llavakit layout.

llava-hf layout (what ``LlavaNextForConditionalGeneration.from_pretrained`` of every transformers version
reads): ``config.json`` (``model_type: llava_next``, every field explicit) and ``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json`` when larger than
``max_shard_size``; keys ``language_model.model.*``, ``language_model.lm_head.weight``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``.

llavakit layout (any assembly, plugins included): ``llavakit.json`` holding the model config (component
names, their options, ``weights`` naming one safetensors file per component, relative to the folder) and
what is untrained, plus ``vision.safetensors``, ``projector.safetensors``, ``tiler.safetensors`` and
``llm.safetensors`` (each sharded the same way when large), in each component's own parameter names.
``load_model(folder)`` reads both back.

Files are written under temporary names and renamed into place, so saving over the folder a model was
loaded from (whose weights may be memory-mapped from those very files) is safe. Weight and config files
of either layout left from an earlier save are removed; other files are left alone. The processor, when
the model has one, saves its own files alongside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from llavakit.core.errors import ConfigError
from llavakit.registry.checkpoints import LLAVA_HF_SAVE_KEYMAP
from llavakit.registry.hf_config import to_llava_next
from llavakit.registry.hub import PROCESSOR_FILES
from llavakit.registry.model import LLAVAKIT_CONFIG, PARTS, LlavakitModel

LAYOUTS = ("auto", "llava-hf", "llavakit")
LLAVAKIT_FORMAT_VERSION = 1

#: Our part → the submodule holding it.
PART_MODULES = {"vision": "vision_tower", "projector": "projector", "tiler": "tiler", "llm": "language_model"}

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000`` or ``"5GB"`` (decimal, as transformers reads it) / ``"5GiB"`` (binary)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ConfigError(f"max_shard_size {size!r}: expected bytes or a size such as '5GB', '500MB', '2GiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ConfigError(f"max_shard_size {size!r} must be positive")
    return value


# ------------------------------------------------------------------------------------------ writing files
def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file, streaming each tensor's bytes (no copy of the whole set).

    Tensors are ordered by decreasing element size, then name, so every tensor starts aligned to its own
    element size and the file can be memory-mapped without copies.
    """
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        tensor = tensors[key]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ConfigError(f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with _replacing(path) as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for key in order:
            data = tensors[key].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            handle.write(memoryview(data.numpy()))


class _replacing:
    """Write ``path`` through a temporary file renamed over it on success (removed on failure)."""

    def __init__(self, path: Path, mode: str = "wb"):
        self.path, self.mode = Path(path), mode
        self.temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def __enter__(self):
        self.handle = self.temporary.open(self.mode)
        return self.handle

    def __exit__(self, kind, error, traceback):
        self.handle.close()
        if kind is None:
            os.replace(self.temporary, self.path)
        else:
            self.temporary.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    with _replacing(path, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")


def write_sharded(folder: Path, basename: str, tensors: Mapping[str, torch.Tensor], max_shard_size: int) -> list[str]:
    """``{basename}.safetensors``, or shards ``{basename}-0000k-of-0000n.safetensors`` and their
    ``{basename}.safetensors.index.json`` when the tensors exceed ``max_shard_size``. Returns the file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > max_shard_size:
            shards.append({})
            used = 0
        shards[-1][key] = tensor
        used += size
    if len(shards) == 1:
        write_safetensors(folder / f"{basename}.safetensors", shards[0])
        return [f"{basename}.safetensors"]
    names = [f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = f"{basename}.safetensors.index.json"
    write_json(folder / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, index]


def _stale_files(folder: Path, written: Iterable[str]) -> list[Path]:
    """Weight and config files of either layout in ``folder`` that this save did not write."""
    bases = ("model", *PARTS)
    pattern = re.compile(
        rf"^(config\.json|{re.escape(LLAVAKIT_CONFIG)}|"
        rf"({'|'.join(bases)})(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?)$"
    )
    keep = set(written)
    return [p for p in folder.iterdir() if p.is_file() and pattern.match(p.name) and p.name not in keep]


# ------------------------------------------------------------------------------------------ layouts
def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (a tied weight once, under its first name) and persistent buffers of ``module``."""
    persistent = set(module.state_dict())
    tensors = {name: p.detach() for name, p in module.named_parameters()}
    tensors.update({name: b for name, b in module.named_buffers() if name in persistent})
    return tensors


def llava_hf_obstacles(model: LlavakitModel) -> list[str]:
    """Why transformers' ``LlavaNextForConditionalGeneration`` cannot express ``model`` (empty if it can)."""
    from llavakit.plugins.clip_vit import ClipVisionTower
    from llavakit.plugins.llama import LlamaDecoder
    from llavakit.plugins.projectors import MlpProjector
    from llavakit.plugins.tilers import AnyResTiler

    config = model.config
    problems = []
    if type(model.vision_tower) is not ClipVisionTower:
        problems.append(f"the vision encoder {config.vision.name!r} is not the built-in CLIP ViT")
    if type(model.language_model) is not LlamaDecoder:
        problems.append(f"the language model {config.llm.name!r} is not the built-in Llama-family decoder")
    if type(model.projector) is not MlpProjector or model.projector.depth != 2:
        problems.append(f"the projector {config.projector.name!r} is not a two-layer GELU MLP (mlp2x-gelu)")
    if type(model.tiler) is not AnyResTiler:
        problems.append(f"the tiler {config.tiler.name!r} is not AnyRes")
    index = config.image_token_index
    vocab = getattr(model.language_model, "vocab_size", 0)
    if index is None or not 0 <= index < vocab:
        problems.append(
            f"the image token id {index} has no row in the {vocab}-token vocabulary (an original LLaVA "
            "placeholder); `llavakit convert` adds the <image> and <pad> rows"
        )
    return problems


def save_pretrained(
    model: LlavakitModel, folder: str | Path, *, max_shard_size: int | str = "5GB", layout: str = "auto"
) -> Path:
    """Write ``model`` to ``folder`` in the llava-hf layout (``layout="auto"`` picks it whenever transformers
    can express the model) or the llavakit layout; the processor's files go alongside when there is one."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    limit = parse_size(max_shard_size)
    obstacles = llava_hf_obstacles(model)
    if layout == "llava-hf" and obstacles:
        raise ConfigError(
            "this model cannot be saved in the llava-hf layout: " + "; ".join(obstacles) + ". Use layout='llavakit'."
        )
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "llavakit" or obstacles:
        written = _save_llavakit(model, folder, limit)
    else:
        written = _save_llava_hf(model, folder, limit)
    for stale in _stale_files(folder, written):
        stale.unlink()
    _save_processor(model, folder)
    return folder


def _save_processor(model: LlavakitModel, folder: Path) -> None:
    """The processor saves itself when it can; otherwise the tokenizer, image-processor and chat-template
    files of the folder the model came from are copied unchanged."""
    processor = getattr(model, "processor", None)
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(folder)
        return
    source = getattr(model, "source_folder", None)
    if source is None or not Path(source).is_dir() or Path(source).resolve() == folder.resolve():
        return
    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, folder / name)


def add_tokens_to_tokenizer_files(folder: Path, tokens: Mapping[str, int]) -> list[str]:
    """Add special ``tokens`` (``{"<image>": 32000, "<pad>": 32001}``) to the tokenizer files in ``folder``,
    checking each gets the id the model expects; returns the files changed.

    ``tokenizer.json`` gains them as added special tokens; a SentencePiece-only folder gets an
    ``added_tokens.json`` (as the older llava-hf repos have); ``tokenizer_config.json`` names ``<pad>`` as
    the pad token and lists the new tokens.
    """
    folder = Path(folder)
    changed: list[str] = []
    if (folder / "tokenizer.json").is_file():
        from tokenizers import AddedToken, Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        for token, expected in tokens.items():
            if tokenizer.token_to_id(token) is None:
                tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            found = tokenizer.token_to_id(token)
            if found != expected:
                raise ConfigError(
                    f"{folder / 'tokenizer.json'}: {token} gets id {found} but the model expects {expected}; the "
                    "tokenizer's vocabulary does not match the model's"
                )
        with _replacing(folder / "tokenizer.json", "w") as handle:
            handle.write(tokenizer.to_str())
        changed.append("tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        added_path = folder / "added_tokens.json"
        added = json.loads(added_path.read_text()) if added_path.is_file() else {}
        write_json(added_path, {**added, **tokens})
        changed.append("added_tokens.json")
    else:
        return changed
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        decoder = config.setdefault("added_tokens_decoder", {})
        for token, token_id in tokens.items():
            decoder[str(token_id)] = {
                "content": token, "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
            }
        if "<pad>" in tokens and not config.get("pad_token"):
            config["pad_token"] = "<pad>"
        write_json(config_path, config)
        changed.append("tokenizer_config.json")
    return changed


def convert(
    source: str | Path,
    destination: str | Path,
    *,
    layout: str = "auto",
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    revision: str | None = None,
    allow_pickle: bool = False,
) -> tuple[Path, list[str]]:
    """Load ``source`` (any layout load_model reads) and save it to ``destination``; returns the folder and
    notes for the user. An original LLaVA checkpoint bound for the llava-hf layout first gets its
    ``<image>``/``<pad>`` rows (see :func:`~llavakit.registry.components.add_image_tokens`)."""
    from llavakit.registry.components import add_image_tokens
    from llavakit.registry.loading import load_model

    model = load_model(source, dtype=dtype, revision=revision, allow_pickle=allow_pickle)
    notes: list[str] = []
    index, vocab = model.image_token_index, model.language_model.vocab_size
    new_tokens: dict[str, int] = {}
    if layout != "llavakit" and (index is None or not 0 <= index < vocab):
        new_tokens = add_image_tokens(model)
        notes.append(
            f"added {', '.join(f'{t} (id {i})' for t, i in new_tokens.items())}: the vocabulary grew from {vocab} to "
            f"{model.language_model.vocab_size} rows; the new rows are the mean row (untrained)"
        )
        model.processor = None  # its tokenizer predates the new tokens; the files are copied and extended
    folder = save_pretrained(model, destination, max_shard_size=max_shard_size, layout=layout)
    notes.insert(0, f"wrote the {saved_layout(folder)} layout to {folder}")
    if new_tokens:
        changed = add_tokens_to_tokenizer_files(folder, new_tokens)
        notes.append(f"tokenizer: added the new tokens to {', '.join(changed)}" if changed else
                     "no tokenizer files were found: add <image> and <pad> to the tokenizer with the ids above")
    if model.untrained or model.untrained_rows:
        notes.append("untrained: " + model.untrained_summary().replace("\n", "; "))
    return folder, notes


def saved_layout(folder: str | Path) -> str:
    """Which layout :func:`save_pretrained` wrote into ``folder``."""
    return "llavakit" if (Path(folder) / LLAVAKIT_CONFIG).exists() else "llava-hf"


def _dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.language_model.parameters()).dtype).removeprefix("torch.")


def _save_llava_hf(model: LlavakitModel, folder: Path, limit: int) -> list[str]:
    llm_spec = getattr(model, "component_specs", {}).get("llm")
    metadata = llm_spec.metadata if llm_spec is not None else {}
    llm = model.language_model.config.model_dump()
    family = metadata.get("family") or ("mistral" if llm["sliding_window"] is not None else "llama")
    config = to_llava_next(
        vision=model.vision_tower.config.model_dump(),
        llm=llm,
        llm_family=family,
        projector_bias=model.projector.config.bias,
        grid_pinpoints=model.tiler.grid_pinpoints,
        config=model.config,
        dtype=_dtype_name(model),
        pad_token_id=pad if (pad := metadata.get("pad_token_id")) is not None and pad < llm["vocab_size"] else None,
    )
    tensors = {}
    for name, tensor in state_of(model).items():
        prefix, target = next((p, t) for p, t in LLAVA_HF_SAVE_KEYMAP if name.startswith(p))
        tensors[target + name[len(prefix) :]] = tensor
    written = write_sharded(folder, "model", tensors, limit)
    write_json(folder / "config.json", config)
    return [*written, "config.json"]


def _save_llavakit(model: LlavakitModel, folder: Path, limit: int) -> list[str]:
    written: list[str] = []
    config = model.config.model_dump(mode="json")
    for part, attribute in PART_MODULES.items():
        files = write_sharded(folder, part, state_of(getattr(model, attribute)), limit)
        written += files
        config[part]["weights"] = files[-1]  # the single file, or the shards' index
    config["dtype"] = _dtype_name(model)
    document = {
        "format": "llavakit",
        "format_version": LLAVAKIT_FORMAT_VERSION,
        "model": config,
        "untrained": {"parts": sorted(model.untrained), "rows": {k: list(v) for k, v in model.untrained_rows.items()}},
    }
    write_json(folder / LLAVAKIT_CONFIG, document)
    return [*written, LLAVAKIT_CONFIG]
