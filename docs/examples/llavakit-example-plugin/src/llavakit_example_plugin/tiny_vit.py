"""``example-tiny-vit``: a small ViT vision encoder written against llavakit's ``VisionEncoder`` contract.

It shows the three things every encoder must get right: the declared attributes (image and patch size,
width, depth, class token, normalisation), features taken at ``feature_layer`` with no block past it run,
and attention through the backend the assembler hands in (so ``attention="eager"|"sdpa"|"flash"`` reaches
this tower too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from llavakit.core.attention import AttentionBackend
from llavakit.core.errors import ConfigError
from llavakit.core.interfaces import SelectStrategy, VisionEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyVitConfig(BaseModel):
    """Defaults are ViT-Tiny/16 at 224 px (DeiT-Ti shapes)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 192
    num_layers: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD


class Block(nn.Module):
    """Pre-norm transformer block; attention is computed by the llavakit backend."""

    def __init__(self, config: TinyVitConfig, backend: AttentionBackend):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, config.hidden_size)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # [B, L, 3C] -> three [B, H, L, D] tensors, the layout the attention contract takes
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = self.backend.attend(q, k, v, mask=None, causal=False, scale=self.head_dim**-0.5)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyVit(VisionEncoder):
    """Patch embedding + class token + learned positions + ``num_layers`` blocks (no final norm is used)."""

    def __init__(self, config: TinyVitConfig, *, attention: AttentionBackend):
        super().__init__()
        if config.image_size % config.patch_size or config.hidden_size % config.num_heads:
            raise ConfigError(
                f"example-tiny-vit: image_size {config.image_size} must be a multiple of patch_size "
                f"{config.patch_size} and hidden_size {config.hidden_size} of num_heads {config.num_heads}"
            )
        self.config = config
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_layers
        self.has_class_token = True
        self.image_mean = tuple(config.image_mean)
        self.image_std = tuple(config.image_std)
        self.patch_embed = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_grid.num_tokens + 1, config.hidden_size))
        self.blocks = nn.ModuleList(Block(config, attention) for _ in range(config.num_layers))

    def reset_parameters(self) -> None:
        """Random init as timm's ViT: truncated normal(0.02) weights, zero biases, LayerNorm at 1/0."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values, *, feature_layer: int = -2, strategy: SelectStrategy = "default"):
        """``[N, 3, S, S]`` tiles -> ``[N, P, C]`` features after block ``feature_index(feature_layer)``."""
        blocks_to_run = self.feature_index(feature_layer)
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        for block in self.blocks[:blocks_to_run]:
            x = block(x)
        return self.select(x, strategy)
