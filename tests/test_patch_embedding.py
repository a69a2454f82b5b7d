"""A ViT's patch embedding as one matrix product (patch_embedding.PatchwiseConv2d), and apply_bsr putting it in place.

Against the convolution in float64, with a partial last patch and without bias, both dtypes; the refused
convolutions; the same state dict; torchvision's and timm's ViTs giving the same logits, and auto keeping the
convolution where it measured faster.
"""
import copy

import pytest
import torch
import torchvision
from torch import nn

import blocksparse
import patch_embedding
from helpers import tiny_deit
from patch_embedding import PatchwiseConv2d

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def conv(in_channels=3, out_channels=16, patch=8, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Conv2d(in_channels, out_channels, patch, stride=patch, bias=bias).eval().requires_grad_(False).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(32, 32), (37, 35)], ids=["whole patches", "partial last patches"])
@pytest.mark.parametrize("bias", [True, False])
def test_patchwise_matches_the_convolution(dtype, size, bias):
    convolution = conv(bias=bias, dtype=dtype)
    x = torch.randn(2, 3, *size).to(dtype)
    got = PatchwiseConv2d(convolution)(x)
    expected = copy.deepcopy(convolution).double()(x.double())
    assert got.shape == expected.shape == (2, 16, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(got.double(), expected, **TOL[dtype])
    assert got.flatten(2).data_ptr() == got.data_ptr(), "flatten(2), as the ViTs read it, is a view"


def test_it_keeps_the_convolutions_parameters_and_state_dict():
    convolution = conv()
    patchwise = PatchwiseConv2d(convolution)
    assert patchwise.weight is convolution.weight and patchwise.bias is convolution.bias
    assert list(patchwise.state_dict()) == list(convolution.state_dict())
    back = patchwise.to_conv()
    assert type(back) is nn.Conv2d and back.weight is convolution.weight and back.bias is convolution.bias
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(back(x), convolution(x))


@pytest.mark.parametrize("module,reason", [
    (nn.Conv2d(3, 8, 4, stride=2), "its kernel (4, 4) is not its stride (2, 2)"),
    (nn.Conv2d(3, 8, 4, stride=4, padding=1), "it pads, dilates or groups"),
    (nn.Conv2d(4, 8, 4, stride=4, groups=2), "it pads, dilates or groups"),
    (nn.Linear(3, 8), "Linear is not an nn.Conv2d"),
])
def test_convolutions_it_cannot_compute_are_refused_with_the_reason(module, reason):
    assert patch_embedding.unsupported_reason(module) == reason
    with pytest.raises(ValueError, match="cannot compute this convolution patch by patch"):
        PatchwiseConv2d(module)


def tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises it: logits would all be 0
    return model.eval().requires_grad_(False)


def test_apply_bsr_computes_the_vits_patch_embedding_patchwise_once():
    dense = tiny_vit()
    converted = copy.deepcopy(dense)
    result = blocksparse.apply_bsr(converted, 16, min_sparsity=0.0, kernel="fused")
    assert result.patchwise_convolutions == ["conv_proj"] and type(converted.conv_proj) is PatchwiseConv2d
    assert "computed the patch embedding as one matrix product: conv_proj" in str(result)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), dense(x), atol=1e-4, rtol=1e-4)
    again = blocksparse.apply_bsr(converted, 16, min_sparsity=0.0, kernel="fused")
    assert again.patchwise_convolutions == [] and type(converted.conv_proj) is PatchwiseConv2d


def test_auto_keeps_the_convolution_where_it_measured_faster(monkeypatch):
    monkeypatch.setattr(patch_embedding, "is_faster", lambda conv, size: False)
    model = tiny_vit()
    assert blocksparse.apply_bsr(model, 16, min_sparsity=0.0, kernel="auto").patchwise_convolutions == []
    assert type(model.conv_proj) is nn.Conv2d


def test_is_faster_measures_on_the_models_image_size_once():
    convolution = conv()
    first = patch_embedding.is_faster(convolution, (32, 32))
    assert isinstance(first, bool)
    key = (tuple(convolution.weight.shape), torch.float32, "cpu", (32, 32))
    assert patch_embedding._measured[key] is first
    assert patch_embedding.patch_convolutions(tiny_vit())[0][2] == (32, 32)


def test_timms_patch_embedding_is_computed_patchwise_too():
    pytest.importorskip("timm")
    model, converted, result = tiny_deit(depth=1)
    assert result.patchwise_convolutions == ["patch_embed.proj"]
    assert patch_embedding.patch_convolutions(model)[0][2] == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4)
