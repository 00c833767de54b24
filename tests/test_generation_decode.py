"""The llama decoder's single-token fast path (fused, prepacked weights; grouped-query attention without cache
copies) gives the logits of the plain forward pass, for every packing, dtype, mask and sliding window, and
notices when the weights change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llavakit.core.errors import ConfigError
from llavakit.registry import build_model

LLM = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=2,
           rope_theta=1e4, max_position_embeddings=512)
#: x86 builds of torch carry both MKL and oneDNN, so every packing is available.
X86_BLAS = torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()
BF16_DOT = __import__("llavakit.core.gemv", fromlist=["BF16_DOT"]).BF16_DOT
VISION = dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)


def decoder(dtype=torch.float32, **options):
    model = build_model("clip-vit", "llama", vision_options=VISION, llm_options={**LLM, **options},
                        image_token_index=299, dtype=dtype, seed=0)
    with torch.no_grad():  # larger weights than the default init, so logits differ visibly between tokens
        for name, param in model.language_model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model.language_model


def prefilled(llm, prompt, mask, room: int = 4):
    cache = llm.new_kv_cache(prompt.shape[0], prompt.shape[1] + room)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(prompt.shape[1])[None]
    llm(llm.embed(prompt), position_ids=positions, attention_mask=mask, kv_cache=cache)
    return cache


def step_both_ways(llm, batch: int, padded: bool, length: int = 12):
    """Next-token logits for one step after a prompt: the plain forward path and the fast path."""
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, 299, (batch, length), generator=generator)
    mask = None
    if padded:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :5] = 0
    tokens = torch.randint(0, 299, (batch,), generator=generator)
    attended = length if mask is None else mask.sum(-1, keepdim=True)
    positions = torch.full((batch, 1), length) if mask is None else attended
    step_mask = None if mask is None else torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        plain_cache, fast_cache = prefilled(llm, prompt, mask), prefilled(llm, prompt, mask)
        hidden = llm(llm.embed(tokens[:, None]), position_ids=positions, attention_mask=step_mask, kv_cache=plain_cache)
        plain = llm.logits(hidden)[:, -1]
        fast = llm.decode_step(tokens, position_ids=positions, attention_mask=step_mask, kv_cache=fast_cache)
    assert fast_cache.length == plain_cache.length == length + 1
    assert torch.allclose(fast_cache.keys[1], plain_cache.keys[1], atol=1e-5)
    return plain.float(), fast.float()


@pytest.mark.parametrize("dtype, batch, expected_packing", [
    (torch.float32, 1, "numba"), (torch.float32, 3, "numba"), (torch.float32, 8, "numba"),
    (torch.float32, 12, "onednn"), (torch.bfloat16, 1, "numba"), (torch.bfloat16, 3, "numba" if BF16_DOT else "onednn"),
    (torch.bfloat16, 12, "onednn"),
])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_step_gives_the_forward_logits(dtype, batch, expected_packing, padded):
    llm = decoder(dtype)
    steps = []
    for name in ("_fused_step", "_glued_step"):
        original = getattr(llm, name)
        setattr(llm, name, lambda *args, name=name, original=original, **options:
                steps.append((name, args[-1].tolist())) or original(*args, **options))
    plain, fast = step_both_ways(llm, batch, padded and batch > 1)
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * plain.abs().max().item()
    assert (plain - fast).abs().max().item() < tolerance
    assert plain.std() > 0.5  # logits with signal
    if X86_BLAS and (dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        assert llm.decode_weights(batch).packing == expected_packing
        # Up to a group of rows the step is one numba kernel; larger batches run packed products with numba
        # kernels between them; either way left-padded rows attend from their first real token.
        starts = [5] + [0] * (batch - 1) if padded and batch > 1 else [0] * batch
        assert steps == [("_fused_step" if expected_packing == "numba" else "_glued_step", starts)]


def test_a_mask_that_is_not_left_padding_takes_the_general_path():
    llm = decoder()
    fused = []
    for name in ("_fused_step", "_glued_step"):
        original = getattr(llm, name)
        setattr(llm, name, lambda *args, original=original, **options: fused.append(1) or original(*args, **options))
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 299, (2, 10), generator=generator)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 3:5] = 0  # a hole in the middle of row 1
    tokens = torch.randint(0, 299, (2,), generator=generator)
    positions = mask.sum(-1, keepdim=True)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        plain_cache, fast_cache = prefilled(llm, prompt, mask), prefilled(llm, prompt, mask)
        plain = llm.logits(llm(llm.embed(tokens[:, None]), position_ids=positions, attention_mask=step_mask,
                               kv_cache=plain_cache))[:, -1]
        fast = llm.decode_step(tokens, position_ids=positions, attention_mask=step_mask, kv_cache=fast_cache)
    assert not fused
    assert (plain - fast).abs().max().item() < 1e-4


def test_unpacked_fast_step_and_sliding_window():
    llm = decoder(sliding_window=6)
    llm.pack_decode_weights = False
    plain, fast = step_both_ways(llm, 2, padded=True)
    assert llm.decode_weights(2).packing is None
    assert (plain - fast).abs().max().item() < 1e-4


def test_packed_weights_follow_weight_changes():
    llm = decoder()
    _, before = step_both_ways(llm, 1, padded=False)
    first = llm.decode_weights(1)
    with torch.no_grad():
        llm.lm_head.weight.mul_(2)  # an in-place update, like an optimizer step
    plain, after = step_both_ways(llm, 1, padded=False)
    assert llm.decode_weights(1) is not first
    assert torch.allclose(after, 2 * before, atol=1e-4) and torch.allclose(after, plain, atol=1e-4)
    llm.release_decode_weights()
    assert llm._decode_weights is None


def test_the_parameter_check_runs_once_per_cache_whatever_batch_came_before(monkeypatch):
    """Steps check the packed weights against the parameters on a cache's first step only, also when the weights
    were packed for another batch size (they fit it): a check every step cost 0.1-0.2 ms of each."""
    from llavakit.plugins import llama

    llm = decoder()
    checks = []
    original = llama.parameter_fingerprint
    monkeypatch.setattr(llama, "parameter_fingerprint", lambda slots: checks.append(1) or original(slots))
    for batch in (1, 3, 1):
        cache = prefilled(llm, torch.randint(0, 299, (batch, 6)), None, room=5)
        checks.clear()
        with torch.inference_mode():
            for step in range(5):
                llm.decode_greedy(torch.zeros(batch, dtype=torch.long), position_ids=torch.full((batch, 1), 6 + step),
                                  attention_mask=None, kv_cache=cache)
        assert len(checks) <= 1, f"batch {batch}: {len(checks)} parameter checks in 5 steps"


def test_with_gradients_the_step_is_the_differentiable_forward():
    llm = decoder()
    cache = llm.new_kv_cache(1, 8)
    with torch.no_grad():
        llm(llm.embed(torch.tensor([[1, 2, 3]])), position_ids=torch.arange(3)[None], kv_cache=cache)
    logits = llm.decode_step(torch.tensor([4]), position_ids=torch.tensor([[3]]), attention_mask=None, kv_cache=cache)
    logits.sum().backward()
    assert llm.layers[0].self_attn.q_proj.weight.grad is not None
    assert getattr(llm, "_decode_weights", None) is None


@pytest.mark.parametrize("rows, inner", [(1, 7), (63, 64), (65, 33), (1000, 512), (130, 1408)])
@pytest.mark.parametrize("layout", ["row-major", "fast"])
def test_numba_gemv_matches_f_linear(rows, inner, layout):
    """Row-major and blocked (odd row counts and widths padded), one row and batches past a group of 8: every
    product agrees with ``F.linear``, and each row of a batch is that row's product alone, bit for bit."""
    from llavakit.core.gemv import as_matrix, fast_layout, gemv

    pack = (lambda m: m) if layout == "row-major" else fast_layout
    generator = torch.Generator().manual_seed(rows * inner)
    weight = torch.randn(rows, inner, generator=generator)
    x = torch.randn(11, inner, generator=generator)
    for batch in (x[:1], x[:5], x):
        out = gemv(pack(as_matrix(weight)), batch)
        assert out.shape == (batch.shape[0], rows) and out.dtype == torch.float32
        assert torch.allclose(out, torch.nn.functional.linear(batch, weight), atol=1e-4, rtol=1e-5)
    # bf16 weights and activations: fp32 accumulation of the exact bf16 values, rounded to bf16 once.
    weight16, x16 = weight.bfloat16(), x.bfloat16()
    matrix16 = pack(as_matrix(weight16))
    out16 = gemv(matrix16, x16)
    reference = torch.nn.functional.linear(x16.float(), weight16.float())
    assert out16.dtype == torch.bfloat16
    assert torch.allclose(out16.float(), reference, atol=1e-3, rtol=8e-3)
    assert torch.equal(out16, torch.cat([gemv(matrix16, row[None]) for row in x16]))
    matrix = pack(as_matrix(weight))
    assert torch.equal(gemv(matrix, x), torch.cat([gemv(matrix, row[None]) for row in x]))


