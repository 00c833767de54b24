"""Batch-1 matrix-vector products for decode steps (float32 and bfloat16 weights), as parallel numba kernels.

Why it exists: a decode step at batch 1 is a chain of matrix-vector products that do nothing but stream the
weights from memory. On the 2-core Zen 4 machine this project measures on, MKL's packed GEMM reads them at
about 20 GB/s and ``F.linear`` at 9–15 GB/s, while this plain loop (rows in blocks of 64 split across the
cores, each row a float32 dot product that LLVM vectorises with AVX-512 FMAs) reads the benchmark model's
65 MB ``lm_head`` at about 44 GB/s and the small per-layer matrices twice as fast as MKL too.

bfloat16 weights are read as 16-bit words and widened to float32 in registers (a bf16 value is the top
half of a float32), so they cost half the bytes; the activations are bf16 values held in float32 and the
result is rounded to bf16 once, as oneDNN's bf16 GEMM does. A bf16 matrix of even width is best read as
32-bit pairs of words (:func:`pair_view`): the low word shifted up and the high word masked in place are
both float32s, so a 64-byte load costs two integer operations and two FMAs instead of a widening move, a
shift and an FMA per 16 words, and the input comes split into its even and odd elements so both products
vectorise without shuffles. Streamed from memory, the benchmark model's 33 MB bf16
``lm_head`` reads at 25-31 GB/s this way against 23-25 GB/s word by word (medians of 40 calls, two runs)
and 14 GB/s through ``F.linear``; its layer-sized matrices at 25-28 GB/s against 20-22.

:func:`gemv_rows` is the loop body, shared with the fused decode-layer kernel of the llama plugin; the
helpers :func:`widen`, :func:`narrow` and :func:`round_bf16` let such kernels read and write bf16 data as
PyTorch rounds it.

The sums are accumulated in float32 in another order than the BLAS libraries', so results agree with
``F.linear`` to rounding, not bit for bit. numba compiles the kernel on first use (about a second) and caches it on
disk. Importing this module imports numba; callers import it only when they pick this path.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from llvmlite import ir
from numba import config as numba_config
from numba import njit, prange, set_num_threads, types
from numba.extending import intrinsic, overload

#: Rows per parallel work item: small enough to balance two cores on a 512-row matrix, large enough that
#: scheduling costs nothing next to the row loads.
ROW_BLOCK = 64
# numba's workqueue threading layer (its fallback where no OpenMP or TBB runtime loads) must not be entered
# from two threads at once; every parallel launch here takes this lock.
launch_lock = threading.Lock()


@intrinsic
def _bits_to_float32(typingctx, bits):  # pragma: no cover - compiled
    """Reinterpret a uint32 as the float32 with those bits (no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _float32_to_bits(typingctx, value):  # pragma: no cover - compiled
    """The bits of a float32 as a uint32 (no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def widen(value):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: a weight or cache element (float32, or bf16 stored as uint16) as a float32."""
    raise NotImplementedError


@overload(widen)
def _widen_for(value):
    """A weight element as float32: itself, or (a bf16 stored as its 16-bit word) the top half of a float32."""
    if value == types.uint16:
        return lambda value: _bits_to_float32(np.uint32(value) << np.uint32(16))
    return lambda value: value


@njit(inline="always")
def round_bf16(value):  # pragma: no cover - compiled
    """A float32 rounded to the nearest bfloat16 (ties to even), still held as a float32: what storing a value
    in a bf16 tensor does. Inside numba kernels, so fused code rounds where PyTorch's bf16 ops would."""
    bits = _float32_to_bits(value)
    bits = np.uint32((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    return _bits_to_float32(bits)


def narrow(value, like):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: a float32 as an element of ``like``'s array (uint16 bf16 words or float32)."""
    raise NotImplementedError


@overload(narrow)
def _narrow_for(value, like):
    if like == types.uint16:
        return lambda value, like: np.uint16(_float32_to_bits(round_bf16(value)) >> np.uint32(16))
    return lambda value, like: value


def row_dot(weight, row, x):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: ``weight[row] · x`` in float32. ``weight`` is float32, bf16 words (uint16), or bf16
    words read as 32-bit pairs (uint32, ``[N, K/2]``); for pairs ``x`` is ``[2, K/2]``, its even elements then
    its odd ones (:func:`pair_input`)."""
    raise NotImplementedError


@overload(row_dot)
def _row_dot_for(weight, row, x):
    if weight.dtype == types.uint32:
        def dot_pairs(weight, row, x):
            acc = np.float32(0.0)
            for j in range(weight.shape[1]):
                pair = weight[row, j]
                acc += (_bits_to_float32(pair << np.uint32(16)) * x[0, j]
                        + _bits_to_float32(pair & np.uint32(0xFFFF0000)) * x[1, j])
            return acc
        return dot_pairs

    def dot(weight, row, x):
        acc = np.float32(0.0)
        for j in range(x.shape[0]):
            acc += widen(weight[row, j]) * x[j]
        return acc
    return dot


def pair_input(x, weight):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: the rows of ``x`` (``[B, K]``) as :func:`row_dot` reads them for ``weight``: as they
    are, or for a pair-read (uint32) weight split into ``[B, 2, K/2]`` even and odd elements."""
    raise NotImplementedError


@overload(pair_input)
def _pair_input_for(x, weight):
    if weight.dtype == types.uint32:
        def split(x, weight):
            out = np.empty((x.shape[0], 2, x.shape[1] // 2), np.float32)
            for b in range(x.shape[0]):
                for j in range(x.shape[1] // 2):
                    out[b, 0, j] = x[b, 2 * j]
                    out[b, 1, j] = x[b, 2 * j + 1]
            return out
        return split
    return lambda x, weight: x


def pair_view(matrix: np.ndarray) -> np.ndarray:
    """A bf16-word matrix of even width as its ``[N, K/2]`` uint32 pairs (no copy), the faster way
    :func:`row_dot` reads bf16 (see the module docstring); any other matrix as it is."""
    if matrix.dtype == np.uint16 and matrix.shape[-1] % 2 == 0 and matrix.flags.c_contiguous:
        return matrix.view(np.uint32)
    return matrix


@njit(inline="always", fastmath=True)
def gemv_rows(weight, x, out, block, bf16):  # pragma: no cover - compiled
    """``out[r] = weight[r] · x`` for the rows of work item ``block`` (``ROW_BLOCK`` rows), summed in float32 and
    rounded to bf16 when ``bf16``: the body of every parallel matrix-vector product here and in fused kernels."""
    stop = min(weight.shape[0], (block + 1) * ROW_BLOCK)
    for row in range(block * ROW_BLOCK, stop):
        acc = row_dot(weight, row, x)
        out[row] = round_bf16(acc) if bf16 else acc


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(weight, x, out):  # pragma: no cover - compiled (one specialisation per weight dtype)
    for block in prange((weight.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_rows(weight, x, out, block, False)


def as_matrix(weight: torch.Tensor) -> np.ndarray:
    """The array :func:`gemv` reads for a float32 or bfloat16 ``[N, K]`` weight (bf16 as its 16-bit words)."""
    weight = weight.detach().contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.int16).numpy().view(np.uint16)
    if weight.dtype != torch.float32:
        raise TypeError(f"gemv reads float32 or bfloat16 weights, got {weight.dtype}")
    return weight.numpy()


def gemv(matrix: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for one row ``x`` (``[1, K]``) and ``matrix = as_matrix(weight)`` or its
    :func:`pair_view` (made here when not given, a view at no cost): a ``[1, N]`` tensor
    in ``x``'s dtype (float32, or bfloat16 for bf16 weights). Runs on ``torch.get_num_threads()`` cores (at
    most numba's)."""
    out = torch.empty((1, matrix.shape[0]), dtype=torch.float32)
    vector = x.reshape(-1).to(torch.float32).contiguous().numpy()
    with launch_lock:
        set_num_threads(max(1, min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)))
        pairs = pair_view(matrix)  # itself if already pairs
        if pairs.dtype == np.uint32:  # the input as its even and odd elements, [2, K/2]
            _gemv(pairs, np.ascontiguousarray(vector.reshape(-1, 2).T), out.numpy()[0])
        else:
            _gemv(matrix, vector, out.numpy()[0])
    return out if x.dtype == torch.float32 else out.to(x.dtype)
