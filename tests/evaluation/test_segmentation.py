"""The attention-Jaccard measure of DINO's segmentation property, against hand-made masks."""

import pytest
import torch

from dino_research.evaluation.segmentation import attention_jaccard, foreground_masks, jaccard


def test_jaccard_of_perfect_disjoint_and_partial_masks():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True  # 8 pixels
    assert jaccard(a, a).item() == 1.0
    assert jaccard(a, ~a).item() == 0.0
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[1:3] = True  # overlaps a on row 1: |a & b| = 4, |a | b| = 12
    assert jaccard(a, b).item() == pytest.approx(4 / 12)
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert jaccard(empty, empty).item() == 1.0  # nothing to find, nothing found
    assert jaccard(empty, a).item() == 0.0
    with pytest.raises(TypeError, match="bool masks"):
        jaccard(a.float(), a)


def test_sixty_percent_mass_threshold_and_best_head_on_a_hand_made_case():
    # One image, 2x2 patches of 2 pixels, two heads (values exact in binary). Head 0 puts
    # [0.5, 0.25, 0.125, 0.125] on patches (0,0), (0,1), (1,0), (1,1): 60% of the mass takes the first
    # two patches (0.5 alone is below 0.6), i.e. the top row. Head 1 puts 0.625 on patch (1,1): 60% is
    # that patch alone.
    attn = torch.tensor([[[[0.5, 0.25], [0.125, 0.125]], [[0.125, 0.125], [0.125, 0.625]]]])
    truth = torch.zeros(1, 4, 4, dtype=torch.bool)
    truth[0, :2, :] = True  # the object is the top row of patches
    result = attention_jaccard(attn, truth, patch_size=2, threshold=0.6)
    assert result["per_image_head"][0].tolist() == pytest.approx([1.0, 0.0])
    assert result["best_head"] == 0 and result["best_head_jaccard"] == pytest.approx(1.0)
    assert result["mean_over_heads"] == pytest.approx(0.5)
    # Head 0's mask is the top row (half the image), head 1's one patch (a quarter); the object is half.
    assert result["mask_area"].tolist() == pytest.approx([0.5, 0.25])
    assert result["foreground_area"] == pytest.approx(0.5)
    # Keeping 50% of the mass leaves head 0 with patch (0,0) only: 4 of the 8 true pixels.
    half = attention_jaccard(attn, truth, patch_size=2, threshold=0.5)
    assert half["per_image_head"][0, 0].item() == pytest.approx(4 / 8)


def test_best_head_is_chosen_over_the_set_and_shapes_are_checked():
    attn = torch.rand(3, 4, 7, 7)
    masks = torch.rand(3, 28, 28) > 0.5
    result = attention_jaccard(attn, masks, patch_size=4)
    assert result["per_image_head"].shape == (3, 4) and result["per_head"].shape == (4,)
    assert result["best_head_jaccard"] == pytest.approx(result["per_head"].max().item())
    with pytest.raises(ValueError, match=r"masks must be \(B, h\*p, w\*p\) = \(3, 28, 28\)"):
        attention_jaccard(attn, masks[:, :27], patch_size=4)


def test_foreground_of_an_object_on_black():
    images = torch.zeros(1, 3, 4, 4)
    images[0, :, 1:3, 1:3] = 0.8
    images[0, 0, 0, 0] = 0.01  # sensor noise below the threshold
    assert foreground_masks(images)[0].sum().item() == 4 and foreground_masks(images)[0, 1, 1]
