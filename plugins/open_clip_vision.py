"""Vision encoders backed by open_clip: every ``open_clip:<model name>`` (``open_clip:ViT-L-14-336-quickgelu``,
``open_clip:ViT-B-16``, ``open_clip:ViT-SO400M-14-SigLIP-384`` …).

The tower is open_clip's own module (``open_clip.create_model``'s vision half, built from the same model
config), so its numerics are open_clip's, attention included: the model's ``attention`` setting applies to
the native components only, which ``llavakit plugins`` says. Two kinds of open_clip towers are ViTs and
supported: open_clip's ``VisionTransformer`` (always a class token) and timm ViTs wrapped by open_clip
(SigLIP: no class token; prefix tokens other than a class token, such as registers, are dropped).

Features are hidden states after block ``feature_index(feature_layer)``, taken with open_clip's / timm's
``forward_intermediates(stop_early=True)`` so no block past the feature layer runs. Image size, patch size
and the normalisation constants come from the open_clip config (and the pretrained folder's
``open_clip_config.json`` when there is one), and reach the tiler and the processor through the
:class:`~llavakit.core.interfaces.VisionEncoder` attributes.

open_clip is imported when a tower is built or an ``open_clip:`` name is resolved, never at registration,
so importing the registry stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llavakit.core.attention import AttentionBackend
from llavakit.core.errors import CheckpointError, ConfigError, PluginError, StateDictError
from llavakit.core.hooks import hookimpl
from llavakit.core.interfaces import SelectStrategy, VisionEncoder

#: Weight files looked for in a pretrained folder, in open_clip's order of preference (Hub layout first).
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
#: open_clip's per-model config file in a Hub-layout folder (``model_cfg`` + ``preprocess_cfg``).
FOLDER_CONFIG = "open_clip_config.json"
ATTENTION_NOTE = "open_clip's own (the attention setting applies to native components only)"


class OpenClipVisionConfig(BaseModel):
    """Options of an ``open_clip:<model name>`` tower; ``model_name`` comes from the name itself."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(description="open_clip model config name, e.g. ViT-B-16")
    pretrained: str | None = Field(
        default=None,
        description="local weights: an open_clip checkpoint file (.safetensors/.bin/.pt, full CLIP or visual-only) "
        "or a folder holding one (Hub layout, optionally with open_clip_config.json)",
    )
    vision_cfg: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of open_clip's vision_cfg (layers, width, head_width, image_size, timm_model_name …)",
    )
    image_mean: tuple[float, float, float] | None = Field(default=None, description="default: from open_clip")
    image_std: tuple[float, float, float] | None = Field(default=None, description="default: from open_clip")


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise PluginError(
            f"open_clip vision towers need the open_clip_torch package ({err}); pip install open_clip_torch"
        ) from err
    return open_clip


def open_clip_model_names() -> list[str]:
    """Every model config open_clip knows (the members of the ``open_clip:*`` family)."""
    return list(import_open_clip().list_models())


class OpenClipVisionTower(VisionEncoder):
    """An open_clip vision tower behind the :class:`VisionEncoder` contract.

    Submodule ``visual`` is open_clip's module unchanged (``conv1``, ``transformer.resblocks.*``, ``ln_post``,
    ``proj`` … or ``trunk.*`` for timm towers), so its state dict is open_clip's ``visual.*`` minus the prefix.
    """

    def __init__(self, config: OpenClipVisionConfig, *, attention: AttentionBackend | None = None):
        # ``attention`` is accepted (every vision factory receives it) and deliberately unused: these towers
        # run open_clip's attention, as registered in their ``attention`` metadata.
        super().__init__()
        self.config = config
        open_clip = import_open_clip()
        model_cfg = open_clip.get_model_config(config.model_name)
        if model_cfg is None:
            raise ConfigError(f"open_clip has no model config named {config.model_name!r}")
        folder_cfg = read_folder_config(config.pretrained)
        model_cfg = folder_cfg.get("model_cfg", model_cfg)
        self.visual = build_visual(open_clip, config, model_cfg)
        trunk = self._timm_trunk()
        self.is_timm = trunk is not None  # a flag, not the module: a second reference would duplicate its weights
        if trunk is not None:
            image_size, patch_size = trunk.patch_embed.img_size, trunk.patch_embed.patch_size
            self.hidden_size, self.num_layers = trunk.embed_dim, len(trunk.blocks)
            self.has_class_token = getattr(trunk, "cls_token", None) is not None
        else:
            image_size, patch_size = self.visual.image_size, self.visual.patch_size
            self.hidden_size, self.num_layers = self.visual.transformer.width, len(self.visual.transformer.resblocks)
            self.has_class_token = True
        if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
            raise ConfigError(
                f"open_clip:{config.model_name} has non-square tiles or patches ({tuple(image_size)}, "
                f"{tuple(patch_size)}); llavakit tilers cut square tiles"
            )
        self.image_size, self.patch_size = int(image_size[0]), int(patch_size[0])
        self.image_mean, self.image_std = normalisation(open_clip, config, folder_cfg)
        if config.pretrained is not None and not any(p.is_meta for p in self.visual.parameters()):
            self.load_pretrained(Path(config.pretrained))

    def _timm_trunk(self):
        """The timm ViT inside an open_clip ``TimmModel``, ``None`` for open_clip's own ViT; refuse the rest."""
        from open_clip.transformer import VisionTransformer

        if isinstance(self.visual, VisionTransformer):
            return None
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None and hasattr(trunk, "forward_intermediates") and hasattr(trunk, "blocks") and hasattr(
            trunk, "patch_embed"
        ):
            return trunk
        raise ConfigError(
            f"open_clip:{self.config.model_name} builds a {type(trunk or self.visual).__name__}, not a ViT; llavakit "
            "needs a patch-grid transformer (open_clip ViT-* models, or timm ViTs such as the SigLIP ones)"
        )

    def feature_index(self, feature_layer: int) -> int:
        index = super().feature_index(feature_layer)
        if index == 0:
            raise ConfigError(
                f"vision_feature_layer={feature_layer} asks for the embeddings, but open_clip towers expose block "
                f"outputs only; use a value in [1, {self.num_layers}] or [-{self.num_layers}, -1]"
            )
        return index

    def forward(self, pixel_values, *, feature_layer: int = -2, strategy: SelectStrategy = "default"):
        block = self.feature_index(feature_layer) - 1
        pixel_values = pixel_values.to(next(self.visual.parameters()).dtype)
        if self.is_timm:
            (layer,) = self.visual.trunk.forward_intermediates(
                pixel_values, indices=[block], return_prefix_tokens=True, stop_early=True, output_fmt="NLC",
                intermediates_only=True,
            )
            # (patches, prefix tokens) when the trunk has prefix tokens, else the patches alone
            patches, prefix = layer if isinstance(layer, tuple) else (layer, None)
            class_token = prefix[:, :1] if self.has_class_token else None
        else:
            output = self.visual.forward_intermediates(
                pixel_values, indices=[block], stop_early=True, output_fmt="NLC", intermediates_only=True,
                output_extra_tokens=True,
            )
            patches, class_token = output["image_intermediates"][0], output["image_intermediates_prefix"][0]
        hidden = patches if class_token is None else torch.cat([class_token, patches], dim=1)
        return self.select(hidden, strategy)

    def load_pretrained(self, path: Path) -> None:
        """Load open_clip weights (a full CLIP checkpoint's ``visual.*`` or a visual-only state dict)."""
        file = checkpoint_file(path)
        state = read_state_dict(file)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        expected = self.visual.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        misshapen = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or misshapen:
            problems = []
            for label, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
                if names:
                    problems.append(f"{len(names)} {label}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
            raise StateDictError(
                f"{file}: does not fit the vision tower of open_clip:{self.config.model_name} ({'; '.join(problems)}); "
                "check that the weights belong to this model name"
            )
        self.visual.load_state_dict(state)
        self.has_loaded_weights = True


def build_visual(open_clip, config: OpenClipVisionConfig, model_cfg: dict) -> nn.Module:
    """open_clip's vision tower for ``model_cfg`` with ``config.vision_cfg`` overrides, without the text tower.

    ``_build_vision_tower`` is what open_clip's ``CLIP.__init__`` calls for its ``visual`` member; calling it
    directly builds the identical module while skipping the text tower, which LLaVA never uses.
    """
    import dataclasses

    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision_cfg = {**model_cfg["vision_cfg"], **config.vision_cfg}
    known = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    unknown = sorted(set(config.vision_cfg) - known)
    if unknown:
        raise ConfigError(
            f"vision.options.vision_cfg: unknown open_clip vision_cfg field(s) {unknown}; known: {', '.join(sorted(known))}"
        )
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # weights come from `pretrained`, never from a download
    return _build_vision_tower(
        model_cfg["embed_dim"], CLIPVisionCfg(**vision_cfg), quick_gelu=model_cfg.get("quick_gelu", False)
    )


def read_folder_config(pretrained: str | None) -> dict:
    """``open_clip_config.json`` of a pretrained folder (``{}`` for a file, or a folder without one)."""
    if pretrained is None or not Path(pretrained).is_dir() or not (Path(pretrained) / FOLDER_CONFIG).is_file():
        return {}
    path = Path(pretrained) / FOLDER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable open_clip config ({err})") from err


def normalisation(open_clip, config: OpenClipVisionConfig, folder_cfg: dict) -> tuple[tuple, tuple]:
    """Per-channel mean and std: the options, else the folder's ``preprocess_cfg``, else open_clip's
    pretrained configs for this model (when its tags agree), else open_clip's defaults."""
    preprocess = folder_cfg.get("preprocess_cfg", {})
    mean, std = config.image_mean or preprocess.get("mean"), config.image_std or preprocess.get("std")
    if mean is None or std is None:
        tags = open_clip.list_pretrained_tags_by_model(config.model_name)
        known = {
            (tuple(cfg["mean"]), tuple(cfg["std"]))
            for cfg in (open_clip.get_pretrained_cfg(config.model_name, tag) for tag in tags)
            if "mean" in cfg and "std" in cfg
        }
        if len(known) > 1:
            raise ConfigError(
                f"open_clip's pretrained weights for {config.model_name} ({', '.join(tags)}) use different "
                "normalisations; pass vision_options image_mean and image_std for yours"
            )
        from open_clip.transform import PreprocessCfg

        default = (known.pop() if known else (PreprocessCfg().mean, PreprocessCfg().std))
        mean, std = mean or default[0], std or default[1]
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no open_clip weights found; expected one of {', '.join(CHECKPOINT_NAMES)}")
    raise CheckpointError(f"{path}: no such file or folder (vision.options.pretrained)")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is unusable
        raise CheckpointError(f"{file}: cannot read open_clip weights ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


@hookimpl
def register_vision_encoders(register):
    register(
        "open_clip:*",
        OpenClipVisionTower,
        config=OpenClipVisionConfig,
        description="any open_clip ViT as open_clip:<model name>, e.g. open_clip:ViT-B-16",
        attention=ATTENTION_NOTE,
        members=open_clip_model_names,
    )
