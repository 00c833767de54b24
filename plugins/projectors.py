"""Built-in projectors: ``mlp2x-gelu`` (LLaVA-1.5/1.6), the general ``mlpNx-gelu``, and ``linear``.

Layer names are ``linear_1 … linear_N`` as in llava-hf checkpoints (original LLaVA's
``mm_projector.0/.2/…`` is mapped onto them by the checkpoint loader).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llavakit.core.hooks import hookimpl
from llavakit.core.inplace import kernel_products, linear_rows
from llavakit.core.interfaces import Projector

#: Tokens per image tile from which float32 products without gradients run on the many-row kernel.
KERNEL_MIN_POSITIONS = 32


class MlpProjectorConfig(BaseModel):
    """``depth`` linear layers with exact-erf GELU between them; sizes are filled in by the assembler."""

    model_config = ConfigDict(extra="forbid")

    in_features: int = Field(default=1024, description="vision width (set from the vision encoder)")
    out_features: int = Field(default=4096, description="LLM width (set from the language model)")
    depth: int = Field(default=2, ge=1)
    bias: bool = True


class MlpProjector(Projector):
    """Linear(C→D) → [GELU → Linear(D→D)] × (depth − 1). ``depth=1`` is the plain ``linear`` projector."""

    def __init__(self, config: MlpProjectorConfig):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = config.in_features, config.out_features
        widths = [config.in_features] + [config.out_features] * config.depth
        for index in range(config.depth):
            self.add_module(f"linear_{index + 1}", nn.Linear(widths[index], widths[index + 1], bias=config.bias))
        self.depth = config.depth

    def reset_parameters(self) -> None:
        """Documented random init: PyTorch's default ``nn.Linear`` init (Kaiming-uniform), as LLaVA stage 1 starts."""
        for index in range(self.depth):
            getattr(self, f"linear_{index + 1}").reset_parameters()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Many float32 rows without gradients: the products on llavakit's many-row kernel (see kernel_products).
        kernel = features.dim() == 3 and kernel_products(features, self, KERNEL_MIN_POSITIONS)
        apply = (lambda linear, x: linear_rows(x, (linear,))[0]) if kernel else (lambda linear, x: linear(x))
        x = apply(self.linear_1, features)
        for index in range(2, self.depth + 1):
            x = apply(getattr(self, f"linear_{index}"), F.gelu(x))
        return x


@hookimpl
def register_projectors(register):
    register("linear", MlpProjector, config=MlpProjectorConfig, defaults={"depth": 1}, description="one Linear(C→D)")
    for depth in range(2, 9):
        register(
            f"mlp{depth}x-gelu",
            MlpProjector,
            config=MlpProjectorConfig,
            defaults={"depth": depth},
            description=f"{depth} Linear layers with GELU between (LLaVA's mlp{depth}x_gelu)",
        )
