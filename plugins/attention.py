"""Built-in attention backends: ``eager`` (reference math), ``sdpa`` (llavakit's CPU prefill kernel or torch's SDPA),
``flash`` (flash kernels only).

Which kernel ``flash`` runs:

====================================  ======================================================================
where                                 kernel
====================================  ======================================================================
CUDA (sm80+), fp16/bf16,              the ``flash-attn`` package: ``flash_attn_func`` for unpadded batches,
``flash-attn`` >= 2.1 importable      ``flash_attn_varlen_func`` over the packed (padding-free) tokens of a
                                      padded batch, native grouped-query attention.
CUDA (sm80+), fp16/bf16,              PyTorch's flash kernel (``sdpa_kernel(FLASH_ATTENTION)``); a padded batch
no usable ``flash-attn``              runs row by row over each row's real tokens (the kernel takes no mask).
CPU, float32 or bf16, 32+ queries     llavakit's numba prefill kernel (:mod:`~llavakit.plugins.attention_kernels`;
                                      bf16 where the CPU has AVX512-BF16), with the same padding-free packing.
CPU, anything else                    PyTorch's CPU flash kernel, with the same packing.
CUDA fp32, CUDA before sm80, or any   refused with :class:`AttentionBackendError` by :meth:`FlashAttention.check`,
other device                          which the assembler calls before any weight is allocated.
====================================  ======================================================================

Flash kernels take no arbitrary mask, only "causal" and sequence lengths. ``flash`` therefore reads a
mask as *causal attention over each row's real tokens*: it recovers which key positions are real from
the mask, checks that the mask is exactly the decoder's padding mask, and refuses any other mask (e.g. a
sliding window) with a message pointing to ``sdpa``. Causality is bottom-right aligned (the newest query
sees every key), as in the contract. A padding query's output is its own value: exactly what the mask
gives under left padding (generation's layout); after right padding those positions differ from
``eager``, and nothing reads them.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llavakit.core.attention import AttentionBackend, repeat_kv
from llavakit.core.errors import AttentionBackendError
from llavakit.core.hooks import hookimpl

#: flash-attn releases from this one on align ``causal`` bottom-right, as the attention contract does.
MIN_FLASH_ATTN_VERSION = (2, 1)
#: Flash kernels on CUDA need Ampere (compute capability 8.0) or newer.
MIN_CUDA_CAPABILITY = (8, 0)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
#: Dtypes llavakit's CPU prefill kernel has loops for (bf16 only where the CPU has bf16 dot products).
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: Fewer queries than this (a decode step, a short continuation) stay with PyTorch: the kernel copies every key
#: and value into its blocked layout, which only a long enough block of queries pays for.
CPU_KERNEL_MIN_QUERIES = 32


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


def cpu_kernel(q, k, v, mask, causal):
    """llavakit's numba prefill kernel (:mod:`llavakit.plugins.attention_kernels`) where it computes this call,
    else ``None``. The cheap checks come first: the module imports numba, which plugin discovery must not wait for."""
    if (q.device.type != "cpu" or mask is not None or q.dtype not in CPU_KERNEL_DTYPES
            or q.shape[2] < CPU_KERNEL_MIN_QUERIES):
        return None
    from llavakit.plugins import attention_kernels

    return attention_kernels if attention_kernels.applies(q, k, v, mask, causal) else None


class SdpaAttention(AttentionBackend):
    """Scaled dot-product attention: llavakit's CPU prefill kernel where it applies, else
    ``torch.nn.functional.scaled_dot_product_attention`` with whatever kernel PyTorch picks."""

    name = "sdpa"
    #: Whether CPU prefills may run llavakit's kernel (set ``model.attention_backend.use_cpu_kernel = False`` to
    #: keep PyTorch's: no numba compilation on first use, 5-6 s per dtype the first time, cached on disk after).
    use_cpu_kernel: bool = True

    def __init__(self) -> None:
        self._layout_cache: tuple[torch.Tensor, PaddedLayout | None] | None = None

    def attend(self, q, k, v, *, mask, causal, scale):
        kernel = cpu_kernel(q, k, v, mask, causal) if self.use_cpu_kernel else None
        if kernel is not None:
            return kernel.attention(q, k, v, causal=causal, scale=scale)
        if mask is not None and self.use_cpu_kernel and cpu_kernel(q, k, v, None, True) is not None:
            layout = self._left_padding(mask, q.shape[2], k.shape[2], q.shape[0])
            if layout is not None:  # a left-padded prefill: each row's real tokens through the kernel
                return attend_rows(q, k, v, layout, scale)
        if causal and q.shape[2] != k.shape[2]:
            # PyTorch's is_causal is top-left aligned; our contract is bottom-right (queries are the newest).
            mask, causal = bottom_right_causal(q.shape[2], k.shape[2], q.device), False
        if k.shape[1] != q.shape[1]:
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)

    def _left_padding(self, mask: torch.Tensor, q_len: int, k_len: int, batch_size: int) -> PaddedLayout | None:
        """The layout of the decoder's mask over left-padded rows (a padding query sees only itself, which is what
        :func:`attend_rows` gives it), else ``None``. Every layer of one forward gets the same mask: read it once."""
        if self._layout_cache is None or self._layout_cache[0] is not mask:
            try:
                layout = PaddedLayout.from_mask(mask, q_len, k_len, batch_size)
            except AttentionBackendError:  # another mask structure: torch's SDPA takes any mask
                layout = None
            if layout is not None and not all(span is not None and span[1] == k_len for span in layout.key_spans):
                layout = None  # right padding: padding queries see the real keys too, as only a mask says
            self._layout_cache = (mask, layout)
        return self._layout_cache[1]


@dataclass(frozen=True)
class PaddedLayout:
    """Where a padded batch's real tokens are, recovered from its attention mask.

    ``key_valid`` is ``[B, Lk]``; the queries are the last ``Lq`` key positions, so ``query_valid`` is its
    tail. ``*_index`` address the flattened ``[B * L]`` token axis; ``cu_seqlens_*`` are the int32 prefix
    sums of real tokens per row that varlen kernels take. ``key_spans[row]`` is ``(start, end)`` when the
    row's real keys are one contiguous run (always under left padding), so they can be sliced, not copied.
    """

    key_valid: torch.Tensor
    query_valid: torch.Tensor
    key_index: torch.Tensor
    query_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_k: int
    max_seqlen_q: int
    key_spans: tuple[tuple[int, int] | None, ...]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, q_len: int, k_len: int, batch_size: int) -> PaddedLayout:
        """Read the layout off a ``[B or 1, 1, Lq, Lk]`` mask; refuse a mask that is not causal-over-padding.

        The decoder's mask is ``causal & (real key | own key)``: a padding query sees the real keys before it
        plus itself. So a key is real exactly when a query other than its own position attends to it; the
        newest position, which no later query can vouch for, is taken as real (its row is the same either
        way). The mask rebuilt from that classification must equal the given one, or the mask is refused.
        """
        allowed = mask[:, 0].expand(batch_size, q_len, k_len)
        own_key = torch.arange(k_len, device=mask.device)[None, :] == torch.arange(
            k_len - q_len, k_len, device=mask.device
        )[:, None]
        key_valid = (allowed & ~own_key).any(dim=1)
        key_valid[:, -1] = True
        causal = bottom_right_causal(q_len, k_len, mask.device)
        rebuilt = (causal & key_valid[:, None, :]) | own_key
        if not torch.equal(rebuilt, allowed):
            raise AttentionBackendError(
                "attention='flash' supports causal attention over left- or right-padded rows only (flash kernels "
                "take sequence lengths, not masks); this mask has another structure (a sliding window?). Use "
                "attention='sdpa' for this model."
            )
        query_valid = key_valid[:, k_len - q_len :]
        key_counts, query_counts = key_valid.sum(dim=1), query_valid.sum(dim=1)
        first = key_valid.int().argmax(dim=1)  # the newest key is always real, so every row has one
        # contiguous exactly when all `count` real keys lie in [first, first + count)
        contiguous = key_valid.int().cumsum(dim=1).gather(1, (first + key_counts - 1)[:, None])[:, 0] == key_counts
        spans = tuple(
            (start, start + count) if whole else None
            for start, count, whole in zip(first.tolist(), key_counts.tolist(), contiguous.tolist())
        )
        return cls(
            key_valid=key_valid,
            query_valid=query_valid,
            key_index=key_valid.flatten().nonzero().squeeze(1),
            query_index=query_valid.flatten().nonzero().squeeze(1),
            cu_seqlens_k=F.pad(key_counts.cumsum(0, dtype=torch.int32), (1, 0)),
            cu_seqlens_q=F.pad(query_counts.cumsum(0, dtype=torch.int32), (1, 0)),
            max_seqlen_k=int(key_counts.max()),
            max_seqlen_q=int(query_counts.max()),
            key_spans=spans,
        )


def own_values(v: torch.Tensor, q_len: int, num_query_heads: int) -> torch.Tensor:
    """``[B, Hq, Lq, D]`` values at the queries' own positions: what a query that sees only itself returns."""
    return repeat_kv(v[:, :, v.shape[2] - q_len :], num_query_heads)


class FlashAttention(AttentionBackend):
    """Flash kernels only; refuses where none can run (see the module docstring for which one runs where)."""

    name = "flash"
    #: Whether CPU prefills may run llavakit's kernel rather than PyTorch's flash kernel (see ``SdpaAttention``).
    use_cpu_kernel: bool = True

    def __init__(self) -> None:
        self._flash_attn = None  # the flash-attn module, once found usable on CUDA
        self._flash_attn_checked = False
        self._layout_cache: tuple[torch.Tensor, PaddedLayout] | None = None

    # ------------------------------------------------------------------------------------ where it runs
    def check(self, device, dtype):
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type in ("cpu", "meta"):
            return
        if device.type != "cuda":
            raise AttentionBackendError(
                f"attention='flash' has no kernel for device {device.type!r}; use attention='sdpa' or 'eager'"
            )
        if dtype not in FLASH_DTYPES:
            raise AttentionBackendError(
                f"attention='flash' on CUDA needs float16 or bfloat16 weights, got {dtype}; pass "
                "dtype='bfloat16' (or 'float16'), or use attention='sdpa' for float32"
            )
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < MIN_CUDA_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(device)
            raise AttentionBackendError(
                f"attention='flash' needs a CUDA GPU of compute capability 8.0 (Ampere) or newer; "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Use attention='sdpa'"
            )
        self._resolve_flash_attn()

    def kernel(self, device: torch.device | str) -> str:
        """Which kernel :meth:`attend` uses on ``device`` (for logs and benchmarks)."""
        if torch.device(device).type == "cuda" and self._resolve_flash_attn() is not None:
            return f"flash-attn {self._flash_attn.__version__} (flash_attn_func / flash_attn_varlen_func)"
        if torch.device(device).type == "cpu":
            return "llavakit's numba prefill kernel (32+ queries), else torch sdpa_kernel(FLASH_ATTENTION)"
        return "torch sdpa_kernel(FLASH_ATTENTION)"

    def _resolve_flash_attn(self):
        """The ``flash-attn`` module if it is installed, imports, and is recent enough; else ``None``."""
        if not self._flash_attn_checked:
            self._flash_attn_checked = True
            if importlib.util.find_spec("flash_attn") is not None:
                try:
                    module = importlib.import_module("flash_attn")
                except (ImportError, OSError):  # a build for another torch/CUDA: PyTorch's kernel still runs
                    module = None
                version = tuple(int(p) for p in getattr(module, "__version__", "0.0").split(".")[:2] if p.isdigit())
                if module is not None and version >= MIN_FLASH_ATTN_VERSION:
                    self._flash_attn = module
        return self._flash_attn

    # ------------------------------------------------------------------------------------------ attend
    def attend(self, q, k, v, *, mask, causal, scale):
        if q.is_cuda and q.dtype not in FLASH_DTYPES:
            raise AttentionBackendError(
                f"attention='flash' on CUDA needs float16 or bfloat16, got {q.dtype}; cast the model with "
                "dtype='bfloat16' or use attention='sdpa'"
            )
        flash_attn = self._resolve_flash_attn() if q.is_cuda else self._flash_attn
        if mask is None:
            if flash_attn is not None:
                out = flash_attn.flash_attn_func(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal
                )
                return out.transpose(1, 2)
            return cpu_or_torch_flash(q, k, v, causal=causal, scale=scale, use_kernel=self.use_cpu_kernel)
        layout = self._layout(mask, q.shape[2], k.shape[2], q.shape[0])
        if flash_attn is not None:
            return self._varlen(flash_attn, q, k, v, layout, scale)
        return attend_rows(q, k, v, layout, scale, use_kernel=self.use_cpu_kernel)

    def _layout(self, mask: torch.Tensor, q_len: int, k_len: int, batch_size: int) -> PaddedLayout:
        # Every layer of one forward receives the same mask object: read it once.
        if self._layout_cache is None or self._layout_cache[0] is not mask:
            self._layout_cache = (mask, PaddedLayout.from_mask(mask, q_len, k_len, batch_size))
        return self._layout_cache[1]

    @staticmethod
    def _varlen(flash_attn, q, k, v, layout: PaddedLayout, scale: float) -> torch.Tensor:
        """One ``flash_attn_varlen_func`` call over the real tokens of every row, packed end to end."""
        batch, heads, q_len, head_dim = q.shape
        k_len, kv_heads = k.shape[2], k.shape[1]
        packed_q = q.transpose(1, 2).reshape(batch * q_len, heads, head_dim)[layout.query_index]
        packed_k = k.transpose(1, 2).reshape(batch * k_len, kv_heads, head_dim)[layout.key_index]
        packed_v = v.transpose(1, 2).reshape(batch * k_len, kv_heads, head_dim)[layout.key_index]
        packed_out = flash_attn.flash_attn_varlen_func(
            packed_q,
            packed_k,
            packed_v,
            cu_seqlens_q=layout.cu_seqlens_q,
            cu_seqlens_k=layout.cu_seqlens_k,
            max_seqlen_q=layout.max_seqlen_q,
            max_seqlen_k=layout.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
        )
        out = own_values(v, q_len, heads).transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        out = out.index_copy(0, layout.query_index, packed_out.to(out.dtype))
        return out.view(batch, q_len, heads, head_dim).transpose(1, 2)

def attend_rows(q, k, v, layout: PaddedLayout, scale: float, use_kernel: bool = True) -> torch.Tensor:
    """A padded batch row by row, each over its real tokens only (a flash kernel takes no mask); a padding
    query's output is its own value."""
    q_len, k_len = q.shape[2], k.shape[2]
    out = own_values(v, q_len, q.shape[1]).clone()
    for row, span in enumerate(layout.key_spans):
        if span is not None:  # slices are views: no copy of the row's keys and values
            start = span[0]
            queries = slice(max(start - (k_len - q_len), 0), q_len)
            keys = slice(start, span[1])
        else:
            queries, keys = layout.query_valid[row], layout.key_valid[row]
        out[row, :, queries] = cpu_or_torch_flash(
            q[row : row + 1, :, queries], k[row : row + 1, :, keys], v[row : row + 1, :, keys],
            causal=True, scale=scale, use_kernel=use_kernel,
        )[0]
    return out


def cpu_or_torch_flash(q, k, v, *, causal: bool, scale: float, use_kernel: bool = True) -> torch.Tensor:
    """A flash kernel with bottom-right causality and grouped-query attention: llavakit's CPU prefill kernel where
    it applies (:func:`cpu_kernel`) and ``use_kernel``, else PyTorch's."""
    kernel = cpu_kernel(q, k, v, None, causal) if use_kernel else None
    if kernel is not None:
        return kernel.attention(q, k, v, causal=causal, scale=scale)
    causal = causal and q.shape[2] > 1  # a single (newest) query sees every key: nothing to mask
    if causal and q.shape[2] != k.shape[2]:
        # Imported here: torch.nn.attention.bias pulls in torch._dynamo (seconds), which plugin discovery must not.
        from torch.nn.attention.bias import causal_lower_right

        # A CausalBias, unlike a boolean mask, reaches the flash kernel (which aligns causal bottom-right); its
        # dispatch calls the kernel directly, without grouped-query support, so the heads are expanded here.
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale)
    # The kernel's own grouped-query support reads each key/value head once (repeat_kv would copy them).
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )


@hookimpl
def register_attention_backends(register):
    register("eager", EagerAttention, description="reference matmul/softmax attention (fp32 softmax)")
    register("sdpa", SdpaAttention,
             description="scaled dot-product attention: llavakit's CPU prefill kernel, else torch's SDPA")
    register(
        "flash",
        FlashAttention,
        description="flash-attn package (varlen for padded batches) on CUDA when installed, else PyTorch's flash kernel",
    )