@pytest.mark.parametrize("rows, inner, outputs", [(1, 5, 3), (7, 33, 17), (37, 300, 40), (45, 600, 33),
                                                  (96, 64, 48)])
def test_numba_matmul_matches_a_float64_product(rows, inner, outputs):
    """The many-row kernel of prefills: partial groups of 8 rows, partial blocks of 16 outputs, several column
    slices (PANEL_COLUMNS) and inputs whose rows are strided all give the product to float32 rounding."""
    from llavakit.core.gemv import as_matrix, blocked_layout, matmul

    generator = torch.Generator().manual_seed(rows + inner)
    weight = torch.randn(outputs, inner, generator=generator, dtype=torch.float64)
    wide = torch.randn(rows, inner + 3, generator=generator, dtype=torch.float64)
    x = wide[:, 2:2 + inner]  # rows two elements apart from their neighbours' ends
    exact = x @ weight.T
    scale = x.abs() @ weight.abs().T  # a float32 sum of products errs by at most inner * 2**-24 * this
    matrix = blocked_layout(as_matrix(weight.float()))
    out = matmul(matrix, x.float())
    assert out.shape == (rows, outputs) and out.dtype == torch.float32
    assert bool(((out.double() - exact).abs() <= inner * 2.0**-24 * scale + 1e-30).all())
    into = torch.full((rows, outputs), float("nan"))
    assert matmul(matrix, x.float(), into) is into and torch.equal(into, out)
    bias = torch.randn(outputs, generator=generator)
    with_bias = matmul(matrix, x.float(), bias=bias)
    assert bool(((with_bias.double() - exact - bias.double()).abs()
                 <= (inner + 1) * 2.0**-24 * (scale + bias.double().abs()) + 1e-30).all())


