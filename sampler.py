"""Samplers for training with repeated augmentation and for evaluating every sample exactly once."""
import math

import torch
import torch.distributed as dist


def _replica_info(num_replicas, rank):
    """Fill in world size and rank from the process group when not given."""
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas - 1}]")
    return num_replicas, rank


class RASampler(torch.utils.data.Sampler):
    """Repeated-augmentation sampler: every drawn image appears `repetitions` times per step, on different replicas.

    Hoffer et al., "Augment your batch" (2019). Each epoch shuffles the data set with a generator seeded by
    `seed + epoch`, repeats every index `repetitions` times and deals the copies round-robin to the replicas, so
    the copies of one image get different augmentations (on different processes, or in one batch when there is
    a single process). Each replica yields ceil(len(dataset) / num_replicas) indices, as DistributedSampler
    does, so an epoch has the same number of steps with or without repetition; it covers about
    1 / repetitions of the distinct images. Call `set_epoch` before each epoch.
    """

    def __init__(self, dataset, *, num_replicas=None, rank=None, shuffle=True, seed=0, repetitions=3):
        if repetitions < 1:
            raise ValueError(f"repetitions must be at least 1, got {repetitions}")
        self.num_replicas, self.rank = _replica_info(num_replicas, rank)
        self.dataset_size = len(dataset)
        self.shuffle = shuffle
        self.seed = seed
        self.repetitions = repetitions
        self.epoch = 0
        self.num_samples = math.ceil(self.dataset_size / self.num_replicas)

    def set_epoch(self, epoch):
        """Select the shuffle of `epoch`; the same epoch always gives the same order."""
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        repeated = order.repeat_interleave(self.repetitions)
        # Deal round-robin: consecutive copies of an index go to consecutive replicas.
        needed = self.num_samples * self.num_replicas
        if needed > repeated.numel():
            repeated = repeated.repeat(math.ceil(needed / repeated.numel()))
        mine = repeated[self.rank : needed : self.num_replicas]
        return iter(mine.tolist())

    def __len__(self):
        return self.num_samples


class DistributedEvalSampler(torch.utils.data.Sampler):
    """Split indices across replicas without padding, so all replicas together see each sample exactly once.

    DistributedSampler pads the last shard with repeated samples, which biases accuracy; this sampler gives
    replica r the indices r, r + R, r + 2R, ... so shards differ in length by at most one. Sum the per-replica
    counts (correct and total) with all_reduce to get the exact accuracy.
    """

    def __init__(self, dataset, *, num_replicas=None, rank=None):
        self.num_replicas, self.rank = _replica_info(num_replicas, rank)
        self.dataset_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.dataset_size, self.num_replicas))
