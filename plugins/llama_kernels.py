"""One Llama decoder layer for a decode step of batch 1 or a small batch, as a single numba kernel (float32 or
bfloat16).

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

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from numba import config as numba_config
from numba import njit, prange, set_num_threads

from llavakit.core.gemv import ROW_BLOCK, as_matrix, gemv_rows, launch_lock, narrow, pair_input, round_bf16, widen

#: sha256 of ``core/gemv.py``, whose helpers the kernels below inline. numba keys a disk-cached kernel on the
#: contents of its own file only, so when that file changes this one must change too, or every cache
#: (a developer's, or a user's after an upgrade) keeps running the old code; a test checks it.
GEMV_SOURCE_SHA256 = "c1c6267678b32a9ce1343dbf38b2ddf74c5d15bc935507b4550a7fd5d81fcbba"


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
    return _round(_round(gate / (np.float32(1.0) + np.exp(-gate)), bf16) * up, bf16)


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


@njit(inline="always", fastmath=True)
def _attend_head(rotated, keys, values, head, group, first, position, scale, bf16, out):  # pragma: no cover - compiled
    """Query head ``head`` of one row (``rotated``) against its key/value head over cache positions ``first …
    position``, softmax in float32; the result goes to ``out[head * head_dim …]`` (float32 or bf16 words)."""
    head_dim = keys.shape[2]
    query = rotated[head * head_dim:(head + 1) * head_dim]
    row_keys, row_values = keys[head // group], values[head // group]  # [capacity, head_dim]
    scores = np.empty(position + 1 - first, np.float32)
    top = -np.inf
    for t in range(first, position + 1):
        acc = np.float32(0.0)
        for d in range(head_dim):
            acc += query[d] * widen(row_keys[t, d])
        scores[t - first] = acc * scale
        top = max(top, scores[t - first])
    total = np.float32(0.0)
    for i in range(scores.shape[0]):
        weight = np.exp(scores[i] - top)
        total += weight
        # PyTorch's CPU attention kernel multiplies the values by these weights in the input dtype.
        scores[i] = _round(weight, bf16)
    # Position by position, so the loads run along a cached value row (each output still sums in position order).
    sums = np.zeros(head_dim, np.float32)
    for t in range(first, position + 1):
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
    qkv = np.empty((batch, w_qkv.shape[0]), np.float32)
    h_in = pair_input(h, w_qkv)
    for block in prange((w_qkv.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        for b in range(batch):
            gemv_rows(w_qkv, h_in[b], qkv[b], block, bf16)

    rotated = np.empty((batch, q_size + kv_size), np.float32)
    for b in range(batch):
        _rotate_and_store(qkv[b], cos[b], sin[b], rotated[b], keys[b], values[b], position, num_heads, bf16)
    attended = np.empty((batch, q_size), np.float32)
    for item in prange(batch * num_heads):
        b = item // num_heads
        head = item - b * num_heads
        _attend_head(rotated[b], keys[b], values[b], head, group, starts[b], position, scale, bf16, attended[b])

    projected = np.empty((batch, hidden), np.float32)
    attended_in = pair_input(attended, w_out)
    for block in prange((w_out.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        for b in range(batch):
            gemv_rows(w_out, attended_in[b], projected[b], block, bf16)
    for b in range(batch):
        _add_residual(x[b], projected[b], bf16)
        h[b] = _rms_norm(x[b], post_norm, eps, bf16)

    gate_up = np.empty((batch, w_gate_up.shape[0]), np.float32)
    h_in = pair_input(h, w_gate_up)
    for block in prange((w_gate_up.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        for b in range(batch):
            gemv_rows(w_gate_up, h_in[b], gate_up[b], block, bf16)
    inner = w_gate_up.shape[0] // 2
    activated = np.empty((batch, inner), np.float32)
    for b in range(batch):
        for i in range(inner):
            activated[b, i] = _silu_times(gate_up[b, i], gate_up[b, inner + i], bf16)
    activated_in = pair_input(activated, w_down)
    for block in prange((w_down.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        for b in range(batch):
            gemv_rows(w_down, activated_in[b], projected[b], block, bf16)
    for b in range(batch):
        _add_residual(x[b], projected[b], bf16)


# ---------------------------------------------------------------- batches: oneDNN products, fused glue between them
# From batch 2 on, oneDNN's packed products beat these loops (at batch 8 they reach the compute a few vectors
# need; its bf16 products use the CPU's bf16 dot-product instructions), so a step of a small batch is four
# oneDNN products per layer with everything between them done by the three serial kernels below: the ~20
# PyTorch operators they replace cost more than the products at this size.


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


@contextlib.contextmanager
def kernel_threads() -> Iterator[None]:
    """Hold numba's launch lock (its workqueue threading layer must not be entered from two threads at once) with
    as many numba threads as torch uses, for a run of parallel kernel calls."""
    with launch_lock:
        set_num_threads(max(1, min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)))
        yield


def as_cache_array(tensor: torch.Tensor) -> np.ndarray:
    """A ``[B, Hkv, capacity, D]`` cache tensor as the array :func:`decode_layer` writes: the same float32 /
    bf16-word view the weights get (the cache is contiguous, so it is no copy)."""
    return as_matrix(tensor)


def run_layers(x: np.ndarray, layers: list[tuple], keys: list[np.ndarray], values: list[np.ndarray], *,
               bf16: bool, eps: float, scale: float, num_heads: int, position: int, starts: np.ndarray,
               cos: np.ndarray, sin: np.ndarray) -> None:
    """Every layer of a decode step on ``x`` (``[B, hidden]``) in place. ``layers`` holds per layer (input norm,
    qkv, output, post norm, gate/up, down), the matrices as from :func:`llavakit.core.gemv.as_matrix` (bf16
    ones best through :func:`~llavakit.core.gemv.pair_view`, as the llama plugin packs them), norms as float32
    arrays; ``keys`` and ``values`` the per-layer cache arrays of :func:`as_cache_array`; ``starts`` (int64
    ``[B]``) each row's first attended position."""
    with kernel_threads():
        for (input_norm, qkv, out, post_norm, gate_up, down), k, v in zip(layers, keys, values):
            decode_layer(x, bf16, np.float32(eps), np.float32(scale), num_heads, position, starts, cos, sin,
                         input_norm, qkv, out, post_norm, gate_up, down, k, v)
