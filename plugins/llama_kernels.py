"""A Llama decode step of one row or a small batch as a single numba kernel (float32 or bfloat16): the embedding
lookup, every decoder layer, the final norm and ``lm_head`` (or, for greedy steps, only its argmax).

Why it exists: once the weights stream at memory speed (:mod:`llavakit.core.gemv`), a decode step of a small
model is dominated by everything else. On the 2-core Zen 4 machine this project measures on, the benchmark
model's bf16 step once took 6.8 ms of which reading the 80 MB of weights was 1.7 ms; the rest was about 25
small PyTorch operators per layer (norms, rotary, cache writes, attention, activations), each a dispatch, an
allocation and a trip through Python. Layer by layer in one call each, that fell to 4 ms; what remained
outside (embedding, rotary, final norm, conversions, 0.3-0.6 ms) ran on caches the weights had just flushed,
so the whole step is now one call. Within a layer: RMSNorm, the q/k/v products, rotary, the cache write,
grouped-query attention over the cache, the output product, the residual, RMSNorm, the gate/up products,
SiLU, the down product and the residual, with the products and the attention heads split across the cores
and everything else done in place on vectors of a few hundred floats.

Numerics follow the PyTorch path: sums in float32, and with bf16 weights every value the PyTorch path keeps in
a bf16 tensor (norm outputs, projections, rotated q/k, the cache, the attention output, activations, the
residual stream) is rounded to bf16 at the same point (:func:`~llavakit.core.gemv.round_bf16`). Sums run in
another order than oneDNN's or PyTorch's attention kernels, and exponentials come from a 1-ulp polynomial
(:func:`~llavakit.core.gemv.exp32`), so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from llavakit.core.gemv import (ROW_BLOCK, as_matrix, dot_input, exp32, gemv_block, key_scores16, matrix_rows,
                                 narrow, round_bf16, screened_argmax, softmax_exp, weighted_value_sums, widen)

#: sha256 of ``core/gemv.py``, whose helpers the kernels below inline. numba keys a disk-cached kernel on the
#: contents of its own file only, so when that file changes this one must change too, or every cache
#: (a developer's, or a user's after an upgrade) keeps running the old code; a test checks it.
GEMV_SOURCE_SHA256 = "a17cf2ca74f021965351de825714e63c73b55607eaafd52635ce0bc0989126e0"


@njit(inline="always", fastmath=True)
def _round(value, bf16):  # pragma: no cover - compiled
    return round_bf16(value) if bf16 else value


@njit(inline="always", fastmath=True)
def _rms_norm(x, weight, eps, bf16):  # pragma: no cover - compiled
    """RMSNorm as :class:`~llavakit.plugins.llama.RMSNorm` computes it: normalise in float32, round to the
    model's dtype, then scale (the product rounded again)."""
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    inverse = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[0]) + eps)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _round(weight[i] * _round(x[i] * inverse, bf16), bf16)
    return out


@njit(inline="always", fastmath=True)
def _add_residual(x, delta, bf16):  # pragma: no cover - compiled
    """``x += delta`` for one row (``delta`` float32 or bf16 words), rounded as PyTorch's residual add rounds."""
    for i in range(x.shape[0]):
        x[i] = _round(x[i] + widen(delta[i]), bf16)


@njit(inline="always", fastmath=True)
def _silu_times(gate, up, bf16):  # pragma: no cover - compiled
    """``silu(gate) * up`` with PyTorch's bf16 roundings (after the SiLU and after the product)."""
    return _round(_round(gate / (np.float32(1.0) + exp32(-gate)), bf16) * up, bf16)


@njit(inline="always", fastmath=True)
def _rotate_and_store(qkv, cos, sin, rotated, keys, values, position, num_heads, bf16):  # pragma: no cover - compiled
    """Rotary (rotate-half) on every q and k head of one row's ``qkv`` (float32 or bf16 words) into
    ``rotated`` (float32 ``[q + kv]``); its rotated key and its value go into the row's cache at ``position``."""
    kv_heads, head_dim = keys.shape[0], keys.shape[2]
    half = head_dim // 2
    q_size, kv_size = num_heads * head_dim, kv_heads * head_dim
    for head in range(num_heads + kv_heads):
        base = head * head_dim
        for d in range(head_dim):
            partner = -widen(qkv[base + d + half]) if d < half else widen(qkv[base + d - half])
            rotated[base + d] = _round(_round(widen(qkv[base + d]) * cos[d], bf16) + _round(partner * sin[d], bf16), bf16)
    for head in range(kv_heads):
        for d in range(head_dim):
            keys[head, position, d] = narrow(rotated[q_size + head * head_dim + d], keys[0, 0, 0])
            values[head, position, d] = narrow(widen(qkv[q_size + kv_size + head * head_dim + d]), values[0, 0, 0])


def _paired_value_sums(values, weights, first, sums):  # pragma: no cover - replaced by the overload below
    """Inside the kernels: ``sums += weights[:n] @ values[first:first + n]`` through
    :func:`~llavakit.core.gemv.weighted_value_sums` where the rows are a multiple of 64 values wide (bf16 words:
    the largest even ``n``; float32: every position), returning ``n``; 0 otherwise, all left to the caller's
    loop."""
    raise NotImplementedError


@overload(_paired_value_sums)
def _paired_value_sums_for(values, weights, first, sums):
    if values.dtype == types.float32:
        def single(values, weights, first, sums):
            if values.shape[1] % 64:
                return 0
            weighted_value_sums(values, first, weights, weights.shape[0], sums)
            return weights.shape[0]
        return single

    def paired(values, weights, first, sums):
        if values.shape[1] % 64:
            return 0
        pairs = weights.shape[0] // 2
        words = np.empty(2 * pairs, np.uint16)
        for i in range(2 * pairs):  # the weights are bf16 values already: exact
            words[i] = narrow(weights[i], words[0])
        weighted_value_sums(values, first, words, pairs, sums)
        return 2 * pairs
    return paired


@njit(inline="always", fastmath=True)
def _attend_head(rotated, keys, values, head, group, first, position, scale, bf16, out):  # pragma: no cover - compiled
    """Query head ``head`` of one row (``rotated``) against its key/value head over cache positions ``first …
    position``, softmax in float32; the result goes to ``out[head * head_dim …]`` (float32 or bf16 words).
    Scores sixteen keys at a time (:func:`~llavakit.core.gemv.key_scores16`) and sums the values with their sums in
    registers (:func:`~llavakit.core.gemv.weighted_value_sums`, bf16 two positions at a time) where the head size
    allows, one by one otherwise."""
    head_dim = keys.shape[2]
    query = rotated[head * head_dim:(head + 1) * head_dim]
    row_keys, row_values = keys[head // group], values[head // group]  # [capacity, head_dim]
    scores = np.empty(position + 1 - first, np.float32)
    top = -np.inf
    start = first
    if head_dim * row_keys.itemsize % 64 == 0:  # sixteen keys at a time (key_scores16), the rest one by one
        query_in = np.empty(head_dim, row_keys.dtype)  # the query as the keys are stored (bf16: exact)
        for d in range(head_dim):
            query_in[d] = narrow(query[d], row_keys[0, 0])
        while start + 16 <= position + 1:
            block = scores[start - first:start - first + 16]
            key_scores16(row_keys, start, query_in, block)
            for j in range(16):
                block[j] *= scale
                top = max(top, block[j])
            start += 16
    for t in range(start, position + 1):
        acc = np.float32(0.0)
        for d in range(head_dim):
            acc += query[d] * widen(row_keys[t, d])
        scores[t - first] = acc * scale
        top = max(top, scores[t - first])
    total = np.float32(0.0)
    for i in range(scores.shape[0]):
        weight = softmax_exp(scores[i] - top)
        total += weight
        # PyTorch's CPU attention kernel multiplies the values by these weights in the input dtype.
        scores[i] = _round(weight, bf16)
    # Position by position along the cached value rows (_paired_value_sums: bf16 two positions at a time, the last
    # odd one alone below).
    sums = np.zeros(head_dim, np.float32)
    for t in range(first + _paired_value_sums(row_values, scores, first, sums), position + 1):
        weight = scores[t - first]
        for d in range(head_dim):
            sums[d] += weight * widen(row_values[t, d])
    for d in range(head_dim):
        out[head * head_dim + d] = narrow(_round(sums[d] / total, bf16), out[0])


@njit(parallel=True, fastmath=True, cache=True)
def decode_layer(x, bf16, eps, scale, num_heads, position, starts, cos, sin, input_norm, w_qkv, w_out,
                 post_norm, w_gate_up, w_down, keys, values):  # pragma: no cover - compiled
    """Advance the hidden states ``x`` (float32 ``[B, hidden]``, updated in place) through one layer at cache
    position ``position``. Row ``b`` has rotary ``cos[b]``/``sin[b]`` (``[B, head_dim]``), writes its key and
    value at ``position`` of ``keys[b]``/``values[b]`` (``[B, kv_heads, capacity, head_dim]``, float32 or bf16
    words) and attends over positions ``starts[b] … position`` (its left padding is skipped)."""
    batch, hidden = x.shape
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    group = num_heads // kv_heads
    q_size = num_heads * head_dim
    kv_size = kv_heads * head_dim

    h = np.empty((batch, hidden), np.float32)
    for b in range(batch):
        h[b] = _rms_norm(x[b], input_norm, eps, bf16)
    qkv = np.empty((batch, matrix_rows(w_qkv)), np.float32)
    h_in = dot_input(h, w_qkv)
    for block in prange((matrix_rows(w_qkv) + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_block(w_qkv, h_in, qkv, block, bf16)

    rotated = np.empty((batch, q_size + kv_size), np.float32)
    for b in range(batch):
        _rotate_and_store(qkv[b], cos[b], sin[b], rotated[b], keys[b], values[b], position, num_heads, bf16)
    attended = np.empty((batch, q_size), np.float32)
    for item in prange(batch * num_heads):
        b = item // num_heads
        head = item - b * num_heads
        _attend_head(rotated[b], keys[b], values[b], head, group, starts[b], position, scale, bf16, attended[b])

    projected = np.empty((batch, hidden), np.float32)
    attended_in = dot_input(attended, w_out)
    for block in prange((matrix_rows(w_out) + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_block(w_out, attended_in, projected, block, bf16)
    for b in range(batch):
        _add_residual(x[b], projected[b], bf16)
        h[b] = _rms_norm(x[b], post_norm, eps, bf16)

    gate_up = np.empty((batch, matrix_rows(w_gate_up)), np.float32)
    h_in = dot_input(h, w_gate_up)
    for block in prange((matrix_rows(w_gate_up) + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_block(w_gate_up, h_in, gate_up, block, bf16)
    inner = matrix_rows(w_gate_up) // 2
    activated = np.empty((batch, inner), np.float32)
    for b in prange(batch):  # a batch's exponentials, on every core
        for i in range(inner):
            activated[b, i] = _silu_times(gate_up[b, i], gate_up[b, inner + i], bf16)
    activated_in = dot_input(activated, w_down)
    for block in prange((matrix_rows(w_down) + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_block(w_down, activated_in, projected, block, bf16)
    for b in range(batch):
        _add_residual(x[b], projected[b], bf16)


@njit(cache=True)
def _argmax(values):  # pragma: no cover - compiled
    """The index of the largest value, the first among equals; a NaN wins (the first NaN), as in ``torch.argmax``.
    Not inlined: the NaN test must not be compiled under the step kernel's fast-math flags, which assume none."""
    best = 0
    for i in range(values.shape[0]):
        if values[i] != values[i]:
            return i
        if values[i] > values[best]:
            best = i
    return best


@njit(parallel=True, fastmath=True, cache=True)
def decode_tokens(tokens, rotary_rows, starts, embedding, layers, keys, values, final_norm, lm_head, cos_table,
                  sin_table, bf16, eps, scale, num_heads, position, logits, best, screen):  # pragma: no cover - compiled
    """A whole decode step in one call: each row's token embedding (``embedding[tokens[b]]``), every layer of
    ``layers`` (a tuple of :func:`decode_layer`'s per-layer arrays, caches in ``keys``/``values``), the final
    RMSNorm and ``lm_head``: the logits into ``logits`` (``[B, V]``, float32 or bf16 words) and each row's argmax
    into ``best`` (``[B]``, the first index among equal maxima, a NaN winning as in ``torch.argmax``); either
    may have no rows. With ``best`` only and a screen of ``lm_head`` (``screen``: the codes and stats of an
    :class:`~llavakit.core.gemv.ArgmaxScreen` and the scratch of :func:`~llavakit.core.gemv.screened_argmax` for
    up to its rows of inputs; codes with no rows for none), the rows' argmax is found through it and the logits
    are never computed. Row ``b`` takes its rotary from row ``rotary_rows[b]`` of the tables. Returns the first row
    whose token is not in the vocabulary (then nothing was computed), or -1. Why one call: the module docstring."""
    batch, hidden = tokens.shape[0], embedding.shape[1]
    for b in range(batch):
        if tokens[b] < 0 or tokens[b] >= embedding.shape[0]:
            return b
    x = np.empty((batch, hidden), np.float32)
    cos = np.empty((batch, cos_table.shape[1]), np.float32)
    sin = np.empty_like(cos)
    for b in range(batch):
        for i in range(hidden):
            x[b, i] = widen(embedding[tokens[b], i])
        cos[b] = cos_table[rotary_rows[b]]
        sin[b] = sin_table[rotary_rows[b]]
    for index in range(len(layers)):
        input_norm, w_qkv, w_out, post_norm, w_gate_up, w_down = layers[index]
        decode_layer(x, bf16, eps, scale, num_heads, position, starts, cos, sin, input_norm, w_qkv, w_out,
                     post_norm, w_gate_up, w_down, keys[index], values[index])
    h = np.empty((batch, hidden), np.float32)
    for b in range(batch):
        h[b] = _rms_norm(x[b], final_norm, eps, bf16)
    h_in = dot_input(h, lm_head)
    codes, stats, block_upper, block_low = screen
    # Every batch goes through the screen: with one bound kept per block of 16 rows (not per row) it pays in bf16
    # too (benchmark model, batch 8, 128 new tokens, medians of 6 alternating: 1671 against 1587 tok/s; float32
    # 1092 against 901), where per-row bounds had cost what the int8 reads saved (4.57 against 4.27 ms a step).
    if logits.shape[0] == 0 and codes.shape[0] and batch <= block_upper.shape[0]:
        screened_argmax(lm_head, h_in, h, bf16, codes, stats, block_upper[:batch], block_low[:batch], best)
        return -1
    scores = np.empty((batch, matrix_rows(lm_head)), np.float32)
    for block in prange((matrix_rows(lm_head) + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_block(lm_head, h_in, scores, block, bf16)
    for b in range(logits.shape[0]):
        for i in range(scores.shape[1]):
            logits[b, i] = narrow(scores[b, i], logits[0, 0])
    for b in prange(best.shape[0]):
        best[b] = _argmax(scores[b])
    return -1


# ---------------------------------------------------------------- larger batches: oneDNN products, glue between
# Past a group of rows (or for bf16 on CPUs without bf16 dot products, past one row) oneDNN's packed products do
# more work per weight load than the loops above, so such a step is four oneDNN products per layer with
# everything between them done by the three kernels below: the ~20 PyTorch operators they replace cost more
# than the products at this size.


@njit(fastmath=True, cache=True)
def residual_norm(x, delta, weight, eps, bf16, out):  # pragma: no cover - compiled
    """``x += delta`` (the residual, rounded as PyTorch rounds it; skipped when ``delta`` is empty), then
    ``out = RMSNorm(x)`` (float32 or bf16 words) for every row of ``x`` (float32 ``[B, hidden]``)."""
    for b in range(x.shape[0]):
        if delta.shape[0]:
            _add_residual(x[b], delta[b], bf16)
        normed = _rms_norm(x[b], weight, eps, bf16)
        for i in range(x.shape[1]):
            out[b, i] = narrow(normed[i], out[0, 0])


@njit(parallel=True, fastmath=True, cache=True)
def attend_rows(qkv, bf16, scale, num_heads, position, starts, cos, sin, keys, values, out):  # pragma: no cover - compiled
    """For every row of ``qkv`` (``[B, q + 2 kv]``, float32 or bf16 words): rotary, the cache write at
    ``position`` and grouped-query attention from ``starts[b]``, as :func:`decode_layer` does, into ``out``
    (``[B, q]``)."""
    batch = qkv.shape[0]
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    rotated = np.empty((batch, (num_heads + kv_heads) * head_dim), np.float32)
    for b in range(batch):
        _rotate_and_store(qkv[b], cos[b], sin[b], rotated[b], keys[b], values[b], position, num_heads, bf16)
    for item in prange(batch * num_heads):
        b = item // num_heads
        _attend_head(rotated[b], keys[b], values[b], item - b * num_heads, num_heads // kv_heads, starts[b], position,
                     scale, bf16, out[b])


@njit(fastmath=True, cache=True)
def silu_gate(gate_up, bf16, out):  # pragma: no cover - compiled
    """``out = silu(gate) * up`` per row, ``gate_up`` being the two halves side by side (float32 or bf16 words)."""
    inner = out.shape[1]
    for b in range(out.shape[0]):
        for i in range(inner):
            out[b, i] = narrow(_silu_times(widen(gate_up[b, i]), widen(gate_up[b, inner + i]), bf16), out[0, 0])


def as_cache_array(tensor: torch.Tensor) -> np.ndarray:
    """A ``[B, Hkv, capacity, D]`` cache tensor as the array :func:`decode_layer` writes: the same float32 /
    bf16-word view the weights get (the cache is contiguous, so it is no copy)."""
    return as_matrix(tensor)

