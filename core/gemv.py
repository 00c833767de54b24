"""Matrix-vector products for decode steps (float32 and bfloat16 weights, a batch of up to a few rows), the
exact argmax of one, and float32 products of many rows for prefills (:func:`matmul`), as parallel numba kernels.

Why it exists: a decode step at batch 1 is a chain of matrix-vector products that do nothing but stream the
weights from memory. On the 2-core Zen 4 machine this project measures on, MKL's packed GEMM reads them at
about 20 GB/s, oneDNN's at 24 GB/s (bf16) and ``F.linear`` at 9-15 GB/s; the loops here read the benchmark
model's ``lm_head`` at 30 GB/s (float32) and 34 GB/s (bf16), and at batch 8 keep up with oneDNN.

Layout (:func:`blocked_layout`, picked by :func:`fast_layout`): the weights are copied once into blocks of 16
rows in which each 64-byte line holds one column (float32) or one pair of columns (bf16) of those rows. One
load then meets the matching input element, broadcast, in one FMA, or in one ``vdpbf16ps`` where the CPU has
AVX512-BF16 (two exact bf16 products summed into each of 16 float32 lanes): lane ``r`` accumulates row ``r``
and no horizontal sums are needed, which in a row-major layout cost about a third of the instructions at
batch 8. A batch's rows share every load (:data:`GROUP` at a time). Every row of a batch gets the same
sequence of operations as a row alone, so batched outputs equal single ones bit for bit. Without AVX512-BF16
a bf16 matrix stays row-major, read as 32-bit pairs of words (:func:`pair_view`: the low word shifted up and
the high word masked in place are both float32s, so both products vectorise without shuffles).

Activations of a bf16 model are bf16 values, and each output is rounded to bf16 once, as oneDNN's bf16 GEMM
does; the sums run in float32 in another order than the BLAS libraries', so results agree with ``F.linear``
to rounding, not bit for bit.

:class:`ArgmaxScreen` and :func:`screened_argmax` find the largest output exactly while reading an int8 copy
of the matrix instead of the matrix itself (see the section below): what a greedy decode step needs of
``lm_head``.

:func:`gemv_block` and :func:`row_value` are the loop bodies, shared with the fused decode-step kernel of the
llama plugin; :func:`widen`, :func:`narrow` and :func:`round_bf16` let such kernels read and write bf16 data as
PyTorch rounds it. numba compiles the kernels on first use and caches them on disk. Importing this module
imports numba; callers import it only when they pick this path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
from llvmlite import binding, ir
from numba import config as numba_config
from numba import njit, prange, set_num_threads, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

#: Rows per parallel work item: small enough to balance two cores on a 512-row matrix, large enough that
#: scheduling costs nothing next to the row loads.
ROW_BLOCK = 64
# numba's workqueue threading layer (its fallback where no OpenMP or TBB runtime loads) must not be entered
# from two threads at once; every parallel launch takes this lock (through :func:`kernel_threads`).
launch_lock = threading.Lock()


@contextlib.contextmanager
def kernel_threads() -> Iterator[None]:
    """Hold numba's launch lock with as many numba threads as torch uses, for a run of parallel kernel calls
    (here, and in the plugins' fused kernels)."""
    with launch_lock:
        set_num_threads(max(1, min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)))
        yield


def _compiles_for(feature: str) -> bool:
    """Whether numba compiles for a CPU with ``feature`` (an LLVM feature name): the host's, or those of the target
    named by ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` (set for portable caches; it must then be listed)."""
    if numba_config.CPU_NAME or numba_config.CPU_FEATURES:
        return f"+{feature}" in (numba_config.CPU_FEATURES or "")
    return bool(binding.get_host_cpu_features().get(feature, False))


#: bf16 rows are read with the bf16 dot-product instruction (see the module docstring); decided once, at import.
BF16_DOT = _compiles_for("avx512bf16")
#: :class:`ArgmaxScreen` reads its int8 rows with the AVX512-VNNI byte dot-product instruction; without it there
#: is no screen (a plain loop would not read int8 faster than the weights themselves).
BYTE_DOT = _compiles_for("avx512vnni")
#: :func:`softmax_row` scales by ``2^n`` with ``vscalefps`` (AVX-512F); without it, by the power built from its bits.
SCALEF = _compiles_for("avx512f")


class _BFloat16(ir.Type):
    """LLVM's ``bfloat`` type, which llvmlite's IR builder does not name (it only needs the text)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat16)

    def __hash__(self):
        return hash("bfloat")


_LANES = ir.VectorType(ir.FloatType(), 16)
_WORDS = ir.VectorType(_BFloat16(), 32)
_INT_LANES = ir.VectorType(ir.IntType(32), 16)
#: Rows of a blocked matrix (:func:`blocked_layout`) that one 64-byte load covers: a float32 column, or a bf16 pair
#: of columns, of 16 consecutive rows.
BLOCK_ROWS = 16
#: Inputs one weight load is multiplied with (a batch step's rows, eight at a time).
GROUP = 8
#: How far ahead of its loads a batch's product asks for weights (software prefetch, into L2: see
#: :data:`PREFETCH_LOCALITY`). With 8 inputs per load a core spends long enough on each line that the hardware
#: prefetcher falls behind, and the products no longer overlap their memory reads: the benchmark model's bf16
#: weights (80 MB) took 1.43 ms of dot products plus 2.3 ms of reads, about their sum. Prefetched 16 KB ahead
#: into L2 the reads overlap: 3.0-3.1 against 5.0-5.5 ms for all of them at batch 8 (medians of 20 alternating
#: rounds, 1536 bytes ahead into L1 before; best 2.1 ms, what one row takes). One row streams at 34 GB/s
#: without any.
PREFETCH_BYTES = 16384
#: ``llvm.prefetch``'s locality for those reads: 2 (``prefetcht1``, to L2). A prefetch to L1 (``prefetcht0``, or
#: ``prefetchnta``) holds one of the core's few L1 miss buffers for a whole trip to memory, which caps how many
#: can be in flight: on Zen 4 those ran at 14-16 GB/s whatever the distance, the L2 ones at 24-27.
PREFETCH_LOCALITY = 2


def _bf16_dot(builder):  # pragma: no cover - compiled
    """``vdpbf16ps`` on 512-bit vectors (16 float32 lanes += 32 bf16 words · 32 bf16 words, pairwise)."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_LANES, [_LANES, _WORDS, _WORDS]),
                                          "llvm.x86.avx512bf16.dpbf16ps.512")


