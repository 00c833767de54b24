"""A configurable CLIP ViT vision tower, with the ``clip-l336`` preset (ViT-L/14 at 336 px, QuickGELU).

Parameter names follow Hugging Face's ``CLIPVisionModel`` (``embeddings.patch_embedding``,
``pre_layrnorm`` [sic], ``encoder.layers.{i}.self_attn.q_proj`` …), so llava-hf checkpoints load with a
prefix change. Every block exists and loads, but ``forward`` runs only the blocks up to the feature layer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from llavakit.core.attention import AttentionBackend
from llavakit.core.hooks import hookimpl
from llavakit.core.inplace import kernel_products, linear_rows, runs_in_place
from llavakit.core.interfaces import SelectStrategy, VisionEncoder

#: Inference forwards over at least this many tokens apply the activation in place (see :mod:`llavakit.core.inplace`).
IN_PLACE_MIN_POSITIONS = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipVitConfig(BaseModel):
    """Options of the ``clip-vit`` tower (``clip-l336`` sets the ViT-L/14-336 values)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    initializer_range: float = 0.02


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """:func:`quick_gelu` overwriting ``x``, with one temporary instead of three (the same operations, so the
    same bits)."""
    return x.mul_(torch.mul(x, 1.702).sigmoid_())


class ClipEmbeddings(nn.Module):
    def __init__(self, config: ClipVitConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size, bias=False)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    def __init__(self, config: ClipVitConfig, backend: AttentionBackend):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.backend = backend

    def forward(self, x: torch.Tensor, kernel: bool = False) -> torch.Tensor:
        """``kernel``: run the products on llavakit's many-row kernel (see :func:`kernel_products`)."""
        b, l, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (
            y.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
            for y in (linear_rows(x, projections) if kernel else (proj(x) for proj in projections))
        )
        out = self.backend.attend(q, k, v, mask=None, causal=False, scale=self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(b, l, -1)
        return linear_rows(out, (self.out_proj,))[0] if kernel else self.out_proj(out)


class ClipMLP(nn.Module):
    def __init__(self, config: ClipVitConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x, kernel: bool = False):
        """``kernel``: run the products on llavakit's many-row kernel (see :func:`kernel_products`)."""
        hidden = linear_rows(x, (self.fc1,))[0] if kernel else self.fc1(x)
        if self.act is quick_gelu and runs_in_place(x, self, IN_PLACE_MIN_POSITIONS):
            hidden = quick_gelu_(hidden)  # nothing else holds fc1's output: gate it where it lies
        else:
            hidden = self.act(hidden)
        return linear_rows(hidden, (self.fc2,))[0] if kernel else self.fc2(hidden)


class ClipBlock(nn.Module):
    def __init__(self, config: ClipVitConfig, backend: AttentionBackend):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config, backend)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x, kernel: bool = False):
        x = x + self.self_attn(self.layer_norm1(x), kernel)
        return x + self.mlp(self.layer_norm2(x), kernel)


class ClipEncoder(nn.Module):
    def __init__(self, config: ClipVitConfig, backend: AttentionBackend):
        super().__init__()
        self.layers = nn.ModuleList(ClipBlock(config, backend) for _ in range(config.num_layers))


class ClipVisionTower(VisionEncoder):
    """CLIP ViT. Hidden state 0 is the embedding output after ``pre_layrnorm``; ``post_layernorm`` is kept
    (it is part of the published checkpoints) but never used for LLaVA features."""

    def __init__(self, config: ClipVitConfig, *, attention: AttentionBackend):
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_layers
        self.has_class_token = True
        self.image_mean = tuple(config.image_mean)
        self.image_std = tuple(config.image_std)
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = ClipEncoder(config, attention)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def reset_parameters(self) -> None:
        """Documented random init: normal(0, initializer_range) for weights, zero biases, LayerNorm at 1/0."""
        std = self.config.initializer_range
        nn.init.normal_(self.embeddings.class_embedding, std=std)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values, *, feature_layer: int = -2, strategy: SelectStrategy = "default"):
        blocks_to_run = self.feature_index(feature_layer)
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        kernel = kernel_products(x, self, IN_PLACE_MIN_POSITIONS)
        for block in self.encoder.layers[:blocks_to_run]:
            x = block(x, kernel)
        return self.select(x, strategy)


CLIP_L336 = dict(
    image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
    hidden_act="quick_gelu",
)


@hookimpl
def register_vision_encoders(register):
    register("clip-vit", ClipVisionTower, config=ClipVitConfig, description="configurable CLIP ViT (native attention)")
    register(
        "clip-l336",
        ClipVisionTower,
        config=ClipVitConfig,
        defaults=CLIP_L336,
        description="CLIP ViT-L/14 at 336 px with QuickGELU, the tower of every LLaVA-1.6 checkpoint",
    )
