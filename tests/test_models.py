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


@pytest.fixture
def local_resnet18_weights(tmp_path, monkeypatch):
    """resnet18's ImageNet weights file where a download leaves it (random values: nothing is downloaded)."""
    import os

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, folder / os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url))
    return state


def test_pretrained_weights_for_another_class_count_get_a_new_head_with_a_notice(local_resnet18_weights, capsys):
    model = models.build_model("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1", num_classes=3, image_size=16)
    assert model.fc.out_features == 3 and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert torch.equal(model.conv1.weight, local_resnet18_weights["conv1.weight"]), "the body is not pretrained"
    assert capsys.readouterr().out == ("Notice: ResNet18_Weights.IMAGENET1K_V1 classifies 1000 classes and the data 3: "
                                       "fc newly initialised for 3 classes, the rest pretrained\n")
    same = models.build_model("resnet18", weights="DEFAULT", num_classes=1000, image_size=16)
    assert torch.equal(same.fc.weight, local_resnet18_weights["fc.weight"]) and capsys.readouterr().out == ""


def test_replace_classifier_replaces_every_head_of_the_old_class_count():
    model = torchvision.models.squeezenet1_0(num_classes=1000)  # a 1x1 Conv2d head
    assert models.replace_classifier(model, old_classes=1000, num_classes=5) == ["classifier.1"]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model = torchvision.models.inception_v3(num_classes=1000, aux_logits=True, init_weights=False)
    assert sorted(models.replace_classifier(model, old_classes=1000, num_classes=5)) == ["AuxLogits.fc", "fc"]


@pytest.mark.parametrize("weights,message", [
    ("Bogus.X", "there is no weights enum Bogus; resnet18's weights are ResNet18_Weights.IMAGENET1K_V1 (or DEFAULT)"),
    ("ResNet50_Weights.IMAGENET1K_V2", "ResNet50_Weights holds another model's weights; resnet18's weights are "),
    ("ResNet18_Weights.V9", "ResNet18_Weights has no weights V9; resnet18's weights are ResNet18_Weights.IMAGENET1K_V1"),
])
def test_unknown_weights_say_which_exist(weights, message):
    with pytest.raises(ValueError) as caught:
        models.resolve_weights("resnet18", weights)
    assert str(caught.value).startswith(message), str(caught.value)
