"""The benchmark's GGUF export (benchmarks/gguf_export.py), which puts llama.cpp in the same run as llavakit.

The rotary permutation is checked on its own (attention scores unchanged), the file is read back with the
``gguf`` package's reader, and where ``llama-cpp-python`` is installed (the optional ``llamacpp`` extra),
llama.cpp's logits on the exported file are compared with llavakit's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import save_tiny_llava_hf

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gguf_export  # noqa: E402

from llavakit.plugins.llama import RotaryEmbedding, apply_rotary  # noqa: E402
from llavakit.registry import load_model  # noqa: E402


def interleaved_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's ``llama`` rotary embedding: dimensions ``(2i, 2i + 1)`` rotated by ``position * theta^(-2i/D)``
    (``x`` ``[L, heads, D]``), the angles and their cos/sin in float32, as :class:`RotaryEmbedding` has them."""
    dim = x.shape[-1]
    angles = positions[:, None, None].float() * RotaryEmbedding(dim, theta).inv_freq(x.device)
    cos, sin = angles.cos().double(), angles.sin().double()
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_interleaved_rows_give_the_same_attention_scores(heads, kv_heads):
    dim, width, length, theta = 16, 32, 11, 1e4
    generator = torch.Generator().manual_seed(0)
    wq = torch.randn(heads * dim, width, generator=generator, dtype=torch.float64)
    wk = torch.randn(kv_heads * dim, width, generator=generator, dtype=torch.float64)
    x = torch.randn(length, width, generator=generator, dtype=torch.float64)
    positions = torch.arange(length) + 3

    cos, sin = RotaryEmbedding(dim, theta)(positions[None], torch.float64)
    q = apply_rotary((x @ wq.T).view(1, length, heads, dim).transpose(1, 2), cos, sin)[0]
    k = apply_rotary((x @ wk.T).view(1, length, kv_heads, dim).transpose(1, 2), cos, sin)[0]
    group = heads // kv_heads
    expected = q @ k.repeat_interleave(group, 0).transpose(1, 2)

    q2 = interleaved_rotary((x @ gguf_export.interleave_rotary_rows(wq, heads).T).view(length, heads, dim),
                            positions, theta).transpose(0, 1)
    k2 = interleaved_rotary((x @ gguf_export.interleave_rotary_rows(wk, kv_heads).T).view(length, kv_heads, dim),
                            positions, theta).transpose(0, 1)
    got = q2 @ k2.repeat_interleave(group, 0).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-source")
    save_tiny_llava_hf(folder, "llama-gqa")
    return load_model(folder, dtype=torch.float32)


def _tensor(reader, name: str):
    (tensor,) = [t for t in reader.tensors if t.name == name]
    return tensor


def _field(reader, key: str):
    field = reader.fields[key]
    return field.parts[field.data[0]].tolist()[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_reads_back(tiny_model, tmp_path, dtype):
    path = gguf_export.write_text_gguf(tiny_model, tmp_path / "text.gguf", dtype)
    reader = gguf.GGUFReader(path)
    llm = tiny_model.language_model
    layers = llm.config.num_layers
    assert len(reader.tensors) == 3 + 9 * layers
    assert _field(reader, "llama.block_count") == layers
    assert _field(reader, "llama.attention.head_count") == llm.config.num_heads
    assert _field(reader, "llama.attention.head_count_kv") == llm.num_kv_heads
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(llm.config.rope_theta)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == llm.config.vocab_size

    matrix_type = gguf.GGMLQuantizationType.F32 if dtype == torch.float32 else gguf.GGMLQuantizationType.BF16
    q = _tensor(reader, "blk.1.attn_q.weight")
    assert q.tensor_type == matrix_type
    assert list(q.shape) == list(reversed(llm.layers[1].self_attn.q_proj.weight.shape))  # ggml's order
    expected = gguf_export.interleave_rotary_rows(llm.layers[1].self_attn.q_proj.weight.detach(), llm.config.num_heads)
    if dtype == torch.bfloat16:
        bits = expected.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(np.asarray(q.data).view(np.uint16).reshape(bits.shape), bits)
    else:
        assert np.array_equal(np.asarray(q.data).reshape(expected.shape), expected.numpy())
    norm = _tensor(reader, "blk.0.attn_norm.weight")
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay float32, as llama.cpp's converter keeps them
    assert np.array_equal(np.asarray(norm.data), llm.layers[0].input_layernorm.weight.detach().numpy())


def test_export_refuses_float16(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        gguf_export.write_text_gguf(tiny_model, tmp_path / "text.gguf", torch.float16)


@pytest.mark.skipif(not gguf_export.has_llama_cpp(), reason="llama-cpp-python is not installed (optional extra)")
def test_llama_cpp_logits_match_llavakit(tiny_model, tmp_path):
    path = gguf_export.write_text_gguf(tiny_model, tmp_path / "text.gguf", torch.float32)
    llm = gguf_export.load_llama_cpp(path, threads=2, context=256, float32_cache=True)
    tokens = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = tiny_model(tokens[None]).logits[0, -1].float().numpy()
    theirs = gguf_export.llama_cpp_logits(llm, tokens.tolist())
    assert np.abs(theirs - ours).max() < 1e-4  # 2e-6 to 1.3e-5 measured, every family, 5 to 300 tokens
    with torch.inference_mode():
        greedy = tiny_model.generate(tokens[None], max_new_tokens=16, eos_token_id=[])[0, 40:].tolist()
    assert gguf_export.llama_cpp_greedy(llm, tokens.tolist(), 16)[0] == greedy
    llm.close()