def _fma16(builder):  # pragma: no cover - compiled
    """A 16-lane float32 fused multiply-add, ``fma(a, b, c) = a * b + c``."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_LANES, [_LANES] * 3), "llvm.fma.v16f32")


def _open_loop(builder, entry, limit, count, body, exit):  # pragma: no cover - compiled
    """At a loop's head block: a counter from 0 and ``count`` float32 vector accumulators from zero (both coming
    from ``entry``), then the branch into ``body`` while the counter is below ``limit``, else to ``exit``. Returns
    the counter and the accumulators; :func:`_close_loop` ends the body."""
    i64 = ir.IntType(64)
    counter = builder.phi(i64)
    counter.add_incoming(ir.Constant(i64, 0), entry)
    accumulators = [builder.phi(_LANES) for _ in range(count)]
    for phi in accumulators:
        phi.add_incoming(ir.Constant(_LANES, [0.0] * 16), entry)
    builder.cbranch(builder.icmp_signed("<", counter, limit), body, exit)
    builder.position_at_end(body)
    return counter, accumulators


def _close_loop(builder, head, counter, accumulators, updated):  # pragma: no cover - compiled
    """End a loop body opened by :func:`_open_loop`: the counter plus one and the ``updated`` accumulators go back
    to ``head``."""
    body = builder.block
    counter.add_incoming(builder.add(counter, ir.Constant(ir.IntType(64), 1)), body)
    for phi, value in zip(accumulators, updated):
        phi.add_incoming(value, body)
    builder.branch(head)


def _emit_block_dots(context, builder, signature, args, rows_of_x, accumulate=False):  # pragma: no cover
    """LLVM IR storing ``lanes[i] = blocks[block] · xs[first + i]`` (16 rows' outputs) for ``i < rows_of_x``.

    ``blocks`` is a blocked matrix (:func:`blocked_layout`): each 64-byte load is one column (float32) or one
    pair of columns (bf16 words) of 16 rows, which meets the matching input element (pair), broadcast, in one
    FMA (or ``vdpbf16ps``: two exact products into each of 16 float32 lanes). Blocked int8 codes
    (:class:`ArgmaxScreen`) hold four columns per lane and meet four uint8 inputs in ``vpdpbusd``, summed
    exactly in int32 (products of at most 255 * 127: no overflow below 66,000 columns). No horizontal sums:
    lane ``r`` is row ``r``'s output. Per input, columns alternate between two accumulators, added at the end, so every
    input (and any ``rows_of_x``) gets the same order: a row of a batch gets the bits it gets alone.

    With ``accumulate`` (:func:`_block_dots8_into`) the arguments carry a first column (``start``) before the count,
    the sums start from the values in ``lanes`` instead of zero, and nothing is prefetched: a many-row product's
    slice of columns, whose weights sit in L1."""
    i32, i64, byte = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
    if accumulate:
        args, arg_types = list(args), list(signature.args)
        start = context.cast(builder, args.pop(4), arg_types.pop(4), types.int64)
    else:
        arg_types, start = signature.args, ir.Constant(i64, 0)
    blocks_type, xs_type, lanes_type = arg_types[0], arg_types[2], arg_types[5]
    blocks = context.make_array(blocks_type)(context, builder, args[0])
    inputs = context.make_array(xs_type)(context, builder, args[2])
    lanes = context.make_array(lanes_type)(context, builder, args[5])
    block = context.cast(builder, args[1], arg_types[1], types.int64)
    first = context.cast(builder, args[3], arg_types[3], types.int64)
    count = context.cast(builder, args[4], arg_types[4], types.int64)
    block_start = builder.gep(builder.bitcast(blocks.data, byte),
                              [builder.add(builder.mul(block, builder.extract_value(blocks.strides, 0)),
                                           builder.mul(start, ir.Constant(i64, 64)))])
    x_stride = builder.extract_value(inputs.strides, 0)
    x_base = builder.gep(builder.bitcast(inputs.data, byte), [builder.mul(start, ir.Constant(i64, 4))])
    x_starts = [builder.gep(x_base, [builder.mul(builder.add(first, ir.Constant(i64, i)), x_stride)])
                for i in range(rows_of_x)]
    accumulator = _LANES
    if blocks_type.dtype == types.uint16:
        weight_type, element = _WORDS, i32  # a pair of bf16 words, read as one 32-bit element
        dot = _bf16_dot(builder)
        multiply_add = lambda acc, w, v: builder.call(dot, [acc, w, builder.bitcast(v, _WORDS)])  # noqa: E731
    elif blocks_type.dtype == types.int8:  # four int8 codes per lane against four uint8 inputs, summed exactly
        weight_type = accumulator = _INT_LANES
        element = i32
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_INT_LANES, [_INT_LANES] * 3),
                                             "llvm.x86.avx512.vpdpbusd.512")
        multiply_add = lambda acc, w, v: builder.call(dot, [acc, v, w])  # noqa: E731  (unsigned input first)
    else:
        weight_type, element = _LANES, ir.FloatType()
        fma = _fma16(builder)
        multiply_add = lambda acc, w, v: builder.call(fma, [w, v, acc])  # noqa: E731
    splat_type = ir.VectorType(element, 16)

    def step(accumulators, column):
        address = builder.gep(block_start, [builder.mul(column, ir.Constant(i64, 64))])
        if rows_of_x > 1 and not accumulate:  # a batch: weights asked for ahead, into L2 (see PREFETCH_BYTES)
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]), "llvm.prefetch.p0")
            builder.call(prefetch, [builder.gep(address, [ir.Constant(i64, PREFETCH_BYTES)]), ir.Constant(i32, 0),
                                    ir.Constant(i32, PREFETCH_LOCALITY), ir.Constant(i32, 1)])
        w = builder.load(builder.bitcast(address, weight_type.as_pointer()), align=4)
        out = []
        for acc, x_start in zip(accumulators, x_starts):
            value = builder.load(builder.bitcast(builder.gep(x_start, [builder.mul(column, ir.Constant(i64, 4))]),
                                                 element.as_pointer()), align=2)
            splat = builder.insert_element(ir.Constant(splat_type, None), value, ir.Constant(i32, 0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(i32, 16), [0] * 16))
            out.append(multiply_add(acc, w, splat))
        return out

    zero = ir.Constant(accumulator, [0 if accumulator is _INT_LANES else 0.0] * 16)
    lanes_start = builder.bitcast(lanes.data, byte)
    lanes_stride = builder.extract_value(lanes.strides, 0)
    lane_rows = [builder.bitcast(builder.gep(lanes_start, [builder.mul(ir.Constant(i64, i), lanes_stride)]),
                                 accumulator.as_pointer()) for i in range(rows_of_x)]
    initial = [builder.load(row, align=4) for row in lane_rows] if accumulate else [zero] * rows_of_x
    entry = builder.block
    head, body, tail, last, done = (builder.append_basic_block(f"blockdot.{name}")
                                    for name in ("head", "body", "tail", "last", "done"))
    builder.branch(head)
    builder.position_at_end(head)  # two columns per turn while two remain
    column = builder.phi(i64)
    firsts = [builder.phi(accumulator) for _ in x_starts]
    seconds = [builder.phi(accumulator) for _ in x_starts]
    column.add_incoming(ir.Constant(i64, 0), entry)
    for phi, value in zip(firsts + seconds, initial + [zero] * rows_of_x):
        phi.add_incoming(value, entry)
    builder.cbranch(builder.icmp_signed("<", builder.add(column, ir.Constant(i64, 1)), count), body, tail)
    builder.position_at_end(body)
    firsts_next = step(firsts, column)
    seconds_next = step(seconds, builder.add(column, ir.Constant(i64, 1)))
    column.add_incoming(builder.add(column, ir.Constant(i64, 2)), body)
    for phi, value in zip(firsts + seconds, firsts_next + seconds_next):
        phi.add_incoming(value, body)
    builder.branch(head)
    builder.position_at_end(tail)  # an odd column left over
    builder.cbranch(builder.icmp_signed("<", column, count), last, done)
    builder.position_at_end(last)
    firsts_last = step(firsts, column)
    builder.branch(done)
    builder.position_at_end(done)
    totals = [builder.phi(accumulator) for _ in x_starts]  # every phi first, as LLVM requires
    for total, first_acc, first_last in zip(totals, firsts, firsts_last):
        total.add_incoming(first_acc, tail)
        total.add_incoming(first_last, last)
    for row, total, second in zip(lane_rows, totals, seconds):
        total = builder.add(total, second) if accumulator is _INT_LANES else builder.fadd(total, second)
        builder.store(total, row, align=4)
    return context.get_dummy_value()


@intrinsic
def _block_dot(typingctx, blocks, block, xs, first, columns, lanes):  # pragma: no cover - compiled
    """``lanes[0] = blocks[block] · xs[first]`` over ``columns`` 64-byte columns (:func:`_emit_block_dots`)."""
    def codegen(context, builder, signature, args):
        return _emit_block_dots(context, builder, signature, args, 1)

    return types.none(blocks, block, xs, first, columns, lanes), codegen


@intrinsic
def _block_dots8(typingctx, blocks, block, xs, first, columns, lanes):  # pragma: no cover - compiled
    """``lanes[i] = blocks[block] · xs[first + i]`` for 8 inputs, each weight load used 8 times."""
    def codegen(context, builder, signature, args):
        return _emit_block_dots(context, builder, signature, args, GROUP)

    return types.none(blocks, block, xs, first, columns, lanes), codegen


@intrinsic
def _block_dots8_into(typingctx, blocks, block, xs, first, start, columns, lanes):  # pragma: no cover - compiled
    """``lanes[i] += blocks[block][start:start + columns] · xs[first + i][start:start + columns]`` for 8 inputs."""
    def codegen(context, builder, signature, args):
        return _emit_block_dots(context, builder, signature, args, GROUP, accumulate=True)

    return types.none(blocks, block, xs, first, start, columns, lanes), codegen


def _reduce_lanes16(builder, vectors):  # pragma: no cover - compiled
    """Sixteen 16-lane float32 vectors to one whose lane ``j`` is the sum of vector ``j``'s lanes: four levels of
    pairwise shuffles and adds (30 shuffles, 15 adds, where sixteen separate reductions take 64 of each), then
    the one shuffle that undoes the levels' bit-reversed order."""
    i32 = ir.IntType(32)
    for width in (8, 4, 2, 1):
        low, high = [], []
        for g in range(0, 16 // width, 2):
            low += [g * width + i for i in range(width)] + [16 + g * width + i for i in range(width)]
            high += [(g + 1) * width + i for i in range(width)] + [16 + (g + 1) * width + i for i in range(width)]
        vectors = [builder.fadd(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 16), low)),
                                builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 16), high)))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
    (total,) = vectors
    order = [int(f"{lane:04b}"[::-1], 2) for lane in range(16)]
    return builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, 16), order))


