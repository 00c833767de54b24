"""Assemble a model from component names: ``build_model(vision="clip-l336", llm="mistral-7b")``.

Assembly resolves each name through the plugin registry, merges preset defaults with the caller's
option overrides, sizes the projector and tiler from their neighbours, checks that the attention backend
can run, builds every component on the target device (``meta`` allocates nothing), initialises or loads
weights, and casts to the requested dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from llavakit.core.config import ModelConfig
from llavakit.core.errors import ConfigError
from llavakit.registry.config_files import validate_model_config
from llavakit.registry.model import PARTS, LlavakitModel
from llavakit.registry.plugins import ComponentSpec, get_registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: ``torch.nn.init`` functions modules call while they are constructed. On the meta device there is nothing
#: to fill, so a meta build replaces them with no-ops (as transformers does): it halves the build time.
INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


@contextmanager
def building_on(device: torch.device) -> Iterator[None]:
    """Construct modules on ``device``; on the meta device, skip ``torch.nn.init`` (process-wide while it
    lasts, so build on meta from one thread at a time)."""
    if device.type != "meta":
        with torch.device(device):
            yield
        return
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    for name in INIT_FUNCTIONS:
        setattr(torch.nn.init, name, _no_init)
    try:
        with torch.device(device):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _no_init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``torch.dtype`` from a dtype, its name (``"bfloat16"``) or ``None``/``"auto"`` (→ ``default``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return default
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(
    vision: str,
    llm: str,
    projector: str = "mlp2x-gelu",
    tiler: str = "anyres",
    attention: str = "sdpa",
    *,
    vision_options: Mapping[str, Any] | None = None,
    llm_options: Mapping[str, Any] | None = None,
    projector_options: Mapping[str, Any] | None = None,
    tiler_options: Mapping[str, Any] | None = None,
    weights: Mapping[str, str] | None = None,
    tokenizer: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    image_token_index: int | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    seed: int | None = None,
    allow_pickle: bool = False,
) -> LlavakitModel:
    """Build a model from registered component names.

    ``*_options`` override preset fields (``llm_options={"num_layers": 2, "hidden_size": 64}`` gives a
    tiny model of that family). ``device="meta"`` builds the full-size model without allocating memory.
    ``weights={"vision": SRC, "llm": SRC, "projector": SRC, "tiler": SRC}`` loads parts from local folders,
    files or hub ids (see :mod:`llavakit.registry.components`); pickle files need ``allow_pickle=True``.
    Components without weights are randomly initialised by their documented ``reset_parameters`` and
    listed in ``model.untrained``; ``seed`` makes that reproducible.
    """
    weights = dict(weights or {})
    components = {
        "vision": (vision, vision_options),
        "llm": (llm, llm_options),
        "projector": (projector, projector_options),
        "tiler": (tiler, tiler_options),
    }
    data: dict[str, Any] = {
        part: {"name": name, "options": dict(options or {}), "weights": weights.pop(part, None)}
        for part, (name, options) in components.items()
    }
    torch_dtype = resolve_dtype(dtype)
    data.update(
        attention=attention,
        dtype="auto" if isinstance(dtype, torch.dtype) else dtype,
        image_token_index=image_token_index,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        tokenizer=tokenizer,
    )
    config = validate_model_config(data, where="build_model")
    if weights:
        raise ConfigError(
            f"weights: unknown component(s) {sorted(weights)}; use the keys vision, llm, projector, tiler"
        )
    return build_from_config(config, device=device, dtype=torch_dtype, seed=seed, allow_pickle=allow_pickle)


def build_from_config(
    config: ModelConfig,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    initialise: bool = True,
    allow_pickle: bool = False,
) -> LlavakitModel:
    """Assemble the model described by ``config``; see :func:`build_model`.

    Parts with ``weights`` are built on the meta device and filled from their source (after the config
    was fitted to the weights); the others are initialised. ``initialise=False`` leaves parameters
    uninitialised (for a loader that fills every tensor next). On the meta device nothing is loaded.
    """
    registry = get_registry()
    dtype = dtype or resolve_dtype(config.dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    sources = {}
    if device.type != "meta" and any(getattr(config, part).weights for part in PARTS):
        from llavakit.registry.components import plan_weights

        config, sources = plan_weights(config, allow_pickle=allow_pickle)
    device_of = {part: torch.device("meta") if part in sources else device for part in PARTS}
    specs = {
        "vision": registry.get("vision", config.vision.name),
        "llm": registry.get("llm", config.llm.name),
        "projector": registry.get("projector", config.projector.name),
        "tiler": registry.get("tiler", config.tiler.name),
    }
    attention_spec = registry.get("attention", config.attention)
    backend = attention_spec.factory()
    backend.check(device, dtype)  # refuse an impossible backend before allocating anything

    vision_cfg = specs["vision"].options(config.vision.options, field_path="vision")
    llm_cfg = specs["llm"].options(config.llm.options, field_path="llm")
    if config.image_token_index is None:
        config = config.model_copy(update={"image_token_index": specs["llm"].metadata.get("image_token_index")})

    if seed is not None and device.type != "meta":
        torch.manual_seed(seed)
    with building_on(device_of["vision"]):
        vision_tower = specs["vision"].factory(vision_cfg, attention=backend)
    with building_on(device_of["llm"]):
        language_model = specs["llm"].factory(llm_cfg, attention=backend)
    with building_on(device_of["projector"]):
        projector = specs["projector"].factory(
            specs["projector"].options(
                {"in_features": vision_tower.hidden_size, "out_features": language_model.hidden_size,
                 **config.projector.options},
                field_path="projector",
            )
        )
    with building_on(device_of["tiler"]):
        tiler = specs["tiler"].factory(
            specs["tiler"].options(
                {"tile_size": vision_tower.image_size, "hidden_size": language_model.hidden_size,
                 **config.tiler.options},
                field_path="tiler",
            )
        )
    check_dimensions(config, specs, vision_tower, projector, language_model)
    model = LlavakitModel(
        config=config, vision_tower=vision_tower, projector=projector, tiler=tiler, language_model=language_model
    )
    model.attention_backend = backend
    model.component_specs = specs
    modules = {"vision": vision_tower, "projector": projector, "tiler": tiler, "llm": language_model}
    if initialise and device.type != "meta":
        for part, module in modules.items():
            if part not in sources and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    if sources:
        from llavakit.registry.components import load_sources

        load_sources(model, sources, device=device, dtype=dtype)
        model.finish_loading()
    # A component may load its own weights (an open_clip tower's ``pretrained`` option): then it is trained.
    model.untrained -= {part for part, module in modules.items() if getattr(module, "has_loaded_weights", False)}
    if config.tokenizer is not None:
        from llavakit.registry.processing import processor_for_model

        model.processor = processor_for_model(model, config.tokenizer)
    model.to(dtype)
    return model.eval()


def check_dimensions(config: ModelConfig, specs: dict[str, ComponentSpec], vision, projector, language_model) -> None:
    """Explain, in plain terms, components that cannot be connected."""
    if projector.in_features != vision.hidden_size:
        raise ConfigError(
            f"the projector {config.projector.name!r} takes {projector.in_features}-wide features but the vision "
            f"encoder {config.vision.name!r} produces {vision.hidden_size}-wide ones; drop projector.options.in_features "
            "or make them equal"
        )
    if projector.out_features != language_model.hidden_size:
        raise ConfigError(
            f"the projector {config.projector.name!r} emits {projector.out_features}-wide tokens but the language "
            f"model {config.llm.name!r} is {language_model.hidden_size} wide; drop projector.options.out_features "
            "or make them equal"
        )
    index = config.image_token_index
    # index == vocab_size is the rowless image id of an original LLaVA vocabulary: image positions are never
    # embedded, so it needs no row.
    if index is not None and index > language_model.vocab_size:
        raise ConfigError(
            f"image_token_index {index} is outside the vocabulary of the language model {config.llm.name!r} "
            f"({language_model.vocab_size} rows); pass image_token_index=<an id below {language_model.vocab_size}> "
            "or enlarge llm.options.vocab_size"
        )
