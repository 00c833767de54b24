"""``llavakit train CONFIG``: staged training from a config file, with checkpoints that resume exactly.

A training config (YAML, TOML or JSON) names the model (built from scratch with ``model:``, or loaded from a
checkpoint folder with ``init:``), the tokenizer (an existing folder, or a byte-level BPE trained on the
data's text), the chat template, the data and a list of stages. Each stage sets, per component (``vision``,
``projector``, ``tiler``, ``llm``), whether it is frozen and its learning rate, which is all the LLaVA recipe
needs:

- stage 1 (alignment): ``vision`` and ``llm`` frozen; only the projector (and ``image_newline``) train. A
  frozen vision tower runs under ``torch.no_grad`` (no activations stored: nothing upstream of it trains); a
  frozen LLM only has ``requires_grad=False`` and keeps its activations, because the projector's gradient
  flows back through it.
- stage 2 (instruction tuning): the LLM trains too, optionally the vision tower at its own learning rate.
- every part from scratch: nothing frozen.

Each stage runs ``steps`` optimizer steps of ``batch_size × grad_accum`` examples with AdamW, linear warm-up
then cosine decay to ``min_lr_ratio`` of the peak, gradient clipping and bf16 autocast where the hardware
has fast bf16. The loss of a step is the mean over every answer token of its micro-batches.

Output folder: ``tokenizer/`` (when trained), ``checkpoints/step-NNNNNN/`` (a llava-hf folder plus
``training_state.pt``: optimizer, scheduler, position in the data), ``model/`` (the final llava-hf folder),
``log.jsonl`` (one line per logged step) and ``loss.png`` (the loss curve). Examples are addressed by index (the synthetic source is a
pure function of its seed, a JSON dataset is shuffled per epoch with a seeded permutation), so a run resumed
from a checkpoint sees the same examples and reproduces the same losses.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llavakit.core.chat import ChatTemplate
from llavakit.core.config import ModelConfig
from llavakit.core.errors import CheckpointError, ConfigError
from llavakit.core.model import IGNORE_INDEX

Component = Literal["vision", "projector", "tiler", "llm"]
#: Config component name → the model's submodule.
COMPONENT_MODULES: dict[str, str] = {
    "vision": "vision_tower", "projector": "projector", "tiler": "tiler", "llm": "language_model",
}
STATE_FILE = "training_state.pt"
LOG_FILE = "log.jsonl"


# ---------------------------------------------------------------------------------------------- config
class ComponentSettings(BaseModel):
    """How one component trains in a stage: frozen or not, and its own peak learning rate."""

    model_config = ConfigDict(extra="forbid")

    freeze: bool = False
    lr: float | None = Field(default=None, gt=0, description="peak learning rate; default: the stage's lr")


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    objective: Literal["answers", "patch-labels"] = Field(
        default="answers",
        description="answers: next-token loss on the assistant answers (the LLaVA stages); patch-labels: the vision "
        "tower alone learns to name what each patch shows, through a linear head dropped after the stage",
    )
    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(default=8, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(gt=0, description="peak learning rate of the components without their own")
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="cosine decay floor, as a fraction of the peak")
    weight_decay: float = Field(default=0.0, ge=0, description="applied to matrices only, never to norms or biases")
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    components: dict[Component, ComponentSettings] = Field(default_factory=dict)
    form_weights: dict[Literal["color", "shape", "count", "exists", "describe"], float] | None = Field(
        default=None, description="synthetic-shapes: this stage's form weights (default: the data section's)"
    )
    save_every: int | None = Field(default=None, gt=0, description="checkpoint every N steps (and always at the end)")
    patch_head: Literal["joint", "factored"] = Field(
        default="joint",
        description="patch-labels: one softmax over the source's patch classes (joint), or one per factor of them "
        "(factored: for synthetic shapes, shape and colour separately, which gives the features one direction per "
        "shape shared by every colour)",
    )
    patch_places: bool = Field(
        default=False,
        description="patch-labels: also name, in a softmax of its own, the place from the left of the shape "
        "covering each patch (synthetic shapes: 1st to 4th, or background), the order a description lists them in",
    )

    def settings(self, component: str) -> ComponentSettings:
        return self.components.get(component, ComponentSettings())  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _something_trains(self) -> StageConfig:
        if self.objective != "patch-labels" and self.patch_head != "joint":
            raise ValueError(f"stage {self.name!r} sets patch_head, which only objective patch-labels uses")
        if self.objective != "patch-labels" and self.patch_places:
            raise ValueError(f"stage {self.name!r} sets patch_places, which only objective patch-labels uses")
        if self.objective == "patch-labels":
            others = sorted(set(self.components) - {"vision"})
            if others:
                raise ValueError(
                    f"stage {self.name!r} has objective patch-labels, which trains only the vision tower; remove the "
                    f"settings of {', '.join(others)}"
                )
            if self.settings("vision").freeze:
                raise ValueError(f"stage {self.name!r} has objective patch-labels but freezes the vision tower it trains")
            return self
        if all(self.settings(c).freeze for c in COMPONENT_MODULES):
            raise ValueError(f"stage {self.name!r} freezes every component; leave at least one to train")
        return self


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["synthetic-shapes", "llava-json"]
    seed: int = 0
    max_turns: int | None = Field(default=None, gt=0, description="synthetic-shapes: questions per scene (default: all forms)")
    form_weights: dict[Literal["color", "shape", "count", "exists", "describe"], float] = Field(
        default_factory=dict, description="synthetic-shapes: how often each question form comes first (default 1 each)"
    )
    balanced_negatives: bool = Field(
        default=False,
        description="synthetic-shapes: false 'Is there a …?' questions that share a present colour as often as a "
        "present shape (by default most share the shape, so the colour alone answers them)",
    )
    path: str | None = Field(default=None, description="llava-json: the JSON or JSONL file")
    image_folder: str | None = Field(default=None, description="llava-json: images are relative to it")
    max_length: int | None = Field(default=None, gt=0, description="refuse longer examples (tokens, images included)")
    samples_per_scene: int = Field(
        default=1, ge=1,
        description="synthetic-shapes: consecutive samples that show one scene, each with its own question (the "
        "scene is rendered and resized once for all of them, and a batch asks several things of one image)",
    )
    independent_turns: bool = Field(
        default=False,
        description="synthetic-shapes: each question of a scene's conversation (max_turns of them) is its own "
        "single-turn conversation, packed into one sequence behind the shared image prompt: a tree-shaped mask "
        "lets every answer see the image and its own question only, so nothing can be copied between turns and "
        "the image tokens are computed once for all of them",
    )
    every_question: bool = Field(
        default=False,
        description="synthetic-shapes, with independent_turns: each scene asks every question it answers (the colour "
        "of each unique shape, the shape of each unique colour, the count, the description, 'Is there …?' for each "
        "shape present and as many absent pairs) instead of one of each form",
    )
    workers: int = Field(
        default=0, ge=0,
        description="threads that render and encode the next steps' batches while the current step computes "
        "(0: the training thread does it between steps)",
    )

    @model_validator(mode="after")
    def _path_for_json(self) -> DataConfig:
        if self.source == "llava-json" and not self.path:
            raise ValueError("source 'llava-json' needs path: the dataset's .json or .jsonl file")
        if self.source != "synthetic-shapes" and self.samples_per_scene != 1:
            raise ValueError("samples_per_scene is a synthetic-shapes setting; a llava-json record has its own image")
        if self.every_question and not self.independent_turns:
            raise ValueError("every_question needs independent_turns: true (in one conversation, later answers could "
                             "be copied from earlier ones)")
        if self.source != "synthetic-shapes" and self.independent_turns:
            raise ValueError(
                "independent_turns is a synthetic-shapes setting (a llava-json record's later turns carry no image "
                "placeholder of their own); split such records into single-turn records instead"
            )
        return self


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, description="an existing tokenizer folder")
    vocab_size: int | None = Field(default=None, gt=0, description="train a byte-level BPE of this size instead")
    training_conversations: int = Field(default=5000, gt=0, description="conversations of the data to train it on")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if (self.path is None) == (self.vocab_size is None):
            raise ValueError("give either path (an existing tokenizer) or vocab_size (train one), not both or neither")
        return self


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig | None = Field(default=None, description="build this model from scratch (seeded)")
    init: str | None = Field(default=None, description="or start from this checkpoint folder")
    tokenizer: TokenizerConfig | None = Field(default=None, description="default: the init folder's tokenizer")
    chat_template: str | None = Field(default=None, description="a Jinja file, or a registered template name")
    data: DataConfig
    output: str = Field(description="run folder, relative to the working directory")
    seed: int = 0
    threads: int | None = Field(default=None, gt=0, description="torch CPU threads (default: torch's choice)")
    device: str = Field(default="cpu", description="where the model trains: cpu, cuda, cuda:1, …")
    autocast: Literal["auto", "bfloat16", "none"] = "auto"
    log_every: int = Field(default=10, gt=0)
    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            torch.device(value)
        except RuntimeError as error:
            raise ValueError(f"device {value!r} is not a torch device ({error}); use cpu, cuda or cuda:N") from None
        return value

    @model_validator(mode="after")
    def _model_source(self) -> TrainingConfig:
        if (self.model is None) == (self.init is None):
            raise ValueError("give either model (build from scratch) or init (a checkpoint folder), not both or neither")
        if self.init is None and self.tokenizer is None:
            raise ValueError("a model built from scratch needs a tokenizer section (path, or vocab_size to train one)")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self


def read_training_config(path: str | Path) -> TrainingConfig:
    """Read and validate a training config. Relative paths of inputs (init, tokenizer, chat template, data) are
    relative to the file's folder, so a config travels with its files; ``output`` is relative to the working
    directory, so a packaged config never writes into the installed package."""
    from llavakit.registry.config_files import read_config_data

    path = Path(path)
    data = read_config_data(path)
    try:
        config = TrainingConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: invalid training config:\n" + "\n".join(lines)) from None
    base = path.parent

    def anchored(value: str) -> str:
        return value if Path(value).is_absolute() else str(base / value)

    updates: dict[str, Any] = {}
    if config.init is not None:
        updates["init"] = anchored(config.init)
    if config.chat_template is not None and config.chat_template.endswith(".jinja"):
        updates["chat_template"] = anchored(config.chat_template)
    if config.tokenizer is not None and config.tokenizer.path is not None:
        updates["tokenizer"] = config.tokenizer.model_copy(update={"path": anchored(config.tokenizer.path)})
    if config.data.path is not None:
        image_folder = anchored(config.data.image_folder) if config.data.image_folder is not None else None
        updates["data"] = config.data.model_copy(update={"path": anchored(config.data.path), "image_folder": image_folder})
    return config.model_copy(update=updates)


# ---------------------------------------------------------------------------------------------- pieces
def make_source(data: DataConfig):
    from llavakit.registry.datasets import LlavaJsonDataset, SyntheticShapesSource

    if data.source == "synthetic-shapes":
        return SyntheticShapesSource(seed=data.seed, max_turns=data.max_turns, form_weights=data.form_weights,
                                     balanced_negatives=data.balanced_negatives,
                                     samples_per_scene=data.samples_per_scene,
                                     independent_turns=data.independent_turns, every_question=data.every_question)
    return LlavaJsonDataset(data.path, data.image_folder)


def load_chat_template(name: str | None) -> ChatTemplate | None:
    """A template from a ``.jinja`` file or a registered name (``None``: the tokenizer folder's own)."""
    if name is None:
        return None
    if name.endswith(".jinja"):
        path = Path(name)
        if not path.is_file():
            raise CheckpointError(f"{path}: chat template file not found")
        return ChatTemplate(name=path.stem, source=path.read_text(encoding="utf-8"))
    from llavakit.registry.plugins import get_registry

    return get_registry().get("chat_template", name).factory


def prepare_tokenizer(config: TrainingConfig, template: ChatTemplate | None, source, output: Path) -> Path:
    """The tokenizer folder to use: the configured one, or a BPE trained now on the data's conversations."""
    from llavakit.registry.tokenizer_training import SPECIAL_TOKENS, train_bpe_tokenizer, write_tokenizer_folder

    settings = config.tokenizer
    if settings is None:
        return Path(config.init)
    if settings.path is not None:
        return Path(settings.path)
    if template is None:
        raise ConfigError("training a tokenizer needs chat_template: the conversations are rendered with it")
    variables = {"bos_token": SPECIAL_TOKENS["bos_token"], "eos_token": SPECIAL_TOKENS["eos_token"]}
    texts = [
        template.render(messages, add_generation_prompt=False, **variables)
        for messages in source.texts(settings.training_conversations)
    ]
    tokenizer = train_bpe_tokenizer(texts, settings.vocab_size)
    return write_tokenizer_folder(tokenizer, output / "tokenizer", template)


def resolve_autocast(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 under ``auto`` on CUDA with bf16 support and on CPUs with AVX512-BF16 or AMX, else none."""
    if setting == "none":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return None


def lr_factor(step: int, stage: StageConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def configure_components(model, stage: StageConfig, head: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """Freeze and unfreeze per the stage; the optimizer's parameter groups (decay on matrices only).

    A ``patch-labels`` stage trains the vision tower and its labelling ``head`` only (the head at the tower's rate).
    """
    groups = []
    for component, attribute in COMPONENT_MODULES.items():
        settings = stage.settings(component)
        module = getattr(model, attribute)
        frozen = settings.freeze or (stage.objective == "patch-labels" and component != "vision")
        module.requires_grad_(not frozen)
        if frozen:
            continue
        lr = settings.lr or stage.lr
        params = [p for p in module.parameters()]
        if component == "vision" and head is not None:
            params += list(head.parameters())
        matrices = [p for p in params if p.ndim >= 2]
        vectors = [p for p in params if p.ndim < 2]
        for group_params, decay in ((matrices, stage.weight_decay), (vectors, 0.0)):
            if group_params:
                groups.append({"params": group_params, "lr": lr, "weight_decay": decay, "component": component})
    return groups


@contextmanager
def without_activations(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Run ``module`` under ``torch.no_grad`` while inside (a frozen vision tower: nothing before it trains,
    so storing its activations would only cost memory and time)."""
    if not enabled:
        yield
        return
    module.forward = torch.no_grad()(type(module).forward.__get__(module))
    try:
        yield
    finally:
        del module.forward


def example_indices(source, first_sample: int, count: int, seed: int) -> list[int]:
    """Source indices of samples ``first_sample … first_sample + count - 1`` of the run.

    An endless source is read in order; a finite one in a fresh seeded permutation every epoch.
    """
    if source.size is None:
        return list(range(first_sample, first_sample + count))
    indices = []
    for sample in range(first_sample, first_sample + count):
        epoch, position = divmod(sample, source.size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(source.size, generator=generator)[position]))
    return indices


@dataclass
class TrainingState:
    """Where a run stands: the stage, the optimizer step within it, and the samples consumed so far."""

    stage: int = 0
    step: int = 0
    samples: int = 0
    elapsed_s: float = 0.0


def save_checkpoint(model, folder: Path, state: TrainingState, optimizer, scheduler,
                    head: torch.nn.Module | None = None) -> Path:
    """A llava-hf folder (weights, config; the processor saves tokenizer, image settings and chat template)
    plus ``generation_config.json`` and ``training_state.pt`` (with a ``patch-labels`` stage's head, which is
    not part of the model)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_generation_config(model, folder)
    torch.save(
        {
            "stage": state.stage, "step": state.step, "samples": state.samples, "elapsed_s": state.elapsed_s,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            **({"patch_head": head.state_dict()} if head is not None else {}),
        },
        folder / STATE_FILE,
    )
    return folder


def write_generation_config(model, folder: Path) -> None:
    """``generation_config.json`` with the tokenizer's special ids, so generation stops at the end of a turn."""
    tokenizer = model.processor.tokenizer
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = {key: value for key, value in ids.items() if value is not None}
    (folder / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no {STATE_FILE}, so this is not a training checkpoint to resume from; pass a "
            "checkpoints/step-NNNNNN folder of a run (or use it as init: to start a new run from its weights)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class StepResult:
    loss: float
    answer_tokens: int


def answer_batches(processor, source, stage: StageConfig, first_sample: int, *, seed: int,
                   max_length: int | None) -> list[dict[str, torch.Tensor]]:
    """The ``grad_accum`` collated micro-batches of the optimizer step that starts at sample ``first_sample``
    (on the CPU; a pure function of its arguments, so it can be built ahead on a worker thread)."""
    from llavakit.registry.datasets import collate, encode_example

    pad_id = processor.tokenizer.pad_token_id
    micro_batches = []
    images: dict = {}  # examples that share a scene (samples_per_scene) preprocess it once
    for micro in range(stage.grad_accum):
        indices = example_indices(source, first_sample + micro * stage.batch_size, stage.batch_size, seed)
        encoded = [encode_example(processor, source.example(i), max_length=max_length, image_cache=images)
                   for i in indices]
        micro_batches.append(collate(encoded, pad_id))
    return micro_batches


def training_step(model, micro_batches: list[dict[str, torch.Tensor]], stage: StageConfig, optimizer, *,
                  autocast: torch.dtype | None, frozen_vision: bool) -> StepResult:
    """One optimizer step over ``micro_batches``; the loss is the mean over all their answer tokens."""
    device = model.device
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches]
    total = sum(counts)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    with without_activations(model.vision_tower, frozen_vision):
        for batch, count in zip(micro_batches, counts):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = model(**batch).loss
            (loss * (count / total)).backward()
            loss_sum += float(loss.detach()) * count
    _clip_and_step(optimizer, stage)
    return StepResult(loss=loss_sum / total, answer_tokens=total)


class PatchHead(torch.nn.Linear):
    """The linear head of a ``patch-labels`` stage: vision features → logits of one or more label factors.

    ``factors`` maps each factor's name to a lookup from patch class to that factor's label: a joint head has
    one factor (the classes themselves); a factored one has several (shape and colour), each with its own
    softmax, so a shape must be one direction of the features whatever its colour. With ``places`` > 0 one
    more softmax of that many labels names each patch's place from the left (not a function of its class, so
    it comes with labels of its own). The loss sums the cross-entropies. It stays an ``nn.Linear`` so its
    state dict is just ``weight`` and ``bias``.
    """

    def __init__(self, in_features: int, factors: dict[str, tuple[int, list[int]]], places: int = 0):
        super().__init__(in_features, sum(size for size, _ in factors.values()) + places)
        self.factor_sizes = [size for size, _ in factors.values()]
        self.places = places
        for index, (_, lookup) in enumerate(factors.values()):
            self.register_buffer(f"lookup_{index}", torch.tensor(lookup, dtype=torch.long), persistent=False)

    def loss(self, features: torch.Tensor, classes: torch.Tensor, places: torch.Tensor | None = None) -> torch.Tensor:
        if (places is None) != (self.places == 0):
            raise ValueError(f"this patch head {'needs' if self.places else 'takes no'} per-patch places")
        logits = self(features).float().reshape(-1, self.out_features)
        classes = classes.reshape(-1)
        total = logits.new_zeros(())
        split = logits.split(self.factor_sizes + ([self.places] if self.places else []), dim=-1)
        for index, factor_logits in enumerate(split[: len(self.factor_sizes)]):
            total = total + torch.nn.functional.cross_entropy(factor_logits, getattr(self, f"lookup_{index}")[classes])
        if places is not None:
            total = total + torch.nn.functional.cross_entropy(split[-1], places.reshape(-1))
        return total


def patch_label_head(model, source, stage: StageConfig, seed: int) -> PatchHead:
    """The head of a ``patch-labels`` stage (seeded), joint or factored per ``stage.patch_head``, with a place
    softmax when ``stage.patch_places``."""
    classes = getattr(source, "patch_classes", None)
    if classes is None or not hasattr(source, "patch_example"):
        raise ConfigError(
            f"stage {stage.name!r} has objective patch-labels, but the data source {type(source).__name__} has no "
            "per-patch labels; use data source synthetic-shapes for this stage, or objective answers"
        )
    places = getattr(source, "patch_places", None) if stage.patch_places else ()
    if places is None:
        raise ConfigError(
            f"stage {stage.name!r} sets patch_places, but the data source {type(source).__name__} does not label "
            "places from the left; remove patch_places or use data source synthetic-shapes"
        )
    if stage.patch_head == "factored":
        factors = {name: (len(names), list(lookup)) for name, (names, lookup) in source.patch_factors.items()}
    else:
        factors = {"class": (len(classes), list(range(len(classes))))}
    tower = model.vision_tower
    generator = torch.Generator().manual_seed(seed + 7919)
    head = PatchHead(tower.hidden_size, factors, places=len(places))
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=generator)
        head.bias.zero_()
    return head.to(model.device)


def patch_batches(model, source, stage: StageConfig,
                  first_sample: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The ``grad_accum`` (pixels, patch classes, patch places or ``None`` unless ``stage.patch_places``)
    micro-batches of the ``patch-labels`` step at ``first_sample``:
    each image stretched onto one tile exactly as the processor makes an AnyRes base tile, normalised as the
    processor normalises (on the CPU; safe to build ahead on a worker thread)."""
    from llavakit.core.images import resize_chw
    from llavakit.core.types import ImageSize

    tower = model.vision_tower
    tile = int(tower.image_size)
    grid = tile // int(tower.patch_size)
    micro_batches = []
    for micro in range(stage.grad_accum):
        first = first_sample + micro * stage.batch_size
        pixels, labels, places = [], [], []
        for index in range(first, first + stage.batch_size):
            image, classes, place = source.patch_example(index, grid, grid)
            pixels.append(torch.from_numpy(resize_chw(image, [ImageSize(tile, tile)])[0].copy()))
            labels.append(classes.reshape(-1))
            places.append(place.reshape(-1))
        micro_batches.append((model.processor.normalize(torch.stack(pixels)), torch.stack(labels),
                              torch.stack(places) if stage.patch_places else None))
    return micro_batches


def patch_label_step(model, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                     stage: StageConfig, optimizer, head: PatchHead, *, autocast: torch.dtype | None) -> StepResult:
    """One optimizer step of a ``patch-labels`` stage: the tower's features at the model's feature layer (class
    token dropped as the model drops it) are classified patch by patch; the loss is the mean over patches."""
    device = model.device
    optimizer.zero_grad(set_to_none=True)
    loss_sum, patches = 0.0, 0
    for pixels, labels, places in micro_batches:
        pixels, labels = pixels.to(device), labels.to(device)
        places = places.to(device) if places is not None else None
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            features = model.vision_tower(pixels, feature_layer=model.vision_feature_layer,
                                          strategy=model.vision_feature_select_strategy)
        if features.shape[1] != labels.shape[1]:
            side = int(model.vision_tower.image_size) // int(model.vision_tower.patch_size)
            raise ConfigError(
                f"stage {stage.name!r}: the vision tower gives {features.shape[1]} features per tile but the "
                f"{side}×{side} patch grid has {labels.shape[1]} labels; patch-labels needs a tower whose selected "
                "features are exactly its patches"
            )
        loss = head.loss(features, labels, places)
        (loss / stage.grad_accum).backward()
        loss_sum += float(loss.detach())
        patches += labels.numel()
    _clip_and_step(optimizer, stage)
    return StepResult(loss=loss_sum / stage.grad_accum, answer_tokens=patches)


def _clip_and_step(optimizer, stage: StageConfig) -> None:
    if stage.max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
    optimizer.step()


class Prefetcher:
    """Builds the batches of upcoming steps on ``workers`` threads while the current step computes.

    Rendering, resizing and tokenising release the GIL (PIL, the numba kernels, the Rust tokenizer), so the
    threads overlap the step. A batch is a pure function of its first sample, so prefetching changes no value:
    a run with workers computes exactly what a run without them does. With 0 workers it builds inline.
    """

    def __init__(self, make: Callable[[int], Any], workers: int, samples_per_step: int):
        self.make = make
        self.workers = workers
        self.stride = samples_per_step
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="llavakit-data") if workers else None
        self.pending: dict[int, Future] = {}

    def get(self, first_sample: int, steps_after: int) -> Any:
        """The batch of the step at ``first_sample``; queues up to ``workers`` of the ``steps_after`` next ones."""
        if self.pool is None:
            return self.make(first_sample)
        for step in range(min(self.workers, steps_after) + 1):
            offset = first_sample + step * self.stride
            if offset not in self.pending:
                self.pending[offset] = self.pool.submit(self.make, offset)
        return self.pending.pop(first_sample).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()


def train(config_path: str | Path, *, resume: str | Path | None = None, output: str | Path | None = None,
          progress: bool = True, max_steps: int | None = None) -> Path:
    """Run the training config at ``config_path`` (or resume it from a checkpoint); return the final model folder.

    ``output`` overrides the config's run folder. ``max_steps`` stops after that many optimizer steps in this
    call (for tests and smoke runs); the schedule still follows the configured ``steps``.
    """
    from tqdm.auto import tqdm

    from llavakit.registry.assembly import build_from_config, resolve_dtype
    from llavakit.registry.loading import load_model
    from llavakit.registry.processing import processor_for_model

    config = read_training_config(config_path)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    output = Path(output if output is not None else config.output)
    output.mkdir(parents=True, exist_ok=True)
    source = make_source(config.data)
    template = load_chat_template(config.chat_template)

    saved: dict[str, Any] | None = None
    if resume is not None:
        resume = Path(resume)
        saved = read_state(resume)
        model = load_model(resume, device=config.device)
        tokenizer_folder = resume
        state = TrainingState(saved["stage"], saved["step"], saved["samples"], saved["elapsed_s"])
    else:
        tokenizer_folder = prepare_tokenizer(config, template, source, output)
        if config.model is not None:
            model = build_from_config(config.model, dtype=resolve_dtype(config.model.dtype), seed=config.seed,
                                      device=config.device)
        else:
            model = load_model(config.init, device=config.device)
        state = TrainingState()
    model.processor = processor_for_model(model, tokenizer_folder, chat_template=template)
    _check_vocabulary(model)
    autocast = resolve_autocast(config.autocast, model.device)
    log_path = output / LOG_FILE
    _trim_log(log_path, state)
    started = time.perf_counter() - state.elapsed_s
    steps_run = 0

    for stage_index in range(state.stage, len(config.stages)):
        stage = config.stages[stage_index]
        if stage_index != state.stage:
            state = TrainingState(stage_index, 0, state.samples, state.elapsed_s)
        stage_source = source
        if stage.form_weights is not None:
            if config.data.source != "synthetic-shapes":
                raise ConfigError(f"stage {stage.name!r} sets form_weights, which only the synthetic-shapes source has")
            stage_source = make_source(config.data.model_copy(update={"form_weights": stage.form_weights}))
        head = patch_label_head(model, stage_source, stage, config.seed) if stage.objective == "patch-labels" else None
        groups = configure_components(model, stage, head)
        optimizer = torch.optim.AdamW(groups, betas=stage.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step, stage=stage: lr_factor(step, stage))
        if saved is not None and saved["stage"] == stage_index:
            if head is not None:
                head.load_state_dict(saved["patch_head"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        frozen_vision = stage.settings("vision").freeze
        if head is not None:
            make = partial(patch_batches, model, stage_source, stage)
        else:
            make = partial(answer_batches, model.processor, stage_source, stage, seed=config.seed,
                           max_length=config.data.max_length)
        per_step = stage.batch_size * stage.grad_accum
        prefetch = Prefetcher(make, config.data.workers, per_step)
        model.train()
        bar = tqdm(total=stage.steps, initial=state.step, desc=f"stage {stage.name}", disable=not progress, unit="step")
        try:
            while state.step < stage.steps:
                if max_steps is not None and steps_run >= max_steps:
                    bar.close()
                    return output
                batches = prefetch.get(state.samples, stage.steps - state.step - 1)
                if head is not None:
                    result = patch_label_step(model, batches, stage, optimizer, head, autocast=autocast)
                else:
                    result = training_step(model, batches, stage, optimizer, autocast=autocast,
                                           frozen_vision=frozen_vision)
                scheduler.step()
                state.step += 1
                state.samples += per_step
                state.elapsed_s = time.perf_counter() - started
                steps_run += 1
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if state.step % config.log_every == 0 or state.step == stage.steps or state.step == 1:
                    _log(log_path, stage, state, result, scheduler)
                if (stage.save_every and state.step % stage.save_every == 0) or state.step == stage.steps:
                    save_checkpoint(model, output / "checkpoints" / f"step-{_global_step(config, state):06d}",
                                    state, optimizer, scheduler, head)
        finally:
            prefetch.close()
        bar.close()
        saved = None
    model.eval()
    final = output / "model"
    model.save_pretrained(final)
    write_generation_config(model, final)
    plot_log(log_path, output / "loss.png")
    return final


def _global_step(config: TrainingConfig, state: TrainingState) -> int:
    return sum(stage.steps for stage in config.stages[: state.stage]) + state.step


def _check_vocabulary(model) -> None:
    tokenizer = model.processor.tokenizer
    rows = model.language_model.vocab_size
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the language model's embedding has {rows} rows; set "
            f"model.llm.options.vocab_size to at least {len(tokenizer)}"
        )


def _log(path: Path, stage: StageConfig, state: TrainingState, result: StepResult, scheduler) -> None:
    entry = {
        "stage": stage.name, "objective": stage.objective, "step": state.step, "samples": state.samples, "loss": round(result.loss, 6),
        "answer_tokens": result.answer_tokens, "lr": scheduler.get_last_lr()[0], "elapsed_s": round(state.elapsed_s, 2),
    }
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def _trim_log(path: Path, state: TrainingState) -> None:
    """On resume, drop log lines past the checkpoint (a crashed run may have logged steps it never saved)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["samples"] <= state.samples:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a run's ``log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_log(log_path: str | Path, png_path: str | Path, *, title: str = "training loss") -> Path:
    """Draw the loss of a run's ``log.jsonl`` against optimizer steps (log scale) as a PNG, with Pillow only."""
    from PIL import Image, ImageDraw

    entries = read_log(log_path)
    if not entries:
        raise ConfigError(f"{log_path}: no logged steps to plot")
    offsets, steps, stage_starts, total = {}, [], [], 0
    for entry in entries:
        if entry["stage"] not in offsets:
            offsets[entry["stage"]] = total
            stage_starts.append((total, entry["stage"]))
        total = offsets[entry["stage"]] + entry["step"]
        steps.append(total)
    losses = [max(entry["loss"], 1e-4) for entry in entries]
    width, height, left, right, top, bottom = 900, 480, 80, 30, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    low, high = math.floor(math.log10(min(losses))), math.ceil(math.log10(max(losses)))
    high = max(high, low + 1)
    last = max(steps)

    def point(step: float, loss: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / last
        y = top + (height - top - bottom) * (high - math.log10(loss)) / (high - low)
        return x, y

    for exponent in range(low, high + 1):
        for mantissa in (1, 2, 5) if exponent < high else (1,):
            y = point(0, mantissa * 10**exponent)[1]
            draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
            draw.text((8, y - 6), f"{mantissa * 10.0**exponent:g}", fill="black")
    for index in range(6):
        step = round(last * index / 5)
        x = point(step, 10**high)[0]
        draw.line([(x, height - bottom), (x, height - bottom + 5)], fill="black")
        draw.text((x - 10, height - bottom + 10), str(step), fill="black")
    for start, name in stage_starts:
        x = point(start, 10**high)[0]
        draw.line([(x, top), (x, height - bottom)], fill=(200, 200, 255))
        draw.text((x + 4, top + 4), name, fill=(80, 80, 200))
    draw.rectangle([(left, top), (width - right, height - bottom)], outline="black")
    draw.line([point(s, l) for s, l in zip(steps, losses)], fill=(200, 40, 40), width=2)
    minutes = entries[-1]["elapsed_s"] / 60
    draw.text((left, 18), f"{title}: {entries[-1]['samples']} examples, {minutes:.1f} min", fill="black")
    draw.text((width // 2 - 60, height - 22), "optimizer step", fill="black")
    png_path = Path(png_path)
    image.save(png_path)
    return png_path
