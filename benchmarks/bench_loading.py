"""Checkpoint loading: llavakit's ``load_model`` against transformers' ``from_pretrained``, each in a fresh process.

The checkpoint is generated at benchmark time into a temporary folder (never committed): Mistral-7B widths
with 4 decoder layers, the full CLIP ViT-L/14-336 tower and projector, vocabulary 32064 — about 1.46 B
parameters, 2.9 GB of bf16 in 3 shards, llava-hf hub layout, written by the safetensors library. The page
cache is warmed by reading every shard before each measurement.

Each measurement runs in a new Python process: imports are timed apart (for llavakit they include plugin
discovery, ``get_registry()``, which imports the plugin modules); the **load phase** is the
``load_model`` / ``from_pretrained`` call; then every weight is touched once (each tensor summed, which
reads every byte); **memory added** is the process's resident memory after loading and touching minus
before loading (file-backed and anonymous pages alike), as a multiple of the checkpoint's bytes; **peak
during load** is the high-water mark of resident memory during the load call (reset just before it).

    .venv/bin/python benchmarks/bench_loading.py [--repeats 3] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

#: The model: Mistral-7B widths, 4 decoder layers, CLIP ViT-L/14-336, mlp2x-gelu, bf16.
NUM_LAYERS = 4
NUM_SHARDS = 3

MEASURE = textwrap.dedent(
    """
    import json, sys, time
    def memory(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))
    start = time.perf_counter()
    import torch
    {imports}
    imported = time.perf_counter()
    before = memory("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the resident-memory high-water mark
    begin = time.perf_counter()
    model = {load}
    loaded = time.perf_counter()
    peak = memory("VmHWM")
    with torch.no_grad():
        total = sum(float(t.sum(dtype=torch.float32)) for t in model.state_dict().values())
    touched = time.perf_counter()
    after = memory("VmRSS")
    heavy = sorted(m for m in ("transformers", "open_clip") if m in sys.modules)
    print(json.dumps(dict(imports=imported - start, load=loaded - begin, touch=touched - loaded,
                          added=after - before, peak_added=peak - before, heavy=heavy)))
    """
)

LLAVAKIT = dict(
    imports="from llavakit.registry import get_registry, load_model\nget_registry()",
    load="load_model(FOLDER)",
)
TRANSFORMERS = dict(
    imports="from transformers import LlavaNextForConditionalGeneration",
    load="LlavaNextForConditionalGeneration.from_pretrained(FOLDER, dtype=torch.bfloat16)",
)

IMPORT_ONLY = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    import llavakit.registry
    registry = time.perf_counter()
    heavy = sorted(m for m in ("transformers", "open_clip", "torch") if m in sys.modules)
    from llavakit.registry import get_registry, load_model
    loading = time.perf_counter()
    get_registry()
    discovered = time.perf_counter()
    print(json.dumps(dict(registry=registry - start, load_model=loading - registry, plugins=discovered - loading, heavy=heavy)))
    """
)


def generate_checkpoint(folder: Path) -> int:
    """Write the benchmark checkpoint (llava-hf hub layout, bf16, random weights); return its weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaNextConfig

    from llavakit.registry import build_model
    from llavakit.registry.checkpoints import LLAVA_HF_SAVE_KEYMAP

    meta = build_model("clip-l336", "mistral-7b", llm_options={"num_layers": NUM_LAYERS}, device="meta", dtype="bfloat16")
    shapes = {}
    for name, tensor in meta.state_dict().items():
        prefix, target = next((p, t) for p, t in LLAVA_HF_SAVE_KEYMAP if name.startswith(p))
        shapes[target + name[len(prefix) :]] = tuple(tensor.shape)
    total = sum(2 * torch.Size(shape).numel() for shape in shapes.values())
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(NUM_SHARDS)]
    filled = [0] * NUM_SHARDS
    for key, shape in shapes.items():  # greedy by size: three shards of about equal bytes
        index = filled.index(min(filled))
        shards[index][key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        filled[index] += 2 * torch.Size(shape).numel()
    weight_map = {}
    for index, shard in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    text = dict(model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=NUM_LAYERS, num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6,
                max_position_embeddings=32768, sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False)
    config = LlavaNextConfig(text_config=text, image_token_index=32000, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(folder)
    return total


def warm(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def measure(code: str, folder: Path) -> dict:
    warm(folder)
    script = MEASURE.format(**code).replace("FOLDER", repr(str(folder)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per library (median reported)")
    parser.add_argument("--keep", type=Path, help="generate into (or reuse) this folder instead of a temporary one")
    args = parser.parse_args()

    imports = json.loads(subprocess.run([sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, check=True).stdout)
    print(f"import llavakit.registry: {imports['registry'] * 1000:.0f} ms (modules it pulled in among torch, "
          f"transformers, open_clip: {imports['heavy'] or 'none'}); then `from llavakit.registry import load_model` "
          f"(torch included): {imports['load_model'] * 1000:.0f} ms; plugin discovery: {imports['plugins'] * 1000:.0f} ms")

    with tempfile.TemporaryDirectory(prefix="llavakit-bench-loading-") as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "model.safetensors.index.json").exists():
            total = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        else:
            print(f"generating the checkpoint in {folder} …", flush=True)
            total = generate_checkpoint(folder)
        print(f"checkpoint: {total / 1e9:.2f} GB bf16 ({total // 2 / 1e9:.2f} B parameters) in {NUM_SHARDS} shards\n")
        runs: dict[str, list[dict]] = {"llavakit": [], "transformers": []}
        for _ in range(args.repeats):  # alternate, so drift affects both alike
            runs["llavakit"].append(measure(LLAVAKIT, folder))
            runs["transformers"].append(measure(TRANSFORMERS, folder))

    def median(name: str, field: str) -> float:
        return statistics.median(run[field] for run in runs[name])

    rows = [
        ("imports (s)", "imports", 1.0),
        ("load phase (s)", "load", 1.0),
        ("touch every weight (s)", "touch", 1.0),
        ("memory added after load+touch (x checkpoint)", "added", 1 / total),
        ("peak during load (x checkpoint)", "peak_added", 1 / total),
    ]
    print(f"{'median of ' + str(args.repeats) + ' fresh processes':<46}{'llavakit':>11}{'transformers':>14}{'ratio':>8}")
    for label, field, scale in rows:
        ours, theirs = median("llavakit", field) * scale, median("transformers", field) * scale
        print(f"{label:<46}{ours:>11.3f}{theirs:>14.3f}{ours / theirs:>8.2f}")
    both = [median(n, "load") + median(n, "touch") for n in ("llavakit", "transformers")]
    print(f"{'load phase + touch (s)':<46}{both[0]:>11.3f}{both[1]:>14.3f}{both[0] / both[1]:>8.2f}")
    print(f"\nllavakit run imported: {runs['llavakit'][0]['heavy'] or 'no transformers, no open_clip'}")


if __name__ == "__main__":
    main()
