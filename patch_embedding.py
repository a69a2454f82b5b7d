"""A ViT's patch embedding, a convolution whose kernel is its stride, as one matrix product over the patches.

A ViT cuts its image into non-overlapping p x p patches and projects each with an ``nn.Conv2d`` of kernel p and
stride p. That is a plain matrix product, (patches, C p p) @ (C p p, E), but oneDNN runs it as a convolution, at a
fraction of its GEMM speed in bfloat16 (vit_b_16 at batch 8 on the AMX Xeon: 4.9 ms as a convolution, 1.3 ms as a
product; benchmarks/RESULTS.md). ``PatchwiseConv2d`` computes the same convolution as a reshape and one ``F.linear``,
on the convolution's own weight and bias (the same state dict), and returns the convolution's layout, (N, E, H', W'),
as a view that the model's flatten reads without a copy.

``blocksparse.apply_bsr`` puts it in place of torchvision's ``VisionTransformer.conv_proj`` and timm's
``PatchEmbed.proj`` where it measures faster on the model's image size (``kernel="auto"``; always with "fused").
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import blocksparse_fused
import timm_layers

# apply_bsr times both forms on this many images of the model's size (224 pixels where it does not say).
SAMPLE_IMAGES = 8
SAMPLE_SIZE = 224

_measured: Dict[tuple, bool] = {}


class PatchwiseConv2d(nn.Module):
    """An ``nn.Conv2d`` whose kernel is its stride (no padding, dilation or groups), computed as one matrix product
    over its patches; the same ``weight`` and ``bias`` parameters."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        reason = unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot compute this convolution patch by patch: {reason}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.weight, self.bias = conv.weight, conv.bias
        self.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        ph, pw = self.kernel_size
        rows, cols = height // ph, width // pw
        if rows * ph != height or cols * pw != width:  # the convolution leaves the last partial patches out
            x = x[:, :, : rows * ph, : cols * pw]
        patches = x.reshape(batch, channels, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(batch * rows * cols, channels * ph * pw),
                       self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(batch, rows, cols, self.out_channels).permute(0, 3, 1, 2)

    def to_conv(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` it computes, on the same parameters."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.kernel_size,
                         bias=self.bias is not None, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=stride={self.kernel_size}"


def unsupported_reason(conv: nn.Module) -> Optional[str]:
    """Why ``PatchwiseConv2d`` cannot compute this module, or None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.kernel_size != conv.stride:
        return f"its kernel {conv.kernel_size} is not its stride {conv.stride}"
    if conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1) or conv.groups != 1:
        return "it pads, dilates or groups"
    return None


def patch_convolutions(model: nn.Module) -> List[Tuple[str, nn.Module, Tuple[int, int]]]:
    """(name, convolution, image size) of each ViT patch embedding in ``model``: torchvision's
    ``VisionTransformer.conv_proj`` and timm's ``PatchEmbed.proj``."""
    found = []
    timm_patch_embed = timm_layers.patch_embed_type()
    for fqn, module in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        if isinstance(module, torchvision.models.VisionTransformer):
            found.append((f"{prefix}conv_proj", module.conv_proj, (module.image_size, module.image_size)))
        elif timm_patch_embed is not None and type(module) is timm_patch_embed:
            size = getattr(module, "img_size", None)
            size = tuple(size) if isinstance(size, (tuple, list)) and len(size) == 2 else (SAMPLE_SIZE, SAMPLE_SIZE)
            found.append((f"{prefix}proj", module.proj, size))
    return found


@torch.no_grad()
def is_faster(conv: nn.Conv2d, image_size: Tuple[int, int]) -> bool:
    """Whether ``PatchwiseConv2d`` beats the convolution on ``SAMPLE_IMAGES`` images of ``image_size`` here, timed
    in interleaved rounds; measured once per shape, dtype and size."""
    key = (tuple(conv.weight.shape), conv.weight.dtype, conv.weight.device.type, tuple(image_size))
    if key not in _measured:
        x = torch.randn(SAMPLE_IMAGES, conv.in_channels, *image_size, generator=torch.Generator().manual_seed(0))
        x = x.to(dtype=conv.weight.dtype, device=conv.weight.device)
        patchwise = PatchwiseConv2d(conv)
        seconds = blocksparse_fused.median_seconds_each({"conv": lambda: conv(x), "patchwise": lambda: patchwise(x)})
        _measured[key] = seconds["patchwise"] < seconds["conv"]
    return _measured[key]
