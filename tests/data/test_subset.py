"""DATASETS.TRAIN_SUBSET: a fixed random subset, the same everywhere, that the trainer trains on."""

import pytest

from dino_research.data import fixed_subset
from dino_research.data.datasets import Synthetic
from dino_research.engine import DINOTrainer, load_config


def test_fixed_subset_is_seeded_sorted_and_distinct():
    dataset = Synthetic(num_images=100, image_size=8)
    a, b, c = fixed_subset(dataset, 30, seed=0), fixed_subset(dataset, 30, seed=0), fixed_subset(dataset, 30, seed=1)
    assert len(a) == 30 and a.indices == b.indices and a.indices != c.indices
    assert a.indices == sorted(set(a.indices)) and 0 <= a.indices[0] and a.indices[-1] < 100
    assert a[3][1] == dataset[a.indices[3]][1]  # items are the dataset's own
    assert fixed_subset(dataset, 0, seed=0) is dataset


def test_subset_larger_than_the_dataset_names_the_key():
    with pytest.raises(ValueError, match="DATASETS.TRAIN_SUBSET = 101: must be 0 \\(all\\) or between 1 and the dataset's 100"):
        fixed_subset(Synthetic(num_images=100, image_size=8), 101, seed=0)


def test_trainer_trains_on_the_subset(tmp_path):
    cfg = load_config("", ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.HEAD.OUT_DIM", "64", "INPUT.GLOBAL_CROP_SIZE", "32",
                           "INPUT.LOCAL_CROP_SIZE", "16", "DATASETS.TRAIN", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "64",
                           "DATASETS.TRAIN_SUBSET", "24", "SOLVER.BATCH_SIZE_PER_GPU", "4", "SOLVER.AMP.ENABLED", "False",
                           "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path)])
    trainer = DINOTrainer(cfg)
    assert trainer.iters_per_epoch == 6 and len(trainer.loader.dataset) == 24
