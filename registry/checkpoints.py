"""Reading checkpoints: safetensors files (single or sharded), opt-in pickle files, key layouts, strict loading.

Key layouts are data: an ordered list of ``(checkpoint prefix, llavakit prefix)`` pairs, first match wins; a
``None`` target marks tensors a layout deliberately leaves out (the text half of a ``CLIPModel``, say).
Loading builds the model on the meta device and materialises each tensor once from the memory-mapped
file, cast per tensor only when a dtype is requested, so the weights never exist twice in memory (with no
cast, the parameters *are* the file's pages, copy-on-write). Missing, unexpected and misshapen tensors are
collected and raised together, each named as in the checkpoint file (and as ours where it differs).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavakit.core.errors import CheckpointError, StateDictError

#: Checkpoint keys that are derived buffers, never weights: skipped wherever they appear (documented
#: allow-list: rotary ``inv_freq`` tables and CLIP's ``position_ids`` range).
IGNORED_SUFFIXES: tuple[str, ...] = (".inv_freq", "embeddings.position_ids")

#: llava-hf layouts: the hub layout (``language_model.model.*``, ``vision_tower.vision_model.*``), the
#: transformers-5 ``save_pretrained`` layout (``vision_tower.*``) and transformers-5's in-memory names.
LLAVA_HF_KEYMAP: tuple[tuple[str, str | None], ...] = (
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

#: The llava-hf hub layout llavakit writes (what ``LlavaNextForConditionalGeneration`` of every
#: transformers version reads): our prefix → checkpoint prefix.
LLAVA_HF_SAVE_KEYMAP: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model.model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("projector.", "multi_modal_projector."),
    ("tiler.image_newline", "image_newline"),
)

#: Original LLaVA (``llava_llama`` / ``llava_mistral``): the LLM at the root, the projector as an
#: ``nn.Sequential`` (Linear at even indices, GELU between), the CLIP tower nested twice.
ORIGINAL_LLAVA_KEYMAP: tuple[tuple[str, str | None], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.image_newline", "tiler.image_newline"),
    *((f"model.mm_projector.{2 * index}.", f"projector.linear_{index + 1}.") for index in range(8)),
    ("model.mm_projector.", "projector.linear_1."),  # mm_projector_type "linear": a bare nn.Linear
    ("model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
)

COMPONENT_OF_PREFIX = {
    "vision_tower.": "vision encoder",
    "projector.": "projector",
    "tiler.": "tiler",
    "language_model.": "language model",
}

#: :func:`map_key`'s answer for a key its layout deliberately leaves out.
DROPPED = "<dropped>"

Keymap = Sequence[tuple[str, "str | None"]]


def map_key(key: str, keymap: Keymap) -> str | None:
    """Our parameter name for checkpoint ``key``: ``None`` when no rule matches, :data:`DROPPED` when the
    matching rule leaves it out on purpose."""
    for source, target in keymap:
        if key.startswith(source):
            return DROPPED if target is None else target + key[len(source) :]
    return None


def checkpoint_name(name: str, keymap: Keymap) -> str:
    """The key our parameter ``name`` would have in a checkpoint of layout ``keymap`` (for messages).

    The most specific rule wins (``language_model.lm_head.`` before ``language_model.``).
    """
    rules = [(source, target) for source, target in keymap if target is not None and name.startswith(target)]
    if not rules:
        return name
    source, target = max(rules, key=lambda rule: len(rule[1]))
    return source + name[len(target) :]


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


# ------------------------------------------------------------------------------------------ sources
@dataclass
class TensorSource:
    """Where one checkpoint tensor lives: file and key, with its dtype and shape read from the header."""

    file: Path | None
    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Checkpoint(ABC):
    """Tensors by checkpoint key, read lazily. ``where`` names the checkpoint in messages."""

    where: str
    files: list[Path]
    tensors: dict[str, TensorSource] = field(default_factory=dict)

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    @abstractmethod
    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys``, grouped by file in file order."""


@dataclass
class SafetensorsCheckpoint(Checkpoint):
    """Every tensor of one or more safetensors files, memory-mapped (no tensor is read until asked for)."""

    @classmethod
    def open(cls, folder: Path, *, basename: str = "model") -> SafetensorsCheckpoint:
        """``{basename}.safetensors`` in ``folder``, or every shard its ``.index.json`` names."""
        return cls.from_files(safetensors_files(folder, basename=basename), where=str(folder))

    @classmethod
    def from_files(cls, files: Sequence[Path], *, where: str | None = None) -> SafetensorsCheckpoint:
        files = [Path(f) for f in files]
        checkpoint = cls(where or str(files[0]), files)
        for path in files:
            for key, (dtype, shape) in read_safetensors_header(path).items():
                checkpoint.tensors[key] = TensorSource(path, key, shape, dtype)
        return checkpoint

    @property
    def folder(self) -> Path:
        return self.files[0].parent

    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
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


