"""One Llama decoder layer for a batch-1 decode step, as a single numba kernel (float32 or bfloat16).

Why it exists: once the weights stream at memory speed (:mod:`llavakit.core.gemv`), a batch-1 decode step
of a small model is dominated by everything else. On the 2-core Zen 4 machine this project measures on,
the benchmark model's bf16 step took 6.8 ms of which reading the 80 MB of weights was 1.7 ms; the rest was
about 25 small PyTorch operators per layer (norms, rotary, cache writes, attention, activations), each a
dispatch, an allocation and a trip through Python. Here a layer is one call: RMSNorm, the q/k/v products,
rotary, the cache write, grouped-query attention over the cache, the output product, the residual, RMSNorm,
the gate/up products, SiLU, the down product and the residual, with the four matrix products split across
the cores and everything else done in place on vectors of a few hundred floats.

Numerics follow the PyTorch path: sums in float32, and with bf16 weights every value the PyTorch path keeps in
a bf16 tensor (norm outputs, projections, rotated q/k, the cache, the attention output, activations, the
residual stream) is rounded to bf16 at the same point (:func:`~llavakit.core.gemv.round_bf16`). Sums run in
another order than oneDNN's or PyTorch's attention kernels, so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import config as numba_config
from numba import njit, prange, set_num_threads

from llavakit.core.gemv import ROW_BLOCK, as_matrix, gemv_rows, launch_lock, narrow, round_bf16, widen


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


@njit(parallel=True, fastmath=True, cache=True)
def decode_layer(x, bf16, eps, scale, num_heads, position, cos, sin, input_norm, w_qkv, w_out,
                 post_norm, w_gate_up, w_down, keys, values):  # pragma: no cover - compiled
    """Advance the hidden state ``x`` (float32 ``[hidden]``, updated in place) through one layer at cache
    position ``position``; writes that position's key and value into ``keys``/``values`` (``[kv_heads,
    capacity, head_dim]``, float32 or bf16 words) and attends over positions ``0 … position``."""
    kv_heads, _, head_dim = keys.shape
    group = num_heads // kv_heads
    half = head_dim // 2
    q_size = num_heads * head_dim
    kv_size = kv_heads * head_dim
    length = position + 1

    h = _rms_norm(x, input_norm, eps, bf16)
    qkv = np.empty(w_qkv.shape[0], np.float32)
    for block in prange((w_qkv.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_rows(w_qkv, h, qkv, block, bf16)

    # Rotary (rotate-half) on every q and k head; k and v go into the cache.
    rotated = np.empty(q_size + kv_size, np.float32)
    for head in range(num_heads + kv_heads):
        base = head * head_dim
        for d in range(head_dim):
            partner = -qkv[base + d + half] if d < half else qkv[base + d - half]
            rotated[base + d] = _round(_round(qkv[base + d] * cos[d], bf16) + _round(partner * sin[d], bf16), bf16)
    for head in range(kv_heads):
        for d in range(head_dim):
            keys[head, position, d] = narrow(rotated[q_size + head * head_dim + d], keys[0, 0, 0])
            values[head, position, d] = narrow(qkv[q_size + kv_size + head * head_dim + d], values[0, 0, 0])

    # Attention: each query head against its key/value head, softmax in float32.
    attended = np.empty(q_size, np.float32)
    for head in prange(num_heads):
        kv = head // group
        query = rotated[head * head_dim:(head + 1) * head_dim]
        scores = np.empty(length, np.float32)
        top = -np.inf
        for t in range(length):
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += query[d] * widen(keys[kv, t, d])
            scores[t] = acc * scale
            top = max(top, scores[t])
        total = np.float32(0.0)
        for t in range(length):
            weight = np.exp(scores[t] - top)
            total += weight
            # PyTorch's CPU attention kernel multiplies the values by these weights in the input dtype.
            scores[t] = _round(weight, bf16)
        for d in range(head_dim):
            acc = np.float32(0.0)
            for t in range(length):
                acc += scores[t] * widen(values[kv, t, d])
            attended[head * head_dim + d] = _round(acc / total, bf16)

    projected = np.empty(x.shape[0], np.float32)
    for block in prange((w_out.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_rows(w_out, attended, projected, block, bf16)
    for i in range(x.shape[0]):
        x[i] = _round(x[i] + projected[i], bf16)

    h = _rms_norm(x, post_norm, eps, bf16)
    gate_up = np.empty(w_gate_up.shape[0], np.float32)
    for block in prange((w_gate_up.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_rows(w_gate_up, h, gate_up, block, bf16)
    inner = w_gate_up.shape[0] // 2
    activated = np.empty(inner, np.float32)
    for i in range(inner):
        gate = gate_up[i]
        activated[i] = _round(_round(gate / (np.float32(1.0) + np.exp(-gate)), bf16) * gate_up[inner + i], bf16)
    for block in prange((w_down.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_rows(w_down, activated, projected, block, bf16)
    for i in range(x.shape[0]):
        x[i] = _round(x[i] + projected[i], bf16)


def as_cache_array(tensor: torch.Tensor) -> np.ndarray:
    """Row 0 of a ``[B, Hkv, capacity, D]`` cache tensor as the array :func:`decode_layer` writes: the same
    float32 / bf16-word view the weights get (row 0 of the contiguous cache is contiguous, so it is no copy)."""
    return as_matrix(tensor[0])


def run_layers(x: np.ndarray, layers: list[tuple], keys: list[np.ndarray], values: list[np.ndarray], *,
               bf16: bool, eps: float, scale: float, num_heads: int, position: int, cos: np.ndarray,
               sin: np.ndarray) -> None:
    """Every layer of a batch-1 step on ``x`` in place. ``layers`` holds per layer (input norm, qkv, output,
    post norm, gate/up, down) as from :func:`llavakit.core.gemv.as_matrix`, norms as float32 arrays; ``keys``
    and ``values`` the per-layer cache arrays of :func:`as_cache_array`."""
    with launch_lock:
        set_num_threads(max(1, min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)))
        for (input_norm, qkv, out, post_norm, gate_up, down), k, v in zip(layers, keys, values):
            decode_layer(x, bf16, np.float32(eps), np.float32(scale), num_heads, position, cos, sin, input_norm,
                         qkv, out, post_norm, gate_up, down, k, v)
