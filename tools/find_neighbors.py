#!/usr/bin/env python
"""Nearest neighbours (cosine) among the embeddings written by tools/extract_features.py.

    python tools/find_neighbors.py EMBEDDINGS_DIR [--query PATH ...] [--num-queries 8] [--k 5]
        [--seed 0] [--output DIR] [--duplicates THRESH] [--device cpu]

Queries are images of the extraction (``--query``: paths as in index.csv, or any spelling of the
same file), or a random sample of ``--num-queries`` rows drawn from ``--seed``. For each, the ``--k``
most similar other images. Written to ``--output`` (default ``EMBEDDINGS_DIR/neighbors``):
``neighbors.csv`` (query_row, query_path, rank, row, path, similarity) and ``neighbors.png`` (one row
per query: the query, then its neighbours with their similarity in the caption).

``--duplicates THRESH`` also lists every pair of images with a cosine similarity of at least THRESH
(e.g. 0.95 for near-duplicates: resized, recompressed or lightly edited copies) in ``duplicates.csv``
(row_a, path_a, row_b, path_b, similarity; most similar first) and draws the 16 most similar pairs
in ``duplicates.png``. That compares all N^2/2 pairs: use ``--device cuda`` for large collections.
Images that could not be read at extraction (NaN rows) are left out of everything.
"""

import argparse
import os
import sys

import numpy as np

from dino_research.evaluation.embeddings import EmbeddingsError, load_embeddings
from dino_research.evaluation.neighbors import near_duplicates, neighbors_figure, top_k_neighbors, write_csv

# Pairs drawn in duplicates.png: enough to judge the threshold, few enough to read.
SHOWN_PAIRS = 16


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embeddings", help="the --output folder of tools/extract_features.py")
    parser.add_argument("--query", nargs="+", default=[], metavar="PATH", help="images of the extraction to query")
    parser.add_argument("--num-queries", type=int, default=8, help="random queries when --query is not given")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random queries")
    parser.add_argument("--output", default="", help="folder of the results (default EMBEDDINGS/neighbors)")
    parser.add_argument("--duplicates", type=float, default=None, metavar="THRESH",
                        help="also list the pairs with cosine similarity >= THRESH")
    parser.add_argument("--device", default="cpu", help="where similarities are computed (cpu, cuda)")
    return parser


def query_rows(args, paths: list, valid: np.ndarray) -> list:
    """Rows of ``--query`` (matched by path, absolute path or real path), else a seeded random sample."""
    if not args.query:
        candidates = np.flatnonzero(valid)
        count = min(args.num_queries, len(candidates))
        return sorted(np.random.default_rng(args.seed).choice(candidates, count, replace=False).tolist())
    lookup = {}
    for row, path in enumerate(paths):
        for key in (path, os.path.abspath(path), os.path.realpath(path)):
            lookup.setdefault(key, row)
    rows = []
    for query in args.query:
        row = next((lookup[k] for k in (query, os.path.abspath(query), os.path.realpath(query)) if k in lookup), None)
        if row is None:
            raise EmbeddingsError(f"--query {query}: not an image of this extraction (see {args.embeddings}/index.csv)")
        if not valid[row]:
            raise EmbeddingsError(f"--query {query}: this image could not be read at extraction (NaN features)")
        rows.append(row)
    return rows


def main(args) -> None:
    features, paths, _ = load_embeddings(args.embeddings)
    out = args.output or os.path.join(args.embeddings, "neighbors")
    valid = np.isfinite(features[:, 0])
    queries = query_rows(args, paths, valid)
    sims, rows = top_k_neighbors(features, queries, args.k, device=args.device)
    write_csv(os.path.join(out, "neighbors.csv"), ["query_row", "query_path", "rank", "row", "path", "similarity"],
              [(q, paths[q], rank + 1, r, paths[r], f"{s:.6f}") for q, qs, qr in zip(queries, sims.tolist(),
               rows.tolist()) for rank, (s, r) in enumerate(zip(qs, qr))])
    neighbors_figure([paths[q] for q in queries], [[paths[r] for r in qr] for qr in rows.tolist()], sims,
                     os.path.join(out, "neighbors.png"))
    print(f"{len(queries)} queries, {rows.shape[1]} neighbours each: {out}/neighbors.csv, {out}/neighbors.png")
    if args.duplicates is not None:
        pairs = near_duplicates(features, args.duplicates, device=args.device)
        write_csv(os.path.join(out, "duplicates.csv"), ["row_a", "path_a", "row_b", "path_b", "similarity"],
                  [(i, paths[i], j, paths[j], f"{s:.6f}") for i, j, s in pairs])
        if pairs:
            shown = pairs[:SHOWN_PAIRS]
            neighbors_figure([paths[i] for i, _, _ in shown], [[paths[j]] for _, j, _ in shown],
                             [[s] for _, _, s in shown], os.path.join(out, "duplicates.png"))
        print(f"{len(pairs)} pairs with similarity >= {args.duplicates}: {out}/duplicates.csv")


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (EmbeddingsError, ValueError) as e:  # the user's to fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
