"""Generation speed, llavakit and transformers side by side on the same checkpoint, in the same run.

The benchmark model of issue 5 is written in the real llava-hf format (transformers' ``save_pretrained``)
into a temporary folder: a Mistral text part (hidden 512, intermediate 1408, 8 layers, 8 heads, 4 kv heads,
vocab 32064, untied ``lm_head``) and a CLIP-style tower (hidden 256, MLP 1024, 4 layers, 4 heads, 336 px,
patch 14). Both libraries load that folder. Measured, per dtype:

- decode: batch 1, a 32-token text prompt, 128 new tokens; tokens/s after the first token, the bytes of
  weights one step reads, and the memory bandwidth that implies;
- time to first token for a 768x1024 (HxW) image (2340 image tokens), pixel values given (no preprocessing),
  and the decode after it (64 new tokens over a 2372-position cache);
- batch 8 (eight 32-token prompts, 128 new tokens): generated tokens/s of the whole call, against batch 1.

Every figure is the best of ``--repeats`` runs, llavakit and transformers alternating, so a busy machine
hurts both alike. With the optional ``llama-cpp-python`` installed (``pip install -e '.[llamacpp]'``), llama.cpp
runs on the CPU in the same run, on a GGUF file of the same text model (:mod:`gguf_export`): greedy tokens
against llavakit's, decode at batch 1, and the prefill of a text prompt as long as the image prompt (llama.cpp
has no path for this architecture's images), llavakit's prefill of the same text alongside.

    python benchmarks/bench_generate.py --threads 2 --dtypes float32 bfloat16
    python benchmarks/bench_generate.py --device cuda --dtypes float32 bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gguf_export import (has_llama_cpp, llama_cpp_decode_rate, llama_cpp_greedy, llama_cpp_prefill_seconds,
                         load_llama_cpp, write_text_gguf)

BENCH_TEXT = dict(
    model_type="mistral", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=32064, rope_theta=1e6, sliding_window=None, max_position_embeddings=32768,
    tie_word_embeddings=False, pad_token_id=32001, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
)
BENCH_VISION = dict(
    model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=4, image_size=336, patch_size=14, projection_dim=256, hidden_act="quick_gelu",
)
IMAGE_TOKEN = 32000
PROMPT_TOKENS = 32
NEW_TOKENS = 128
IMAGE_SIZE = (768, 1024)
BATCH = 8
#: New tokens of the decode measured after the image prompt (its attention reads 2372+ cached positions a step).
IMAGE_NEW_TOKENS = 64


def write_benchmark_checkpoint(folder: Path) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=BENCH_VISION, text_config=BENCH_TEXT, image_token_index=IMAGE_TOKEN,
                             tie_word_embeddings=False)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)


class StepClock:
    """A transformers-protocol streamer that timestamps every step (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def decode_rate(self) -> float:
        steps = self.times[1:]
        return (len(steps) - 1) / (steps[-1] - steps[0])


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step that computes the logits reads: every decoder matrix and norm, ``lm_head``,
    one embedding row."""
    llm = model.language_model
    total = sum(p.numel() * p.element_size() for name, p in llm.named_parameters() if not name.startswith("embed_tokens"))
    row = llm.embed_tokens.weight[0]
    return total + row.numel() * row.element_size()


def greedy_bytes_per_step(model) -> int:
    """Bytes a greedy batch-1 step of llavakit reads: as :func:`weight_bytes_per_step`, with the int8 screen of
    ``lm_head`` (codes and per-row stats) in place of ``lm_head`` where the decoder has one (the few candidate
    rows it then computes, 16 KB a block, are left out)."""
    llm = model.language_model
    screen = getattr(llm.decode_weights(1), "lm_head_screen", None) if hasattr(llm, "decode_weights") else None
    if screen is None or not len(screen[0]):  # no numba step here (another device, no numba) or no screen
        return weight_bytes_per_step(model)
    codes, stats = screen[:2]
    lm_head = llm.lm_head.weight
    return weight_bytes_per_step(model) - lm_head.numel() * lm_head.element_size() + codes.nbytes + stats.nbytes


def best_of(repeats: int, runs: dict) -> dict[str, list[float]]:
    """Run each callable ``repeats`` times, alternating; return every measurement per name."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def summarise(label: str, unit: str, values: dict[str, list[float]], higher_is_better: bool) -> dict[str, float]:
    pick = max if higher_is_better else min
    best = {name: pick(v) for name, v in values.items()}
    line = "  ".join(f"{name} {best[name]:8.3f} (median {statistics.median(v):.3f})" for name, v in values.items())
    print(f"  {label:<34} {unit:<8} {line}")
    return best


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_dtype(folder: Path, dtype: torch.dtype, repeats: int, device: torch.device) -> dict[str, float]:
    from transformers import LlavaNextForConditionalGeneration

    from llavakit.registry import load_model

    ours = load_model(folder, dtype=dtype, device=device)
    theirs = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    theirs.generation_config.eos_token_id = None  # always generate NEW_TOKENS
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 32000, (1, PROMPT_TOKENS), generator=generator)
    batch = torch.randint(3, 32000, (BATCH, PROMPT_TOKENS), generator=generator)
    image_tokens = ours.num_image_tokens(IMAGE_SIZE)
    image_prompt = torch.cat([prompt[:, :4], torch.full((1, image_tokens), IMAGE_TOKEN), prompt[:, 4:]], dim=1)
    pixel_values = torch.randn(1, ours.tiler.num_tiles(IMAGE_SIZE), 3, 336, 336, generator=generator).to(dtype)
    image_sizes = torch.tensor([IMAGE_SIZE])
    prompt, batch, image_prompt, pixel_values, image_sizes = (
        t.to(device) for t in (prompt, batch, image_prompt, pixel_values, image_sizes))

    def decode(model, is_ours: bool):
        def run():
            clock = StepClock()
            options = dict(eos_token_id=[]) if is_ours else dict(min_new_tokens=NEW_TOKENS, do_sample=False)
            model.generate(prompt, max_new_tokens=NEW_TOKENS, streamer=clock, **options)
            return clock.decode_rate()
        return run

    def ttft(model, is_ours: bool):
        def run():
            options = {} if is_ours else dict(do_sample=False)
            start = time.perf_counter()
            model.generate(image_prompt, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=1, **options)
            synchronize(device)
            return time.perf_counter() - start
        return run

    def image_decode(model, is_ours: bool):
        def run():  # decode after the image prompt: every step attends over its 2372 cached positions
            clock = StepClock()
            options = dict(eos_token_id=[]) if is_ours else dict(min_new_tokens=IMAGE_NEW_TOKENS, do_sample=False)
            model.generate(image_prompt, pixel_values=pixel_values, image_sizes=image_sizes,
                           max_new_tokens=IMAGE_NEW_TOKENS, streamer=clock, **options)
            return clock.decode_rate()
        return run

    def throughput(model, is_ours: bool, inputs: torch.Tensor):
        def run():
            options = dict(eos_token_id=[]) if is_ours else dict(min_new_tokens=NEW_TOKENS, do_sample=False)
            start = time.perf_counter()
            out = model.generate(inputs, max_new_tokens=NEW_TOKENS, **options)
            synchronize(device)
            return (out.shape[0] * (out.shape[1] - inputs.shape[1])) / (time.perf_counter() - start)
        return run

    name = str(dtype).removeprefix("torch.")
    print(f"\n{name}: image prompt {image_prompt.shape[1]} tokens ({image_tokens} image tokens)")
    start = time.perf_counter()
    with torch.inference_mode():
        weights = ours.language_model.decode_weights(1)
        packed_s = time.perf_counter() - start
        ours.generate(prompt, max_new_tokens=2, eos_token_id=[])
    first_s = time.perf_counter() - start - packed_s
    fused = ("fused numba layers, compiled on first use and cached on disk" if weights.fused is not None
             else "no fused layers")
    print(f"  first call: packing the decode weights ({weights.packing or 'none'}) {packed_s:.3f} s; the first "
          f"2-token generate ({fused}) {first_s:.2f} s")
    for run in (decode(ours, True), decode(theirs, False)):
        run()  # warm up: thread pools, weight packing, allocator
    def greedy_parity(inputs: torch.Tensor) -> tuple[list[int], list[float]]:
        """Per row, how many of 32 greedy tokens equal transformers' before the first difference; and where a
        row differs, how far apart transformers' own scores put its token and ours (0: a tie)."""
        with torch.inference_mode():
            rows_ours = ours.generate(inputs, max_new_tokens=32, eos_token_id=[])[:, PROMPT_TOKENS:]
        generated = theirs.generate(inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True)
        rows_theirs = generated.sequences[:, PROMPT_TOKENS:].to(rows_ours.device)
        rows_same = (rows_ours == rows_theirs).int().cumprod(1).sum(1).tolist()
        gaps = [float(generated.scores[step][row].float().max() - generated.scores[step][row, rows_ours[row, step]].float())
                for row, step in enumerate(rows_same) if step < 32]
        return rows_same, gaps

    same, _ = greedy_parity(prompt)
    print(f"  greedy tokens equal to transformers' for the first {same[0]} of 32")
    rows_same, gaps = greedy_parity(batch)
    ties = f"; where rows differ, transformers scored our token within {max(gaps):.4f} of its own" if gaps else ""
    print(f"  batch {BATCH}: greedy tokens equal to transformers' in {sum(s == 32 for s in rows_same)} of {BATCH} rows "
          f"(all 32 tokens){ties}")
    decode_rates = summarise("decode, batch 1", "tok/s", best_of(repeats, {
        "llavakit": decode(ours, True), "transformers": decode(theirs, False)}), True)
    ttfts = summarise("time to first token, 768x1024 image", "s", best_of(repeats, {
        "llavakit": ttft(ours, True), "transformers": ttft(theirs, False)}), False)
    summarise(f"decode after the image prompt, {IMAGE_NEW_TOKENS} new", "tok/s", best_of(repeats, {
        "llavakit": image_decode(ours, True), "transformers": image_decode(theirs, False)}), True)
    # Batch 1 and batch 8 alternate in one loop, so a slower spell of a shared machine hits both sides of their
    # ratio alike.
    calls = best_of(repeats, {
        ("b1", "llavakit"): throughput(ours, True, prompt), ("b1", "transformers"): throughput(theirs, False, prompt),
        ("b8", "llavakit"): throughput(ours, True, batch), ("b8", "transformers"): throughput(theirs, False, batch)})
    b1 = summarise("generate, batch 1 (whole call)", "tok/s",
                   {name: v for (size, name), v in calls.items() if size == "b1"}, True)
    b8 = summarise(f"generate, batch {BATCH} (whole call)", "tok/s",
                   {name: v for (size, name), v in calls.items() if size == "b8"}, True)
    paired = [eight / one for one, eight in zip(calls[("b1", "llavakit")], calls[("b8", "llavakit")])]
    print(f"  batch {BATCH} / batch 1, llavakit, round by round: " + ", ".join(f"{r:.2f}x" for r in paired)
          + f" (median {statistics.median(paired):.2f}x)")

    step_bytes, greedy_bytes = weight_bytes_per_step(ours), greedy_bytes_per_step(ours)
    print(f"  weights per decode step: {step_bytes / 1e6:.1f} MB ({name}); a greedy llavakit step reads "
          f"{greedy_bytes / 1e6:.1f} MB (lm_head through its int8 screen): decode "
          f"{decode_rates['llavakit']:.1f} tok/s implies {greedy_bytes * decode_rates['llavakit'] / 1e9:.1f} GB/s "
          f"(transformers {step_bytes * decode_rates['transformers'] / 1e9:.1f} GB/s)")
    ratios = {
        "decode speed vs transformers": decode_rates["llavakit"] / decode_rates["transformers"],
        "time to first token vs transformers": ttfts["llavakit"] / ttfts["transformers"],
        f"batch {BATCH} throughput vs batch 1": b8["llavakit"] / b1["llavakit"],
        f"batch {BATCH} throughput vs transformers": b8["llavakit"] / b8["transformers"],
    }
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and has_llama_cpp():
        ratios.update(bench_llama_cpp(ours, dtype, prompt, image_prompt.shape[1], repeats, decode(ours, True)))
    for label, value in ratios.items():
        print(f"  {label:<40} {value:6.2f}x")
    return ratios


