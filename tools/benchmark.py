#!/usr/bin/env python
"""Benchmarks of dino_research, printed as Markdown tables.

    python tools/benchmark.py [--only SECTION] [--iterations 40] [--repeats 7] [--training-iters 5]
                              [--loader-workers 1 2 ...] [--loader-batches 32] [--quick]

Sections, in ``SECTIONS`` (``--only`` runs one; by default every section runs):

- ``augmentation``: DINO's multi-crop augmentation with the paper's settings (2 global crops of 224,
  8 local crops of 96) on one deterministic 500x375 RGB image, in images/s per data-loader worker
  (one process, one thread: ``torch.set_num_threads(1)``). ``DINOMultiCrop`` is timed against a
  plain torchvision-on-PIL pipeline doing the same operations (``plain_torchvision_multicrop``), in
  the same run: the two alternate, block by block, from the same seeds, so they draw the same crops,
  flips, jitters and blurs and share whatever load the machine has. Reported: the median over
  ``--repeats`` blocks of ``--iterations`` images; the speedup is the median of the per-block ratios.

- ``decode``: JPEG decoding of a generated photo stand-in (500x375, ImageNet's typical size, and
  2000x1500) with Pillow, torchvision.io's decoder and Pillow's reduced-size decoding, next to the
  multi-crop augmentation's cost on the same image, and the reduction the paper's global crops allow.

- ``jpeg``: from JPEG bytes (500x375) to what a loader worker sends, per core: the multi-crop
  augmentation done in the worker against the split one (``INPUT.DEVICE_AUGMENTATION``: the worker
  decodes, crops, resizes and flips; the training device does the rest), interleaved; with the device
  stage's cost when the device is this CPU and the bytes sent per image.

- ``loader``: the whole pretraining data loader (``PretrainLoader``: per-sample seeding, the same
  multi-crop augmentation, collation into batches of ``--loader-batch-size``, transfer from the
  worker processes, pinned memory when CUDA is available) over the same image, in images/s for each
  number of workers in ``--loader-workers`` (default 1, 2, 4, ... up to the machine's CPU count), with
  the augmentation in the workers and with the workers' part of the split one.
  Timed: ``--loader-batches`` batches after the first ``max(1, workers)`` (worker start-up and the
  first prefetch are excluded).

- ``training``: the DINO training step of ViT-S/16 (2x224 + 8x96 crops, batch 8) in float32 and
  bfloat16 autocast, images/s and model FLOP utilization: ``tools/bench_training.py`` (its docstring
  says what is timed and counted), with ``--iters`` = ``--training-iters``.

``--quick`` shrinks every section to a smoke test (a few images, a tiny ViT): it checks that the
script runs, it measures nothing. This is a benchmark, not a test: the augmentation section takes
well under a minute, the training section a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
import time

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from dino_research.config import get_cfg
from dino_research.data.augmentations import DINOMultiCrop
from dino_research.data.loader import PretrainLoader


# ------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs; python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}")


# ------------------------------------------------------------------------------ augmentation
class _PaperBlur:
    """``utils.GaussianBlur`` of the DINO reference: PIL's blur, radius uniform in [0.1, 2]."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class _PaperSolarize:
    """``utils.Solarization`` of the DINO reference."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def plain_torchvision_multicrop():
    """``DataAugmentationDINO`` of the DINO reference (``main_dino.py``), the paper's arguments: a
    plain torchvision-on-PIL pipeline. ``image -> [global 224 x2, local 96 x8]`` normalized tensors."""
    flip_jitter_gray = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = T.InterpolationMode.BICUBIC
    global_1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_jitter_gray,
                          _PaperBlur(1.0), normalize])
    global_2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_jitter_gray,
                          _PaperBlur(0.1), _PaperSolarize(0.2), normalize])
    local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic), flip_jitter_gray,
                       _PaperBlur(0.5), normalize])

    def augment(image):
        return [global_1(image), global_2(image)] + [local(image) for _ in range(8)]

    return augment


def benchmark_image(width: int = 500, height: int = 375, seed: int = 0) -> Image.Image:
    """A deterministic RGB photo stand-in: color ramps, a smooth pattern and seeded sensor noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    pattern = 128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    pixels = np.stack([xx * 255 / (width - 1), yy * 255 / (height - 1), pattern], axis=-1)
    pixels += np.random.default_rng(seed).normal(0.0, 20.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def bench_augmentation(iterations: int, repeats: int) -> list[dict]:
    """Time the plain torchvision pipeline and ``DINOMultiCrop(get_cfg())`` on one thread.

    Returns one row per pipeline: ``{"pipeline", "images_per_s", "ms_per_image", "speedup"}``, the
    medians over ``repeats`` blocks of ``iterations`` images (speedup: median per-block ratio).
    """
    image = benchmark_image()
    pipelines = {
        "plain torchvision on PIL (DINO reference ops)": plain_torchvision_multicrop(),
        "`DINOMultiCrop(get_cfg())`": DINOMultiCrop(get_cfg()),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one data-loader worker = one process with one thread
    try:
        for augment in pipelines.values():  # warm-up: allocator, lazy imports
            augment(image)
        seconds = {name: [] for name in pipelines}
        for block in range(repeats):
            # Alternate which goes first; the same seeds give both the same random parameters.
            names = list(pipelines) if block % 2 == 0 else list(reversed(pipelines))
            for name in names:
                random.seed(block)
                torch.manual_seed(block)
                start = time.perf_counter()
                for _ in range(iterations):
                    pipelines[name](image)
                seconds[name].append((time.perf_counter() - start) / iterations)
    finally:
        torch.set_num_threads(threads)
    reference = seconds[next(iter(pipelines))]
    return [
        {
            "pipeline": name,
            "images_per_s": statistics.median(1.0 / s for s in per_image),
            "ms_per_image": 1e3 * statistics.median(per_image),
            "speedup": statistics.median(r / s for r, s in zip(reference, per_image)),
        }
        for name, per_image in seconds.items()
    ]


def augmentation_section(args) -> None:
    rows = bench_augmentation(args.iterations, args.repeats)
    print("## Multi-crop augmentation\n")
    print("500x375 RGB image, 2 global crops 224 + 8 local crops 96 (paper settings), one thread; "
          f"median of {args.repeats} interleaved blocks of {args.iterations} images.\n")
    print("| pipeline | images/s per worker | ms/image | speedup |")
    print("|---|---:|---:|---:|")
    for row in rows:
        rate, ms, speedup = row["images_per_s"], row["ms_per_image"], row["speedup"]
        print(f"| {row['pipeline']} | {rate:.1f} | {ms:.2f} | {speedup:.2f}x |")
    print(f"\nTarget: >= 1.5x the plain pipeline per worker; measured {rows[-1]['speedup']:.2f}x.\n")


# ------------------------------------------------------------------------------ data loader
class _SameImage(torch.utils.data.Dataset):
    """``num_images`` items ``(transform(image), 0)``, all of the same PIL image (no file is read)."""

    def __init__(self, image: Image.Image, num_images: int, transform):
        self.image, self.num_images, self.transform = image, num_images, transform

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        return self.transform(self.image), 0


def bench_loader(workers: list[int], batches: int, batch_size: int, device_augmentation: bool = False) -> list[dict]:
    """Images/s of :class:`PretrainLoader` with the paper's multi-crop augmentation, per worker count
    (``device_augmentation``: the workers' part of the split augmentation only).

    Each worker count gets its own loader; the first ``max(1, w)`` batches (worker start-up, first
    prefetch) are not timed, the next ``batches`` are. Returns one row per count:
    ``{"workers", "images_per_s", "ms_per_batch", "speedup"}`` (speedup against the first count).
    """
    image, augment = benchmark_image(), DINOMultiCrop(get_cfg(), device_augmentation=device_augmentation)
    pin = torch.cuda.is_available()
    rows = []
    for w in workers:
        skip = max(1, w)
        dataset = _SameImage(image, (skip + batches) * batch_size, augment)
        loader = PretrainLoader(dataset, batch_size=batch_size, num_workers=w, pin_memory=pin, seed=0)
        stream = loader.iterate(0)
        try:
            for _ in range(skip):
                next(stream)
            start = time.perf_counter()
            for _ in range(batches):
                next(stream)
            seconds = time.perf_counter() - start
        finally:
            loader.close()
        rows.append({"workers": w, "images_per_s": batches * batch_size / seconds,
                     "ms_per_batch": 1e3 * seconds / batches})
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def default_loader_workers() -> list[int]:
    """1, 2, 4, ... up to the CPU count (included)."""
    cpus, out = os.cpu_count() or 1, [1]
    while out[-1] * 2 < cpus:
        out.append(out[-1] * 2)
    return out + ([cpus] if cpus > out[-1] else [])


def loader_section(args) -> None:
    workers = args.loader_workers or default_loader_workers()
    paths = {"in the workers": False, "split: the workers' part": True}
    results = {name: bench_loader(workers, args.loader_batches, args.loader_batch_size, split)
               for name, split in paths.items()}
    print("## Data loader\n")
    print(f"`PretrainLoader`, paper multi-crop augmentation of one 500x375 RGB image, batches of "
          f"{args.loader_batch_size}, pinned memory {'on' if torch.cuda.is_available() else 'off'}; "
          f"{args.loader_batches} timed batches per row after the first max(1, workers); {os.cpu_count()} CPUs.\n")
    print("Augmentation in the workers (default), or split with the training device (INPUT.DEVICE_AUGMENTATION: "
          "the workers crop, resize and flip; the device stage is not timed here, see the JPEG section).\n")
    print("| augmentation | workers | images/s | ms/batch | speedup |")
    print("|---|---:|---:|---:|---:|")
    base = results["in the workers"][0]["images_per_s"]
    for name, rows in results.items():
        for row in rows:
            print(f"| {name} | {row['workers']} | {row['images_per_s']:.1f} | {row['ms_per_batch']:.1f} | "
                  f"{row['images_per_s'] / base:.2f}x |")
    print()


# ------------------------------------------------------------------------------ JPEG decoding
def jpeg_fixture(width: int, height: int, quality: int = 90) -> bytes:
    """:func:`benchmark_image` of ``width`` x ``height`` as JPEG bytes (quality 90, 4:2:0)."""
    import io

    buffer = io.BytesIO()
    benchmark_image(width, height).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def admissible_draft_factor(width: int, height: int, crop: int = 224, min_scale: float = 0.4,
                            min_ratio: float = 3 / 4) -> int:
    """The largest JPEG reduction (1, 2, 4 or 8) that keeps every RandomResizedCrop box of the paper's
    global crops (area >= ``min_scale``, aspect ratio >= ``min_ratio``) at least ``crop`` pixels on its
    short side: decoding smaller would make those crops upsample instead of downsample."""
    short_side = (min_scale * width * height * min_ratio) ** 0.5
    factor = 1
    while factor < 8 and short_side / (2 * factor) >= crop:
        factor *= 2
    return factor


def bench_decode(sizes, iterations: int) -> list[dict]:
    """ms per decode of one JPEG per size: Pillow (``load_image``'s path), torchvision.io's
    libjpeg-turbo decoder, and Pillow's reduced-size (DCT-domain) decoding at 1/2 and 1/4; with the
    multi-crop augmentation's ms on the decoded image, on one thread."""
    import io

    from torchvision.io import decode_jpeg

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        augment = DINOMultiCrop(get_cfg())
        for width, height in sizes:
            data = jpeg_fixture(width, height)
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)

            def pil(reduce: int = 1, data=data, size=(width, height)):
                image = Image.open(io.BytesIO(data))
                if reduce > 1:
                    image.draft("RGB", (size[0] // reduce, size[1] // reduce))
                image.load()
                return image.convert("RGB")

            decoders = {"Pillow": pil, "torchvision.io.decode_jpeg": lambda encoded=encoded: decode_jpeg(encoded),
                        "Pillow draft 1/2": lambda: pil(2), "Pillow draft 1/4": lambda: pil(4)}
            times = {}
            for name, decode in decoders.items():
                decode()
                start = time.perf_counter()
                for _ in range(iterations):
                    decode()
                times[name] = (time.perf_counter() - start) * 1e3 / iterations
            image = pil()
            augment(image)
            start = time.perf_counter()
            for _ in range(iterations):
                augment(image)
            rows.append(dict(size=f"{width}x{height}", kilobytes=len(data) / 1e3, decode_ms=times,
                             augment_ms=(time.perf_counter() - start) * 1e3 / iterations,
                             draft_factor=admissible_draft_factor(width, height)))
    finally:
        torch.set_num_threads(threads)
    return rows


def decode_section(args) -> None:
    sizes = [(500, 375), (2000, 1500)] if not args.quick else [(64, 48)]
    rows = bench_decode(sizes, args.iterations)
    names = list(rows[0]["decode_ms"])
    print("## JPEG decoding\n")
    print(f"One JPEG (quality 90) per size, one thread, mean of {args.iterations} decodes; then the paper's "
          "multi-crop augmentation of the decoded image, for the share decoding takes of an image's cost.\n")
    print("| image | KB | " + " | ".join(f"{n} ms" for n in names) + " | augmentation ms | decode share (Pillow) "
          "| reduction the paper's global crops allow |")
    print("|---|---:|" + "---:|" * len(names) + "---:|---:|---:|")
    for r in rows:
        pil_ms, augment_ms = r["decode_ms"]["Pillow"], r["augment_ms"]
        print(f"| {r['size']} | {r['kilobytes']:.0f} | " + " | ".join(f"{r['decode_ms'][n]:.2f}" for n in names)
              + f" | {augment_ms:.2f} | {100 * pil_ms / (pil_ms + augment_ms):.0f}% | 1/{r['draft_factor']} |")
    print("\nReduced-size decoding is only faithful where every global crop box stays at least 224 pixels on "
          "its short side after the reduction (last column); below that the crops would be upsampled.\n")


def bench_jpeg_pipeline(iterations: int, repeats: int, size=(500, 375), finish_batch: int = 32) -> dict:
    """Images/s per loader core from JPEG bytes to what the worker sends, with the work in the worker
    (default) and split with the device (``INPUT.DEVICE_AUGMENTATION``), interleaved block by block from
    the same seeds, one thread. Also: the device stage's ms per image when that device is this CPU
    (batches of ``finish_batch``, one thread and all threads) and the bytes each path sends per image.
    """
    import io

    from dino_research.data import collate_crops
    from dino_research.data.datasets import to_rgb

    data = jpeg_fixture(*size)
    cfg = get_cfg()
    in_worker, split = DINOMultiCrop(cfg), DINOMultiCrop(cfg, device_augmentation=True)
    paths = {"in the worker (default)": in_worker, "split: the worker's part (INPUT.DEVICE_AUGMENTATION)": split}

    def load_and_augment(augment):
        return augment(to_rgb(Image.open(io.BytesIO(data))))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for augment in paths.values():
            load_and_augment(augment)
        seconds = {name: [] for name in paths}
        for block in range(repeats):
            for name in (list(paths) if block % 2 == 0 else list(reversed(paths))):
                random.seed(block)
                torch.manual_seed(block)
                start = time.perf_counter()
                for _ in range(iterations):
                    load_and_augment(paths[name])
                seconds[name].append((time.perf_counter() - start) / iterations)
        samples = [(load_and_augment(split), 0) for _ in range(finish_batch)]
        batch, _ = collate_crops(samples)
        finish_ms = {}
        for count in sorted({1, threads}):
            torch.set_num_threads(count)
            split.finish_batch(batch, "cpu")
            start = time.perf_counter()
            split.finish_batch(batch, "cpu")
            finish_ms[count] = (time.perf_counter() - start) * 1e3 / finish_batch
    finally:
        torch.set_num_threads(threads)
    sent = {name: sum(t.numel() * t.element_size() for t in (out if isinstance(out, list) else
                                                             out["crops"] + [out["crop_params"]]))
            for name, out in ((n, load_and_augment(a)) for n, a in paths.items())}
    base = seconds[next(iter(paths))]
    rows = [dict(path=name, images_per_s=statistics.median(1.0 / t for t in per_image),
                 ms_per_image=1e3 * statistics.median(per_image), kilobytes_sent=sent[name] / 1e3,
                 speedup=statistics.median(b / t for b, t in zip(base, per_image)))
            for name, per_image in seconds.items()]
    return dict(rows=rows, finish_ms=finish_ms, size=size, batch=finish_batch)


def jpeg_pipeline_section(args) -> None:
    size = (500, 375) if not args.quick else (64, 48)
    result = bench_jpeg_pipeline(args.iterations, args.repeats, size, finish_batch=32 if not args.quick else 2)
    print("## From JPEG to crops, per loader core\n")
    print(f"A {size[0]}x{size[1]} JPEG (quality 90) decoded with Pillow and augmented with the paper's multi-crop "
          f"(2x224 + 8x96), one thread; median of {args.repeats} interleaved blocks of {args.iterations} images.\n")
    print("| path | images/s per core | ms/image | KB sent per image | speedup |")
    print("|---|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['path']} | {row['images_per_s']:.1f} | {row['ms_per_image']:.2f} | "
              f"{row['kilobytes_sent']:.0f} | {row['speedup']:.2f}x |")
    cost = ", ".join(f"{ms:.2f} ms/image on {n} thread{'s' if n > 1 else ''}" for n, ms in result["finish_ms"].items())
    print(f"\nThe split's device stage (jitter, grayscale, blur, solarization, normalization, batches of "
          f"{result['batch']}) when the device is this CPU: {cost}. Target: >= 2x images/s per core for the "
          f"worker; measured {result['rows'][-1]['speedup']:.2f}x.\n")


def training_section(args) -> None:
    tool = _load_tool("bench_training")
    print("## Training step\n")
    tool.main(["--quick"] if args.quick else ["--iters", str(args.training_iters)])
    print()


def _load_tool(name: str):
    """A sibling script of ``tools/`` as a module (``tools`` is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ main
# Section name -> function(args) printing its Markdown. A new section is one function and one entry
# here (with its own arguments in ``main``'s parser); ``--only`` offers exactly these names.
SECTIONS = {
    "augmentation": augmentation_section,
    "decode": decode_section,
    "jpeg": jpeg_pipeline_section,
    "loader": loader_section,
    "training": training_section,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), help="run only this section (default: every section)")
    parser.add_argument("--iterations", type=int, default=40, help="augmentation: images per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="augmentation: timed blocks per pipeline")
    parser.add_argument("--training-iters", type=int, default=5, help="training: timed steps per precision")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=None,
                        help="loader: worker counts to time (default 1, 2, 4, ... up to the CPU count)")
    parser.add_argument("--loader-batches", type=int, default=32, help="loader: timed batches per worker count")
    parser.add_argument("--loader-batch-size", type=int, default=64, help="loader: images per batch")
    parser.add_argument("--quick", action="store_true", help="smoke test of every section (measures nothing)")
    args = parser.parse_args(argv)
    if min(args.iterations, args.repeats, args.training_iters, args.loader_batches, args.loader_batch_size) < 1:
        parser.error("--iterations, --repeats, --training-iters, --loader-batches and --loader-batch-size must be >= 1")
    if args.loader_workers and min(args.loader_workers) < 0:
        parser.error("--loader-workers must be >= 0")
    if args.quick:
        args.iterations, args.repeats = 2, 1
        args.loader_workers, args.loader_batches, args.loader_batch_size = args.loader_workers or [0, 1], 2, 2

    command = [os.path.basename(sys.executable), sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    print(f"Machine: {machine_line()}")
    print(f"Command: {' '.join(shlex.quote(a) for a in command)}\n")
    for name in [args.only] if args.only else SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
