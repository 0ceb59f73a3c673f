"""Pretraining loader: per-sample seeding, multi-crop collation, exact resume at any batch."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from dino_research.data.augmentations import DINOMultiCrop
from dino_research.data.loader import PretrainLoader, SeededSampleDataset, build_pretrain_loader, collate_crops
from dino_research.data.samplers import ResumableDistributedSampler


class Images(Dataset):
    """``n`` fixed 20x20 RGB images; label = index, so batches tell which samples they hold."""

    def __init__(self, n, transform=None):
        self.n = n
        self.transform = transform

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        pixels = np.random.default_rng(index).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        return (self.transform(image) if self.transform is not None else image), index


def draws(_image):
    """A transform reading all three global generators."""
    return torch.tensor([random.random(), np.random.random(), torch.rand(()).item()], dtype=torch.float64)


def one_crop(image):
    """The image as a single (3, 20, 20) crop: for tests that only look at which samples come."""
    return [torch.from_numpy(np.array(image)).permute(2, 0, 1)]


def multicrop():
    return DINOMultiCrop(global_crop_size=16, local_crop_size=8, local_crops_number=2)


def global_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def assert_same_states(a, b):
    assert a[0] == b[0]
    assert np.array_equal(a[1], b[1])
    assert torch.equal(a[2], b[2])


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for (crops_x, labels_x), (crops_y, labels_y) in zip(xs, ys):
        assert torch.equal(labels_x, labels_y)
        assert len(crops_x) == len(crops_y)
        assert all(torch.equal(a, b) for a, b in zip(crops_x, crops_y))


# ------------------------------------------------------------------------------ SeededSampleDataset
def test_sample_depends_only_on_seed_epoch_and_index():
    data = SeededSampleDataset(Images(10, draws), seed=5)
    keys = [(0, 1), (0, 2), (1, 1), (3, 7)]
    forward = {key: data[key][0] for key in keys}
    random.seed(123), np.random.seed(9), torch.manual_seed(77)  # any history before the calls
    for key in reversed(keys):
        assert torch.equal(data[key][0], forward[key])
    assert torch.equal(SeededSampleDataset(Images(10, draws), seed=5)[(3, 7)][0], forward[(3, 7)])
    # Every generator gets a different seed per epoch, per index and per base seed.
    for other in (forward[(0, 2)], forward[(1, 1)], SeededSampleDataset(Images(10, draws), seed=6)[(0, 1)][0]):
        assert (other != forward[(0, 1)]).all()
    assert torch.equal(data[1][0], forward[(0, 1)])  # a plain index is epoch 0
    assert data[(3, 7)][1] == 7


def test_seeded_multicrop_differs_across_epochs():
    data = SeededSampleDataset(Images(4, multicrop()), seed=0)
    crops_e0, crops_e1 = data[(0, 2)][0], data[(1, 2)][0]
    assert all(torch.equal(a, b) for a, b in zip(crops_e0, data[(0, 2)][0]))
    assert not all(torch.equal(a, b) for a, b in zip(crops_e0, crops_e1))


def test_main_process_global_generators_are_left_unchanged():
    data = SeededSampleDataset(Images(4, draws), seed=0)
    before = global_states()
    data[(2, 3)]
    assert_same_states(before, global_states())


# ---------------------------------------------------------------------------------------- collate
def test_collate_multicrop_shapes():
    dataset = Images(6, multicrop())
    crops, labels = collate_crops([dataset[i] for i in range(3)])
    assert [tuple(c.shape) for c in crops] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="list of crop tensors"):
        collate_crops([(torch.zeros(3, 4, 4), 0)])


# ---------------------------------------------------------------------------------------- loader
def test_batches_per_epoch_and_too_small_dataset():
    # 50 images over 2 ranks: 25 per rank, 6 batches of 4.
    assert PretrainLoader(Images(50), batch_size=4, world_size=2, rank=1).batches_per_epoch == 6
    assert PretrainLoader(Images(50), batch_size=4, world_size=2, batches_per_epoch=3).batches_per_epoch == 3
    assert PretrainLoader(Images(50), batch_size=4, world_size=2, batches_per_epoch=99).batches_per_epoch == 6
    with pytest.raises(ValueError, match=r"7 images.*world size 2.*3 images.*batch of 4"):
        PretrainLoader(Images(7), batch_size=4, world_size=2)


def test_epochs_hold_exactly_batches_per_epoch():
    loader = PretrainLoader(Images(40, one_crop), batch_size=4, seed=1, batches_per_epoch=2)  # 10 possible, 2 used
    labels = [batch[1].tolist() for batch in take(loader.iterate(0), 4)]
    sampler = ResumableDistributedSampler(40, seed=1)
    expected = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = [i for _, i in sampler]
        expected += [order[0:4], order[4:8]]
    assert labels == expected


def test_build_from_config_and_shapes(make_tiny_cfg):
    cfg = make_tiny_cfg(**{"SEED": 3, "SOLVER.BATCH_SIZE_PER_GPU": 3})
    loader = build_pretrain_loader(cfg, Images(20, multicrop()), rank=1, world_size=2, batches_per_epoch=2)
    assert (loader.batch_size, loader.seed, loader.rank, loader.world_size) == (3, 3, 1, 2)
    assert loader.num_workers == cfg.DATALOADER.NUM_WORKERS == 0 and loader.batches_per_epoch == 2
    crops, labels = next(loader.iterate())
    assert [tuple(c.shape) for c in crops] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2
    assert tuple(labels.shape) == (3,)


def test_resume_equals_uninterrupted_and_keeps_global_generators():
    loader = PretrainLoader(Images(22, multicrop()), batch_size=4, seed=2)  # 5 batches per epoch
    before = global_states()
    reference = take(loader.iterate(0), 12)  # 2.4 epochs
    assert_same_states(before, global_states())  # the trainer's random streams are untouched
    for start in (3, 5, 7):  # mid-epoch, an epoch boundary, across one
        fresh = PretrainLoader(Images(22, multicrop()), batch_size=4, seed=2)  # as after a restart
        assert_batches_equal(take(fresh.iterate(start), 12 - start), reference[start:])
    # Every epoch uses each of 20 of the 22 images once.
    epoch1 = torch.cat([labels for _, labels in reference[5:10]]).tolist()
    assert len(set(epoch1)) == 20


def test_resume_with_workers_equals_uninterrupted_without():
    reference = take(PretrainLoader(Images(22, multicrop()), batch_size=4, seed=2).iterate(0), 12)
    loader = PretrainLoader(Images(22, multicrop()), batch_size=4, seed=2, num_workers=2)
    try:
        assert_batches_equal(take(loader.iterate(0), 12), reference)
        # Abandon that iterator mid-epoch; the persistent workers serve a resumed one.
        iterator = loader.iterate(7)
        assert_batches_equal(take(iterator, 2), reference[7:9])
        iterator.close()
        resumed = loader.iterate(3)
        assert_batches_equal(take(resumed, 9), reference[3:])
        stale = resumed
        assert_batches_equal(take(loader.iterate(11), 1), reference[11:])
        with pytest.raises(RuntimeError, match="superseded"):
            next(stale)
    finally:
        loader.close()
    assert loader.loader._iterator is None


def test_abandoned_iterator_with_non_persistent_workers_does_not_hang():
    reference = take(PretrainLoader(Images(22, one_crop), batch_size=4, seed=2).iterate(0), 8)
    loader = PretrainLoader(Images(22, one_crop), batch_size=4, seed=2, num_workers=2, persistent_workers=False)
    iterator = loader.iterate(4)
    assert_batches_equal(take(iterator, 2), reference[4:6])  # crosses the epoch boundary
    iterator.close()  # workers of the abandoned epoch shut down with their DataLoader iterator
    assert_batches_equal(take(loader.iterate(6), 2), reference[6:8])


def test_two_ranks_partition_each_epoch():
    per_rank = []
    for rank in range(2):
        loader = PretrainLoader(Images(21, one_crop), batch_size=5, world_size=2, rank=rank, seed=4)  # 10 per rank
        assert loader.batches_per_epoch == 2
        epochs = [take(loader.iterate(2 * epoch), 2) for epoch in range(2)]
        per_rank.append([torch.cat([labels for _, labels in batches]).tolist() for batches in epochs])
    for epoch in range(2):
        rank0, rank1 = per_rank[0][epoch], per_rank[1][epoch]
        assert not set(rank0) & set(rank1)
        assert len(set(rank0) | set(rank1)) == 20
    assert per_rank[0][0] != per_rank[0][1]
