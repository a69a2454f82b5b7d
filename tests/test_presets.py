"""presets.py: training and evaluation preprocessing, PIL and tensor, transforms v1 and v2."""
import numpy as np
import pytest
import torch
from PIL import Image

import presets


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
