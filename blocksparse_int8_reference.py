"""W8A8 quantization in pure PyTorch: the int8 kernels' reference (the tests' oracle) and their fallback.

The scheme the C++ ops (``csrc/int8_bsr_linear.cpp``) compute, step for step:

* weights: int8, symmetric, one scale per output channel, ``scale = amax(|row|) / 127``;
* activations: int8, symmetric, one scale per token (row of the input), quantized inside the op:
  ``q = round(x * (127 / amax))`` (half to even), ``scale = amax / 127``; a row of zeros has scale 0, and a row
  holding inf or NaN scale NaN, so its outputs are NaN (as ``nn.Linear``'s would be);
* the integer product, exact (float64 holds every int32 sum of int8 products of a Linear);
* the epilogue, in float32: ``float(acc) * (token scale * channel scale) + bias``, then the input's dtype.

The kernels store the weight blocks for the dot-product instructions (``vnni_layout``) and the activations shifted by
+128 to uint8; ``compensation`` is what that shift adds to every product, subtracted in the epilogue.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


##### Quantization primitives #####


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output channel) of a 2-D float weight; a row of zeros gets scale 1."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    # Tensor by tensor (see quantize_tokens). Quantizing ``dequantize_weight``'s result gives these scales back.
    scale = torch.where(amax > 0, amax / torch.full_like(amax, 127), torch.ones_like(amax))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def dequantize_weight(weight_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 weight and its channel scales stand for."""
    return weight_q.float() * scale[:, None]


def quantize_tokens(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) of a 2-D input, as the kernels quantize it."""
    x = x.float()
    amax = x.abs().amax(dim=1)
    finite = torch.isfinite(x).all(dim=1)
    # Tensor by tensor: torch divides by a Python number as a product with its reciprocal, the kernels do not.
    fixed = torch.full_like(amax, 127)
    inverse = torch.where(finite & (amax > 0), fixed / amax, torch.zeros_like(amax))
    q = torch.round(torch.where(finite[:, None], x, 0) * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
    scale = torch.where(finite, amax / fixed, torch.full_like(amax, float("nan")))
    return q, scale


def integer_product(q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """``q @ weight_q.T`` exactly, as int32 (float64 is exact for sums of up to 2**53 / 127**2 products)."""
    return (q.double() @ weight_q.double().T).to(torch.int32)


def dequantize(acc: torch.Tensor, token_scale: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The kernels' epilogue, float32: ``float(acc) * (token scale * channel scale) + bias``."""
    y = acc.float() * (token_scale[:, None] * weight_scale[None, :])
    return y if bias is None else y + bias.float()


##### The kernels' weight layout #####


def vnni_layout(blocks: torch.Tensor) -> torch.Tensor:
    """int8 blocks (kept, in, out), each a transposed weight block -> (kept, in/4, out, 4): four consecutive inputs
    of one output side by side, the operand of VPDPBUSD and of AMX's int8 products."""
    kept, size_in, size_out = blocks.shape
    return blocks.view(kept, size_in // 4, 4, size_out).transpose(2, 3).contiguous()


def compensation(weight_q: torch.Tensor) -> torch.Tensor:
    """int32 per output channel: what the kernels' +128 shift of the activations adds to each product."""
    return (weight_q.to(torch.int32).sum(dim=1) * 128).to(torch.int32)


##### Reference ops #####


def int8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8 ``x @ W.T + bias`` for a 2-D float ``x``: what ``torch.ops.superblock.int8_bsr_linear`` computes."""
    q, token_scale = quantize_tokens(x)
    return dequantize(integer_product(q, weight_q), token_scale, weight_scale, bias).to(x.dtype)


ACTIVATIONS = {"gelu": lambda h: F.gelu(h), "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
               "relu": F.relu, "identity": lambda h: h}


def int8_mlp(x: torch.Tensor, first: tuple, second: tuple, activation: str, blocksize: int) -> torch.Tensor:
    """``second(act(first(x)))`` in W8A8 as ``torch.ops.superblock.int8_bsr_mlp`` computes it: bit for bit with
    "relu" and "identity". The kernel computes GELU (both forms) by its own approximations, within 6e-5 of
    ``F.gelu``, so with those a hidden value may round to its neighbouring int8 step: a few steps apart, not equal.

    ``first`` and ``second`` are each ``(weight_q, weight_scale, bias)``. The hidden activations stay float32
    between the layers; they are quantized per token over the hidden blocks ``second`` reads (its nonzero block
    columns), the only ones the kernel computes.
    """
    w1, s1, b1 = first
    w2, s2, b2 = second
    q, token_scale = quantize_tokens(x)
    hidden = ACTIVATIONS[activation](dequantize(integer_product(q, w1), token_scale, s1, b1))
    read = w2.view(w2.shape[0] // blocksize, blocksize, -1, blocksize).ne(0).any(dim=3).any(dim=1).any(dim=0)
    hidden = torch.where(read.repeat_interleave(blocksize), hidden, 0)
    q, token_scale = quantize_tokens(hidden)
    return dequantize(integer_product(q, w2), token_scale, s2, b2).to(x.dtype)
