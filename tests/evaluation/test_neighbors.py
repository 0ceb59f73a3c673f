"""Neighbour search on extracted embeddings: top-k and near-duplicate pairs against a brute-force
numpy search, unreadable rows left out, and tools/find_neighbors.py writing its CSV files and grids."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from tool_utils import load_tool

from dino_research.evaluation.neighbors import near_duplicates, top_k_neighbors


def brute_force(features, query, k):
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = x @ x[query]
    sims[query] = -np.inf
    sims[~np.isfinite(sims)] = -np.inf
    order = np.argsort(-sims, kind="stable")[:k]
    return sims[order], order


def test_top_k_matches_a_brute_force_search_across_blocks():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 8)).astype(np.float32) * rng.uniform(0.5, 3, (50, 1)).astype(np.float32)
    features[7] = np.nan  # an unreadable image
    sims, rows = top_k_neighbors(features, [0, 13, 49], 6, block=16)  # several blocks merged
    for q, got_sims, got_rows in zip([0, 13, 49], sims.numpy(), rows.numpy()):
        want_sims, want_rows = brute_force(features, q, 6)
        assert got_rows.tolist() == want_rows.tolist() and 7 not in got_rows and q not in got_rows
        np.testing.assert_allclose(got_sims, want_sims, atol=1e-5)
    with pytest.raises(ValueError, match="unreadable"):
        top_k_neighbors(features, [7], 3)
    assert top_k_neighbors(features[5:9], [0], 10)[1].shape == (1, 2)  # k clipped: 2 other valid rows


def test_near_duplicates_are_every_pair_above_the_threshold():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 16)).astype(np.float32)
    features[12] = features[3] * 2 + 0.01 * rng.normal(size=16)  # a rescaled near-copy
    features[25] = features[3]
    features[20] = np.nan
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = x @ x.T
    want = sorted(((i, j, sims[i, j]) for i in range(30) for j in range(i + 1, 30)
                   if np.isfinite(sims[i, j]) and sims[i, j] >= 0.4), key=lambda t: (-t[2], t[0], t[1]))
    got = near_duplicates(features, 0.4, block=7)
    assert len(got) == len(want) > 5 and {(i, j) for i, j, _ in got} == {(i, j) for i, j, _ in want}
    for i, j, sim in got:
        assert i < j and abs(sim - sims[i, j]) < 1e-5
    assert [s for _, _, s in got] == sorted((s for _, _, s in got), reverse=True)  # most similar first
    assert {(i, j) for i, j, _ in near_duplicates(features, 0.99)} == {(3, 12), (3, 25), (12, 25)}


@pytest.fixture
def embeddings(tmp_path):
    """An extraction folder as tools/extract_features.py leaves it: 6 images, one unreadable (NaN)."""
    rng = np.random.default_rng(2)
    out, paths = tmp_path / "emb", []
    out.mkdir()
    for i in range(6):
        path = tmp_path / "imgs" / f"img_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    features = rng.normal(size=(6, 4)).astype(np.float32)
    features[4] = features[1] + 0.001  # a near-duplicate of image 1
    features[5] = np.nan
    np.save(out / "features.npy", features)
    with open(out / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows([["row", "path"], *enumerate(paths)])
    (out / "meta.json").write_text(json.dumps({"format": "dino_research.embeddings/1", "complete": True}))
    return out, paths, features


def test_tool_writes_the_neighbour_grid_and_the_duplicates(embeddings, tmp_path, capsys):
    out, paths, features = embeddings
    tool = load_tool("find_neighbors")
    tool.main(tool.build_parser().parse_args([str(out), "--query", paths[1], "--k", "3", "--duplicates", "0.99"]))
    with open(out / "neighbors" / "neighbors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    _, want = brute_force(features, 1, 3)
    assert [int(r["row"]) for r in rows] == want.tolist() and rows[0]["row"] == "4"
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and {r["query_path"] for r in rows} == {paths[1]}
    assert float(rows[0]["similarity"]) > 0.99
    with open(out / "neighbors" / "duplicates.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert [(p["row_a"], p["row_b"]) for p in pairs] == [("1", "4")] and pairs[0]["path_b"] == paths[4]
    for name in ("neighbors.png", "duplicates.png"):
        with Image.open(out / "neighbors" / name) as figure:
            assert figure.format == "PNG"
    assert "1 pairs with similarity >= 0.99" in capsys.readouterr().out
    # Random queries: a seeded sample of the readable rows; the unreadable one is never drawn.
    tool.main(tool.build_parser().parse_args([str(out), "--num-queries", "10", "--k", "2", "--output",
                                              str(tmp_path / "random")]))
    with open(tmp_path / "random" / "neighbors.csv", newline="") as f:
        queries = {int(r["query_row"]) for r in csv.DictReader(f)}
    assert queries == {0, 1, 2, 3, 4}
    from dino_research.evaluation.embeddings import EmbeddingsError

    with pytest.raises(EmbeddingsError, match="not an image of this extraction"):
        tool.main(tool.build_parser().parse_args([str(out), "--query", str(tmp_path / "elsewhere.png")]))
    with pytest.raises(EmbeddingsError, match="could not be read"):
        tool.main(tool.build_parser().parse_args([str(out), "--query", paths[5]]))
