"""Nearest neighbours among extracted embeddings: cosine top-k, near-duplicate pairs, pictures of them.

Works on the arrays ``tools/extract_features.py`` writes (``features.npy`` (N, D) + ``index.csv``; see
:mod:`~dino_research.evaluation.embeddings`). Similarity is the cosine: rows are L2-normalized here
whether or not they were at extraction. Rows of unreadable images (NaN) are never a neighbour, a
query or half of a pair. Similarities are computed in blocks, so memory stays at ``block x N`` floats.
"""

from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.plots import save_figure

__all__ = ["near_duplicates", "neighbors_figure", "top_k_neighbors", "unit_rows", "write_csv"]


def unit_rows(features: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (N, D) float32 of unit L2 norm, valid (N,) bool)``; invalid (non-finite) rows are zero."""
    x = torch.tensor(np.asarray(features, dtype=np.float32), device=device)  # a copy: memory maps are read-only
    valid = torch.isfinite(x).all(dim=1)
    x = torch.where(valid[:, None], x, torch.zeros((), device=x.device))
    return F.normalize(x, dim=1), valid


def top_k_neighbors(features: np.ndarray, queries: Sequence[int], k: int, *, block: int = 8192,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows most cosine-similar to each query row, the query itself excluded.

    Args:
        features: (N, D) embeddings (any norm; NaN rows are skipped).
        queries: Q row indices, each of a valid row.
        k: neighbours per query; at most the number of other valid rows.

    Returns ``(similarity (Q, k) float32, rows (Q, k) int64)`` on the CPU, most similar first
    (ties: the lower row first).
    """
    x, valid = unit_rows(features, device)
    queries = torch.as_tensor(list(queries), dtype=torch.int64, device=x.device)
    if not bool(valid[queries].all()):
        raise ValueError("a query row is the row of an unreadable image (NaN features)")
    k = min(k, int(valid.sum()) - 1)
    if k < 1:
        raise ValueError("top_k_neighbors needs at least two valid rows")
    q = x[queries]  # (Q, D)
    best_sim = torch.full((len(queries), 0), float("-inf"), device=x.device)
    best_row = torch.zeros((len(queries), 0), dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], block):
        stop = min(start + block, x.shape[0])
        sims = q @ x[start:stop].T  # (Q, block)
        columns = torch.arange(start, stop, device=x.device)
        sims[:, ~valid[start:stop]] = float("-inf")
        sims[columns[None, :] == queries[:, None]] = float("-inf")  # not its own neighbour
        # Merge this block's candidates with the best so far; a stable sort keeps lower rows first.
        sims = torch.cat([best_sim, sims], dim=1)
        rows = torch.cat([best_row, columns.expand(len(queries), -1)], dim=1)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        best_sim, best_row = sims.gather(1, order), rows.gather(1, order)
    return best_sim.float().cpu(), best_row.cpu()


def near_duplicates(features: np.ndarray, threshold: float, *, block: int = 2048,
                    device: torch.device | str = "cpu") -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, similarity)`` with ``i < j`` and cosine similarity >= ``threshold``, the
    most similar first (then by ``i``, ``j``). Costs N^2 / 2 dot products: a GPU helps beyond ~10^5 rows.
    """
    x, valid = unit_rows(features, device)
    n = x.shape[0]
    found = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = x[start:stop] @ x[start:].T  # (b, n - start): pairs with j >= start
        i = torch.arange(start, stop, device=x.device)[:, None]
        j = torch.arange(start, n, device=x.device)[None, :]
        keep = (sims >= threshold) & (j > i) & valid[start:stop, None] & valid[None, start:]
        rows, cols = keep.nonzero(as_tuple=True)
        found += zip((rows + start).tolist(), (cols + start).tolist(), sims[rows, cols].tolist())
    return sorted(found, key=lambda t: (-t[2], t[0], t[1]))


def write_csv(path: str, header: Sequence[str], rows) -> str:
    """``header`` then ``rows`` to ``path`` (folders created), through a temporary and a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _thumbnail(path: str, size: int) -> np.ndarray:
    """The image at ``path`` scaled to fit ``size`` x ``size`` (aspect kept, centred on grey; grey alone
    for a file that cannot be read), RGB uint8 (size, size, 3)."""
    from PIL import Image

    from ..data.images import UnreadableImageError, load_image

    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    try:
        image = load_image(path)
    except UnreadableImageError:
        return np.asarray(canvas)
    scale = size / max(image.size)  # small images are enlarged too: a grid of stamps says nothing
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas)


def neighbors_figure(query_paths: Sequence[str], neighbor_paths: Sequence[Sequence[str]],
                     similarities, out: str, *, thumb: int = 160, titles: Sequence[str] | None = None) -> str:
    """One row per query: the query, then its neighbours captioned with their cosine similarity.

    ``neighbor_paths`` (Q, k) and ``similarities`` (Q, k) as :func:`top_k_neighbors` ranks them;
    ``titles`` (Q,) replaces the query captions (default: its file name). Written to ``out`` (PNG)
    through a temporary and a rename; returns ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = np.asarray(similarities, dtype=np.float64)
    rows, cols = len(query_paths), 1 + max((len(n) for n in neighbor_paths), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for r, query in enumerate(query_paths):
        cells = [(query, titles[r] if titles else f"query\n{_short(query)}")]
        cells += [(p, f"{sims[r, c]:.3f}\n{_short(p)}") for c, p in enumerate(neighbor_paths[r])]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cells):
                ax.imshow(_thumbnail(cells[c][0], thumb))
                ax.set_title(cells[c][1], fontsize=7, color="tab:blue" if c == 0 else "black")
    fig.tight_layout()
    return save_figure(fig, out)


def _short(path: str, width: int = 22) -> str:
    name = os.path.basename(path)
    return name if len(name) <= width else name[: width - 3] + "..."
