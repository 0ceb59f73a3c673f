#!/usr/bin/env python
"""Benchmark the one-pass multi-k k-NN classifier against the per-k approach of the DINO reference.

    python tools/benchmark_knn.py [--num-train 50000] [--num-test 10000] [--dim 384] [--classes 1000]
                                  [--ks 10 20 100 200] [--chunk-size 256] [--noise 3] [--device cpu]
                                  [--quick]

Random L2-normalized features: a Gaussian class centre plus ``--noise`` times Gaussian noise, then
normalized, so that accuracy is far from both 0 and 100% and differs across k (what matters is
the time and that both methods agree). Both methods run once, on the same data and chunk size; the
script prints a Markdown table of seconds and the speedup, and fails if their accuracies differ.
This is a benchmark, not a test: it takes a minute or two on a laptop CPU at the default sizes.
"""

import argparse
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from benchmark import cpu_model  # the shared machine description of tools/benchmark.py

from dino_research.evaluation.knn import knn_classifier_multi_k


@torch.no_grad()
def per_k_reference(train_features, train_labels, test_features, test_labels, k, T, num_classes, chunk_size):
    """The straightforward way, as in the DINO reference: for one k, per chunk a similarity matmul,
    ``topk(k)`` and a dense one-hot (chunk * k, C) vote. Returns (top1, top5) in percent."""
    top = min(5, num_classes)
    correct1 = correct5 = 0
    for start in range(0, test_features.shape[0], chunk_size):
        q = test_features[start:start + chunk_size]
        targets = test_labels[start:start + chunk_size]
        sim = q @ train_features.T
        w, idx = sim.topk(k, dim=1, largest=True, sorted=True)
        c = q.shape[0]
        onehot = torch.zeros(c * k, num_classes, device=q.device).scatter_(1, train_labels[idx].view(-1, 1), 1)
        votes = (onehot.view(c, k, num_classes) * (w / T).exp().unsqueeze(-1)).sum(1)
        # Same tie rule as the library (stable sort: equal votes ranked by class index).
        pred = votes.argsort(dim=1, descending=True, stable=True)[:, :top]
        hits = pred == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    n = test_features.shape[0]
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=50_000)
    parser.add_argument("--num-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--noise", type=float, default=3.0,
                        help="std of the Gaussian noise around unit-variance class centres (accuracy < 100%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5000 train x 1000 test")
    args = parser.parse_args()
    if args.quick:
        args.num_train, args.num_test = min(args.num_train, 5000), min(args.num_test, 1000)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(args.classes, args.dim, generator=gen)
    train_labels = torch.randint(0, args.classes, (args.num_train,), generator=gen)
    test_labels = torch.randint(0, args.classes, (args.num_test,), generator=gen)

    def sample(labels):
        noise = args.noise * torch.randn(labels.shape[0], args.dim, generator=gen)
        return F.normalize(centers[labels] + noise, dim=1).to(device)

    train, test = sample(train_labels), sample(test_labels)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    common = dict(T=args.temperature, num_classes=args.classes, chunk_size=args.chunk_size)

    # Warm-up on a small slice (allocator, thread pool, CUDA context), not timed.
    knn_classifier_multi_k(train[:1000], train_labels[:1000], test[:64], test_labels[:64], args.ks, **common)
    per_k_reference(train[:1000], train_labels[:1000], test[:64], test_labels[:64], min(args.ks), **common)

    sync(device)
    t0 = time.perf_counter()
    ours = knn_classifier_multi_k(train, train_labels, test, test_labels, args.ks, **common)
    sync(device)
    t_ours = time.perf_counter() - t0

    ref = {}
    t0 = time.perf_counter()
    for k in args.ks:
        ref[k] = per_k_reference(train, train_labels, test, test_labels, k, **common)
    sync(device)
    t_ref = time.perf_counter() - t0

    command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
          f"{gpu}; torch {torch.__version__}; python {platform.python_version()}")
    print(f"Command: {command}")
    print(f"Data: {args.num_train} train x {args.num_test} test features, dim {args.dim}, {args.classes} classes, "
          f"T={args.temperature}, chunk {args.chunk_size}, device {device}\n")
    ks = ", ".join(map(str, args.ks))
    print("| method | k | seconds | speedup |")
    print("|---|---|---:|---:|")
    print(f"| per-k reference (matmul + topk(k) + one-hot vote, once per k) | {ks} | {t_ref:.2f} | 1.00x |")
    print(f"| `knn_classifier_multi_k` (one pass, incremental votes) | {ks} | {t_ours:.2f} | {t_ref / t_ours:.2f}x |")
    print("\n| k | top-1 (multi-k) | top-5 (multi-k) | top-1 (per-k) | top-5 (per-k) |")
    print("|---:|---:|---:|---:|---:|")
    for k in args.ks:
        print(f"| {k} | {ours[k][0]:.2f} | {ours[k][1]:.2f} | {ref[k][0]:.2f} | {ref[k][1]:.2f} |")
    mismatched = [k for k in args.ks if ours[k] != ref[k]]
    if mismatched:
        raise SystemExit(f"accuracies differ between the two methods for k in {mismatched}")
    print("\nBoth methods give identical accuracies.")


if __name__ == "__main__":
    main()