def bench_llama_cpp(ours, dtype: torch.dtype, prompt: torch.Tensor, prefill_tokens: int, repeats: int,
                    ours_decode) -> dict[str, float]:
    """llama.cpp (``llama-cpp-python``) on a GGUF export of ``ours``'s text model, against llavakit: greedy
    tokens, decode at batch 1 (``ours_decode``: llavakit's decode run of :func:`bench_dtype`), and the prefill of
    ``prefill_tokens`` text tokens. Returns the ratios."""
    import llama_cpp

    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, 32000, (1, prefill_tokens), generator=generator)
    tokens = prompt[0].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = write_text_gguf(ours, Path(tmp) / "text.gguf", dtype)
        written_s = time.perf_counter() - start
        llm = load_llama_cpp(path, torch.get_num_threads(), prefill_tokens + NEW_TOKENS + 64)
        print(f"  llama.cpp (llama-cpp-python {llama_cpp.__version__}; GGUF written in {written_s:.1f} s, "
              f"{path.stat().st_size / 1e6:.0f} MB; float16 cache, flash attention)")
        theirs_tokens, _ = llama_cpp_greedy(llm, tokens, 32)
        with torch.inference_mode():
            ours_tokens = ours.generate(prompt, max_new_tokens=32, eos_token_id=[])[0, PROMPT_TOKENS:].tolist()
        same = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), 32)
        print(f"  greedy tokens equal to llama.cpp's for the first {same} of 32")

        def ours_prefill():
            start = time.perf_counter()
            with torch.inference_mode():
                ours.generate(text, max_new_tokens=1)
            return time.perf_counter() - start

        rates = summarise("decode, batch 1", "tok/s", best_of(repeats, {
            "llavakit": ours_decode, "llama.cpp": lambda: llama_cpp_decode_rate(llm, tokens, NEW_TOKENS)}), True)
        prefills = summarise(f"prefill, {prefill_tokens} text tokens", "s", best_of(repeats, {
            "llavakit": ours_prefill, "llama.cpp": lambda: llama_cpp_prefill_seconds(llm, text[0].tolist())}), False)
        llm.close()
    return {"decode speed vs llama.cpp": rates["llavakit"] / rates["llama.cpp"],
            "text prefill time vs llama.cpp": prefills["llavakit"] / prefills["llama.cpp"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (the issue's figures) or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {where}, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench-llava-next"
        write_benchmark_checkpoint(folder)
        for name in args.dtypes:
            bench_dtype(folder, getattr(torch, name), args.repeats, device)


if __name__ == "__main__":
    main()
