"""Revisited Oxford/Paris retrieval: revisitop's metric on hand-made rankings, the restricted
ground-truth reader, multi-scale features, and tools/eval_retrieval.py end to end on a tiny fixture."""

import functools
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from tool_utils import load_tool

from dino_research.data import DatasetError
from dino_research.evaluation.retrieval import (
    RestrictedUnpickler,
    RevisitOPImages,
    compute_ap,
    compute_map,
    evaluate_revisitop,
    load_revisitop_ground_truth,
    multi_scale_features,
    rank_database,
    revisitop_protocols,
)

REPO = Path(__file__).resolve().parents[2]


def column(*ranking):
    """One query's ranking as revisitop's (N, 1) ranks array."""
    return np.array(ranking).reshape(-1, 1)


# ------------------------------------------------------------------------------------ metric
def test_perfect_ranking_scores_one():
    ranks = np.stack([np.arange(6), np.array([3, 4, 0, 1, 2, 5])], axis=1)  # (6 database, 2 queries)
    gnd = [{"ok": [0, 1, 2], "junk": []}, {"ok": [3, 4], "junk": []}]
    mean_ap, aps, pr, prs = compute_map(ranks, gnd, [1, 2])
    assert mean_ap == pytest.approx(1.0) and aps.tolist() == pytest.approx([1.0, 1.0])
    assert pr.tolist() == pytest.approx([1.0, 1.0]) and prs.shape == (2, 2)


def test_known_interleaving():
    # Positives found at 0-based ranks 0, 2 and 5, a fourth never retrieved (nres = 4). Trapezoids,
    # (j / r + (j + 1) / (r + 1)) / 2 / 4 for the j-th positive at rank r (j / r = 1 at r = 0):
    #   (1 + 1) / 8 + (1/2 + 2/3) / 8 + (2/5 + 3/6) / 8 = 30/120 + 17.5/120 + 13.5/120 = 61/120
    assert compute_ap([0, 2, 5], 4) == pytest.approx(61 / 120)
    # The same through compute_map: database indices 7, 9 and 4 are the retrieved positives, 8 the
    # missed one (not in this truncated ranking).
    ranks = column(7, 1, 9, 2, 3, 4)
    mean_ap, aps, pr, prs = compute_map(ranks, [{"ok": [7, 9, 4, 8]}], [1, 5, 10])
    assert mean_ap == pytest.approx(61 / 120)
    # P@k is measured at min(k, rank of the last positive) = min(k, 6), 1-based positives 1, 3, 6:
    # 1/1, 2/5, 3/6.
    assert prs[0].tolist() == pytest.approx([1.0, 2 / 5, 3 / 6])


def test_junk_images_are_taken_out_of_the_ranking():
    # Ranking: junk, positive, negative, positive. Without the junk the positives sit at ranks 0 and
    # 2: AP = (1 + 1) / 4 + (1/2 + 2/3) / 4 = 1/2 + 7/24 = 19/24 (counting the junk would give 1/3).
    ranks = column(5, 1, 2, 3)
    mean_ap, _, _, prs = compute_map(ranks, [{"ok": [1, 3], "junk": [5]}], [1, 5])
    assert mean_ap == pytest.approx(19 / 24)
    assert prs[0].tolist() == pytest.approx([1.0, 2 / 3])  # P@5 at the last positive's rank 3
    assert compute_map(ranks, [{"ok": [1, 3]}], [])[0] == pytest.approx(((0 + 1 / 2) + (1 / 3 + 2 / 4)) / 4)


def test_query_without_positives_is_skipped_as_revisitop_does():
    ranks = np.stack([np.array([0, 1, 2]), np.array([2, 1, 0])], axis=1)
    gnd = [{"ok": [1], "junk": []}, {"ok": [], "junk": [0]}]
    mean_ap, aps, pr, prs = compute_map(ranks, gnd, [1])
    # query 0: its positive at rank 1 -> (0 + 1/2) / 2 = 1/4; query 1: NaN, left out of the means
    assert aps[0] == pytest.approx(0.25) and np.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert mean_ap == pytest.approx(0.25) and pr.tolist() == pytest.approx([0.0])
    with pytest.raises(ValueError, match="no query has a positive"):
        compute_map(ranks, [{"ok": []}, {"ok": []}])