def test_numba_matmul_refuses_what_it_cannot_multiply():
    from llavakit.core.gemv import as_matrix, blocked_layout, matmul

    matrix = blocked_layout(as_matrix(torch.randn(16, 8)))
    with pytest.raises(TypeError, match="float32"):
        matmul(matrix, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="width 9"):
        matmul(matrix, torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"out must be float32 \[4, 16\]"):
        matmul(matrix, torch.randn(4, 8), torch.empty(4, 15))
    with pytest.raises(ValueError, match=r"bias must be float32 \[16\]"):
        matmul(matrix, torch.randn(4, 8), bias=torch.randn(15))


def test_the_fused_kernels_cache_follows_the_gemv_source():
    """numba keys the disk cache of a kernel on its own file's contents only; the fused layer inlines
    :mod:`llavakit.core.gemv`'s loops, so its file records that file's hash and must be updated with it."""
    import hashlib

    from llavakit.core import gemv
    from llavakit.plugins import llama_kernels

    digest = hashlib.sha256(Path(gemv.__file__).read_bytes()).hexdigest()
    assert llama_kernels.GEMV_SOURCE_SHA256 == digest, (
        f"core/gemv.py changed: set GEMV_SOURCE_SHA256 in plugins/llama_kernels.py to {digest!r} so cached "
        "fused kernels are recompiled with it")


def test_numba_gemv_refuses_other_dtypes():
    from llavakit.core.gemv import as_matrix, blocked_layout, gemv

    with pytest.raises(TypeError, match="float32 or bfloat16"):
        as_matrix(torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match="blocked bf16 weights multiply bf16 inputs"):
        gemv(blocked_layout(as_matrix(torch.zeros(2, 2, dtype=torch.bfloat16))), torch.zeros(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_give_the_forward_cache_and_logits(dtype):
    """Batch 1 without a mask runs each layer as one numba kernel; it rounds where PyTorch's bf16 ops round,
    so in bf16 the cache and logits are the forward pass's bit for bit, in fp32 within summation-order noise."""
    llm = decoder(dtype)
    assert llm.decode_weights(1).fused is not None
    for length in (1, 12, 40):
        generator = torch.Generator().manual_seed(length)
        prompt = torch.randint(0, 299, (1, length), generator=generator)
        tokens = torch.randint(0, 299, (1,), generator=generator)
        positions = torch.full((1, 1), length)
        with torch.inference_mode():
            plain_cache, fast_cache = prefilled(llm, prompt, None), prefilled(llm, prompt, None)
            plain = llm.logits(llm(llm.embed(tokens[:, None]), position_ids=positions, kv_cache=plain_cache))[:, -1]
            fast = llm.decode_step(tokens, position_ids=positions, attention_mask=None, kv_cache=fast_cache)
        if dtype == torch.bfloat16:
            assert torch.equal(plain, fast)
            assert all(torch.equal(a, b) for a, b in zip(plain_cache.keys + plain_cache.values,
                                                        fast_cache.keys + fast_cache.values))
        else:
            assert (plain - fast).abs().max().item() < 1e-4
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain_cache.values, fast_cache.values))


def test_fused_step_leaves_eager_as_the_reference_and_checks_the_cache_room():
    from llavakit.core.errors import ContextLengthError
    from llavakit.plugins.attention import EagerAttention

    llm = decoder()
    cache = llm.new_kv_cache(1, 3)
    with torch.inference_mode():
        llm(llm.embed(torch.tensor([[1, 2, 3]])), position_ids=torch.arange(3)[None], kv_cache=cache)
        with pytest.raises(ContextLengthError, match="holds 3 positions but 4 are needed"):
            llm.decode_step(torch.tensor([4]), position_ids=torch.tensor([[3]]), attention_mask=None, kv_cache=cache)
    assert cache.length == 3
    eager = EagerAttention()
    for layer in llm.layers:
        layer.self_attn.backend = eager
    calls = []
    original = llm._fused_step
    llm._fused_step = lambda *args, **options: calls.append(1) or original(*args, **options)
    step_both_ways(llm, 1, padded=False)
    assert not calls  # eager is the reference math (and a plugin's backend is never bypassed either)


def test_a_four_dimensional_mask_is_refused_where_a_sliding_window_cuts_in():
    llm = decoder(sliding_window=6)
    embeds = llm.embed(torch.arange(5, 13)[None])
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(ConfigError, match="meets the sliding window of 6"):
        llm(embeds, position_ids=torch.arange(8)[None], attention_mask=mask)
    # Within the window the mask is used as given.
    short = llm(embeds[:, :6], position_ids=torch.arange(6)[None], attention_mask=mask[..., :6, :6])
    torch.testing.assert_close(short, llm(embeds[:, :6], position_ids=torch.arange(6)[None]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_steps_pick_the_argmax_of_the_logits(dtype, batch):
    """``decode_greedy`` (the one-kernel step finding the winner through the int8 screen of ``lm_head`` where the
    CPU has AVX512-VNNI, for one row or float32 rows) returns exactly the argmax of ``decode_step``'s logits,
    step after step."""
    from llavakit.core.gemv import BYTE_DOT

    llm = decoder(dtype)
    weights = llm.decode_weights(batch)
    assert (weights.fused is not None) == (dtype == torch.float32 or batch == 1 or BF16_DOT)
    if weights.fused is not None:
        assert (weights.lm_head_screen[0].shape[0] > 0) == BYTE_DOT
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 299, (batch, 9), generator=generator)
    with torch.inference_mode():
        logits_cache, greedy_cache = prefilled(llm, prompt, None, 24), prefilled(llm, prompt, None, 24)
        for step in range(24):
            tokens = torch.randint(0, 299, (batch,), generator=generator)
            positions = torch.full((batch, 1), 9 + step)
            logits = llm.decode_step(tokens, position_ids=positions, attention_mask=None, kv_cache=logits_cache)
            chosen = llm.decode_greedy(tokens, position_ids=positions, attention_mask=None, kv_cache=greedy_cache)
            assert chosen.dtype == torch.int64 and chosen.tolist() == logits.argmax(-1).tolist()
    assert all(torch.equal(a, b) for a, b in zip(logits_cache.keys, greedy_cache.keys))


def test_a_token_outside_the_vocabulary_is_refused_by_the_fused_step():
    llm = decoder()
    cache = prefilled(llm, torch.tensor([[1, 2, 3]]), None)
    with torch.inference_mode(), pytest.raises(IndexError, match="token id 300 of row 0 is outside the vocabulary of 300"):
        llm.decode_step(torch.tensor([300]), position_ids=torch.tensor([[3]]), attention_mask=None, kv_cache=cache)
    assert cache.length == 3


requires_byte_dot = pytest.mark.skipif(
    not __import__("llavakit.core.gemv", fromlist=["BYTE_DOT"]).BYTE_DOT, reason="the screen needs AVX512-VNNI")


@requires_byte_dot
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(3000, 512), (700, 100), (130, 7)])
def test_screened_argmax_is_the_argmax_of_the_full_product(dtype, rows, width):
    """The screen only skips rows that cannot win: the argmax equals the full product's, including exact ties
    (repeated rows: the first wins), rows of zeros, an input of zeros, and inputs far from the weights' scale."""
    from llavakit.core.gemv import ArgmaxScreen, as_matrix, fast_layout, gemv, gemv_argmax

    generator = torch.Generator().manual_seed(rows + width)
    weight = torch.randn(rows, width, generator=generator) * 0.02
    weight[rows // 2] = weight[rows // 3]  # an exact tie whenever one of them wins
    weight[rows // 4] = 0
    weight = weight.to(dtype)
    screen = ArgmaxScreen.build(weight)
    matrix = fast_layout(as_matrix(weight))
    inputs = [torch.randn(1, width, generator=generator) * scale for scale in (1e-3, 1.0, 30.0) for _ in range(8)]
    inputs += [torch.zeros(1, width), weight[rows // 3].float()[None] * 50]  # the last one makes the tie win
    for x in inputs:
        x = x.to(dtype)
        full = gemv(matrix, x).float()
        assert gemv_argmax(matrix, x, screen).tolist() == [int(full.argmax())]
    assert gemv_argmax(matrix, inputs[-1].to(dtype), screen).tolist() == [rows // 3]
    # A batch reads each code line once for all its rows; each row's winner is its own.
    batch = torch.cat(inputs).to(dtype)
    assert gemv_argmax(matrix, batch, screen).tolist() == gemv_argmax(matrix, batch).tolist()


@requires_byte_dot
def test_screened_argmax_follows_torch_for_non_finite_inputs_and_refuses_non_finite_weights():
    from llavakit.core.gemv import ArgmaxScreen, as_matrix, fast_layout, gemv, gemv_argmax

    weight = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    screen, matrix = ArgmaxScreen.build(weight), fast_layout(as_matrix(weight))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
        x[0, 5] = bad
        assert gemv_argmax(matrix, x, screen).tolist() == [int(gemv(matrix, x).argmax())]
    weight[7, 3] = float("inf")
    assert ArgmaxScreen.build(weight) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_computed_alone_has_the_bits_of_the_full_product(dtype):
    """The screen's candidates are computed by ``row_value``, the function the full product runs per row."""
    import numpy as np

    from llavakit.core.gemv import as_matrix, dot_input, fast_layout, gemv, matrix_rows, row_value
    from numba import njit

    @njit
    def each_row(matrix, x, bf16, out):
        x_in = dot_input(x, matrix)[0]
        for row in range(matrix_rows(matrix)):
            out[row] = row_value(matrix, row, x_in, bf16)

    generator = torch.Generator().manual_seed(4)
    for width in (7, 64, 100, 512):
        weight = torch.randn(300, width, generator=generator).to(dtype)
        x = torch.randn(1, width, generator=generator).to(dtype)
        matrix = fast_layout(as_matrix(weight))
        alone = np.empty(300, np.float32)
        each_row(matrix, x.float().numpy(), dtype == torch.bfloat16, alone)
        assert torch.equal(torch.from_numpy(alone), gemv(matrix, x).float()[0])


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("case", ["causal", "left-padded", "sliding-window", "after-a-cache", "four-dimensional"])
def test_keep_last_gives_the_last_hidden_states_and_the_whole_cache(case, keep):
    """A prefill that wants the last positions only: the same hidden states and cache as the full forward, and the
    last layer's MLP sees only those rows (the layer's queries, attention output and MLP are skipped for the rest)."""
    llm = decoder(sliding_window=6 if case == "sliding-window" else None)
    batch, length, past = 2, 12, 7 if case == "after-a-cache" else 0
    generator = torch.Generator().manual_seed(keep)
    embeds = llm.embed(torch.randint(0, 299, (batch, past + length), generator=generator))
    positions = torch.arange(past + length)[None].expand(batch, -1)
    mask = None
    if case == "left-padded":
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :5] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    elif case == "four-dimensional":  # two packed sequences of 5 and 7 tokens that must not see each other
        segment = torch.tensor([0] * 5 + [1] * 7)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = (causal & (segment[:, None] == segment[None, :]))[None, None].expand(batch, -1, -1, -1)
        positions = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(batch, -1)
    rows_seen = []
    hook = llm.layers[-1].mlp.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[1]))
    results = []
    with torch.inference_mode():
        for keep_last in (0, keep):
            cache = llm.new_kv_cache(batch, past + length)
            if past:
                llm(embeds[:, :past], position_ids=positions[:, :past], kv_cache=cache)
            hidden = llm(embeds[:, past:], position_ids=positions[:, past:], attention_mask=mask, kv_cache=cache,
                         keep_last=keep_last)
            results.append((hidden, cache))
    hook.remove()
    (full, full_cache), (kept, kept_cache) = results
    assert rows_seen == ([past] if past else []) + [length] + ([past] if past else []) + [keep]
    assert kept.shape == (batch, keep, llm.hidden_size)
    assert (kept - full[:, -keep:]).abs().max().item() < 1e-5
    assert kept_cache.length == full_cache.length == past + length
    for layer in range(llm.num_layers):
        assert torch.equal(kept_cache.keys[layer], full_cache.keys[layer])
        assert torch.equal(kept_cache.values[layer], full_cache.values[layer])


def test_keep_last_beyond_the_length_keeps_every_position():
    llm = decoder()
    embeds = llm.embed(torch.randint(0, 299, (1, 5)))
    with torch.inference_mode():
        full = llm(embeds, position_ids=torch.arange(5)[None])
        kept = llm(embeds, position_ids=torch.arange(5)[None], keep_last=9)
    assert torch.equal(kept, full)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash"])
def test_keep_last_with_every_backend_on_a_left_padded_batch(backend):
    """The kept rows' queries meet the sliced padding mask (``flash`` reads it as causal attention over real
    tokens; ``sdpa`` and ``eager`` use it as given): each backend gives the full forward's last rows."""
    model = build_model("clip-vit", "llama", attention=backend, vision_options=VISION, llm_options=LLM,
                        image_token_index=299, seed=0)
    llm = model.language_model
    batch, length = 2, 40
    embeds = llm.embed(torch.randint(0, 299, (batch, length), generator=torch.Generator().manual_seed(3)))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        full = llm(embeds, position_ids=positions, attention_mask=mask, kv_cache=llm.new_kv_cache(batch, length))
        for keep in (1, 3):
            kept = llm(embeds, position_ids=positions, attention_mask=mask, kv_cache=llm.new_kv_cache(batch, length),
                       keep_last=keep)
            assert kept.shape == (batch, keep, llm.hidden_size)
            assert (kept - full[:, -keep:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("head_dim", [64, 128])
def test_key_scores_and_value_sums_sixteen_and_two_positions_at_a_time(head_dim):
    """The decode attention's blocked loops against float64: sixteen keys' scores at once (float32 and bf16
    words), bf16 values weighted two positions at a time (from an offset, an odd count left over) and float32
    values one at a time."""
    import numpy as np
    from numba import njit

    from llavakit.core.gemv import key_scores16, weighted_value_sums

    @njit
    def scores(keys, first, query, out):
        key_scores16(keys, first, query, out)

    @njit
    def sums(values, first, weights, pairs, out):
        weighted_value_sums(values, first, weights, pairs, out)

    generator = torch.Generator().manual_seed(head_dim)
    keys, query = torch.randn(40, head_dim, generator=generator), torch.randn(head_dim, generator=generator)
    out = np.full(16, np.nan, np.float32)
    scores(keys.numpy(), 5, query.numpy(), out)
    exact = (keys[5:21].double() @ query.double()).numpy()
    assert np.abs(out - exact).max() <= head_dim * 2.0**-24 * (keys[5:21].abs() @ query.abs()).max().item()
    words = lambda t: t.bfloat16().view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    scores(words(keys), 7, words(query), out)
    exact = (keys[7:23].bfloat16().double() @ query.bfloat16().double()).numpy()
    assert np.abs(out - exact).max() <= head_dim * 2.0**-24 * (keys[7:23].abs() @ query.abs()).max().item() * 1.1
    values, weights = torch.randn(50, head_dim, generator=generator), torch.rand(23, generator=generator)
    total = np.ones(head_dim, np.float32)  # the sums are added to what is there
    sums(words(values), 3, words(weights), 11, total)
    exact = 1 + (weights[:22].bfloat16().double() @ values[3:25].bfloat16().double()).numpy()
    assert np.abs(total - exact).max() <= 22 * 2.0**-24 * (weights[:22].abs() @ values[3:25].abs()).max().item() * 1.1
    total = np.ones(head_dim, np.float32)  # float32: one position at a time, every one of them
    sums(values.numpy(), 3, weights.numpy(), 23, total)
    exact = 1 + (weights.double() @ values[3:26].double()).numpy()
    assert np.abs(total - exact).max() <= 24 * 2.0**-24 * (1 + (weights.abs() @ values[3:26].abs()).max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_over_a_long_cache_with_wide_heads(dtype):
    """Heads of 64 (the published models' size: the blocked score and value loops run, not the one-key-at-a-time
    ones the narrow heads above take), 71 cached positions (an odd one left over): the step's logits and its cache
    entry match the forward pass's."""
    llm = decoder(dtype, hidden_size=128, num_heads=2, num_kv_heads=1)
    assert llm.head_dim == 64 and llm.decode_weights(1).fused is not None
    generator = torch.Generator().manual_seed(71)
    prompt = torch.randint(0, 299, (1, 71), generator=generator)
    tokens = torch.randint(0, 299, (1,), generator=generator)
    positions = torch.full((1, 1), 71)
    with torch.inference_mode():
        plain_cache, fast_cache = prefilled(llm, prompt, None), prefilled(llm, prompt, None)
        plain = llm.logits(llm(llm.embed(tokens[:, None]), position_ids=positions, kv_cache=plain_cache))[:, -1]
        fast = llm.decode_step(tokens, position_ids=positions, attention_mask=None, kv_cache=fast_cache)
    tolerance = 1e-4 if dtype == torch.float32 else 0.02 * plain.float().abs().max().item()  # a few bf16 steps
    assert (plain.float() - fast.float()).abs().max().item() < tolerance
    assert plain.float().argmax() == fast.float().argmax()
    assert torch.allclose(plain_cache.values[1][:, :, :72].float(), fast_cache.values[1][:, :, :72].float(),
                          atol=1e-5 if dtype == torch.float32 else 2e-2)
