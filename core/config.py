"""The model configuration schema, shared by ``build_model`` arguments and config files.

A config names one component of each kind plus per-component option overrides and weight sources; the
registry resolves the names. It is plain data validated by pydantic, so a bad field fails with a message
that points at it (``llm.options.hidden_size: …``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


class ComponentRef(BaseModel):
    """One component: its registered name, option overrides on top of the preset, and optional weights."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, name: str) -> str:
        return canonical_name(name)


def canonical_name(name: str) -> str:
    """Names use hyphens; the original LLaVA spelling with underscores (``mlp2x_gelu``) maps to them."""
    name = name.strip()
    head, sep, tail = name.partition(":")
    # Namespaced names (``open_clip:ViT-B-16``) keep their model part verbatim.
    return f"{head}{sep}{tail}" if sep else name.replace("_", "-").lower()


class ModelConfig(BaseModel):
    """Everything needed to assemble a model (weights excepted, which are referenced, not embedded)."""

    model_config = ConfigDict(extra="forbid")

    vision: ComponentRef
    llm: ComponentRef
    projector: ComponentRef = Field(default_factory=lambda: ComponentRef(name="mlp2x-gelu"))
    tiler: ComponentRef = Field(default_factory=lambda: ComponentRef(name="anyres"))
    attention: str = "sdpa"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    image_token_index: int | None = Field(
        default=None, description="Token id of <image>; defaults to the LLM preset's value."
    )
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    tokenizer: str | None = None

    @field_validator("attention")
    @classmethod
    def _canonical_attention(cls, name: str) -> str:
        return canonical_name(name)
