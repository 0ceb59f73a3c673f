"""Feature PCA: the principal axes against numpy's SVD, foreground and jointly fitted colours on
hand-made patch grids, and tools/visualize_features.py --pca writing its figures."""

import numpy as np
import pytest
import torch
from PIL import Image
from tool_utils import load_tool

from dino_research.checkpoint import Checkpointer
from dino_research.evaluation.feature_pca import feature_pca, fit_pca, patch_features
from dino_research.modeling import build_backbone, build_model


def test_fit_pca_matches_an_svd():
    x = torch.randn(200, 6, dtype=torch.float64) @ torch.diag(torch.tensor([5.0, 3, 2, 1, 0.5, 0.1], dtype=torch.float64))
    mean, components, variance = fit_pca(x, 4)
    centred = (x - x.mean(0)).numpy()
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean.numpy(), x.mean(0).numpy())
    np.testing.assert_allclose(variance.numpy(), s[:4] ** 2 / 199, rtol=1e-9)
    for got, want in zip(components.numpy(), vt[:4]):
        np.testing.assert_allclose(np.abs(got @ want), 1.0, atol=1e-9)  # the same axis
        assert got[np.abs(got).argmax()] > 0  # sign fixed: largest coefficient positive


def scene(h, w, box, rng):
    """A (h, w, 8) grid: background along direction 0; the object (rows/cols ``box``) along direction
    3 (what all object patches share, the strongest variation) plus its part, direction 1 on its left
    half and 2 on its right half; small noise."""
    grid = np.zeros((h, w, 8))
    grid[..., 0] = 1.0
    (r0, r1), (c0, c1) = box
    mid = (c0 + c1) // 2
    grid[r0:r1, c0:c1, 0] = 0
    grid[r0:r1, c0:c1, 3] = 4.0
    grid[r0:r1, c0:mid, 1] = 1.0
    grid[r0:r1, mid:c1, 2] = 1.0
    return torch.from_numpy(grid + rng.normal(0, 0.01, grid.shape)).float()


def test_foreground_and_part_colours_correspond_across_images():
    rng = np.random.default_rng(0)
    a = scene(8, 8, ((2, 6), (2, 6)), rng)
    b = scene(6, 10, ((1, 5), (4, 10)), rng)  # another size, the object elsewhere
    ra, rb = feature_pca([a, b], threshold=0.0)
    want_a = np.zeros((8, 8), bool)
    want_a[2:6, 2:6] = True
    want_b = np.zeros((6, 10), bool)
    want_b[1:5, 4:10] = True
    assert np.array_equal(ra["foreground"].numpy(), want_a)
    assert np.array_equal(rb["foreground"].numpy(), want_b)
    assert ra["rgb"].shape == (8, 8, 3) and (ra["rgb"][~ra["foreground"]] == 0).all()  # background black
    # One fit for both: the left part has one colour in both images, the right part another. (Within
    # the object the scene varies along one direction, the second component: red. Green and blue are
    # what is left, noise; they are not compared.)
    left_a, right_a = ra["rgb"][3, 2, 0], ra["rgb"][3, 5, 0]
    left_b, right_b = rb["rgb"][2, 4, 0], rb["rgb"][2, 9, 0]
    torch.testing.assert_close(left_a, left_b, atol=0.05, rtol=0)
    torch.testing.assert_close(right_a, right_b, atol=0.05, rtol=0)
    assert (left_a - right_a).abs() > 0.9
    # A higher threshold keeps fewer patches (none above 10 standard deviations).
    assert not feature_pca([a, b], threshold=10.0)[0]["foreground"].any()


def test_patch_features_are_the_last_blocks_tokens(make_tiny_cfg):
    vit = build_backbone(make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 1, "MODEL.BACKBONE.PATCH_SIZE": 8}), 0.0).eval()
    images = [torch.randn(1, 3, 16, 24), torch.randn(1, 3, 32, 8)]
    grids = patch_features(vit, images)
    assert [tuple(g.shape) for g in grids] == [(2, 3, 192), (4, 1, 192)]
    with torch.no_grad():
        tokens = vit.forward_features(images[0])[0, 1:]
    torch.testing.assert_close(grids[0][1, 2], tokens[1 * 3 + 2])  # row-major
    with pytest.raises(TypeError, match="needs a ViT"):
        patch_features(torch.nn.Conv2d(3, 4, 3), images)


def test_tool_writes_pca_figures(tmp_path, make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 1, "MODEL.BACKBONE.PATCH_SIZE": 8})
    checkpoint = Checkpointer(str(tmp_path / "run"), build_model(cfg)).save("model.pth", iteration=1,
                                                                            config=cfg.dump())
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name, shape in (("a.png", (40, 48, 3)), ("sub/b.png", (33, 30, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    tool = load_tool("visualize_features")
    out = tmp_path / "out"
    tool.main(tool.build_parser().parse_args(["--pca", "--weights", checkpoint, "--image", str(tmp_path / "imgs"),
                                              "--output", str(out), "MODEL.DEVICE", "cpu"]))
    for name in ("pca_a.png", "pca_sub_b.png", "pca.png"):
        with Image.open(out / name) as figure:
            assert figure.format == "PNG" and figure.width > 300
    assert not (out / "pca_broken.png").exists()
    with pytest.raises(SystemExit, match="--pca"):
        tool.main(tool.build_parser().parse_args(["--weights", checkpoint, "--image", str(tmp_path / "imgs")]))
