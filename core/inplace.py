"""Inference forwards that write into reused buffers instead of fresh temporaries.

Why this exists: a long prefill's temporaries are megabytes each, about a hundred per decoder layer. glibc's
malloc hands blocks that large back to the kernel when they are freed (``munmap``, or trimming the heap's top),
so every layer wrote its results into freshly mapped pages again: on the benchmark's 2372-token image prompt,
66 000 page faults and about 0.1 s of a 0.65-0.75 s prefill (bf16, 2 cores). Components keep their plain
``forward`` (autograd, hooks, the reference); their ``*_in_place`` twins run the same operations in the same
order into a :class:`Workspace`, so the results are the same bits, and are used only where nothing can tell
the difference: no gradient wanted and no forward hook registered.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn


class Workspace:
    """Named scratch buffers for one forward pass: allocated by the first layer that asks, reused by the others.

    A buffer asked for with another shape or dtype is replaced (the last layer of a prefill that keeps only the
    last positions, say). Buffers live as long as the workspace: one forward.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a forward hook would see ``module`` or one of its submodules run (global hooks included): an
    in-place path calls no submodule's ``forward``, and may overwrite a tensor a hook kept."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def kernel_products(x: torch.Tensor, module: nn.Module, min_positions: int) -> bool:
    """Whether ``module``'s float32 products on ``x`` may run on llavakit's many-row numba kernel
    (:func:`llavakit.core.gemv.matmul`; 1.2-1.6x MKL's sgemm on the 2 Zen 4 cores measured) through
    :func:`linear_rows`: where :func:`runs_in_place` holds, for float32, with numba installed."""
    return x.dtype == torch.float32 and runs_in_place(x, module, min_positions) and has_numba()


def linear_rows(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(linear(x) for linear in linears)`` for float32 linears sharing the input ``x``, as one product on the
    many-row kernel: their weights (and biases) side by side, copied into the kernel's blocked layout for this call
    (a fraction of a millisecond for a 1 MB weight, against 8-10 ms of the product it serves). The outputs are
    views of one ``[..., sum of widths]`` tensor; they equal ``F.linear``'s to float32 rounding."""
    from llavakit.core.gemv import as_matrix, blocked_layout, matmul

    weight = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
    biases = [linear.bias for linear in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else weight.new_zeros(linear.out_features)
                          for b, linear in zip(biases, linears)])
    out = matmul(blocked_layout(as_matrix(weight)), x.reshape(-1, x.shape[-1]), bias=bias)
    out = out.view(*x.shape[:-1], -1)
    return out.split([linear.out_features for linear in linears], dim=-1)


@functools.cache
def has_numba() -> bool:
    """Whether numba is installed (without importing it: plugin discovery must not wait for it)."""
    return importlib.util.find_spec("numba") is not None


def runs_in_place(x: torch.Tensor, module: nn.Module, min_positions: int) -> bool:
    """The shared condition: a CPU input of at least ``min_positions`` positions (dim 1), no gradient wanted, no
    hook on ``module``. Shorter inputs allocate temporaries small enough for malloc to reuse without faults, and
    other devices have caching allocators."""
    return (x.device.type == "cpu" and x.shape[1] >= min_positions and not torch.is_grad_enabled()
            and not has_forward_hooks(module))
