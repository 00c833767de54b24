"""``example-resampler``: a perceiver resampler (as in Flamingo) behind llavakit's ``Projector`` contract.

``grid_size ** 2`` learned latents cross-attend to a tile's vision features (and to themselves) and
come out as ``[N, grid_size * grid_size, out_features]``: a fixed number of tokens per tile whatever
the encoder's patch grid. :meth:`PerceiverResampler.token_grid` declares that grid, and the model,
the tiler and the processor all take the per-tile grid from it, so ``<image>`` expansion, feature
arrangement (AnyRes grid, unpad, newline per row) and counts agree without the encoder's involvement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llavakit.core.errors import ConfigError
from llavakit.core.interfaces import Projector
from llavakit.core.types import TokenGrid


class ResamplerConfig(BaseModel):
    """``in_features``/``out_features`` are filled in by llavakit's assembler from the encoder and the LLM."""

    model_config = ConfigDict(extra="forbid")

    in_features: int = Field(default=192, description="vision width (set from the vision encoder)")
    out_features: int = Field(default=4096, description="LLM width (set from the language model)")
    grid_size: int = Field(default=8, ge=1, description="tokens per tile: grid_size x grid_size")
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=8, ge=1)
    mlp_ratio: float = 4.0


class ResamplerLayer(nn.Module):
    """Latents attend to [features; latents], then an MLP; both residual, pre-norm."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)
        self.norm_mlp = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        normed = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), normed], dim=1)
        keys, values = self.kv_proj(context).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(self._heads(self.q_proj(normed)), self._heads(keys), self._heads(values))
        latents = latents + self.out_proj(attended.transpose(1, 2).flatten(2))
        return latents + self.fc2(F.gelu(self.fc1(self.norm_mlp(latents))))


class PerceiverResampler(Projector):
    """``[N, P, C]`` features -> ``[N, grid_size**2, D]`` tokens, laid out as a ``grid_size`` square."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        if config.out_features % config.num_heads:
            raise ConfigError(
                f"example-resampler: out_features {config.out_features} (the LLM width) is not divisible by "
                f"num_heads {config.num_heads}; set projector_options num_heads to a divisor"
            )
        self.config = config
        self.in_features, self.out_features = config.in_features, config.out_features
        self.grid = TokenGrid(config.grid_size, config.grid_size)
        self.input_proj = nn.Linear(config.in_features, config.out_features)
        self.latents = nn.Parameter(torch.empty(self.grid.num_tokens, config.out_features))
        self.layers = nn.ModuleList(
            ResamplerLayer(config.out_features, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(config.out_features)

    def token_grid(self, encoder_grid: TokenGrid) -> TokenGrid:
        """Always ``grid_size x grid_size``, whatever the encoder's patch grid: that is what a resampler is for."""
        return self.grid

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.grid.num_tokens

    def reset_parameters(self) -> None:
        """Random init: latents normal(0.02), Linear weights truncated normal(0.02), zero biases, norms 1/0."""
        nn.init.normal_(self.latents, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.input_proj(features)
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.norm_out(latents)
