"""A preallocated, per-layer, GQA-aware key/value cache.

Keys and values live in one ``[B, Hkv, capacity, D]`` buffer per layer, allocated once before prefill,
so decoding never reallocates or concatenates (the gpt-fast design). Storing only the ``Hkv`` key/value
heads, not the expanded query heads, keeps the cache ``Hq / Hkv`` times smaller for GQA models.
"""

from __future__ import annotations

import torch

from llavakit.core.errors import ContextLengthError


class KVCache:
    """Static key/value storage for ``num_layers`` decoder layers.

    Usage per forward pass: every layer calls :meth:`update` with the new keys and values of its
    ``L`` new positions and attends over what it returns; afterwards the language model calls
    :meth:`advance` once, moving the write position by ``L``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0
        #: Views of the buffers that a fast path derives once (numpy arrays for a numba kernel, say), by name;
        #: they live as long as the cache and are dropped whenever the buffers are replaced.
        self.views: dict[str, object] = {}

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (``[B, Hkv, L, D]``) after the cached positions; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.check_room(k.shape[2])
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def check_room(self, num_positions: int) -> None:
        """Raise unless ``num_positions`` more positions fit (for code that writes the buffers itself)."""
        end = self.length + num_positions
        if end > self.capacity:
            raise ContextLengthError(
                f"the KV cache holds {self.capacity} positions but {end} are needed; "
                "allocate it with a larger capacity (prompt length + max_new_tokens)"
            )

    def advance(self, num_positions: int) -> None:
        """Commit ``num_positions`` newly written positions (called once per forward, after all layers)."""
        self.length += num_positions

    def reset(self) -> None:
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (used when finished rows are dropped)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.views.clear()