def test_medium_and_hard_protocols():
    gnd = [{"easy": np.array([0]), "hard": np.array([2]), "junk": np.array([1])}]
    protocols = revisitop_protocols(gnd)
    assert sorted(protocols["medium"][0]["ok"].tolist()) == [0, 2] and protocols["medium"][0]["junk"].tolist() == [1]
    assert protocols["hard"][0]["ok"].tolist() == [2] and sorted(protocols["hard"][0]["junk"].tolist()) == [0, 1]
    # Ranking 0 (easy), 1 (junk), 2 (hard), 3: Medium has positives at ranks 0 and 1 once the junk
    # is out (AP 1); Hard sees the hard image first once easy and junk are out (AP 1, P@1 1).
    results = evaluate_revisitop(column(0, 1, 2, 3), gnd, kappas=(1,))
    assert results["medium"]["mAP"] == pytest.approx(100.0) and results["hard"]["mP@1"] == pytest.approx(100.0)
    # Ranking 3, 2, 0, 1: Hard positive at rank 1 -> 25; Medium positives at ranks 1, 2 -> (1/2 + (1/2 + 2/3)) / 4
    results = evaluate_revisitop(column(3, 2, 0, 1), gnd, kappas=(1, 5))
    assert results["hard"]["mAP"] == pytest.approx(25.0) and results["hard"]["AP"] == pytest.approx([25.0])
    assert results["medium"]["mAP"] == pytest.approx(100 * (1 / 2 + 7 / 6) / 4)
    assert results["medium"]["mP@1"] == 0.0 and results["medium"]["mP@5"] == pytest.approx(100 * 2 / 3)


def test_rank_database_sorts_by_cosine_similarity():
    database = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    queries = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert rank_database(database, queries).T.tolist() == [[1, 2, 0], [0, 2, 1]]


# ------------------------------------------------------------------------------------ ground truth
class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"imlist": ["a"], "gnd": [_RunsCode()]})
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    assert not (tmp_path / "pwned.txt").exists()
    # and through the loader: one DatasetError naming the file
    (tmp_path / "roxford5k").mkdir()
    (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(payload)
    with pytest.raises(DatasetError, match=r"gnd_roxford5k\.pkl.*refusing to load global"):
        load_revisitop_ground_truth(str(tmp_path), "roxford5k")
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_reads_numpy_data(protocol):
    data = {"gnd": [{"easy": np.array([1, 2]), "bbx": [np.float64(1.5), 2.0], "tags": {"a"}}], "raw": b"\x00\xff"}
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(data, protocol=protocol))).load()
    assert loaded["gnd"][0]["easy"].tolist() == [1, 2] and loaded["gnd"][0]["bbx"] == [1.5, 2.0]
    assert loaded["gnd"][0]["tags"] == {"a"} and loaded["raw"] == b"\x00\xff"


def test_missing_or_malformed_ground_truth_names_the_file(tmp_path):
    path = tmp_path / "rparis6k" / "gnd_rparis6k.pkl"
    with pytest.raises(DatasetError, match=rf"{path}.*does not exist.*jpg/NAME\.jpg"):
        load_revisitop_ground_truth(str(tmp_path), "rparis6k")
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "junk": []}]}))
    with pytest.raises(DatasetError, match=r"gnd\[0\] must be a dict with 'easy', 'hard' and 'junk'"):
        load_revisitop_ground_truth(str(tmp_path), "rparis6k")
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(DatasetError, match=r"integer indices in \[0, 1\)"):
        load_revisitop_ground_truth(str(tmp_path), "rparis6k")
    with pytest.raises(DatasetError, match="unknown revisitop dataset"):
        load_revisitop_ground_truth(str(tmp_path), "holidays")


