"""Attention backends side by side with transformers: accuracy against fp32 eager, prefill and decode speed.

One random LLaVA-NeXT checkpoint (a Mistral-style GQA decoder; a CLIP tower cutting 224-px tiles into 16x16
patches; AnyRes tiling) is written by transformers, then run by llavakit (``eager``, ``sdpa``, ``flash``) and
by transformers (``eager``, ``sdpa``; ``flash_attention_2`` when flash-attn is installed) on the same
left-padded batch of two images. Every run is compared with llavakit's fp32 eager logits on the real
(unpadded) positions and with its greedy tokens.

    python benchmarks/attention_backends.py                          # CPU, float32
    python benchmarks/attention_backends.py --device cuda --dtype bfloat16

On CUDA, ``flash`` refuses float32 (no flash kernel runs it; the script prints the refusal): use
``--dtype bfloat16`` there. The reference is always fp32 eager on the same device. Prefill is one forward
over the batch (vision included); decode is ``--new-tokens`` greedy steps over each library's KV cache after
that prefill, timed alone. Each figure is the fastest of ``--repeats`` runs. Ratios are transformers time /
llavakit time (> 1: llavakit faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time

import torch

from llavakit.core.errors import AttentionBackendError
from llavakit.registry import load_model

IMAGE_TOKEN = 320
VOCAB = 384
PAD = 321
TEXT = dict(model_type="mistral", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, rope_theta=1e6, sliding_window=None, max_position_embeddings=8192,
            vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1,
            eos_token_id=2)
VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=3,
              num_attention_heads=4, image_size=224, patch_size=14, projection_dim=128, hidden_act="quick_gelu")
TILE = VISION["image_size"]
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
IMAGE_SIZES = [(480, 640), (224, 300)]


def write_checkpoint(folder: str) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).eval().save_pretrained(folder)


def make_inputs(model, device) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, left-padded, each with one image; explicit positions for both libraries."""
    rows = []
    for index, size in enumerate(IMAGE_SIZES):
        text = [1] + [5 + index] * (3 + 9 * index)
        rows.append(text + [IMAGE_TOKEN] * model.num_image_tokens(size) + [7, 8, 9])
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    tiles = max(model.tiler.num_tiles(size) for size in IMAGE_SIZES)
    pixel_values = torch.randn(len(rows), tiles, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        "pixel_values": pixel_values.to(device),
        "image_sizes": torch.tensor(IMAGE_SIZES).to(device),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fastest(fn, device, repeats: int) -> tuple[float, object]:
    """(seconds, result) of the fastest of ``repeats`` runs after one warm-up: on a shared machine the minimum
    is the figure least disturbed by other work."""
    result, best = fn(), float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def decode_llavakit(model, inputs, steps: int, device) -> tuple[float, torch.Tensor]:
    """Greedy decode over llavakit's KV cache; returns (seconds for ``steps`` steps, tokens [B, steps])."""
    batch, prompt = inputs["input_ids"].shape
    cache = model.language_model.new_kv_cache(batch, prompt + steps + 1)
    tokens = model(**inputs, kv_cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
    mask, positions, chosen = inputs["attention_mask"], inputs["position_ids"][:, -1:], []
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        mask, positions = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), positions + 1
        logits = model(tokens[:, None], attention_mask=mask, position_ids=positions, kv_cache=cache, logits_to_keep=1).logits
        tokens = logits[:, -1].argmax(-1)
        chosen.append(tokens)
    synchronize(device)
    return time.perf_counter() - start, torch.stack(chosen, dim=1)


def decode_transformers(model, inputs, steps: int, device) -> tuple[float, torch.Tensor]:
    """The same greedy decode over transformers' cache (``past_key_values``)."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    tokens, past = out.logits[:, -1].argmax(-1), out.past_key_values
    mask, positions, chosen = inputs["attention_mask"], inputs["position_ids"][:, -1:], []
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        mask, positions = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), positions + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        tokens, past = out.logits[:, -1].argmax(-1), out.past_key_values
        chosen.append(tokens)
    synchronize(device)
    return time.perf_counter() - start, torch.stack(chosen, dim=1)


def run(args) -> None:
    from transformers import LlavaNextForConditionalGeneration

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    folder = tempfile.mkdtemp(prefix="llavakit-attention-bench-")
    write_checkpoint(folder)
    reference_model = load_model(folder, attention="eager", dtype="float32", device=device)
    inputs = make_inputs(reference_model, device)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = reference_model(**inputs).logits.float()
        _, reference_tokens = decode_llavakit(reference_model, inputs, args.new_tokens, device)
    del reference_model
    batch, prompt = inputs["input_ids"].shape
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), dtype {dtype}, "
          f"torch {torch.__version__}; batch {batch}, prompt {prompt} tokens (left-padded), {args.new_tokens} decode "
          f"steps; fastest of {args.repeats}")

    results: dict[tuple[str, str], dict] = {}

    def measure(library: str, label: str, model, decode) -> None:
        with torch.no_grad():
            prefill_s, logits = fastest(lambda: model(**inputs).logits, device, args.repeats)
            runs = [decode(model, inputs, args.new_tokens, device) for _ in range(args.repeats)]
        decode_s, tokens = min(runs, key=lambda run: run[0])
        tokens_per_s = batch * args.new_tokens / decode_s
        diff = (logits.float() - reference)[real].abs().max().item()
        same = int((tokens == reference_tokens).all(dim=1).sum())
        results[library, label] = {"prefill_s": prefill_s, "tokens_per_s": tokens_per_s, "diff": diff}
        print(f"  {label:<34} max |logit - fp32 eager| {diff:9.2e}   greedy tokens as fp32 eager: {same}/{batch} rows   "
              f"prefill {prefill_s * 1e3:8.1f} ms   decode {tokens_per_s:8.1f} tok/s")

    print("llavakit:")
    for backend in ("eager", "sdpa", "flash"):
        try:
            model = load_model(folder, attention=backend, dtype=dtype, device=device)
        except AttentionBackendError as refusal:  # flash on CUDA in float32: refused by design, before loading
            print(f"  {backend:<34} refused: {refusal}")
            continue
        label = f"flash [{model.attention_backend.kernel(device)}]" if backend == "flash" else backend
        measure("llavakit", label, model, decode_llavakit)
        del model

    print("transformers:")
    implementations = ["eager", "sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        implementations.append("flash_attention_2")
    for implementation in implementations:
        hf = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=implementation,
                                                               dtype=dtype).to(device).eval()
        measure("transformers", implementation, hf, decode_transformers)
        del hf

    print("ratios (transformers time / llavakit time; > 1: llavakit faster):")
    pairs = [("eager", "eager"), ("sdpa", "sdpa")]
    flash_labels = [label for library, label in results if library == "llavakit" and label.startswith("flash")]
    hf_flash = "flash_attention_2" if ("transformers", "flash_attention_2") in results else "sdpa"
    pairs += [(label, hf_flash) for label in flash_labels]
    for ours, theirs in pairs:
        mine, reference_run = results["llavakit", ours], results["transformers", theirs]
        prefill = reference_run["prefill_s"] / mine["prefill_s"]
        decode = mine["tokens_per_s"] / reference_run["tokens_per_s"]
        print(f"  {ours.split(' ')[0]:>6} vs {theirs:<18} prefill x{prefill:5.2f}   decode x{decode:5.2f}")
    worst = max(r["diff"] for r in results.values())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    print(f"worst logit difference {worst:.2e} ({'within' if worst < tolerance else 'OUTSIDE'} {tolerance:g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
