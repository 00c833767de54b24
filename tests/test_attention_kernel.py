"""llavakit's CPU prefill attention kernel (:mod:`llavakit.plugins.attention_kernels`): accurate against a float64
reference (float32: to 1e-5; bf16: no worse than PyTorch's own flash kernel on the same inputs), causal and full,
grouped-query, bottom-right after a cache, odd lengths; used by ``sdpa`` and ``flash`` exactly where it applies."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llavakit.core.gemv import BF16_DOT
from llavakit.plugins import attention_kernels
from llavakit.plugins.attention import CPU_KERNEL_MIN_QUERIES, FlashAttention, SdpaAttention, cpu_kernel

DTYPES = [torch.float32] + ([torch.bfloat16] if BF16_DOT else [])
# batch, query heads, key/value heads, queries, keys, head size, causal
SHAPES = {
    "causal-gqa": (2, 8, 2, 77, 77, 64, True),
    "tower-like": (1, 4, 4, 577, 577, 64, False),
    "after-cache": (1, 4, 1, 40, 133, 128, True),
    "odd-small": (3, 2, 1, 33, 35, 16, False),
    "long-causal": (1, 2, 1, 1000, 1000, 32, True),
    "more-queries-than-keys": (1, 2, 2, 70, 40, 32, False),
}


def inputs(batch, heads, kv_heads, q_len, k_len, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Queries as a projection leaves them ([B, L, H, D], seen as [B, H, L, D]); scores of a few units: a peaked
    # softmax.
    q = (torch.randn(batch, q_len, heads, head_dim, generator=generator) * 2).transpose(1, 2)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference(q, k, v, causal, scale):
    """float64 attention of the given (already rounded) inputs, causal bottom-right aligned."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    if causal:
        q_len, k_len = q.shape[2], k.shape[2]
        allowed = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def torch_kernel(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = None
    if causal:
        mask = torch.arange(k.shape[2])[None, :] <= torch.arange(k.shape[2] - q.shape[2], k.shape[2])[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernel_matches_a_float64_reference(shape, dtype):
    *sizes, causal = shape
    q, k, v = inputs(*sizes, dtype)
    scale = sizes[-1] ** -0.5
    assert attention_kernels.applies(q, k, v, None, causal)
    out = attention_kernels.attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    expected = reference(q, k, v, causal, scale)
    error = (out.double() - expected).abs()
    if dtype == torch.float32:
        assert error.max() < 1e-5
    else:  # the output is rounded to bf16 (and so are the probabilities): compare with PyTorch's own kernel
        theirs = (torch_kernel(q, k, v, causal, scale).double() - expected).abs()
        assert error.max() <= 1.5 * theirs.max() + 1e-6, (error.max(), theirs.max())
        assert error.mean() <= 1.2 * theirs.mean() + 1e-6, (error.mean(), theirs.mean())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_rows_never_read_later_keys(dtype):
    q, k, v = inputs(1, 4, 2, 64, 64, 32, dtype)
    out = attention_kernels.attention(q, k, v, causal=True, scale=0.2)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:], v2[:, :, 40:] = 100.0, -100.0  # keys past query 39 changed beyond recognition
    changed = attention_kernels.attention(q, k2, v2, causal=True, scale=0.2)
    assert torch.equal(out[:, :, :40], changed[:, :, :40])
    assert not torch.equal(out[:, :, 40:], changed[:, :, 40:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_rows_and_heads_are_independent(dtype):
    """A row of a batch gets exactly the bits it gets alone (the same tiles, the same order of sums)."""
    q, k, v = inputs(3, 8, 2, 50, 50, 64, dtype)
    out = attention_kernels.attention(q, k, v, causal=True, scale=0.125)
    for row in range(3):
        alone = attention_kernels.attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], causal=True, scale=0.125)
        assert torch.equal(out[row:row + 1], alone)


def test_backends_route_long_unmasked_prefills_to_the_kernel():
    q, k, v = inputs(1, 8, 2, 96, 96, 64, torch.float32)
    kernel = attention_kernels.attention(q, k, v, causal=True, scale=0.125)
    for backend in (SdpaAttention(), FlashAttention()):
        assert torch.equal(backend.attend(q, k, v, mask=None, causal=True, scale=0.125), kernel)
    # Short query blocks (decode steps, short continuations) stay with PyTorch, which needs no copies.
    short = q[:, :, -(CPU_KERNEL_MIN_QUERIES - 1):]
    assert cpu_kernel(short, k, v, None, True) is None
    out = SdpaAttention().attend(short, k, v, mask=None, causal=True, scale=0.125)
    assert (out - kernel[:, :, -(CPU_KERNEL_MIN_QUERIES - 1):]).abs().max() < 1e-5


def test_what_the_kernel_does_not_take_goes_to_torch():
    q, k, v = inputs(1, 4, 2, 64, 64, 64, torch.float32)
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    assert cpu_kernel(q, k, v, mask, False) is None  # masks: torch's kernels
    assert cpu_kernel(q.half(), k.half(), v.half(), None, True) is None  # no float16 loops
    odd = inputs(1, 4, 2, 64, 64, 24, torch.float32)
    assert cpu_kernel(*odd, None, True) is None  # head size not a multiple of 16
    assert cpu_kernel(q[:, :, :, :], k[:, :, :40], v[:, :, :40], None, True) is None  # more queries than keys
    # Training: the kernel has no backward, so a gradient-carrying call runs PyTorch's, and the gradient flows.
    leaf = q.clone().requires_grad_()
    assert cpu_kernel(leaf, k, v, None, True) is None
    out = SdpaAttention().attend(leaf, k, v, mask=None, causal=True, scale=0.125)
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    with torch.no_grad():
        assert cpu_kernel(leaf, k, v, None, True) is attention_kernels


def test_flash_runs_padded_rows_through_the_kernel():
    """``flash`` packs a padded batch row by row; each row's long prefill goes to the kernel."""
    q, k, v = inputs(2, 4, 2, 70, 70, 32, torch.float32)
    attention_mask = torch.ones(2, 70, dtype=torch.bool)
    attention_mask[1, :20] = False  # left padding
    positions = torch.arange(70)
    allowed = (positions[None, :] <= positions[:, None])[None, None] & attention_mask[:, None, None, :]
    allowed = allowed | torch.eye(70, dtype=torch.bool)[None, None]
    out = FlashAttention().attend(q, k, v, mask=allowed, causal=False, scale=0.2)
    alone = attention_kernels.attention(q[1:, :, 20:], k[1:, :, 20:], v[1:, :, 20:], causal=True, scale=0.2)
    assert torch.equal(out[1:, :, 20:], alone)
    assert (out[:1] - reference(q[:1], k[:1], v[:1], True, 0.2)).abs().max() < 1e-5


def test_the_kernels_cache_follows_the_gemv_source():
    """numba keys a kernel's disk cache on its own file; the kernel inlines core/gemv.py's loops."""
    from llavakit.core import gemv

    digest = hashlib.sha256(Path(gemv.__file__).read_bytes()).hexdigest()
    assert attention_kernels.GEMV_SOURCE_SHA256 == digest, (
        f"core/gemv.py changed: set GEMV_SOURCE_SHA256 in plugins/attention_kernels.py to {digest!r}")


def padded_mask(lengths: list[int], total: int, left: bool = True) -> torch.Tensor:
    """The decoder's mask for padded rows: causal over real keys, a padding query sees itself too."""
    attention_mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for row, length in enumerate(lengths):
        attention_mask[row, total - length:] = True
    if not left:
        attention_mask = attention_mask.flip(-1)
    positions = torch.arange(total)
    allowed = (positions[None, :] <= positions[:, None])[None, None] & attention_mask[:, None, None, :]
    return allowed | torch.eye(total, dtype=torch.bool)[None, None]


def test_sdpa_runs_left_padded_prefills_row_by_row_through_the_kernel():
    q, k, v = inputs(3, 4, 2, 90, 90, 32, torch.float32)
    mask = padded_mask([90, 61, 7], 90)
    out = SdpaAttention().attend(q, k, v, mask=mask, causal=False, scale=0.2)
    expected = torch_kernel_masked(q, k, v, mask, 0.2)
    assert (out - expected).abs().max() < 1e-5  # every position, padding queries (their own value) included
    alone = attention_kernels.attention(q[1:2, :, 29:], k[1:2, :, 29:], v[1:2, :, 29:], causal=True, scale=0.2)
    assert torch.equal(out[1:2, :, 29:], alone)  # the 61-token row went through the kernel
    # Right padding: the padding queries see real keys, which only the mask says; torch's SDPA takes it.
    right = padded_mask([90, 61, 7], 90, left=False)
    out = SdpaAttention().attend(q, k, v, mask=right, causal=False, scale=0.2)
    assert (out - torch_kernel_masked(q, k, v, right, 0.2)).abs().max() < 1e-6
    backend = SdpaAttention()
    assert backend._left_padding(mask, 90, 90, 3) is not None and backend._left_padding(right, 90, 90, 3) is None


def torch_kernel_masked(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask, scale=scale)


def test_the_kernel_can_be_switched_off_per_backend(monkeypatch):
    """``use_cpu_kernel = False`` keeps PyTorch's kernels (no numba compilation), for unmasked and padded calls."""
    def refuse(*args, **kwargs):
        raise AssertionError("the kernel ran although switched off")

    monkeypatch.setattr(attention_kernels, "attention", refuse)
    q, k, v = inputs(2, 4, 2, 64, 64, 32, torch.float32)
    mask = padded_mask([64, 40], 64)
    for backend in (SdpaAttention(), FlashAttention()):
        backend.use_cpu_kernel = False
        out = backend.attend(q, k, v, mask=None, causal=True, scale=0.2)
        assert (out - reference(q, k, v, True, 0.2)).abs().max() < 1e-5
        padded = backend.attend(q, k, v, mask=mask, causal=False, scale=0.2)
        assert (padded - torch_kernel_masked(q, k, v, mask, 0.2)).abs().max() < 1e-5
    with pytest.raises(AssertionError, match="switched off"):
        SdpaAttention().attend(q, k, v, mask=None, causal=True, scale=0.2)


@pytest.mark.parametrize("scalef", [True, False], ids=["vscalefps", "power-from-bits"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seen", [1, 15, 16, 17, 64, 100])
def test_softmax_row_equals_the_scalar_exponentials(dtype, seen, scalef, monkeypatch):
    """``softmax_row`` (16 lanes, ``vcvtneps2bf16``, and ``vscalefps`` or on CPUs without AVX-512 the power of two
    from its bits) gives the same rounded weights as ``softmax_exp`` one at a time, zeros the rest of its last 16
    lanes, and sums the unrounded weights."""
    import numpy as np
    from numba import njit

    from llavakit.core import gemv
    from llavakit.core.gemv import fma32, narrow, softmax_exp, softmax_row

    if scalef and not gemv.SCALEF:
        pytest.skip("this CPU has no AVX-512F (vscalefps)")
    monkeypatch.setattr(gemv, "SCALEF", scalef)  # read when the intrinsic is compiled, in the first call below

    @njit
    def row(scores, seen, scale, shift, out):
        return softmax_row(scores, seen, scale, shift, out)

    @njit
    def scalar(scores, seen, scale, shift, out):
        total = np.float64(0.0)
        for i in range(seen):
            weight = softmax_exp(fma32(scores[i], scale, shift))
            total += weight
            out[i] = narrow(weight, out[0])
        return total

    words = np.uint16 if dtype == torch.bfloat16 else np.float32
    generator = np.random.default_rng(seen)
    scores = (generator.standard_normal(112) * 300).astype(np.float32)  # exponents from 0 down past the clamp
    scale = np.float32(0.25)
    shift = np.float32(-scores[:seen].max() * scale)
    got, expected = np.full(112, 7, words), np.full(112, 7, words)
    total = row(scores, seen, scale, shift, got)
    reference_total = scalar(scores, seen, scale, shift, expected)
    assert np.array_equal(got[:seen], expected[:seen])
    assert not got[seen:-(-seen // 16) * 16].any()  # the rest of the last line zeroed
    assert (got[-(-seen // 16) * 16:] == 7).all()  # nothing past it written
    assert abs(total - reference_total) <= 1e-6 * reference_total
    scores[seen // 2] = np.nan  # a NaN score stays NaN in the sum, as PyTorch's softmax keeps it
    assert np.isnan(row(scores, seen, scale, shift, got))


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_inputs_equal_the_permuted_layouts(dtype):
    """The parallel copy into the kernel's blocked layouts equals PyTorch's pad + permute + contiguous."""
    from llavakit.plugins.attention_kernels import LINE, _blocked_inputs, _words, _words32

    k, v = (torch.randn(2, 23, 3, 32).to(dtype).transpose(1, 2) for _ in range(2))  # strided, as projected
    padded = 32
    keys, values = F.pad(k, (0, 0, 0, padded - 23)), F.pad(v, (0, 0, 0, padded - 23))
    if dtype == torch.bfloat16:
        expected_keys = keys.view(2, 3, 2, LINE, 16, 2).permute(0, 1, 2, 4, 3, 5)
        expected_values = values.view(2, 3, padded // 2, 2, 2, LINE).permute(0, 1, 4, 2, 5, 3)
    else:
        expected_keys = keys.view(2, 3, 2, LINE, 32).permute(0, 1, 2, 4, 3)[..., None]
        expected_values = values.view(2, 3, padded, 2, LINE).permute(0, 1, 3, 2, 4)[..., None]
    per_line = expected_values.shape[-1]
    key_blocks = torch.full(expected_keys.shape, 5.0, dtype=dtype)
    value_blocks = torch.full(expected_values.shape, 5.0, dtype=dtype)
    _blocked_inputs(_words32(k), _words(v), _words32(key_blocks).reshape(key_blocks.shape[:5]),
                    _words(value_blocks).reshape(value_blocks.shape[:4] + (LINE, per_line)), 23)
    assert torch.equal(key_blocks, expected_keys) and torch.equal(value_blocks, expected_values)
