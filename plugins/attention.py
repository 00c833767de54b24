"""Built-in attention backends: ``eager`` (reference math), ``sdpa`` (torch), ``flash`` (flash kernels).

Which kernel ``flash`` runs:

- CUDA, fp16/bf16, ``flash-attn`` installed: the ``flash-attn`` package's kernels.
- CUDA, fp16/bf16, no ``flash-attn``: PyTorch's built-in flash kernel (``sdpa_kernel(FLASH_ATTENTION)``).
- CPU, any float dtype: PyTorch's CPU flash kernel (``sdpa_kernel(FLASH_ATTENTION)``).
- CUDA fp32, or any other device: refused with :class:`AttentionBackendError` before weights load.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llavakit.core.attention import AttentionBackend, repeat_kv
from llavakit.core.errors import AttentionBackendError
from llavakit.core.hooks import hookimpl


def bottom_right_causal(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[q_len, k_len]`` mask where query ``i`` sees keys up to ``k_len - q_len + i``."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


class EagerAttention(AttentionBackend):
    """Plain matmul-softmax-matmul, softmax in fp32: the reference the other backends are tested against."""

    name = "eager"

    def attend(self, q, k, v, *, mask, causal, scale):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if causal:
            mask = bottom_right_causal(q.shape[2], k.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)


class SdpaAttention(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention`` with whatever kernel PyTorch picks."""

    name = "sdpa"

    def _sdpa(self, q, k, v, *, mask, causal, scale):
        if causal and q.shape[2] != k.shape[2]:
            # PyTorch's is_causal is top-left aligned; our contract is bottom-right (queries are the newest).
            mask, causal = bottom_right_causal(q.shape[2], k.shape[2], q.device), False
        if k.shape[1] != q.shape[1]:
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)

    def attend(self, q, k, v, *, mask, causal, scale):
        return self._sdpa(q, k, v, mask=mask, causal=causal, scale=scale)


class FlashAttention(SdpaAttention):
    """Flash kernels only; refuses where none can run (see the module docstring for which one runs where)."""

    name = "flash"

    def __init__(self) -> None:
        self._flash_attn = None

    def check(self, device, dtype):
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cpu" or device.type == "meta":
            return
        if device.type != "cuda":
            raise AttentionBackendError(
                f"attention='flash' has no kernel for device {device.type!r}; use attention='sdpa' or 'eager'"
            )
        if dtype not in (torch.float16, torch.bfloat16):
            raise AttentionBackendError(
                f"attention='flash' on CUDA needs float16 or bfloat16 weights, got {dtype}; pass "
                "dtype='bfloat16' (or 'float16'), or use attention='sdpa' for float32"
            )
        if importlib.util.find_spec("flash_attn") is not None:
            import flash_attn

            self._flash_attn = flash_attn

    def attend(self, q, k, v, *, mask, causal, scale):
        if self._flash_attn is not None and q.is_cuda and mask is None:
            out = self._flash_attn.flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal
            )
            return out.transpose(1, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return self._sdpa(q, k, v, mask=mask, causal=causal, scale=scale)


@hookimpl
def register_attention_backends(register):
    register("eager", EagerAttention, description="reference matmul/softmax attention (fp32 softmax)")
    register("sdpa", SdpaAttention, description="torch scaled_dot_product_attention, kernel chosen by PyTorch")
    register("flash", FlashAttention, description="flash-attn package on CUDA when installed, else PyTorch's flash kernel")
