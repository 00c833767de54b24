"""The in-place inference paths (``llavakit.core.inplace``): the same bits as the plain forward, taken only where
nothing can tell the difference (no gradient, no hook), and each buffer allocated once per forward."""

from __future__ import annotations

import pytest
import torch

from llavakit.core import inplace as inplace_module
from llavakit.core.inplace import Workspace, has_forward_hooks
from llavakit.plugins import clip_vit
from llavakit.plugins import llama as llama_plugin
from llavakit.registry import build_model

from test_generation_decode import decoder

LENGTH = 40  # over IN_PLACE_MIN_POSITIONS


def run_both(llm, embeds, positions, mask, keep):
    """The plain and the in-place forward (with torch's products: the numba ones are tested below)."""
    llm.pack_decode_weights = False
    results = []
    for in_place in (False, True):
        llm.in_place = in_place
        cache = llm.new_kv_cache(embeds.shape[0], embeds.shape[1])
        with torch.inference_mode():
            assert llm.runs_in_place(embeds) == in_place
            hidden = llm(embeds, position_ids=positions, attention_mask=mask, kv_cache=cache, keep_last=keep)
        results.append((hidden, cache))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "left-padded", "sliding-window", "four-dimensional"])
@pytest.mark.parametrize("keep", [0, 1, 3])
def test_the_in_place_decoder_gives_the_bits_of_the_plain_one(dtype, case, keep):
    llm = decoder(dtype, sliding_window=6 if case == "sliding-window" else None)
    batch = 2
    embeds = llm.embed(torch.randint(0, 299, (batch, LENGTH), generator=torch.Generator().manual_seed(keep)))
    positions, mask = torch.arange(LENGTH)[None].expand(batch, -1), None
    if case == "left-padded":
        mask = torch.ones(batch, LENGTH, dtype=torch.long)
        mask[0, :5] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    elif case == "four-dimensional":
        segment = torch.tensor([0] * 15 + [1] * (LENGTH - 15))
        causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
        mask = (causal & (segment[:, None] == segment[None, :]))[None, None].expand(batch, -1, -1, -1)
        positions = torch.cat([torch.arange(15), torch.arange(LENGTH - 15)])[None].expand(batch, -1)
    (plain, plain_cache), (in_place, in_place_cache) = run_both(llm, embeds, positions, mask, keep)
    assert torch.equal(plain, in_place)
    for layer in range(llm.num_layers):
        assert torch.equal(plain_cache.keys[layer], in_place_cache.keys[layer])
        assert torch.equal(plain_cache.values[layer], in_place_cache.values[layer])


def test_each_buffer_is_allocated_once_per_forward(monkeypatch):
    allocated = []

    class CountingWorkspace(Workspace):
        def __call__(self, name, shape, dtype):
            if name not in self._buffers:
                allocated.append(name)
            return super().__call__(name, shape, dtype)

    monkeypatch.setattr(llama_plugin, "Workspace", CountingWorkspace)
    llm = decoder(num_layers=4)
    with torch.inference_mode():
        llm(llm.embed(torch.randint(0, 299, (1, LENGTH))), position_ids=torch.arange(LENGTH)[None])
    assert allocated and len(allocated) == len(set(allocated))


def test_hooks_gradients_short_inputs_and_the_switch_keep_the_plain_path():
    llm = decoder()
    embeds = llm.embed(torch.randint(0, 299, (1, LENGTH))).detach()
    with torch.inference_mode():
        assert llm.runs_in_place(embeds)
        assert not llm.runs_in_place(embeds[:, :8])
        llm.in_place = False
        assert not llm.runs_in_place(embeds)
        llm.in_place = True
    assert not llm.runs_in_place(embeds)  # gradients enabled
    seen = []
    handle = llm.layers[1].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    assert has_forward_hooks(llm.layers)
    with torch.inference_mode():
        assert not llm.runs_in_place(embeds)
        llm(embeds, position_ids=torch.arange(LENGTH)[None])
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (1, LENGTH, llm.hidden_size)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert has_forward_hooks(llm.layers)
    finally:
        handle.remove()
    assert not has_forward_hooks(llm.layers)


VISION = dict(image_size=112, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_vision_mlp_gates_in_place_with_the_same_bits(dtype, monkeypatch):
    model = build_model("clip-vit", "llama", vision_options=VISION, llm_options=dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=2),
        image_token_index=299, dtype=dtype, seed=0)
    tower = model.vision_tower
    pixels = torch.randn(2, 3, 112, 112).to(dtype)
    calls = []
    monkeypatch.setattr(clip_vit, "quick_gelu_", lambda x: calls.append(1) or clip_vit.quick_gelu(x.clone()))
    plain = tower(pixels).detach()  # gradients enabled: the plain activation
    assert not calls
    monkeypatch.undo()
    with torch.inference_mode():
        in_place = tower(pixels)
        projected = model.projector(in_place)
    if dtype == torch.bfloat16 or not inplace_module.has_numba():
        assert torch.equal(plain, in_place)
    else:  # float32 products on the many-row kernel: another summation order, equal to rounding
        assert not torch.equal(plain, in_place)
        assert (plain - in_place).abs().max().item() < 1e-5
        plain_projected = model.projector(plain).detach()
        assert (plain_projected - projected).abs().max().item() < 1e-5
    # A hook that keeps fc1's output must keep what fc1 returned, not the gated values.
    kept = []
    handle = tower.encoder.layers[0].mlp.fc1.register_forward_hook(lambda module, args, out: kept.append((args[0], out)))
    with torch.inference_mode():
        assert torch.equal(tower(pixels), plain)  # a hook anywhere in the tower: the plain path, every bit
    handle.remove()
    (fc1_input, fc1_output), = kept
    with torch.inference_mode():
        assert torch.equal(fc1_output, tower.encoder.layers[0].mlp.fc1(fc1_input))


@pytest.mark.parametrize("case", ["causal", "left-padded"])
@pytest.mark.parametrize("keep", [0, 1])
def test_a_float32_prefill_runs_its_products_on_the_decode_steps_packed_weights(case, keep):
    """With a cache (a generation's prefill), float32 products go through the numba many-row kernel on the weights
    the decode steps pack anyway: equal to the plain path to rounding; a plain forward never packs for itself."""
    llm = decoder(torch.float32)
    batch = 3
    embeds = llm.embed(torch.randint(0, 299, (batch, LENGTH), generator=torch.Generator().manual_seed(5)))
    positions, mask = torch.arange(LENGTH)[None].expand(batch, -1), None
    if case == "left-padded":
        mask = torch.ones(batch, LENGTH, dtype=torch.long)
        mask[1, :9] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        llm.pack_decode_weights = False
        plain_cache = llm.new_kv_cache(batch, LENGTH)
        plain = llm(embeds, position_ids=positions, attention_mask=mask, kv_cache=plain_cache, keep_last=keep)
        llm.pack_decode_weights = True
        llm(embeds, position_ids=positions, attention_mask=mask)  # no cache: no packing
        assert getattr(llm, "_decode_weights", None) is None
        cache = llm.new_kv_cache(batch, LENGTH)
        products = llm.prefill_products(embeds, cache)
        if not llama_plugin.has_numba():
            pytest.skip("numba is not installed: prefills keep torch's products")
        assert products is not None and products[0][0].packing == "numba"
        fast = llm(embeds, position_ids=positions, attention_mask=mask, kv_cache=cache, keep_last=keep)
    assert not torch.equal(fast, plain)  # another summation order: the kernel really ran
    assert (fast - plain).abs().max().item() < 1e-5
    for layer in range(llm.num_layers):
        assert (cache.keys[layer] - plain_cache.keys[layer]).abs().max().item() < 1e-5
        assert (cache.values[layer] - plain_cache.values[layer]).abs().max().item() < 1e-5


def test_bf16_prefills_keep_torch_products():
    llm = decoder(torch.bfloat16)
    with torch.inference_mode():
        embeds = llm.embed(torch.randint(0, 299, (1, LENGTH)))
        assert llm.prefill_products(embeds, llm.new_kv_cache(1, LENGTH)) is None


def test_linear_rows_is_each_linear_side_by_side():
    if not inplace_module.has_numba():
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    linears = (torch.nn.Linear(40, 24), torch.nn.Linear(40, 17, bias=False), torch.nn.Linear(40, 8))
    x = torch.randn(3, 37, 40)
    with torch.inference_mode():
        outputs = inplace_module.linear_rows(x, linears)
        for out, linear in zip(outputs, linears):
            assert out.shape == (3, 37, linear.out_features)
            assert (out - linear(x)).abs().max().item() < 1e-5
