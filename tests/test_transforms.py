"""transforms.py: mixup and cutmix collation."""
import torch

import transforms


def test_mix_collate_gives_soft_labels_that_sum_to_one():
    mix = transforms.get_mixup_cutmix(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=5)
    batch = [(torch.rand(3, 8, 8), i % 5) for i in range(6)]
    images, labels = transforms.MixCollate(mix)(batch)
    assert images.shape == (6, 3, 8, 8) and labels.shape == (6, 5)
    torch.testing.assert_close(labels.sum(dim=1), torch.ones(6))


def test_mixup_cutmix_off_gives_none():
    assert transforms.get_mixup_cutmix(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=5) is None
