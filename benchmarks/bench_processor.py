"""Image preprocessing speed: llavakit's processor against transformers' PIL and torchvision paths.

All three run in this process on the same images; transformers' PIL path is the pixel reference, so the
benchmark also checks that llavakit's pixels match it (max abs diff < 1e-4). Timings are the image part
only (PIL images in, normalised ``pixel_values`` out): median and best wall time of repeated runs, and the
median CPU time over all threads (the work done, which a busy machine disturbs much less than wall time).

    .venv/bin/python benchmarks/bench_processor.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from llavakit.core.images import num_workers
from llavakit.core.processor import Processor, TextTokenizer
from llavakit.plugins.clip_vit import CLIP_MEAN, CLIP_STD
from llavakit.plugins.tilers import AnyResConfig, AnyResTiler
from llavakit.core.types import TokenGrid

#: The batch of 8 mixed sizes (height, width): photos in both orientations, a panorama, a tall strip, small.
BATCH_SIZES = [(768, 1024), (1024, 768), (480, 640), (1080, 1920), (336, 336), (2000, 500), (300, 200), (899, 1024)]
SINGLE_SIZE = (768, 1024)


def photo_like(height: int, width: int, seed: int) -> Image.Image:
    """Smooth structure plus noise, so resizes do real work on every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 60 * np.sin(x / 37.0)[..., None] * np.cos(y / 23.0)[..., None] * np.array([1.0, 0.6, -0.8])
    noise = rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(function: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median wall, best wall, median CPU) seconds over ``repeats`` runs after one warm-up run.

    CPU time (all threads) is the work done: on a shared machine it moves far less than wall time.
    """
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, start = cpu_seconds(), time.perf_counter()
        function()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_seconds() - cpu)
    return statistics.median(walls), min(walls), statistics.median(cpus)


def llavakit_processor() -> Processor:
    from tokenizers import Tokenizer, models

    tiler = AnyResTiler(AnyResConfig(tile_size=336, hidden_size=8))
    tokenizer = TextTokenizer(Tokenizer(models.WordLevel({"<image>": 0, "<unk>": 1}, unk_token="<unk>")))
    return Processor(tokenizer, tiler, TokenGrid(24, 24), image_mean=CLIP_MEAN, image_std=CLIP_STD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from transformers import LlavaNextImageProcessor, LlavaNextImageProcessorPil

    settings = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pil_path = LlavaNextImageProcessorPil(**settings)
    torchvision_path = LlavaNextImageProcessor(**settings)
    ours = llavakit_processor()
    print(f"threads: torch {torch.get_num_threads()}, llavakit image workers {num_workers()}")

    cases = {
        f"1 image {SINGLE_SIZE[0]}x{SINGLE_SIZE[1]}": [photo_like(*SINGLE_SIZE, seed=0)],
        "batch of 8 mixed sizes": [photo_like(*size, seed=i) for i, size in enumerate(BATCH_SIZES)],
    }
    for name, images in cases.items():
        reference = pil_path(images, return_tensors="pt")
        pixel_values, image_sizes = ours.preprocess_images(images)
        diff = (pixel_values - reference["pixel_values"]).abs().max().item()
        assert torch.equal(image_sizes, reference["image_sizes"]), "image_sizes differ from transformers"
        results = {
            "transformers PIL": timed(lambda: pil_path(images, return_tensors="pt"), args.repeats),
            "transformers torchvision": timed(lambda: torchvision_path(images, return_tensors="pt"), args.repeats),
            "llavakit": timed(lambda: ours.preprocess_images(images), args.repeats),
        }
        # torch's OpenMP threads spin while waiting, which inflates the torchvision path's CPU time on a busy
        # machine; one thread shows the work it really does.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        results["  torchvision, 1 thread"] = timed(lambda: torchvision_path(images, return_tensors="pt"), args.repeats)
        torch.set_num_threads(threads)
        print(f"\n{name}: max |llavakit - transformers PIL| = {diff:.1e} ({'OK' if diff < 1e-4 else 'MISMATCH'})")
        ours_median, ours_best, _ = results["llavakit"]
        for label, (median, best, cpu) in results.items():
            ratio = "" if label == "llavakit" else (
                f"   speed-up median {median / ours_median:.2f}x, best {best / ours_best:.2f}x"
            )
            print(f"  {label:28s} wall median {median * 1e3:7.2f} ms  best {best * 1e3:7.2f} ms  "
                  f"CPU {cpu * 1e3:7.2f} ms{ratio}")


if __name__ == "__main__":
    main()