@intrinsic
def key_scores16(typingctx, keys, first, query, out):  # pragma: no cover - compiled
    """``out[j] = keys[first + j] · query`` for ``j < 16`` (float32 sums): sixteen cached keys (rows of ``keys``,
    float32, or bf16 words with ``query`` as bf16 words too) against one query, their row width a multiple of 64
    bytes. Each key row meets the query 64 bytes at a time in one FMA or ``vdpbf16ps`` into its own 16 lanes,
    and :func:`_reduce_lanes16` sums all sixteen at once: a decode step's attention scores over a long cache,
    where one key at a time spent most of its instructions on horizontal sums."""
    def codegen(context, builder, signature, args):
        i64, byte = ir.IntType(64), ir.IntType(8).as_pointer()
        keys_type, query_type, out_type = signature.args[0], signature.args[2], signature.args[3]
        key_rows = context.make_array(keys_type)(context, builder, args[0])
        query_array = context.make_array(query_type)(context, builder, args[2])
        out_array = context.make_array(out_type)(context, builder, args[3])
        first_row = context.cast(builder, args[1], signature.args[1], types.int64)
        row_stride = builder.extract_value(key_rows.strides, 0)
        row_bytes = builder.mul(builder.extract_value(key_rows.shape, 1),
                                ir.Constant(i64, keys_type.dtype.bitwidth // 8))
        chunks = builder.udiv(row_bytes, ir.Constant(i64, 64))
        base = builder.gep(builder.bitcast(key_rows.data, byte), [builder.mul(first_row, row_stride)])
        query_base = builder.bitcast(query_array.data, byte)
        if keys_type.dtype == types.uint16:
            vector_type, dot = _WORDS, _bf16_dot(builder)
            multiply_add = lambda acc, k, q: builder.call(dot, [acc, k, q])  # noqa: E731
        else:
            vector_type, fma = _LANES, _fma16(builder)
            multiply_add = lambda acc, k, q: builder.call(fma, [k, q, acc])  # noqa: E731
        entry = builder.block
        head, body, done = (builder.append_basic_block(f"keyscores.{name}") for name in ("head", "body", "done"))
        builder.branch(head)
        builder.position_at_end(head)
        chunk, accumulators = _open_loop(builder, entry, chunks, 16, body, done)
        offset = builder.mul(chunk, ir.Constant(i64, 64))
        q = builder.load(builder.bitcast(builder.gep(query_base, [offset]), vector_type.as_pointer()), align=4)
        updated = []
        for j, acc in enumerate(accumulators):
            row = builder.gep(base, [builder.add(builder.mul(ir.Constant(i64, j), row_stride), offset)])
            k = builder.load(builder.bitcast(row, vector_type.as_pointer()), align=4)
            updated.append(multiply_add(acc, k, q))
        _close_loop(builder, head, chunk, accumulators, updated)
        builder.position_at_end(done)
        scores = _reduce_lanes16(builder, accumulators)
        builder.store(scores, builder.bitcast(out_array.data, _LANES.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(keys, first, query, out), codegen


@intrinsic
def weighted_value_sums(typingctx, values, first, weights, steps, out):  # pragma: no cover - compiled
    """``out[d] += sum over t < n of weights[t] * values[first + t, d]`` (``out`` float32, rows of ``values`` a
    multiple of 64 values wide): a decode step's attention output over a long cache, the 64 sums of a slice of
    every row kept in registers. bf16 words (``weights`` too), ``n = 2 * steps``: two rows' 32-value slices are
    interleaved by one shuffle each into (row t, row t + 1) pairs, which meet the pair of weights, broadcast,
    in one ``vdpbf16ps`` (two exact products into each of 16 float32 lanes), a quarter of the instructions of
    widening every value for its own FMA. float32, ``n = steps``: one FMA per 16 values and position."""
    def codegen(context, builder, signature, args):
        i32, i64, byte = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        values_type, weights_type, out_type = signature.args[0], signature.args[2], signature.args[4]
        rows = context.make_array(values_type)(context, builder, args[0])
        weight_array = context.make_array(weights_type)(context, builder, args[2])
        out_array = context.make_array(out_type)(context, builder, args[4])
        first_row = context.cast(builder, args[1], signature.args[1], types.int64)
        count = context.cast(builder, args[3], signature.args[3], types.int64)
        row_stride = builder.extract_value(rows.strides, 0)
        groups = builder.udiv(builder.extract_value(rows.shape, 1), ir.Constant(i64, 64))
        words = values_type.dtype == types.uint16
        group_bytes = 128 if words else 256
        base = builder.gep(builder.bitcast(rows.data, byte), [builder.mul(first_row, row_stride)])
        weight_base = builder.bitcast(weight_array.data, byte)
        out_base = builder.bitcast(out_array.data, byte)
        dot, fma = _bf16_dot(builder), _fma16(builder)
        splat_type = ir.VectorType(i32, 16)
        interleave = [[half * 16 + i + 32 * side for i in range(16) for side in (0, 1)] for half in (0, 1)]
        entry = builder.block
        outer, inner_head, inner_body, inner_done, done = (
            builder.append_basic_block(f"valuesums.{name}") for name in ("outer", "head", "body", "store", "done"))
        builder.branch(outer)
        builder.position_at_end(outer)  # one group of 64 values (128 bytes of a row) at a time
        group = builder.phi(i64)
        group.add_incoming(ir.Constant(i64, 0), entry)
        builder.cbranch(builder.icmp_signed("<", group, groups), inner_head, done)
        builder.position_at_end(inner_head)
        pair, accumulators = _open_loop(builder, outer, count, 4, inner_body, inner_done)
        rows_per_step = 2 if words else 1
        row = builder.gep(base, [builder.add(builder.mul(builder.mul(pair, ir.Constant(i64, rows_per_step)),
                                                         row_stride),
                                             builder.mul(group, ir.Constant(i64, group_bytes)))])
        weight = builder.load(builder.bitcast(builder.gep(weight_base, [builder.mul(pair, ir.Constant(i64, 4))]),
                                              i32.as_pointer()), align=2)  # a bf16 pair, or one float32
        splat = builder.insert_element(ir.Constant(splat_type, None), weight, ir.Constant(i32, 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(splat_type, [0] * 16))
        updated = []
        if words:
            splat = builder.bitcast(splat, _WORDS)
            following = builder.gep(row, [row_stride])
            for line in (0, 1):
                a = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, 64 * line)]), _WORDS.as_pointer()),
                                 align=2)
                b = builder.load(builder.bitcast(builder.gep(following, [ir.Constant(i64, 64 * line)]),
                                                 _WORDS.as_pointer()), align=2)
                for half in (0, 1):
                    pairs_of_rows = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 32), interleave[half]))
                    updated.append(builder.call(dot, [accumulators[2 * line + half], pairs_of_rows, splat]))
        else:
            splat = builder.bitcast(splat, _LANES)
            for line in range(4):
                v = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, 64 * line)]), _LANES.as_pointer()),
                                 align=4)
                updated.append(builder.call(fma, [v, splat, accumulators[line]]))
        _close_loop(builder, inner_head, pair, accumulators, updated)
        builder.position_at_end(inner_done)  # add the 64 sums into out[group * 64 …]
        for index, acc in enumerate(accumulators):
            address = builder.bitcast(builder.gep(out_base, [builder.add(builder.mul(group, ir.Constant(i64, 256)),
                                                                          ir.Constant(i64, 64 * index))]),
                                      _LANES.as_pointer())
            builder.store(builder.fadd(builder.load(address, align=4), acc), address, align=4)
        group.add_incoming(builder.add(group, ir.Constant(i64, 1)), inner_done)
        builder.branch(outer)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.none(values, first, weights, steps, out), codegen


