"""The benchmark's text model as a GGUF file, and llama.cpp (through ``llama-cpp-python``) measured on it.

Why it exists: issue 5 names llama.cpp as the CPU peer to beat, measured in the same run as llavakit and
transformers when the optional ``llama-cpp-python`` is installed (``pip install -e '.[llamacpp]'``; it builds
llama.cpp from source). llama.cpp reads GGUF files only, so :func:`write_text_gguf` writes the Llama-family
decoder of a loaded llavakit model as one, the way llama.cpp's own ``convert_hf_to_gguf.py`` does:

- tensor names ``token_embd``, ``blk.N.attn_q`` ... ``output``, shapes as PyTorch's (the ``gguf`` package
  reverses them into ggml's order);
- the query and key rows permuted per head from the rotate-half rotary layout of Hugging Face checkpoints into
  the interleaved pairs of llama.cpp's ``llama`` architecture (:func:`interleave_rotary_rows`);
- float32, or bf16 (``GGML_TYPE_BF16``: the same bits as a bf16 PyTorch tensor);
- a stand-in SentencePiece vocabulary (``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens, then ``tok{i}``):
  the benchmark's prompts are token ids, and llama.cpp only needs a well-formed vocabulary of the right size.

Only the text part is exported: llama.cpp's LLaVA path (a separate ``mmproj`` file with its own CLIP) is not
this architecture's, so its prefill is measured on a text prompt of the image prompt's length instead.
:func:`llama_cpp_logits` is what tests/test_gguf_export.py compares against llavakit's logits.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

#: ``tokenizer.ggml.token_type`` values (llama.cpp's ``llama_token_type``).
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``[heads * D, C]`` query or key rows in rotate-half order (dimension ``i`` pairs with ``i + D/2``) reordered
    so pairs are adjacent (``2i`` with ``2i + 1``), as llama.cpp's ``llama`` rotary embedding expects: per head,
    the rows ``0, D/2, 1, D/2 + 1, ...``. The same permutation as ``convert_hf_to_gguf.py``'s ``permute``."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def _vocabulary(size: int) -> tuple[list[bytes], list[float], list[int]]:
    """A stand-in SentencePiece vocabulary of ``size`` tokens (ids 0-2 unk/bos/eos, 3-258 the bytes)."""
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    if size < len(tokens):
        raise ValueError(f"a GGUF vocabulary needs at least {len(tokens)} tokens; the model has {size}")
    tokens += [f"\u2581tok{i}".encode() for i in range(len(tokens), size)]
    types += [NORMAL] * (size - len(types))
    return tokens, [0.0] * size, types


def write_text_gguf(model, path: Path, dtype: torch.dtype, *, context_length: int = 4096) -> Path:
    """Write the Llama-family decoder of a loaded llavakit ``model`` (``model.language_model``) to ``path`` as a
    GGUF file of ``dtype`` (float32 or bfloat16) that llama.cpp loads as its ``llama`` architecture."""
    import gguf

    llm = model.language_model
    config = llm.config
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"write_text_gguf writes float32 or bfloat16, not {dtype}")
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_BF16
    heads, kv_heads = config.num_heads, llm.num_kv_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llavakit benchmark text model")
    writer.add_context_length(context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(llm.head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(llm.head_dim)
    writer.add_value_length(llm.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    tokens, scores, types = _vocabulary(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)

    def add(name: str, tensor: torch.Tensor, *, matrix: bool = True) -> None:
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if matrix and dtype == torch.bfloat16:  # norms stay float32, as convert_hf_to_gguf.py keeps them
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))

    add("token_embd.weight", llm.embed_tokens.weight)
    for i, layer in enumerate(llm.layers):
        attention, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, matrix=False)
        add(f"blk.{i}.attn_q.weight", interleave_rotary_rows(attention.q_proj.weight, heads))
        add(f"blk.{i}.attn_k.weight", interleave_rotary_rows(attention.k_proj.weight, kv_heads))
        add(f"blk.{i}.attn_v.weight", attention.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", attention.o_proj.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, matrix=False)
        add(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
    add("output_norm.weight", llm.norm.weight, matrix=False)
    add("output.weight", llm.lm_head.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def has_llama_cpp() -> bool:
    """Whether ``llama-cpp-python`` and ``gguf`` are installed (the optional ``llamacpp`` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "llama_cpp"))


def load_llama_cpp(path: Path, threads: int, context: int, *, float32_cache: bool = False):
    """llama.cpp's model and context on ``path``, quiet, on ``threads`` CPU threads, with room for ``context``
    positions; the prompt goes through in llama.cpp's default batches of 512.

    For speed (the default): llama.cpp's float16 key/value cache (what ``llama-bench`` measures) and its flash
    attention, which ``llama-cpp-python`` leaves off but which prefilled the benchmark's 2372 tokens in 1.2
    against 1.5-1.8 s (bf16). With ``float32_cache`` (for logit parity): a float32 cache, no flash attention."""
    from llama_cpp import GGML_TYPE_F32, Llama

    options = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if float32_cache else dict(flash_attn=True)
    return Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                 verbose=False, **options)


def last_logits(llm) -> np.ndarray:
    """A view of llama.cpp's logits for the last token evaluated, float32 ``[vocab]`` (valid until the next
    evaluation). ``Llama.scores`` keeps them only with ``logits_all``, which would copy every prompt row."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    """The logits llama.cpp gives the last of ``tokens`` from a fresh cache, as float32 ``[vocab]``."""
    llm.reset()
    llm.eval(tokens)
    return last_logits(llm).copy()


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding in llama.cpp from a fresh cache: the ``new_tokens`` tokens, and when each was known (read
    with ``time.perf_counter``; the first one once the prompt's logits are there)."""
    llm.reset()
    times, out = [], []
    llm.eval(prompt)
    while True:
        out.append(int(np.argmax(last_logits(llm))))
        times.append(time.perf_counter())
        if len(out) == new_tokens:
            return out, times
        llm.eval(out[-1:])


def llama_cpp_decode_rate(llm, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of greedy decoding after the first new token, as the benchmark's ``StepClock`` measures llavakit's
    and transformers' (the prompt's evaluation excluded)."""
    _, times = llama_cpp_greedy(llm, prompt, new_tokens)
    return (len(times) - 1) / (times[-1] - times[0])


def llama_cpp_prefill_seconds(llm, tokens: list[int]) -> float:
    """Seconds llama.cpp takes to evaluate ``tokens`` from a fresh cache (its prompt processing)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - start
