"""ResumableDistributedSampler: seeded epoch orders, split over ranks, resumable at any sample."""

import pytest
import torch

from dino_research.data.samplers import ResumableDistributedSampler, derive_seed


def share(n, world_size, rank, epoch=0, seed=0, **kwargs):
    sampler = ResumableDistributedSampler(n, world_size=world_size, rank=rank, seed=seed, **kwargs)
    sampler.set_epoch(epoch)
    return [index for _, index in sampler]


def test_drop_last_covers_each_index_at_most_once_and_drops_the_tail():
    n, world = 23, 4  # 23 = 4 * 5 + 3: 3 samples dropped, 5 per rank
    shares = [share(n, world, rank) for rank in range(world)]
    assert [len(s) for s in shares] == [5, 5, 5, 5]
    seen = [i for s in shares for i in s]
    assert len(set(seen)) == 20  # ranks disjoint, no repeat
    assert set(seen) <= set(range(n))
    assert ResumableDistributedSampler(n, world_size=world, rank=2).num_samples_per_rank == 5


def test_without_drop_last_pads_by_wrapping():
    n, world = 23, 4  # padded to 24: every index once, the first of the order twice
    shares = [share(n, world, rank, drop_last=False) for rank in range(world)]
    assert [len(s) for s in shares] == [6, 6, 6, 6]
    seen = [i for s in shares for i in s]
    assert sorted(set(seen)) == list(range(n))
    # Fewer samples than ranks: wraps more than once, every rank still gets one.
    tiny = [share(2, 5, rank, drop_last=False) for rank in range(5)]
    assert [len(s) for s in tiny] == [1] * 5 and {i for s in tiny for i in s} == {0, 1}


def test_order_is_shared_by_ranks_and_is_the_seeded_permutation():
    n, world, seed, epoch = 30, 3, 7, 2
    interleaved = [None] * n
    for rank in range(world):
        interleaved[rank::world] = share(n, world, rank, epoch=epoch, seed=seed)
    # The same order a single process sees: world_size only decides who takes which position.
    assert interleaved == share(n, 1, 0, epoch=epoch, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(0x5A4D504C, seed, epoch))
    assert interleaved == torch.randperm(n, generator=generator).tolist()


def test_epochs_and_seeds_change_the_order_and_same_seed_repeats_it():
    n = 50
    epoch0, epoch1 = share(n, 1, 0, epoch=0), share(n, 1, 0, epoch=1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert share(n, 1, 0, epoch=1) == epoch1  # a fresh sampler, same seed: same order
    assert share(n, 1, 0, epoch=1, seed=1) != epoch1
    # seed + epoch is not the key: (seed 1, epoch 0) differs from (seed 0, epoch 1)
    assert share(n, 1, 0, epoch=0, seed=1) != epoch1
    assert share(10, 1, 0, shuffle=False) == list(range(10))


def test_start_and_stop_select_exactly_that_part_of_the_share():
    sampler = ResumableDistributedSampler(40, world_size=2, rank=1, seed=3)
    sampler.set_epoch(5)
    full = list(sampler)
    assert len(sampler) == len(full) == sampler.num_samples_per_rank == 20
    sampler.set_epoch(5, start=7)
    assert list(sampler) == full[7:] and len(sampler) == 13
    sampler.set_epoch(5, start=7, stop=15)
    assert list(sampler) == full[7:15] and len(sampler) == 8
    assert sampler.num_samples_per_rank == 20  # the full epoch, whatever start is
    sampler.set_epoch(5, start=20)
    assert list(sampler) == [] and len(sampler) == 0


def test_yields_epoch_index_int_tuples_and_snapshots_at_iter():
    sampler = ResumableDistributedSampler(10, world_size=1, seed=0)
    sampler.set_epoch(3)
    iterator = iter(sampler)
    sampler.set_epoch(4, start=5)  # does not affect the iteration already started
    items = list(iterator)
    assert len(items) == 10
    assert all(isinstance(item, tuple) and len(item) == 2 for item in items)
    assert all(type(e) is int and type(i) is int and e == 3 for e, i in items)


def test_invalid_arguments_fail_loudly():
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(10, world_size=2, rank=2)
    sampler = ResumableDistributedSampler(10, world_size=2, rank=0)
    with pytest.raises(ValueError, match="num_samples_per_rank"):
        sampler.set_epoch(0, start=6)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)


def test_derive_seed_separates_neighbouring_keys():
    seeds = {derive_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert all(0 <= s < 2**64 for s in seeds) and 0 <= derive_seed(-1) < 2**64
