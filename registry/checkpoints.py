"""Reading checkpoints: safetensors files (single or sharded), key layouts, and strict weight loading.

Key layouts are data: an ordered list of ``(checkpoint prefix, llavakit prefix)`` pairs, first match wins.
Loading builds the model on the meta device and materialises each tensor once from the memory-mapped
safetensors file, cast per tensor, so the weights never exist twice in memory. Missing, unexpected and
misshapen tensors are collected and raised together, each named as in the checkpoint file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavakit.core.errors import CheckpointError, StateDictError

#: Checkpoint keys that are derived buffers, never weights: skipped wherever they appear.
IGNORED_SUFFIXES: tuple[str, ...] = (".inv_freq", "embeddings.position_ids")

#: llava-hf layouts: the hub layout (``language_model.model.*``, ``vision_tower.vision_model.*``), the
#: transformers-5 ``save_pretrained`` layout (``vision_tower.*``) and transformers-5's in-memory names.
LLAVA_HF_KEYMAP: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.image_newline", "tiler.image_newline"),
    ("image_newline", "tiler.image_newline"),
)

COMPONENT_OF_PREFIX = {
    "vision_tower.": "vision encoder",
    "projector.": "projector",
    "tiler.": "tiler",
    "language_model.": "language model",
}


def map_key(key: str, keymap: Sequence[tuple[str, str]]) -> str | None:
    """Our parameter name for checkpoint ``key``, or ``None`` when no rule of ``keymap`` matches."""
    for source, target in keymap:
        if key.startswith(source):
            return target + key[len(source) :]
    return None


def component_of(name: str) -> str:
    for prefix, label in COMPONENT_OF_PREFIX.items():
        if name.startswith(prefix):
            return label
    return "model"


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, with errors that name the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


@dataclass
class TensorSource:
    """Where one checkpoint tensor lives: file and key, with its dtype and shape read from the header."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class SafetensorsCheckpoint:
    """An index over every tensor of a folder's safetensors files, opened lazily and memory-mapped."""

    folder: Path
    files: list[Path]
    tensors: dict[str, TensorSource] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, *, basename: str = "model") -> SafetensorsCheckpoint:
        folder = Path(folder)
        files = safetensors_files(folder, basename=basename)
        checkpoint = cls(folder, files)
        for path in files:
            for key, (dtype, shape) in read_safetensors_header(path).items():
                checkpoint.tensors[key] = TensorSource(path, key, shape, dtype)
        return checkpoint

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys``, one file open at a time (shard order)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        for path in self.files:
            wanted = by_file.get(path)
            if not wanted:
                continue
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in wanted:
                        yield key, handle.get_tensor(key)
            except (OSError, RuntimeError, ValueError) as err:
                if isinstance(err, (CheckpointError, StateDictError)):
                    raise
                raise CheckpointError(f"{path}: cannot read tensors ({err}); the file may be truncated or corrupt") from None


def safetensors_files(folder: Path, *, basename: str = "model") -> list[Path]:
    """The safetensors files of ``folder``: ``{basename}.safetensors`` or the shards its index names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    single = folder / f"{basename}.safetensors"
    index = folder / f"{basename}.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' naming the shards")
        files: list[Path] = []
        root = folder.resolve()
        for shard in dict.fromkeys(weight_map.values()):
            path = (folder / shard).resolve()
            if root not in path.parents:
                raise CheckpointError(
                    f"{index}: shard {shard!r} points outside the checkpoint folder; refusing to read it"
                )
            if not path.exists():
                raise CheckpointError(f"{index}: names shard {shard!r}, which is not in {folder}")
            files.append(path)
        return files
    if single.exists():
        return [single]
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {', '.join(bins)}: pickle files are not read by default)" if bins else ""
    raise CheckpointError(f"{folder}: no {basename}.safetensors or {basename}.safetensors.index.json{hint}")


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` from a safetensors header, checking the file is complete and not a Git LFS pointer."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if head.startswith(b"version "):
                raise CheckpointError(
                    f"{path}: is a Git LFS pointer, not weights; run `git lfs pull` in that repository or "
                    "download the real file"
                )
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file (truncated?)")
            header_len = int.from_bytes(head, "little")
            size = path.stat().st_size
            if header_len <= 0 or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {header_len} bytes, file has {size})")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    end = 0
    result = {}
    for key, info in header.items():
        result[key] = (info["dtype"], tuple(info["shape"]))
        end = max(end, info["data_offsets"][1])
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {8 + header_len + end} bytes but the file has {size}; "
            "download it again"
        )
    return result


def is_ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES)


def load_weights(
    model: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    keymap: Sequence[tuple[str, str]],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None = None,
    strict: bool = True,
    skip_ours: Iterable[str] = (),
    progress: bool = False,
) -> set[str]:
    """Fill ``model``'s parameters (built on the meta device) from ``checkpoint``; return our names loaded.

    Every mismatch is collected first and raised as one :class:`StateDictError` listing each tensor by its
    checkpoint name (and ours where it differs), expected and found shapes, and its component.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    ours = dict(model.named_parameters())
    ours.update({n: b for n, b in model.named_buffers() if n in model.state_dict()})
    skip = set(skip_ours)
    plan: dict[str, str] = {}
    unexpected: list[str] = []
    for key in checkpoint.keys():
        if is_ignored(key):
            continue
        name = map_key(key, keymap)
        if name is None or name not in ours:
            unexpected.append(key if name is None or name == key else f"{key} (→ {name})")
            continue
        plan[name] = key
    problems: list[str] = []
    for name, key in plan.items():
        expected, found = tuple(ours[name].shape), checkpoint.tensors[key].shape
        if expected != found:
            label = key if key == name else f"{key} (ours: {name})"
            problems.append(f"  misshapen: {label} [{component_of(name)}]: expected {list(expected)}, found {list(found)}")
    missing = [n for n in ours if n not in plan and n not in skip]
    problems += [f"  missing: {n} [{component_of(n)}]: expected {list(ours[n].shape)}" for n in missing]
    problems += [f"  unexpected: {k}" for k in unexpected]
    if problems and strict:
        raise StateDictError(
            f"the checkpoint in {checkpoint.folder} does not fit the model ({len(problems)} problem(s)):\n"
            + "\n".join(problems)
            + "\nCheck that config.json matches the weights; a model whose weights are partly absent must be "
            "assembled with build_model so the untrained parts are explicit."
        )
    keys = list(plan.values())
    by_key = {key: name for name, key in plan.items()}
    iterator = checkpoint.iter_tensors(keys)
    if progress and len(checkpoint.files) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(keys), desc=f"loading {checkpoint.folder.name}", unit="tensor")
    for key, tensor in iterator:
        name = by_key[key]
        target = ours[name]
        tensor = tensor.to(device=device, dtype=dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype)
        _assign(model, name, tensor, isinstance(target, nn.Parameter))
    return set(plan)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if is_parameter:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor
