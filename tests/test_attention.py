"""Attention backends agree with the eager reference (fp32, CPU): plain, causal, bottom-right causal over a
cache, grouped-query heads, padded batches; ``flash`` refuses what no flash kernel can run."""

from __future__ import annotations

import pytest
import torch

from llavakit.core.errors import AttentionBackendError
from llavakit.plugins.attention import EagerAttention, FlashAttention, SdpaAttention
from llavakit.registry import build_model

TOLERANCE = 1e-4
HEADS = {"mha": (4, 4), "gqa": (8, 2)}
HEAD_DIM = 16


def qkv(batch: int, q_len: int, k_len: int, heads: tuple[int, int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = heads
    return (
        torch.randn(batch, q_heads, q_len, HEAD_DIM, generator=generator),
        torch.randn(batch, kv_heads, k_len, HEAD_DIM, generator=generator),
        torch.randn(batch, kv_heads, k_len, HEAD_DIM, generator=generator),
    )


def decoder_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """The padding mask the Llama decoder builds: causal over real keys, a padding query sees itself too."""
    k_len = attention_mask.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()
    return allowed | (k_pos == q_pos)[None, None]


def run_all(q, k, v, *, mask=None, causal=False, backends=None):
    backends = backends or {"eager": EagerAttention(), "sdpa": SdpaAttention(), "flash": FlashAttention()}
    return {name: b.attend(q, k, v, mask=mask, causal=causal, scale=HEAD_DIM**-0.5) for name, b in backends.items()}


def assert_agree(outputs, rows=slice(None)):
    reference = outputs["eager"]
    for name, out in outputs.items():
        assert out.shape == reference.shape and out.dtype == reference.dtype
        diff = (out - reference).transpose(1, 2)[rows].abs().max().item()
        assert diff < TOLERANCE, f"{name} differs from eager by {diff}"


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize(
    "q_len, k_len, causal",
    [(9, 9, False), (9, 9, True), (3, 11, True), (1, 11, False)],
    ids=["bidirectional", "causal-prefill", "causal-chunk-after-cache", "decode-step"],
)
def test_backends_agree_without_padding(heads, q_len, k_len, causal):
    q, k, v = qkv(2, q_len, k_len, heads)
    outputs = run_all(q, k, v, causal=causal)
    assert_agree(outputs)
    if causal and q_len < k_len:  # bottom-right: the first new query sees every cached key and itself
        first = EagerAttention().attend(q[:, :, :1], k[:, :, : k_len - q_len + 1], v[:, :, : k_len - q_len + 1],
                                        mask=None, causal=False, scale=HEAD_DIM**-0.5)
        assert (outputs["flash"][:, :, :1] - first).abs().max() < TOLERANCE


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_backends_agree_on_a_left_padded_prefill_and_decode(heads):
    attention_mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5, [0] * 6 + [1] * 2], dtype=torch.bool)
    q, k, v = qkv(3, 8, 8, heads)
    assert_agree(run_all(q, k, v, mask=decoder_mask(attention_mask, 8)))  # left padding: every position agrees
    grown = torch.cat([attention_mask, torch.ones(3, 2, dtype=torch.bool)], dim=1)
    q, k, v = qkv(3, 2, 10, heads, seed=1)
    assert_agree(run_all(q, k, v, mask=decoder_mask(grown, 2)))


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_backends_agree_on_real_tokens_of_right_padded_rows(heads):
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], dtype=torch.bool)
    q, k, v = qkv(3, 7, 7, heads)
    outputs = run_all(q, k, v, mask=decoder_mask(attention_mask, 7))
    assert_agree(outputs, rows=attention_mask)  # padding positions are never read


class ReferenceFlashAttn:
    """Stands in for the ``flash-attn`` package (CUDA only) so the packing around it is tested on CPU:
    the same signatures, computed per packed sequence with the eager reference."""

    __version__ = "2.6.3"

    def __init__(self):
        self.calls: list[str] = []

    def flash_attn_func(self, q, k, v, *, softmax_scale, causal):
        self.calls.append("flash_attn_func")
        out = EagerAttention().attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=None,
                                      causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    def flash_attn_varlen_func(self, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal):
        self.calls.append("flash_attn_varlen_func")
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert max_seqlen_q == int(cu_seqlens_q.diff().max()) and max_seqlen_k == int(cu_seqlens_k.diff().max())
        pieces = []
        for row in range(len(cu_seqlens_q) - 1):
            rows_q = slice(cu_seqlens_q[row], cu_seqlens_q[row + 1])
            rows_k = slice(cu_seqlens_k[row], cu_seqlens_k[row + 1])
            out = EagerAttention().attend(q[rows_q].transpose(0, 1)[None], k[rows_k].transpose(0, 1)[None],
                                          v[rows_k].transpose(0, 1)[None], mask=None, causal=causal,
                                          scale=softmax_scale)
            pieces.append(out[0].transpose(0, 1))
        return torch.cat(pieces)


@pytest.fixture
def flash_with_package():
    backend, package = FlashAttention(), ReferenceFlashAttn()
    backend._flash_attn, backend._flash_attn_checked = package, True
    return backend, package


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_flash_attn_varlen_packing_of_padded_batches(flash_with_package, heads):
    backend, package = flash_with_package
    backends = {"eager": EagerAttention(), "flash": backend}
    left = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5, [0] * 7 + [1]], dtype=torch.bool)
    q, k, v = qkv(3, 8, 8, heads)
    assert_agree(run_all(q, k, v, mask=decoder_mask(left, 8), backends=backends))
    grown = torch.cat([left, torch.ones(3, 1, dtype=torch.bool)], dim=1)
    q, k, v = qkv(3, 1, 9, heads, seed=2)
    assert_agree(run_all(q, k, v, mask=decoder_mask(grown, 1), backends=backends))
    right = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1, 1] + [0] * 6], dtype=torch.bool)
    q, k, v = qkv(3, 8, 8, heads, seed=3)
    assert_agree(run_all(q, k, v, mask=decoder_mask(right, 8), backends=backends), rows=right)
    q, k, v = qkv(2, 3, 6, heads, seed=4)
    assert_agree(run_all(q, k, v, causal=True, backends=backends))
    assert package.calls == ["flash_attn_varlen_func"] * 3 + ["flash_attn_func"]


def test_flash_refuses_masks_it_cannot_express():
    q, k, v = qkv(1, 6, 6, HEADS["mha"])
    positions = torch.arange(6)
    sliding_window = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - 3)
    with pytest.raises(AttentionBackendError, match="sliding window.*Use attention='sdpa'"):
        FlashAttention().attend(q, k, v, mask=sliding_window[None, None], causal=False, scale=0.25)
    # A packed training row (a shared prompt, then two branches that do not see each other).
    segments = torch.tensor([0, 0, 1, 1, 2, 2])
    tree = (positions[None, :] <= positions[:, None]) & ((segments[None, :] == 0) | (segments[None, :] == segments[:, None]))
    with pytest.raises(AttentionBackendError, match="Use attention='sdpa'"):
        FlashAttention().attend(q, k, v, mask=tree[None, None], causal=False, scale=0.25)


def test_flash_refuses_devices_without_a_kernel_before_allocating(monkeypatch):
    backend = FlashAttention()
    backend.check(torch.device("cpu"), torch.float32)
    backend.check(torch.device("meta"), torch.bfloat16)
    with pytest.raises(AttentionBackendError, match="no kernel for device 'mps'"):
        backend.check(torch.device("mps"), torch.float16)
    with pytest.raises(AttentionBackendError, match="float16 or bfloat16"):
        build_model(vision="clip-l336", llm="vicuna-7b", attention="flash", device="cuda", dtype="float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(AttentionBackendError, match="compute capability 8.0.*Tesla T4 is 7.5"):
        backend.check(torch.device("cuda"), torch.bfloat16)


def tiny_llm(attention: str):
    return build_model(
        vision="clip-vit", llm="mistral-7b", attention=attention, seed=0, image_token_index=250,
        vision_options=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2),
        llm_options=dict(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=8, num_kv_heads=2,
                         vocab_size=256),
    ).language_model


def test_the_decoders_own_masks_run_on_flash():
    """A left-padded prefill and a decode step through the real decoder: flash matches eager everywhere."""
    eager, flash = tiny_llm("eager"), tiny_llm("flash")
    attention_mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    embeds = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    caches = {name: model.new_kv_cache(2, 8) for name, model in (("eager", eager), ("flash", flash))}
    prefill = {
        name: model(embeds, position_ids=positions, attention_mask=attention_mask, kv_cache=caches[name])
        for name, model in (("eager", eager), ("flash", flash))
    }
    assert (prefill["flash"] - prefill["eager"]).abs().max() < TOLERANCE
    step_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=attention_mask.dtype)], dim=1)
    step = {
        name: model(embeds[:, -1:], position_ids=positions[:, -1:] + 1, attention_mask=step_mask, kv_cache=caches[name])
        for name, model in (("eager", eager), ("flash", flash))
    }
    assert (step["flash"] - step["eager"]).abs().max() < TOLERANCE
