"""Batch-level augmentation: MixUp and CutMix, applied when the data loader collates a batch."""
from torch.utils.data.dataloader import default_collate
from torchvision.transforms import v2


def get_mixup_cutmix(*, mixup_alpha, cutmix_alpha, num_classes):
    """Return a transform that applies MixUp or CutMix (picked at random per batch), or None when both are off.

    The transform takes (images, integer labels) and returns (mixed images, soft labels of shape
    (batch, num_classes)).
    """
    choices = []
    if mixup_alpha > 0.0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0.0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return v2.RandomChoice(choices)


class MixCollate:
    """Collate a list of (image, label) samples into a batch, then mix it.

    A class rather than a closure so that data loader workers started with `spawn` can pickle it.
    """

    def __init__(self, mix):
        self.mix = mix

    def __call__(self, batch):
        return self.mix(*default_collate(batch))
