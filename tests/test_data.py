"""Samplers, presets, mixup/cutmix collation and the digits data set."""
import collections

import numpy as np
import pytest
import torch
from PIL import Image

import presets
import sample_data
import transforms
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


@pytest.mark.parametrize("policy", [None, "ra", "ta_wide", "augmix", "imagenet"])
@pytest.mark.parametrize("backend, use_v2", [("pil", False), ("tensor", False), ("pil", True), ("tv_tensor", True)])
def test_train_preset_gives_normalized_float_tensor_of_crop_size(policy, backend, use_v2):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    preset = presets.ClassificationPresetTrain(
        crop_size=24, auto_augment_policy=policy, random_erase_prob=0.5, backend=backend, use_v2=use_v2
    )
    out = preset(img)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 24, 24)
    assert out.min() < 0, "the output is not normalised"


@pytest.mark.parametrize("backend, use_v2", [("pil", False), ("tensor", True)])
def test_eval_preset_v1_and_v2_agree(backend, use_v2):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    reference = presets.ClassificationPresetEval(crop_size=16, resize_size=20)(img)
    out = presets.ClassificationPresetEval(crop_size=16, resize_size=20, backend=backend, use_v2=use_v2)(img)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0)  # PIL and tensor resizes round differently


def test_tv_tensor_backend_requires_v2():
    with pytest.raises(ValueError, match="--use-v2"):
        presets.ClassificationPresetEval(crop_size=16, backend="tv_tensor", use_v2=False)


def test_mix_collate_gives_soft_labels_that_sum_to_one():
    mix = transforms.get_mixup_cutmix(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=5)
    batch = [(torch.rand(3, 8, 8), i % 5) for i in range(6)]
    images, labels = transforms.MixCollate(mix)(batch)
    assert images.shape == (6, 3, 8, 8) and labels.shape == (6, 5)
    torch.testing.assert_close(labels.sum(dim=1), torch.ones(6))


def test_mixup_cutmix_off_gives_none():
    assert transforms.get_mixup_cutmix(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=5) is None


def test_digits_split_is_80_20_per_class_and_fixed():
    labels = np.repeat(np.arange(10), 50)
    train, val = sample_data.split_indices(labels, val_fraction=0.2, seed=0)
    assert sorted(train + val) == list(range(500)) and len(val) == 100
    assert all(np.sum(labels[val] == c) == 10 for c in range(10))
    assert (train, val) == sample_data.split_indices(labels, val_fraction=0.2, seed=0)


def test_sample_data_writes_32x32_rgb_image_folder(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(2), 10)
    monkeypatch.setattr(sample_data, "load_digits", lambda: (images, labels))
    sample_data.main(sample_data.get_args_parser().parse_args([str(tmp_path)]))
    train = sorted(tmp_path.glob("train/*/*.png"))
    val = sorted(tmp_path.glob("val/*/*.png"))
    assert len(train) == 16 and len(val) == 4
    with Image.open(train[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
