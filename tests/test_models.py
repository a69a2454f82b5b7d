"""models.py: the model zoo takes plain values (no argparse namespace) and says what is wrong."""
import pytest
import torch
import torchvision

import models


def test_build_model_takes_plain_values():
    model = models.build_model("vit_tiny", num_classes=7, image_size=16)
    assert isinstance(model, torchvision.models.VisionTransformer) and model.heads.head.out_features == 7
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    resnet = models.build_model("resnet18", num_classes=3, image_size=32)
    assert resnet.fc.out_features == 3


def test_vits_are_recognised():
    assert models.is_vit("vit_tiny") and models.is_vit("vit_b_16")
    assert not models.is_vit("resnet18")


@pytest.mark.parametrize("call,message", [
    (lambda: models.build_model("resnet_18", num_classes=3, image_size=32), "did you mean resnet18"),
    (lambda: models.build_model("vit_tiny", weights="DEFAULT", num_classes=3, image_size=32), "no pretrained"),
    (lambda: models.build_model("resnet18", weights="NO_SUCH_WEIGHTS", num_classes=3, image_size=32), "NO_SUCH"),
])
def test_mistakes_are_value_errors_that_say_why(call, message):
    with pytest.raises(ValueError, match=message):
        call()