@intrinsic
def bits_to_float32(typingctx, bits):  # pragma: no cover - compiled
    """Reinterpret a uint32 as the float32 with those bits (no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def fma32(typingctx, a, b, c):  # pragma: no cover - compiled
    """``a * b + c`` in float32 with one rounding (LLVM's ``fma``, which vectorises), and never reassociated by
    the fast-math flags of the kernel it is inlined into: for reductions whose order carries the accuracy."""
    def codegen(context, builder, signature, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3),
                                             "llvm.fma.f32")
        return builder.call(fma, list(args))

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def float32_to_bits(typingctx, value):  # pragma: no cover - compiled
    """The bits of a float32 as a uint32 (no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(inline="always", fastmath=True)
def exp_reduced(x, n):  # pragma: no cover - compiled
    """``exp(x - n ln2)`` for the integer-valued float32 ``n`` nearest ``x / ln2``: Cephes' expf polynomial on
    ``r = x - n ln2`` (``|r| <= ln2 / 2``), the part :func:`exp32` and the attention kernel's softmax share; each
    scales it by ``2^n`` its own way."""
    # r = x - n ln2 in two exact steps; fused multiply-adds, which fast-math cannot fold into one rounded step.
    r = fma32(-n, np.float32(-2.12194440e-4), fma32(-n, np.float32(0.693359375), x))
    p = fma32(np.float32(1.9875691500e-4), r, np.float32(1.3981999507e-3))
    p = fma32(p, r, np.float32(8.3334519073e-3))
    p = fma32(p, r, np.float32(4.1665795894e-2))
    p = fma32(p, r, np.float32(1.6666665459e-1))
    p = fma32(p, r, np.float32(5.0000001201e-1))
    return fma32(p * r, r, r) + np.float32(1.0)


@njit(inline="always", fastmath=True)
def exp32(x):  # pragma: no cover - compiled
    """``exp(x)`` in float32 to within 1 ulp (Cephes' expf: ``2^n exp(r)`` with ``|r| <= ln2 / 2``), as plain
    arithmetic: unlike a call into libm it vectorises, which made a batch-8 decode step's SiLUs and softmaxes
    (some 100k exponentials) 10x cheaper; the CPU attention kernel's softmaxes run on it too. Overflows to inf
    above 88.72, underflows through the denormals to 0."""
    n = np.floor(min(max(x, np.float32(-104.0)), np.float32(88.8)) * np.float32(1.44269504088896341) + np.float32(0.5))
    y = exp_reduced(x, n)
    # 2^n as two powers of two of half its size each, so that n from -150 to 128 scales without overflow.
    k = np.int32(n)
    y = y * np.float32(2.0) if k > 127 else y
    k = k - 1 if k > 127 else k
    half = k // 2
    y = y * bits_to_float32(np.uint32((half + 127) << 23)) * bits_to_float32(np.uint32((k - half + 127) << 23))
    if x > np.float32(88.72283):
        return np.float32(np.inf)
    return np.float32(0.0) if x < np.float32(-103.97) else y


@njit(inline="always", fastmath=True)
def softmax_exp(x):  # pragma: no cover - compiled
    """``exp(x)`` for a softmax's ``x = score - max <= 0``: :func:`exp32`'s polynomial (the same bits wherever the
    result is a normal float32) without its overflow path, and 0 below 2^-126, where ``exp32`` would go on through
    the denormals. Those are below a float32 sum's resolution next to the max's exp(0) = 1, and ``vdpbf16ps``
    reads bf16 denormals as 0 anyway. A third of ``exp32``'s cost, without its branches: it vectorises, which
    matters for the prefill kernel's 22 million a layer and a long cache's decode steps."""
    clamped = np.float32(-87.5) if x < np.float32(-87.5) else x
    n = np.floor(clamped * np.float32(1.44269504088896341) + np.float32(0.5))
    scale = bits_to_float32(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))  # 2^n, n >= -126
    y = exp_reduced(clamped, n) * scale
    return np.float32(0.0) if x < np.float32(-87.33654) else y


@intrinsic
def softmax_row(typingctx, scores, seen, scale, shift, out):  # pragma: no cover - compiled
    """``out[i] = softmax_exp(fma(scores[i], scale, shift))`` for ``i < seen``, rounded to ``out``'s dtype (bf16
    words, ties to even, or float32), and 0 for the rest of the last 16 ``out[i]``; returns the float32 sum of the
    unrounded exponentials (16 lanes, summed across once at the end). Both rows must have room for ``seen``
    rounded up to 16 (the tail is read and written whole, its lanes past ``seen`` masked to 0).

    The exponential is :func:`softmax_exp`'s (the same clamp, reduction and polynomial) with two instructions where
    numba's vectorised loop spent ten: ``vscalefps`` scales by ``2^n`` (exact, as the integer construction of the
    power is, which CPUs without AVX-512 get instead: :data:`SCALEF`), and ``vcvtneps2bf16`` rounds to bf16 (as
    :func:`round_bf16` does); the row's tail is one masked line where numba's loop (64 at a time) left up to 63
    keys of every row to narrower epilogues. The prefill attention kernel's softmaxes are 22 million exponentials
    a layer of the benchmark prompt: 0.28 against 0.38 ns a key in bf16 on one core, the same in float32."""
    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        int_lanes = ir.VectorType(i32, 16)

        def broadcast(value, vector_type):
            first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(first, first, ir.Constant(int_lanes, [0] * 16))

        def splat(value):
            return ir.Constant(_LANES, [value] * 16)

        def declare(name, result, *arguments):
            return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, list(arguments)), name)

        scores_array = context.make_array(signature.args[0])(context, builder, args[0])
        out_array = context.make_array(signature.args[4])(context, builder, args[4])
        count = context.cast(builder, args[1], signature.args[1], types.int64)
        scale, shift = broadcast(args[2], _LANES), broadcast(args[3], _LANES)
        bf16 = signature.args[4].dtype == types.uint16
        stored_type = ir.VectorType(_BFloat16(), 16) if bf16 else _LANES
        source = builder.bitcast(scores_array.data, _LANES.as_pointer())
        target = builder.bitcast(out_array.data, stored_type.as_pointer())
        fma = _fma16(builder)
        floor = declare("llvm.floor.v16f32", _LANES, _LANES)
        if SCALEF:
            scalef = declare("llvm.x86.avx512.mask.scalef.ps.512", _LANES, _LANES, _LANES, _LANES, ir.IntType(16), i32)
        reduce = declare("llvm.vector.reduce.fadd.v16f32", ir.FloatType(), ir.FloatType(), _LANES)
        lanes_index = ir.Constant(int_lanes, list(range(16)))
        lines = builder.sdiv(builder.add(count, ir.Constant(i64, 15)), ir.Constant(i64, 16))
        entry = builder.block
        head, body, done = (builder.append_basic_block(f"softmaxrow.{name}") for name in ("head", "body", "done"))
        builder.branch(head)
        builder.position_at_end(head)
        line, (total,) = _open_loop(builder, entry, lines, 1, body, done)
        left = builder.trunc(builder.sub(count, builder.mul(line, ir.Constant(i64, 16))), i32)
        inside = builder.icmp_signed("<", lanes_index, broadcast(left, int_lanes))
        x = builder.call(fma, [builder.load(builder.gep(source, [line]), align=4), scale, shift])
        clamped = builder.select(builder.fcmp_ordered("<", x, splat(-87.5)), splat(-87.5), x)
        n = builder.call(floor, [builder.call(fma, [clamped, splat(1.44269504088896341), splat(0.5)])])
        minus_n = builder.fneg(n)
        r = builder.call(fma, [minus_n, splat(0.693359375), clamped])
        r = builder.call(fma, [minus_n, splat(-2.12194440e-4), r])
        poly = builder.call(fma, [splat(1.9875691500e-4), r, splat(1.3981999507e-3)])
        for coefficient in (8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            poly = builder.call(fma, [poly, r, splat(coefficient)])
        y = builder.fadd(builder.call(fma, [builder.fmul(poly, r), r, r]), splat(1.0))
        if SCALEF:
            y = builder.call(scalef, [y, n, ir.Constant(_LANES, ir.Undefined), ir.Constant(ir.IntType(16), -1),
                                      ir.Constant(i32, 4)])  # all lanes, the current rounding
        else:  # 2^n from its bits (n >= -126 after the clamp; a NaN's n read as 0, its y is NaN anyway)
            n = builder.select(builder.fcmp_ordered("ord", n, n), n, splat(0.0))
            exponent = builder.add(builder.fptosi(n, int_lanes), ir.Constant(int_lanes, [127] * 16))
            y = builder.fmul(y, builder.bitcast(builder.shl(exponent, ir.Constant(int_lanes, [23] * 16)), _LANES))
        keep = builder.and_(inside, builder.fcmp_unordered(">=", x, splat(-87.33654)))  # NaN stays NaN
        weight = builder.select(keep, y, splat(0.0))
        stored = builder.fptrunc(weight, stored_type) if bf16 else weight  # vcvtneps2bf16: ties to even
        builder.store(stored, builder.gep(target, [line]), align=2 if bf16 else 4)
        _close_loop(builder, head, line, [total], [builder.fadd(total, weight)])
        builder.position_at_end(done)
        return builder.call(reduce, [ir.Constant(ir.FloatType(), 0.0), total])

    return types.float32(scores, seen, types.float32, types.float32, out), codegen


def widen(value):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: a weight or cache element (float32, or bf16 stored as uint16) as a float32."""
    raise NotImplementedError


@overload(widen)
def _widen_for(value):
    """A weight element as float32: itself, or (a bf16 stored as its 16-bit word) the top half of a float32."""
    if value == types.uint16:
        return lambda value: bits_to_float32(np.uint32(value) << np.uint32(16))
    return lambda value: value


@njit(inline="always")
def round_bf16(value):  # pragma: no cover - compiled
    """A float32 rounded to the nearest bfloat16 (ties to even), still held as a float32: what storing a value
    in a bf16 tensor does. Inside numba kernels, so fused code rounds where PyTorch's bf16 ops would."""
    bits = float32_to_bits(value)
    bits = np.uint32((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    return bits_to_float32(bits)


def narrow(value, like):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: a float32 as an element of ``like``'s array (uint16 bf16 words or float32)."""
    raise NotImplementedError


@overload(narrow)
def _narrow_for(value, like):
    if like == types.uint16:
        return lambda value, like: np.uint16(float32_to_bits(round_bf16(value)) >> np.uint32(16))
    return lambda value, like: value


def row_dot(weight, row, x):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: ``weight[row] · x`` in float32 for a row-major ``weight``: float32, bf16 words
    (uint16), or bf16 words read as 32-bit pairs (uint32, ``[N, K/2]``); ``x`` as :func:`dot_input` gives it
    (float32, or for pairs ``[2, K/2]``: its even elements, then its odd ones)."""
    raise NotImplementedError


@overload(row_dot)
def _row_dot_for(weight, row, x):
    if weight.dtype == types.uint32:
        def dot_pairs(weight, row, x):
            acc = np.float32(0.0)
            for j in range(weight.shape[1]):
                pair = weight[row, j]
                acc += (bits_to_float32(pair << np.uint32(16)) * x[0, j]
                        + bits_to_float32(pair & np.uint32(0xFFFF0000)) * x[1, j])
            return acc
        return dot_pairs

    def dot(weight, row, x):
        acc = np.float32(0.0)
        for j in range(x.shape[0]):
            acc += widen(weight[row, j]) * widen(x[j])
        return acc
    return dot


def _is_blocked(weight) -> bool:
    """Whether a numba type is a blocked matrix: the ``(blocks, rows, columns)`` tuple of :func:`blocked_layout`."""
    return isinstance(weight, types.BaseTuple)


def matrix_rows(weight):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: the number of rows (outputs) of a row-major or blocked matrix."""
    raise NotImplementedError


@overload(matrix_rows)
def _matrix_rows_for(weight):
    if _is_blocked(weight):
        return lambda weight: weight[1]
    return lambda weight: weight.shape[0]


def dot_input(x, weight):  # pragma: no cover - replaced by the overload below inside compiled code
    """Inside numba kernels: the rows of ``x`` (float32 ``[B, K]``, bf16 values for bf16 weights) as
    :func:`gemv_block` reads them for ``weight``. For a blocked matrix: float32, or bf16 words (an odd width
    gets a zero column) for bf16 blocks, with zero rows up to a multiple of :data:`GROUP` for a batch
    (``B > 1``), read but never stored. For row-major pairs (uint32): split into ``[B, 2, K/2]`` even and odd
    elements. Otherwise as it is."""
    raise NotImplementedError


@njit(inline="always")
def _padded_rows(batch):  # pragma: no cover - compiled
    return batch if batch == 1 else -(-batch // GROUP) * GROUP


@overload(dot_input)
def _dot_input_for(x, weight):
    if _is_blocked(weight) and weight[0].dtype == types.uint16:
        def words(x, weight):
            out = np.zeros((_padded_rows(x.shape[0]), 2 * weight[0].shape[1]), np.uint16)
            for b in range(x.shape[0]):
                for j in range(x.shape[1]):
                    out[b, j] = narrow(x[b, j], out[0, 0])
            return out
        return words
    if _is_blocked(weight):
        def padded(x, weight):
            if x.shape[0] == 1:
                return x
            out = np.zeros((_padded_rows(x.shape[0]), x.shape[1]), np.float32)
            out[:x.shape[0]] = x
            return out
        return padded
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
    :func:`row_dot` reads bf16 without bf16 dot products (see the module docstring); any other matrix as it is."""
    if matrix.dtype == np.uint16 and matrix.shape[-1] % 2 == 0 and matrix.flags.c_contiguous:
        return matrix.view(np.uint32)
    return matrix


def blocked_layout(matrix: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A row-major float32 or bf16-word ``[N, K]`` matrix (:func:`as_matrix`) as ``(blocks, N, K)``: a copy in
    blocks of :data:`BLOCK_ROWS` rows where each 64-byte line holds one column (float32: ``[N/16, K, 16]``) or
    one pair of columns (bf16: ``[N/16, K/2, 16, 2]``) of the block's rows, rows and columns padded with zeros.
    The products then need no horizontal sums, and a batch's rows share every load (see
    :func:`_emit_block_dots`)."""
    rows, columns = matrix.shape
    padded_rows = -(-rows // BLOCK_ROWS) * BLOCK_ROWS
    if matrix.dtype == np.uint16:
        padded = np.zeros((padded_rows, columns + columns % 2), np.uint16)
        padded[:rows, :columns] = matrix
        blocks = padded.reshape(padded_rows // BLOCK_ROWS, BLOCK_ROWS, padded.shape[1] // 2, 2).transpose(0, 2, 1, 3)
    else:
        padded = np.zeros((padded_rows, columns), np.float32)
        padded[:rows] = matrix
        blocks = padded.reshape(padded_rows // BLOCK_ROWS, BLOCK_ROWS, columns).transpose(0, 2, 1)
    return np.ascontiguousarray(blocks), rows, columns


def fast_layout(matrix: np.ndarray) -> np.ndarray | tuple[np.ndarray, int, int]:
    """``matrix`` (from :func:`as_matrix`) as this CPU reads it fastest: float32 blocked
    (:func:`blocked_layout`, a copy); bf16 blocked where the CPU has bf16 dot products (:data:`BF16_DOT`),
    else as 32-bit pairs (:func:`pair_view`, no copy)."""
    if matrix.dtype == np.float32 or BF16_DOT:
        return blocked_layout(matrix)
    return pair_view(matrix)


@njit(fastmath=True, cache=True)
def row_value(weight, row, x, bf16):  # pragma: no cover - compiled
    """``weight[row] · x`` summed in float32, rounded to bf16 when ``bf16``, ``x`` one row of :func:`dot_input`'s
    output: one output of every product here, with the bits the full product gives it (for a blocked matrix,
    its block is computed and the row's lane taken), so that a value computed alone (:func:`screened_argmax`'s
    candidates) is the full product's."""
    return _row_value(weight, row, x, bf16)


def _row_value(weight, row, x, bf16):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@overload(_row_value)
def _row_value_for(weight, row, x, bf16):
    if _is_blocked(weight):
        def blocked(weight, row, x, bf16):
            lanes = np.empty((1, BLOCK_ROWS), np.float32)
            _block_dot(weight[0], row // BLOCK_ROWS, x.reshape((1, x.shape[0])), 0, weight[0].shape[1], lanes)
            value = lanes[0, row % BLOCK_ROWS]
            return round_bf16(value) if bf16 else value
        return blocked

    def row_major(weight, row, x, bf16):
        acc = row_dot(weight, row, x)
        return round_bf16(acc) if bf16 else acc
    return row_major


def gemv_block(weight, xs, out, block, bf16):  # pragma: no cover - replaced by the overload below
    """Inside numba kernels: ``out[b, r] = weight[r] · xs[b]`` for every row ``b`` of ``out`` and the rows ``r`` of
    work item ``block`` (:data:`ROW_BLOCK` rows), ``xs`` as :func:`dot_input` gives it: the body of every
    parallel matrix-vector product here and in fused kernels. Each value is :func:`row_value`'s, bit for bit,
    whatever the batch."""
    raise NotImplementedError


@overload(gemv_block)
def _gemv_block_for(weight, xs, out, block, bf16):
    if _is_blocked(weight):
        def blocked(weight, xs, out, block, bf16):
            blocks, rows = weight[0], weight[1]
            lanes = np.empty((GROUP, BLOCK_ROWS), np.float32)
            stop = min(blocks.shape[0], (block + 1) * (ROW_BLOCK // BLOCK_ROWS))
            for index in range(block * (ROW_BLOCK // BLOCK_ROWS), stop):
                count = min(BLOCK_ROWS, rows - index * BLOCK_ROWS)
                for first in range(0, out.shape[0], GROUP):
                    if out.shape[0] == 1:
                        _block_dot(blocks, index, xs, 0, blocks.shape[1], lanes)
                    else:
                        _block_dots8(blocks, index, xs, first, blocks.shape[1], lanes)
                    for i in range(min(GROUP, out.shape[0] - first)):
                        for lane in range(count):
                            value = lanes[i, lane]
                            out[first + i, index * BLOCK_ROWS + lane] = round_bf16(value) if bf16 else value
        return blocked

    def row_major(weight, xs, out, block, bf16):
        stop = min(weight.shape[0], (block + 1) * ROW_BLOCK)
        for row in range(block * ROW_BLOCK, stop):
            for b in range(out.shape[0]):
                out[b, row] = row_value(weight, row, xs[b], bf16)
    return row_major


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(weight, xs, out):  # pragma: no cover - compiled (one specialisation per weight layout and dtype)
    xs_in = dot_input(xs, weight)
    for block in prange((matrix_rows(weight) + ROW_BLOCK - 1) // ROW_BLOCK):
        gemv_block(weight, xs_in, out, block, False)


# ------------------------------------------------------------------------ the argmax of a product, exactly
# A greedy decode step needs only the row of ``lm_head`` whose product with the hidden state is largest. An
# int8 copy of the matrix (a quarter of float32's bytes, half of bf16's) gives every product to within a
# bound that holds for every row; only rows whose upper bound reaches the best lower bound can win, and only
# those are computed from the weights, by the very function the full product uses. So the winner, ties to
# the first index included, is the full product's argmax bit for bit, not an approximation of it.
#
# For row i, w = s q + e (per-row scale s = max|w| / 127, int8 codes q, e exact in float64) and the input
# x = t r + d (t = max|x| / 127, int8 codes r, d exact). Then w·x = s t (q·r) + s q·d + e·x, and q·r is
# an exact integer (``vpdpbusd``), so |w·x - s t (q·r)| <= s |q| |d| + |e| |x| (Cauchy-Schwarz, 2-norms).
# The value the full product gives differs from w·x by its float32 summation, at most
# gamma_K |w| |x| (gamma_K = K u / (1 - K u), u = 2^-24, any order, FMAs included), then by bf16 rounding,
# at most 2^-8 of its size. The per-row factors of |d| and |x| are kept precomputed. The bound is inflated by
# 1e-6 of itself (for the float64 arithmetic that computes it) plus 1e-30 (denormals flushed by the bf16
# instruction).

#: Columns of an :class:`ArgmaxScreen`'s ``stats``: the scale s, the sum of the codes, the factor of |d| (s |q|),
#: the factor of |x| (|e| + gamma_K |w|) and |w|, the last three rounded up.
SCREEN_SCALE, SCREEN_CODE_SUM, SCREEN_RESIDUAL_FACTOR, SCREEN_INPUT_FACTOR, SCREEN_WEIGHT_NORM = range(5)


class ArgmaxScreen:
    """An int8 copy of a ``[N, K]`` weight with per-row bounds, for :func:`screened_argmax` (see above).

    ``codes`` is blocked as the products' weights are (:func:`blocked_layout`: ``[N/16, K/4, 16, 4]`` int8, four
    columns of 16 rows per 64-byte line, zeros added), ``stats`` ``[5, N]`` float64 (a row per quantity, so a
    block of rows reads each contiguously). It costs about ``N * K``
    bytes and is built once from the weight (0.2 s for 32064 x 512), in float64 blocks of rows so that a large
    vocabulary needs little extra memory. :meth:`build` refuses (returns ``None``) a weight with a non-finite
    value, where no bound holds, and CPUs without AVX512-VNNI (:data:`BYTE_DOT`)."""

    def __init__(self, codes: np.ndarray, stats: np.ndarray, width: int):
        self.codes, self.stats, self.width = codes, stats, width

    @classmethod
    def build(cls, weight: torch.Tensor, rows_at_once: int = 4096) -> ArgmaxScreen | None:
        if not BYTE_DOT or weight.dim() != 2:
            return None
        rows, width = weight.shape
        gamma = width * 2.0 ** -24 / (1 - width * 2.0 ** -24)  # float32 summation of ``width`` products, any order
        padded_rows = -(-rows // BLOCK_ROWS) * BLOCK_ROWS
        row_major = np.zeros((padded_rows, -(-width // 4) * 4), np.int8)
        stats = np.empty((5, rows), np.float64)
        for start in range(0, rows, rows_at_once):
            w = weight[start:start + rows_at_once].detach().to(torch.float64)
            if not bool(torch.isfinite(w).all()):
                return None
            scale = w.abs().amax(dim=1) / 127
            q = (w / torch.where(scale > 0, scale, 1)[:, None]).round().clamp(-127, 127)
            error = w - scale[:, None] * q  # exact: a float32 scale times a 7-bit integer fits a float64
            block = stats[:, start:start + w.shape[0]]
            weight_norm = w.norm(dim=1)
            block[SCREEN_SCALE] = scale.numpy()
            block[SCREEN_CODE_SUM] = q.sum(dim=1).numpy()
            block[SCREEN_RESIDUAL_FACTOR] = (scale * q.norm(dim=1)).numpy()
            block[SCREEN_INPUT_FACTOR] = (error.norm(dim=1) + gamma * weight_norm).numpy()
            block[SCREEN_WEIGHT_NORM] = weight_norm.numpy()
            row_major[start:start + w.shape[0], :width] = q.to(torch.int8).numpy()
        stats[SCREEN_RESIDUAL_FACTOR:] *= 1 + 1e-12  # computed in float64: rounded up
        codes = row_major.reshape(padded_rows // BLOCK_ROWS, BLOCK_ROWS, row_major.shape[1] // 4, 4)
        return cls(np.ascontiguousarray(codes.transpose(0, 2, 1, 3)), stats, width)

    def scratch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The scratch :func:`screened_argmax` needs for up to ``batch_size`` inputs (allocated once, so a step
        allocates nothing this size): the largest upper bound of each block of 16 rows, the largest lower bound
        of each parallel work item."""
        rows = self.stats.shape[1]
        return np.empty((batch_size, -(-rows // BLOCK_ROWS))), np.empty((batch_size, -(-rows // ROW_BLOCK)))


@njit(fastmath=True, cache=True)
def _screen_bounds(dots, stats, block, count, first, group, steps, residual_norms, x_norms, finite, rounding,
                   block_upper, block_low, item):  # pragma: no cover - compiled
    """For the ``count`` rows of block ``block`` (16 rows) and each finite input ``b = first + i`` (``i < group``),
    given their shifted int8 dots (``dots[i]``): the largest upper bound into ``block_upper[b, block]`` and the
    largest lower bound so far into ``block_low[b, item]``. Every value here is finite (the caller handles
    non-finite inputs), so fast-math may vectorise and reorder these float64 sums: that moves them by about
    1e-16 of their size, far inside the 1e-6 margin the bounds carry. One call per block of rows for a whole
    group of inputs, and one bound kept per block, not per row: per input, the calls alone cost about as much as
    a batch's screen saved, and per row the bounds were 2 MB of stores a batch-8 step."""
    first_row = block * BLOCK_ROWS
    for i in range(group):
        b = first + i
        if not finite[b]:
            continue
        low, high = block_low[b, item], -1.7e308
        for lane in range(count):
            row = first_row + lane
            # Integers below 2^53, so exact in float64, and no integer conversions to keep the loop from vectorising.
            dot = np.float64(dots[i, lane]) - 128.0 * stats[SCREEN_CODE_SUM, row]
            estimate = stats[SCREEN_SCALE, row] * steps[b] * dot
            bound = (stats[SCREEN_RESIDUAL_FACTOR, row] * residual_norms[b]
                     + stats[SCREEN_INPUT_FACTOR, row] * x_norms[b])
            bound = (bound * (1 + rounding) + rounding * abs(estimate)) * (1 + 1e-6) + 1e-30
            high = max(high, estimate + bound)
            low = max(low, estimate - bound)
        block_upper[b, block] = high
        block_low[b, item] = low


def block_values(weight, block, x, bf16, values):  # pragma: no cover - replaced by the overload below
    """Inside numba kernels: ``values[lane]`` = :func:`row_value` of row ``16 * block + lane`` for the block's rows,
    with its bits: a blocked matrix's block computed once (the candidates of :func:`screened_argmax`)."""
    raise NotImplementedError


@overload(block_values)
def _block_values_for(weight, block, x, bf16, values):
    if _is_blocked(weight):
        def blocked(weight, block, x, bf16, values):
            lanes = values.reshape((1, BLOCK_ROWS))
            _block_dot(weight[0], block, x.reshape((1, x.shape[0])), 0, weight[0].shape[1], lanes)
            if bf16:
                for lane in range(BLOCK_ROWS):
                    values[lane] = round_bf16(values[lane])
        return blocked

    def row_major(weight, block, x, bf16, values):
        for lane in range(min(BLOCK_ROWS, weight.shape[0] - block * BLOCK_ROWS)):
            values[lane] = row_value(weight, block * BLOCK_ROWS + lane, x, bf16)
    return row_major


@njit(parallel=True, cache=True)
def screened_argmax(weight, xs_in, xs, bf16, codes, stats, block_upper, block_low, best):  # pragma: no cover - compiled
    """``best[b]`` = the argmax over rows of :func:`row_value` (``weight``, ``xs_in[b]`` as :func:`dot_input`
    gives it) for every row ``b`` of ``xs`` (the inputs as float32 values, ``[B, K]``): the first index among
    equal maxima, a NaN winning as in ``torch.argmax``, found through the screen ``codes``/``stats`` of
    ``weight`` (:class:`ArgmaxScreen`). Each code line is read once for the whole batch. ``block_upper``
    (``[B, N / 16]``) and ``block_low`` (``[B, N / ROW_BLOCK]``) are scratch (:meth:`ArgmaxScreen.scratch`). Every
    row of a block whose largest upper bound reaches the largest lower bound is computed (a superset of the rows
    that can win, so the same winner). No fast-math here: the bounds and the NaN test must hold as written."""
    batch, width = xs.shape
    rows = matrix_rows(weight)
    rounding = 2.0 ** -8 if bf16 else 0.0
    largest_weight = stats[SCREEN_WEIGHT_NORM].max()
    # Each input as codes: x = step * code + residual, codes shifted by 128 into the unsigned bytes vpdpbusd reads.
    shifted = np.full((_padded_rows(batch), 4 * codes.shape[1]), 128, np.uint8)
    steps, x_norms, residual_norms = np.empty(batch), np.empty(batch), np.empty(batch)
    finite = np.empty(batch, np.bool_)
    for b in range(batch):
        norm_sq, top = 0.0, 0.0
        for j in range(width):
            value = np.float64(xs[b, j])
            norm_sq += value * value
            top = max(top, abs(value))
        x_norms[b] = np.sqrt(norm_sq) * (1 + 1e-12)
        finite[b] = np.isfinite(x_norms[b]) and x_norms[b] * largest_weight < 1e30
        steps[b] = top / 127 if top > 0 else 1.0
        residual_sq = 0.0
        for j in range(width):
            code = min(127.0, max(-127.0, np.round(np.float64(xs[b, j]) / steps[b]))) if finite[b] else 0.0
            shifted[b, j] = np.uint8(code + 128)
            residual = np.float64(xs[b, j]) - steps[b] * code
            residual_sq += residual * residual
        residual_norms[b] = np.sqrt(residual_sq) * (1 + 1e-12)
    per_item = ROW_BLOCK // BLOCK_ROWS
    for item in prange(block_low.shape[1]):
        lanes = np.empty((GROUP, BLOCK_ROWS), np.int32)
        for b in range(batch):
            block_low[b, item] = -1.7e308  # not -inf: the fast-math bounds assume no infinities
        for index in range(item * per_item, min(codes.shape[0], (item + 1) * per_item)):
            for first in range(0, batch, GROUP):
                if batch == 1:
                    _block_dot(codes, index, shifted, 0, codes.shape[1], lanes)
                else:
                    _block_dots8(codes, index, shifted, first, codes.shape[1], lanes)
                count, group = min(BLOCK_ROWS, rows - index * BLOCK_ROWS), min(GROUP, batch - first)
                _screen_bounds(lanes, stats, index, count, first, group, steps, residual_norms, x_norms,
                               finite, rounding, block_upper, block_low, item)
                for b in range(first, first + group):
                    if not finite[b]:  # every row is a candidate
                        block_upper[b, index] = np.inf
    for b in prange(batch):
        threshold = block_low[b].max() if finite[b] else -np.inf
        values = np.empty(BLOCK_ROWS, np.float32)
        best[b] = -1
        best_value = np.float32(0.0)
        for block in range(codes.shape[0]):
            if not block_upper[b, block] >= threshold:
                continue
            block_values(weight, block, xs_in[b], bf16, values)
            nan = False
            for lane in range(min(BLOCK_ROWS, rows - block * BLOCK_ROWS)):
                value = values[lane]
                if value != value:
                    best[b], nan = block * BLOCK_ROWS + lane, True
                    break
                if best[b] < 0 or value > best_value:
                    best[b], best_value = block * BLOCK_ROWS + lane, value
            if nan:
                break


def as_matrix(weight: torch.Tensor) -> np.ndarray:
    """The array :func:`gemv` reads for a float32 or bfloat16 ``[N, K]`` weight (bf16 as its 16-bit words)."""
    weight = weight.detach().contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.int16).numpy().view(np.uint16)
    if weight.dtype != torch.float32:
        raise TypeError(f"gemv reads float32 or bfloat16 weights, got {weight.dtype}")
    return weight.numpy()


def gemv(matrix: np.ndarray | tuple[np.ndarray, int, int], x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for rows ``x`` (``[B, K]``, a few: each weight load serves up to :data:`GROUP` of them) and
    ``matrix = as_matrix(weight)``, its :func:`fast_layout`, :func:`blocked_layout` or :func:`pair_view`: a
    ``[B, N]`` tensor in ``x``'s dtype (float32, or bfloat16 for bf16 weights). Runs on
    ``torch.get_num_threads()`` cores (at most numba's)."""
    rows = matrix[1] if isinstance(matrix, tuple) else matrix.shape[0]
    if isinstance(matrix, tuple) and matrix[0].dtype == np.uint16 and x.dtype != torch.bfloat16:
        raise TypeError(f"blocked bf16 weights multiply bf16 inputs (they are read as bf16 words), got {x.dtype}; "
                        "cast the input, or pass the row-major matrix of as_matrix() to multiply float32 inputs")
    values = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    out = torch.empty((values.shape[0], rows), dtype=torch.float32)
    with kernel_threads():
        _gemv(matrix, values.numpy(), out.numpy())
    return out if x.dtype == torch.float32 else out.to(x.dtype)


# ------------------------------------------------------------------------ products of many rows (prefill)
# A prefill multiplies thousands of rows by each matrix. The blocked float32 weights of the decode steps serve it
# too, with the loops above and one change: the columns are taken in slices. A work item is a panel of
# PANEL_ROWS input rows; for each slice of PANEL_COLUMNS columns it runs every 16-row block of weights over the
# panel, 8 rows at a time, adding into the output. The panel's slice of inputs (32 KB) and one block's slice of
# weights (16 KB) then stay in the core's caches while each weight line is used 8 times and each input 16
# times. Measured on 2 Zen 4 cores, the benchmark model's prefill shapes (2376 rows, 512 or 1408 columns) ran at
# 175-210 GFLOP/s against 113-160 for MKL's sgemm through torch (the FMA peak is 224). bf16 gained nothing
# over oneDNN (380-400 GFLOP/s both), so only float32 takes this path.

#: Input rows of one parallel work item of :func:`matmul`.
PANEL_ROWS = 32
#: Columns (64-byte lines of weights) summed per pass over a panel.
PANEL_COLUMNS = 256


@njit(parallel=True, fastmath=True, cache=True)
def _matmul(blocks, xs, out, bias):  # pragma: no cover - compiled
    rows, width = xs.shape
    outputs = out.shape[1]
    for panel in prange((rows + PANEL_ROWS - 1) // PANEL_ROWS):
        top = panel * PANEL_ROWS
        count = min(PANEL_ROWS, rows - top)
        full = count // GROUP * GROUP
        for i in range(count):  # the sums start from the bias (empty: none)
            if bias.shape[0]:
                out[top + i] = bias
            else:
                out[top + i] = 0
        lanes = np.empty((GROUP, BLOCK_ROWS), np.float32)
        tail = np.zeros((GROUP if count > full else 0, width), np.float32)  # the last rows, padded to a group
        for i in range(count - full):
            tail[i] = xs[top + full + i]
        for start in range(0, width, PANEL_COLUMNS):
            columns = min(PANEL_COLUMNS, width - start)
            for block in range(blocks.shape[0]):
                left = block * BLOCK_ROWS
                valid = min(BLOCK_ROWS, outputs - left)
                for first in range(0, count, GROUP):
                    group = min(GROUP, count - first)
                    if group == GROUP and valid == BLOCK_ROWS:
                        _block_dots8_into(blocks, block, xs, top + first, start, columns,
                                          out[top + first:top + first + GROUP, left:left + BLOCK_ROWS])
                        continue
                    for i in range(group):  # a partial group or block: through the scratch lanes
                        for j in range(valid):
                            lanes[i, j] = out[top + first + i, left + j]
                    if group == GROUP:
                        _block_dots8_into(blocks, block, xs, top + first, start, columns, lanes)
                    else:
                        _block_dots8_into(blocks, block, tail, 0, start, columns, lanes)
                    for i in range(group):
                        for j in range(valid):
                            out[top + first + i, left + j] = lanes[i, j]


def matmul(matrix: tuple[np.ndarray, int, int], x: torch.Tensor, out: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for many float32 rows ``x`` (``[..., K]``) and a float32 ``weight``'s
    :func:`blocked_layout`, as ``[rows, N]``, into ``out`` when given (float32, rows contiguous). Sums run in
    float32 in another order than the BLAS libraries' (results agree to rounding). See the section above."""
    blocks, rows, columns = matrix
    if blocks.dtype != np.float32 or x.dtype != torch.float32:
        raise TypeError(f"matmul multiplies float32 inputs by blocked float32 weights, got {x.dtype} and "
                        f"{blocks.dtype}")
    if x.shape[-1] != columns:
        raise ValueError(f"inputs of width {x.shape[-1]} against a weight of {columns} columns")
    values = x.reshape(-1, columns)
    if values.stride(-1) != 1:
        values = values.contiguous()
    if out is None:
        out = torch.empty((values.shape[0], rows), dtype=torch.float32)
    elif out.shape != (values.shape[0], rows) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"out must be float32 [{values.shape[0]}, {rows}] with contiguous rows, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if bias is None:
        start = np.zeros(0, np.float32)
    elif bias.shape != (rows,) or bias.dtype != torch.float32:
        raise ValueError(f"bias must be float32 [{rows}], got {bias.dtype} {tuple(bias.shape)}")
    else:
        start = bias.detach().contiguous().numpy()
    with kernel_threads():
        _matmul(blocks, values.numpy(), out.numpy(), start)
    return out


def gemv_argmax(matrix: np.ndarray | tuple[np.ndarray, int, int], x: torch.Tensor,
                screen: ArgmaxScreen | None = None) -> torch.Tensor:
    """``argmax(gemv(matrix, row))`` for every row of ``x`` (``[B, K]``), an int64 ``[B]``, found through ``screen``
    (an :class:`ArgmaxScreen` of the same weight) without computing most products; without a screen, from
    the full product."""
    if screen is None:
        return gemv(matrix, x).float().argmax(-1)
    values = x.to(torch.float32).contiguous().numpy()
    best = np.empty(x.shape[0], np.int64)
    block_upper, block_low = screen.scratch(x.shape[0])
    with kernel_threads():
        _screened_argmax_of(matrix, values, x.dtype == torch.bfloat16, screen.codes, screen.stats, block_upper,
                            block_low, best)
    return torch.from_numpy(best)


@njit(cache=True)
def _screened_argmax_of(weight, xs, bf16, codes, stats, block_upper, block_low, best):  # pragma: no cover - compiled
    screened_argmax(weight, dot_input(xs, weight), xs, bf16, codes, stats, block_upper, block_low, best)
