"""The attention-backend contract.

Every attention layer of every native component (vision tower included) calls
``backend.attend(q, k, v, mask=..., causal=..., scale=...)``; the backend object is handed to each
component when the model is assembled, so one setting reaches all of them.

Shapes: ``q`` is ``[B, Hq, Lq, D]``; ``k`` and ``v`` are ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``
(grouped-query attention is the backend's job, so a kernel with native GQA support can use it).
``mask`` is ``None`` or a boolean ``[B, 1, Lq, Lk]`` tensor, ``True`` where a query may attend; when a
mask is given it already contains the causal structure and ``causal`` is ``False``. ``causal=True``
(with no mask) means the usual lower-triangular mask aligned so that the last query sees the last key.
The result is ``[B, Hq, Lq, D]`` in the dtype of ``q``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionBackend(ABC):
    """Computes scaled dot-product attention; implementations live in plugins."""

    #: Registry name of the backend (``eager``, ``sdpa``, ``flash`` ...).
    name: str = ""

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise :class:`~llavakit.core.errors.AttentionBackendError` if this backend cannot run there.

        Called before any weight is allocated or loaded, so a bad choice fails in milliseconds.
        """

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: torch.Tensor | None,
        causal: bool,
        scale: float,
    ) -> torch.Tensor:
        """Return ``softmax(q kᵀ · scale + mask) v`` with the shapes in the module docstring."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def repeat_kv(x: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """Expand ``[B, Hkv, L, D]`` keys/values to ``[B, Hq, L, D]`` for kernels without native GQA."""
    groups = num_query_heads // x.shape[1]
    if groups == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, groups, l, d).reshape(b, h * groups, l, d)