@dataclass
class TensorDictCheckpoint(Checkpoint):
    """Tensors already in memory (or memory-mapped by ``torch.load``): pickle files, converted layouts.

    ``origin`` gives, for converted tensors, the checkpoint key they were made from (for messages).
    """

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], *, where: str, files: Sequence[Path] = (), origin: Mapping[str, str] | None = None
    ) -> TensorDictCheckpoint:
        checkpoint = cls(where, list(files), state=dict(state), origin=dict(origin or {}))
        for key, tensor in checkpoint.state.items():
            checkpoint.tensors[key] = TensorSource(None, key, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        return checkpoint

    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self.state[key]


def safe_shard_path(folder: Path, shard: str, index: Path) -> Path:
    """``folder / shard`` for a shard named in an index, refusing names that leave the folder.

    The check is on the name, not the resolved path: Hugging Face's cache holds shards as symlinks into a
    blob store outside the snapshot folder, which is legitimate.
    """
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: shard name {shard!r} is not a file name")
    normal = os.path.normpath(shard)
    if os.path.isabs(shard) or normal == ".." or normal.startswith(".." + os.sep):
        raise CheckpointError(f"{index}: shard {shard!r} points outside the checkpoint folder; refusing to read it")
    return Path(folder) / normal


def index_files(index: Path, folder: Path) -> list[Path]:
    """The shards a ``*.index.json`` names, each checked to exist inside ``folder``."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' naming the shards")
    files: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        path = safe_shard_path(folder, shard, index)
        if not path.exists():
            raise CheckpointError(f"{index}: names shard {shard!r}, which is not in {folder}; download it again")
        files.append(path)
    return files


def safetensors_files(folder: Path, *, basename: str = "model") -> list[Path]:
    """The safetensors files of ``folder``: ``{basename}.safetensors`` or the shards its index names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    single = folder / f"{basename}.safetensors"
    index = folder / f"{basename}.safetensors.index.json"
    if index.exists():
        return index_files(index, folder)
    if single.exists():
        return [single]
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {', '.join(bins)}: pickle files are read only with allow_pickle=True)" if bins else ""
    raise CheckpointError(f"{folder}: no {basename}.safetensors or {basename}.safetensors.index.json{hint}")


#: Pickle checkpoint names tried for a safetensors basename (transformers names its pickles differently).
PICKLE_BASENAMES = {"model": ("pytorch_model", "model"), "open_clip_model": ("open_clip_pytorch_model",)}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def open_checkpoint(path: Path, *, basename: str = "model", allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint folder or file: safetensors always, pickle files only with ``allow_pickle=True``."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint.from_files([path])
        if path.suffix in PICKLE_SUFFIXES:
            return open_pickle([path], where=str(path), allow_pickle=allow_pickle)
        raise CheckpointError(f"{path}: not a .safetensors file (or, with allow_pickle=True, a {'/'.join(PICKLE_SUFFIXES)} file)")
    try:
        return SafetensorsCheckpoint.open(path, basename=basename)
    except CheckpointError:
        if not allow_pickle or not path.is_dir():
            raise
    for name in PICKLE_BASENAMES.get(basename, (basename,)):
        index = path / f"{name}.bin.index.json"
        if index.exists():
            return open_pickle(index_files(index, path), where=str(path), allow_pickle=True)
        if (path / f"{name}.bin").exists():
            return open_pickle([path / f"{name}.bin"], where=str(path), allow_pickle=True)
    raise CheckpointError(f"{path}: no {basename}.safetensors, no index and no pickle checkpoint")


def open_pickle(files: Sequence[Path], *, where: str, allow_pickle: bool) -> TensorDictCheckpoint:
    """Tensors of pickle checkpoints, read with ``weights_only=True`` (and memory-mapped when possible)."""
    if not allow_pickle:
        raise CheckpointError(
            f"{where}: is a pickle checkpoint; pickle files can run code when read, so llavakit reads them only "
            "with allow_pickle=True (then with torch.load(weights_only=True)), or convert it to safetensors"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except Exception as err:  # noqa: BLE001 - unpickling raises many types; all mean "unreadable"
            raise CheckpointError(
                f"{path}: cannot be read as a weights-only pickle ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "it may be corrupt or hold objects other than tensors"
            ) from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CheckpointError(f"{path}: does not hold a flat state dict of tensors")
        state.update(loaded)
    return TensorDictCheckpoint.from_state_dict(state, where=where, files=files)


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
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a mapping)")
    header.pop("__metadata__", None)
    end = 0
    result = {}
    for key, info in header.items():
        try:
            result[key] = (info["dtype"], tuple(int(s) for s in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {key!r} lacks dtype/shape/offsets)") from None
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {8 + header_len + end} bytes but the file has {size}; "
            "download it again"
        )
    return result


#: Floating dtypes by their safetensors header name and their torch name.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The floating dtype holding most of ``checkpoint``'s parameters (what ``dtype="auto"`` keeps)."""
    counts: dict[torch.dtype, int] = {}
    for source in checkpoint.tensors.values():
        dtype = FLOAT_DTYPES.get(source.dtype)
        if dtype is not None:
            counts[dtype] = counts.get(dtype, 0) + _numel(source.shape)
    return max(counts, key=counts.get) if counts else torch.float32


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


def is_ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES)