# ------------------------------------------------------------------------------------ fixture and images
def write_image(path, seed, size=(80, 60)):
    """A JPEG of ``size`` (W, H): noise of one seed on a seed-dependent colour, so images differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def build_roxford(root):
    """roxford5k layout: d0-d2 are other images; query q0 has three exact copies in the database (d3
    hard, d4 junk, d5 easy), query q1 one (d6, easy) and no hard positive."""
    images = root / "roxford5k" / "jpg"
    images.mkdir(parents=True)
    write_image(images / "q0.jpg", 0)
    write_image(images / "q1.jpg", 1, size=(60, 80))
    for i in range(3):
        write_image(images / f"d{i}.jpg", 10 + i, size=(70 + 10 * i, 64))
    for name in ("d3", "d4", "d5"):
        shutil.copy(images / "q0.jpg", images / f"{name}.jpg")
    shutil.copy(images / "q1.jpg", images / "d6.jpg")
    gnd = [
        {"easy": np.array([5]), "hard": np.array([3]), "junk": np.array([4]), "bbx": np.array([5.0, 5.0, 60.0, 50.0])},
        {"easy": np.array([6]), "hard": np.array([], dtype=np.int64), "junk": np.array([], dtype=np.int64),
         "bbx": np.array([0.0, 0.0, 30.0, 40.0])},
    ]
    data = {"imlist": [f"d{i}" for i in range(7)], "qimlist": ["q0", "q1"], "gnd": gnd}
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(data))
    return root


def test_images_are_shrunk_never_enlarged_and_queries_optionally_cropped(tmp_path):
    ground_truth = load_revisitop_ground_truth(str(build_roxford(tmp_path)), "roxford5k")
    assert ground_truth.gnd[0]["bbx"] == (5.0, 5.0, 60.0, 50.0) and ground_truth.gnd[1]["hard"].dtype == np.int64
    kwargs = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    queries = RevisitOPImages(ground_truth, "query", imsize=40, **kwargs)
    image, index = queries[1]
    assert index == 1 and image.shape == (3, 40, 30)  # 60x80 (WxH) -> longer side 40
    assert RevisitOPImages(ground_truth, "database", imsize=500, **kwargs)[3][0].shape == (3, 60, 80)  # kept
    cropped = RevisitOPImages(ground_truth, "query", imsize=500, crop_queries=True, **kwargs)
    assert cropped[0][0].shape == (3, 45, 55)  # bbx (5, 5, 60, 50)
    (tmp_path / "roxford5k" / "jpg" / "d4.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 7 database images.*d4\.jpg"):
        RevisitOPImages(ground_truth, "database", imsize=40, **kwargs)


class _Recorder(nn.Module):
    """Records input sizes; features (B, 2): the mean of channel 0 and of channel 1."""

    patch_size = 4

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return x[:, :2].mean(dim=(2, 3))


def test_multi_scale_features_average_three_scales():
    images = torch.rand(2, 3, 20, 28)
    backbone = _Recorder()
    features = multi_scale_features(backbone, images)
    # 20x28 at 1, 1/sqrt(2) (14x19) and 1/2 (10x14), each cropped to a multiple of the patch size 4
    assert backbone.sizes == [(20, 28), (12, 16), (8, 12)]
    resize = functools.partial(torch.nn.functional.interpolate, mode="bilinear", align_corners=False)
    scaled = [images, resize(images, scale_factor=2 ** -0.5)[..., :12, :16], resize(images, scale_factor=0.5)[..., :8, :12]]
    mean = sum(x[:, :2].mean(dim=(2, 3)) for x in scaled) / 3
    torch.testing.assert_close(features, mean / mean.norm(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------ the tool
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A training checkpoint of a 2-block ViT-tiny/16 (config stored inside, as the trainer writes it)."""
    from conftest import tiny_cfg

    from dino_research.checkpoint import Checkpointer
    from dino_research.modeling import build_model

    cfg = tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2})
    return Checkpointer(str(tmp_path_factory.mktemp("ckpt")), build_model(cfg)).save("model.pth", iteration=1,
                                                                                       config=cfg.dump())


def test_tool_end_to_end(tmp_path, tiny_checkpoint):
    root = build_roxford(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools" / "eval_retrieval.py"), "--weights", tiny_checkpoint,
           "--data-root", str(root), "--dataset", "roxford5k", "--imsize", "64", "--multiscale",
           "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "retrieval_roxford5k.json").read_text())
    assert summary["num_database"] == 7 and summary["num_queries"] == 2 and summary["multiscale"]
    # Exact copies tie at the top, in index order: q0 sees d3 (hard), d4 (junk), d5 (easy) first, so
    # both protocols score 100 only if the junk d4 is taken out (Medium AP would be 79.2 with it);
    # q1 finds d6, the last database image, first; it has no hard positive and is skipped in Hard.
    medium, hard = summary["results"]["medium"], summary["results"]["hard"]
    assert medium["mAP"] == pytest.approx(100.0) and medium["AP"] == pytest.approx([100.0, 100.0])
    assert medium["mP@1"] == pytest.approx(100.0) and medium["mP@5"] == pytest.approx(100.0)
    assert hard["mAP"] == pytest.approx(100.0) and hard["AP"][1] is None
    assert "| protocol |    mAP |   mP@1 |   mP@5 |  mP@10 |" in proc.stdout + proc.stderr

    # A missing ground-truth file: a DatasetError naming it (the CLI prints it in one line, exit 2).
    # In-process, the tool's own parser and main, to spare a second interpreter start-up.
    tool = load_tool("eval_retrieval")
    args = cmd[2:]
    args[args.index("--data-root") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"nowhere/roxford5k/gnd_roxford5k\.pkl does not exist"):
        tool.main(tool.build_parser().parse_args(args))
