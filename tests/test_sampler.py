"""sampler.py: each validation image once over all processes; repeated augmentation across processes."""
import collections

import pytest

from sampler import DistributedEvalSampler, RASampler


class Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n, replicas", [(10, 1), (10, 3), (7, 2), (100, 4)])
def test_eval_sampler_covers_every_index_exactly_once(n, replicas):
    shards = [list(DistributedEvalSampler(Sized(n), num_replicas=replicas, rank=r)) for r in range(replicas)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(DistributedEvalSampler(Sized(n), num_replicas=replicas, rank=r)) for r in range(replicas)] == [
        len(s) for s in shards
    ]


def test_ra_sampler_sends_copies_of_an_image_to_different_replicas():
    replicas, reps = 3, 3
    shards = [list(RASampler(Sized(30), num_replicas=replicas, rank=r, repetitions=reps)) for r in range(replicas)]
    assert all(len(s) == 10 for s in shards), "each replica yields ceil(n / replicas) indices"
    # Position p of every shard holds copies of the same image: repeated augmentation across processes.
    for position in range(10):
        assert len({shard[position] for shard in shards}) == 1


def test_ra_sampler_repeats_images_within_one_process():
    indices = list(RASampler(Sized(12), num_replicas=1, rank=0, repetitions=3))
    assert len(indices) == 12
    assert all(count == 3 for count in collections.Counter(indices).values())


def test_ra_sampler_order_depends_only_on_seed_and_epoch():
    a = RASampler(Sized(50), num_replicas=2, rank=1, seed=7)
    b = RASampler(Sized(50), num_replicas=2, rank=1, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