# ------------------------------------------------------------------------------------------ loading
@dataclass
class LoadReport:
    """What :func:`load_weights` did: our names it filled, and rows it appended (``name: (first, end)``)."""

    loaded: set[str] = field(default_factory=set)
    grown_rows: dict[str, tuple[int, int]] = field(default_factory=dict)


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint,
    keymap: Keymap,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None = None,
    strict: bool = True,
    scope: Sequence[str] = (),
    grow_rows: Collection[str] = (),
    progress: bool = False,
) -> LoadReport:
    """Fill ``model``'s parameters (built on the meta device) from ``checkpoint``.

    ``scope`` limits the load to our names under those prefixes (one component of a full checkpoint):
    checkpoint tensors that map outside it belong to other components and are passed over. ``grow_rows``
    names matrices (embedding, ``lm_head``) that may have fewer rows in the checkpoint than in the model;
    the extra rows are set to the mean of the loaded ones and reported. Every mismatch is collected first
    and raised as one :class:`StateDictError` listing each tensor by its checkpoint name (and ours where it
    differs), expected and found shapes, and its component. ``strict=False`` tolerates unexpected tensors
    only: a missing or misshapen one is always an error.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    scope = tuple(scope)
    in_scope = (lambda name: name.startswith(scope)) if scope else (lambda name: True)
    state_names = set(model.state_dict())
    ours = {n: p for n, p in model.named_parameters() if in_scope(n)}
    ours.update({n: b for n, b in model.named_buffers() if n in state_names and in_scope(n)})
    origin = getattr(checkpoint, "origin", {})
    plan: dict[str, str] = {}
    unexpected: list[str] = []
    for key in checkpoint.keys():
        if is_ignored(key):
            continue
        name = map_key(key, keymap)
        if name == DROPPED or (name is not None and scope and not in_scope(name)):
            continue
        if name is None or name not in ours:
            label = origin.get(key, key)
            unexpected.append(label if name is None or name == label else f"{label} (ours: {name})")
            continue
        plan[name] = key
    problems: list[str] = []
    for name, key in plan.items():
        expected, found = tuple(ours[name].shape), checkpoint.tensors[key].shape
        growable = name in grow_rows and len(found) == len(expected) and found[1:] == expected[1:] and found[0] < expected[0]
        if expected != found and not growable:
            label = origin.get(key, key)
            label = label if label == name else f"{label} (ours: {name})"
            problems.append(f"  misshapen: {label} [{component_of(name)}]: expected {list(expected)}, found {list(found)}")
    missing = [n for n in ours if n not in plan]
    problems += [
        f"  missing: {_with_ours(checkpoint_name(n, keymap), n)} [{component_of(n)}]: expected {list(ours[n].shape)}"
        for n in missing
    ]
    if strict:
        problems += [f"  unexpected: {k}" for k in unexpected]
    if problems:
        raise StateDictError(
            f"the checkpoint in {checkpoint.where} does not fit the model ({len(problems)} problem(s)):\n"
            + "\n".join(problems)
            + "\nCheck that the config matches the weights; a model whose weights are partly absent must be "
            "assembled with build_model so the untrained parts are explicit."
        )
    report = LoadReport()
    by_key = {key: name for name, key in plan.items()}
    bar = _shard_bar(checkpoint, progress)
    current_file = None
    for key, tensor in checkpoint.iter_tensors(list(plan.values())):
        if bar is not None and checkpoint.tensors[key].file != current_file:
            if current_file is not None:
                bar.update(1)
            current_file = checkpoint.tensors[key].file
        name = by_key[key]
        target = ours[name]
        cast = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        tensor = tensor.to(device=device, dtype=cast)
        if tuple(tensor.shape) != tuple(target.shape):  # a growable matrix: append mean rows
            tensor = grow_rows_with_mean(tensor, target.shape[0])
            report.grown_rows[name] = (int(checkpoint.tensors[key].shape[0]), int(target.shape[0]))
        _assign(model, name, tensor, isinstance(target, nn.Parameter))
        report.loaded.add(name)
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    return report


def _with_ours(checkpoint_key: str, name: str) -> str:
    return name if checkpoint_key == name else f"{checkpoint_key} (ours: {name})"


def _shard_bar(checkpoint: Checkpoint, progress: bool):
    if not progress or len(checkpoint.files) < 2:
        return None
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal, silent in logs and tests.
    return tqdm(total=len(checkpoint.files), desc=f"loading {Path(checkpoint.where).name}", unit="shard", disable=None)


def grow_rows_with_mean(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with rows appended up to ``rows``, each the mean of the existing rows (new-token init)."""
    grown = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    grown[: tensor.shape[0]] = tensor
    grown[tensor.shape[0] :] = tensor.float().mean(dim=0).to(tensor.dtype)
    return grown


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if is_parameter:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor
