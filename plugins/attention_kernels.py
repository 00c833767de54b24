"""Prefill attention on the CPU as one parallel numba kernel (bfloat16 with AVX512-BF16 dot products, or float32):
causal or full, grouped-query, no mask.

Why it exists: the prefill of a LLaVA-NeXT prompt is mostly image tokens (2340 for one 768x1024 image), and its
attention is a third to a half of the time to first token. PyTorch's CPU flash kernel runs it at about 130
GFLOP/s on the 2-core Zen 4 machine this project measures on in bf16 and in float32 alike, where the same CPU's
bf16 matrix products reach about 400: its bf16 path converts to float32 instead of using the CPU's bf16 dot
products. This kernel computes both products of attention with the blocked loops of :mod:`llavakit.core.gemv`
(``vdpbf16ps`` for bf16, FMA for float32), eight queries per weight load.

How, per head and tile of 8 queries:

1. ``S = Q K^T`` for every key the tile sees (the keys blocked like a matrix of :func:`~llavakit.core.gemv.
   blocked_layout`: 16 keys per 64-byte line); the causal triangle past the tile's last query is skipped.
2. Softmax per query over its own keys in float32: the maximum (:func:`_lines_max`), the exponentials of
   ``scale * (score - max)`` and their float32 sum, 16 lanes at a time (:func:`~llavakit.core.gemv.softmax_row`).
   The exponentials are rounded to the input dtype, as PyTorch's flash kernel rounds its probabilities before
   multiplying them with the values.
3. ``O = P V`` with ``V`` blocked transposed (16 head dimensions per line, one key (float32) or a pair of keys
   (bf16) per line), divided by the sum and rounded once to the output dtype.

Unlike a flash kernel, the scores of a tile's whole key range are kept (8 x 2372 floats, 76 KB, in the core's
L2), so the softmax needs no running rescales. Keys and values are first copied into their blocked layouts by
:func:`_blocked_inputs`, one block of 16 keys per parallel work item. Sums run in float32 in another order than
PyTorch's, so results agree with it to rounding, not bit for bit (tests/test_attention_kernel.py bounds the error
against a float64 reference: no worse than PyTorch's own kernel).
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from llavakit.core.gemv import BF16_DOT, _block_dots8, kernel_threads, narrow, softmax_row

#: sha256 of ``core/gemv.py``, whose loops the kernel inlines (numba keys its disk cache on this file only; see
#: the same constant in :mod:`llavakit.plugins.llama_kernels`; a test checks both).
GEMV_SOURCE_SHA256 = "a17cf2ca74f021965351de825714e63c73b55607eaafd52635ce0bc0989126e0"
#: Queries per tile: the inputs one key (or value) load is multiplied with.
TILE = 8
#: Keys per 64-byte line of the blocked keys, head dimensions per line of the blocked values.
LINE = 16


@intrinsic
def _lines_max(typingctx, values, lines):  # pragma: no cover - compiled
    """The largest of ``values[:16 * lines]`` (a contiguous float32 row, ``lines >= 1``), 16 lanes at a time. numba
    leaves a max reduction scalar (one ``vmaxss`` per element, 0.6 ns), which a softmax over 2372 keys per query
    cannot afford."""
    def codegen(context, builder, signature, args):
        lanes, i64 = ir.VectorType(ir.FloatType(), 16), ir.IntType(64)
        row = context.make_array(signature.args[0])(context, builder, args[0])
        count = context.cast(builder, args[1], signature.args[1], types.int64)
        start = builder.bitcast(row.data, lanes.as_pointer())
        maximum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes, lanes]),
                                                 "llvm.maxnum.v16f32")
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [lanes]),
                                                "llvm.vector.reduce.fmax.v16f32")
        entry = builder.block
        head, body, done = (builder.append_basic_block(f"linesmax.{name}") for name in ("head", "body", "done"))
        first = builder.load(start, align=4)
        builder.branch(head)
        builder.position_at_end(head)
        line = builder.phi(i64)
        best = builder.phi(lanes)
        line.add_incoming(ir.Constant(i64, 1), entry)
        best.add_incoming(first, entry)
        builder.cbranch(builder.icmp_signed("<", line, count), body, done)
        builder.position_at_end(body)
        value = builder.load(builder.gep(start, [line]), align=4)
        line.add_incoming(builder.add(line, ir.Constant(i64, 1)), body)
        best.add_incoming(builder.call(maximum, [best, value]), body)
        builder.branch(head)
        builder.position_at_end(done)
        return builder.call(reduce, [best])

    return types.float32(values, lines), codegen


@njit(parallel=True, fastmath=True, cache=True)
def _attention(queries, key_blocks, value_blocks, out, k_len, scale, causal, threads):  # pragma: no cover - compiled
    """``out[b, h] = softmax(scale * Q K^T) V`` for every batch row and head (module docstring).

    ``queries`` ``[B, H, Lq, D]`` (any strides but a contiguous last axis); ``key_blocks``
    ``[B, Hkv, Lk16/16, C, 16(, 2)]``; ``value_blocks`` ``[B, Hkv, D/16, Lk16/K, 16(, 2)]`` (``C`` = D/2 pairs and
    ``K`` = 2 keys per line in bf16, D and 1 in float32), zeros past ``k_len``; ``out`` like ``queries``. Causal
    attention is bottom-right aligned: query ``i`` sees keys up to ``i + k_len - q_len``."""
    batch, heads, q_len, head_dim = queries.shape
    group = heads // key_blocks.shape[1]
    columns = key_blocks.shape[3]
    key_room = key_blocks.shape[2] * LINE
    keys_per_column = key_room // value_blocks.shape[3]
    offset = k_len - q_len
    tiles = (q_len + TILE - 1) // TILE
    items = batch * heads * tiles
    chunks = min(items, 4 * threads)  # a few per thread, for threads that start late
    for chunk in prange(chunks):
        scores = np.empty((TILE, key_room), np.float32)
        probabilities = np.zeros((TILE, key_room), queries.dtype)
        lanes = np.empty((TILE, LINE), np.float32)
        sums = np.empty(TILE, np.float32)
        tail = np.zeros((TILE, head_dim), queries.dtype)  # a last tile's queries, padded with zero rows
        for item in range(chunk * items // chunks, (chunk + 1) * items // chunks):
            head_row, turn = divmod(item, tiles)
            # Tiles alternate from both ends of the triangle, so every chunk of consecutive items costs the same.
            tile = turn // 2 if turn % 2 == 0 else tiles - 1 - turn // 2
            row, head = divmod(head_row, heads)
            first = tile * TILE
            last_key = min(first + TILE - 1 + offset, k_len - 1) if causal else k_len - 1
            row_queries, start = queries[row, head], first
            rows = min(TILE, q_len - first)
            if rows < TILE:  # the eight loads of a tile must stay inside the queries
                for r in range(rows):
                    tail[r] = row_queries[first + r]
                row_queries, start = tail, 0
            row_keys = key_blocks[row, head // group]
            for block in range(last_key // LINE + 1):  # the products go straight into the scores' block of 16 keys
                _block_dots8(row_keys, block, row_queries, start, columns, scores[:, block * LINE:])
            # The value products run over whole lines of keys (a pair of them in bf16).
            key_end = (last_key // keys_per_column + 1) * keys_per_column
            for r in range(TILE):
                line = scores[r]
                # The keys this query sees: up to its own position (causal), never the padding past k_len.
                seen = min(first + r + offset, k_len - 1) + 1 if causal else k_len
                whole = seen // LINE
                top = _lines_max(line, whole) if whole > 0 else line[0]
                for i in range(whole * LINE, seen):
                    top = max(top, line[i])
                # scale * (score - top) with one rounding: the scale is positive, so the max commutes with it.
                shift = -top * scale
                sums[r] = softmax_row(line, seen, scale, shift, probabilities[r])
                for i in range((seen + LINE - 1) // LINE * LINE, key_end):  # softmax_row zeroed up to here
                    probabilities[r, i] = 0
            row_values = value_blocks[row, head // group]
            for block in range(head_dim // LINE):
                _block_dots8(row_values, block, probabilities, 0, key_end // keys_per_column, lanes)
                for r in range(rows):
                    for i in range(LINE):
                        out[row, head, first + r, block * LINE + i] = narrow(lanes[r, i] / sums[r], out[0, 0, 0, 0])


@njit(parallel=True, cache=True)
def _blocked_inputs(keys, values, key_blocks, value_blocks, k_len):  # pragma: no cover - compiled
    """Copy ``keys`` and ``values`` into the blocked layouts :func:`_attention` reads (its docstring), zeros past
    ``k_len`` (those keys' scores are masked, but their values meet probabilities of 0 in the products, and 0
    times a stale NaN would not be 0), one block of 16 keys per work item, in parallel: PyTorch's
    ``permute(...).contiguous()`` of the same layouts gathers 2-byte elements one at a time on one thread (about
    0.9 ms a decoder layer of the benchmark prompt in bf16).

    ``keys`` ``[B, Hkv, Lk, C]`` and ``key_blocks`` ``[B, Hkv, Lk16/16, C, 16]`` hold 32-bit words: a float32, or a
    pair of bf16 dimensions, so one transpose of words serves both. ``values`` ``[B, Hkv, Lk, D]`` and
    ``value_blocks`` ``[B, Hkv, D/16, Lk16/K, 16, K]`` in the input dtype, ``K`` keys per line (2 in bf16)."""
    batch, kv_heads, _, columns = keys.shape
    head_dim = values.shape[3]
    blocks = key_blocks.shape[2]
    per_line = value_blocks.shape[5]
    for item in prange(batch * kv_heads * blocks):
        head_row, block = divmod(np.int64(item), blocks)  # prange's unsigned index would make divmod's floats
        row, head = divmod(head_row, kv_heads)
        row_keys, row_values, block_keys = keys[row, head], values[row, head], key_blocks[row, head, block]
        first = block * LINE
        seen = min(LINE, k_len - first)
        for c in range(columns):
            for j in range(seen):
                block_keys[c, j] = row_keys[first + j, c]
            for j in range(seen, LINE):
                block_keys[c, j] = 0
        for line in range(head_dim // LINE):
            line_values = value_blocks[row, head, line]
            for j in range(LINE):
                position = first + j
                slot, k = divmod(position, per_line)
                if j < seen:
                    for i in range(LINE):
                        line_values[slot, i, k] = row_values[position, line * LINE + i]
                else:
                    for i in range(LINE):
                        line_values[slot, i, k] = 0


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> bool:
    """Whether :func:`attention` can compute this call: CPU tensors of one float dtype it has loops for (bf16 needs
    the CPU's bf16 dot products), no mask, head size a multiple of 16, whole query groups per key head, and no
    gradient wanted (the kernel has no backward). Whether it pays (long enough query blocks) is the caller's
    call: :func:`llavakit.plugins.attention.cpu_kernel`."""
    if q.device.type != "cpu" or mask is not None or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dtype != torch.float32 and not (q.dtype == torch.bfloat16 and BF16_DOT):
        return False
    if q.dim() != 4 or q.shape[-1] % LINE or q.shape[1] % k.shape[1] or v.shape != k.shape:
        return False
    if causal and q.shape[2] > k.shape[2]:
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _words(tensor: torch.Tensor) -> np.ndarray:
    """A bf16 tensor's 16-bit words, or a float32 tensor's values, as a NumPy view with its strides (no copy)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _words32(tensor: torch.Tensor) -> np.ndarray:
    """A float32 or bf16 tensor's last axis as 32-bit words (a bf16 pair per word), as a NumPy view (no copy)."""
    return tensor.view(torch.int32).numpy()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` for ``q`` ``[B, H, Lq, D]`` and ``k``, ``v`` ``[B, Hkv, Lk, D]`` (``H`` a
    multiple of ``Hkv``), causal bottom-right aligned; call only where :func:`applies`. Returns ``[B, H, Lq, D]``,
    a view of a ``[B, Lq, H, D]`` tensor: the layout the output projection reads, so the usual
    ``transpose(1, 2).reshape(B, Lq, H * D)`` copies nothing. The queries are read where they are (the usual
    ``[B, Lq, H, D]`` projection, transposed); keys and values are copied once into the blocked layouts."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    padded_k = -(-k_len // LINE) * LINE
    blocks, lines = padded_k // LINE, head_dim // LINE
    per_line = 2 if q.dtype == torch.bfloat16 else 1  # keys per line of values: a pair in bf16
    key_blocks = torch.empty(batch, kv_heads, blocks, head_dim // per_line, LINE, per_line, dtype=q.dtype)
    value_blocks = torch.empty(batch, kv_heads, lines, padded_k // per_line, LINE, per_line, dtype=q.dtype)
    keys = k if k.stride(-1) == 1 else k.contiguous()
    queries = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype).transpose(1, 2)
    with kernel_threads():
        _blocked_inputs(_words32(keys), _words(v), _words32(key_blocks).squeeze(-1), _words(value_blocks), k_len)
        if per_line == 1:  # the layouts _attention reads in float32 have no pair axis
            key_blocks, value_blocks = key_blocks.squeeze(-1), value_blocks.squeeze(-1)
        _attention(_words(queries), _words(key_blocks), _words(value_blocks), _words(out), k_len, np.float32(scale),
                   causal, get_num_threads())
    return out
