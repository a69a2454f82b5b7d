"""A transformer block's residual add and the LayerNorm after it, in one pass: pre-norm blocks folded for inference.

Once its matrix products are block-sparse, a ViT block spends about as long in its two LayerNorms and two residual
adds as in its MLP: each is a pass over the whole (tokens x width) activation, and ATen's bfloat16 LayerNorm is
compute-bound at a fraction of the memory's speed. ``torch.ops.superblock.add_layer_norm`` (``csrc/layer_norm.cpp``,
built with the other kernels by ``blocksparse_fused``) returns ``(x + residual, LayerNorm(x + residual))`` in one pass
over the rows, and ``torch.ops.superblock.layer_norm`` the norm alone; ``reference`` is the same in pure PyTorch.

``blocksparse.apply_bsr`` replaces each pre-norm block it knows (torchvision's ViT ``EncoderBlock``, timm's ``Block``)
by a folded one, ``FoldedEncoderBlock`` or ``FoldedTimmBlock``: the same children under the same names (so the same
state dict), the same function, its first norm on the op and the attention's residual add fused with its second
norm; and an ``nn.Sequential`` of folded blocks (torchvision's ``encoder.layers``, timm's ``blocks``) by
``FoldedBlocks``, which also fuses each block's last residual add with the next block's first norm. It does so where
``kernel_is_faster`` measured the ops faster than ATen's add and LayerNorm for the block's width and dtype here.
"""

from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

import blocksparse_fused
import timm_layers

# The op is timed against ATen's add and LayerNorm on this many rows (vit_b_16's 197 tokens of 8 images).
SAMPLE_ROWS = 1576

_state: Dict[str, object] = {"faster": {}}


##### The reference and the ops #####


def reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, LayerNorm over the last dimension of that sum), in pure PyTorch."""
    total = x + residual
    return total, F.layer_norm(total, (total.shape[-1],), weight, bias, eps)


def _register_fakes() -> None:
    if _state.get("fakes"):
        return

    @torch.library.register_fake("superblock::layer_norm")
    def _(x, weight, bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("superblock::add_layer_norm")
    def _(x, residual, weight, bias, eps):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

    _state["fakes"] = True


def unsupported_reason(norm: nn.Module) -> Optional[str]:
    """Why the ops cannot compute this norm module, or None when they can (before asking what the CPU can do)."""
    if type(norm) not in norm_types():
        return f"{type(norm).__name__} is not a LayerNorm"
    if len(norm.normalized_shape) != 1 or norm.weight is None:
        return "the ops take a LayerNorm over the last dimension with a weight"
    if norm.weight.dtype not in (torch.float32, torch.bfloat16) or norm.weight.device.type != "cpu":
        return f"the ops take float32 or bfloat16 on the CPU, not {norm.weight.dtype} on {norm.weight.device.type}"
    if not blocksparse_fused.available():
        return f"the C++ extension is unavailable ({blocksparse_fused.unavailable_reason()})"
    _register_fakes()
    return None


def norm_types():
    """The LayerNorm modules the ops replace: torch's, and timm's (the same computation)."""
    timm_norm = timm_layers.layer_norm_type()
    return (nn.LayerNorm,) if timm_norm is None else (nn.LayerNorm, timm_norm)


def _kernel_runs(x: torch.Tensor, norm: nn.LayerNorm) -> bool:
    # The ops compute no gradients; the dtype may have changed since the block was folded (model.to()).
    return (x.device.type == "cpu" and x.dtype == norm.weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad)))


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x)``, on the op where it runs."""
    if _kernel_runs(x, norm):
        return torch.ops.superblock.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, norm(x + residual))``, in one pass on the op where it runs."""
    if (_kernel_runs(x, norm) and residual.shape == x.shape and residual.dtype == x.dtype
            and not (torch.is_grad_enabled() and residual.requires_grad)):
        return torch.ops.superblock.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    total = x + residual
    return total, norm(total)


@torch.no_grad()
def kernel_is_faster(width: int, dtype: torch.dtype) -> bool:
    """Whether the ops beat ATen's add + LayerNorm and LayerNorm (together, one of each) on ``SAMPLE_ROWS`` rows of
    this width and dtype here; measured once per process."""
    key = (width, dtype)
    if key not in _state["faster"]:
        _register_fakes()
        generator = torch.Generator().manual_seed(0)
        x, residual = (torch.randn(SAMPLE_ROWS, width, generator=generator).to(dtype) for _ in range(2))
        norm = nn.LayerNorm(width, eps=1e-6).to(dtype)
        ops = torch.ops.superblock

        def kernel():
            ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
            ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)

        def aten():
            norm(x)
            norm(x + residual)

        seconds = blocksparse_fused.median_seconds_each({"kernel": kernel, "aten": aten})
        _state["faster"][key] = seconds["kernel"] < seconds["aten"]
    return _state["faster"][key]


##### Folded blocks #####


class _NormsOnTheOps(nn.Module):
    """What the folded blocks share: their norms run on the ops, which an unpickled model (``torch.save(model)``,
    loaded in a fresh process) must load first."""

    def __setstate__(self, state):
        super().__setstate__(state)
        blocksparse_fused.require_for_pickled_model()
        _register_fakes()


class FoldedEncoderBlock(_NormsOnTheOps):
    """torchvision's ViT ``EncoderBlock`` (the same children: ln_1, self_attention, dropout, ln_2, mlp) with its
    norms on the ops: ``ln_1`` on ``layer_norm``, the attention's residual add and ``ln_2`` in one ``add_layer_norm``."""

    _CHILDREN = ("ln_1", "self_attention", "dropout", "ln_2", "mlp")

    def __init__(self, block: EncoderBlock):
        super().__init__()
        self.num_heads = block.num_heads
        for name in self._CHILDREN:
            setattr(self, name, getattr(block, name))
        self.train(block.training)

    @property
    def first_norm(self) -> nn.LayerNorm:
        return self.ln_1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        return self.chained(input, layer_norm(input, self.ln_1))[0]

    def chained(self, input: torch.Tensor, normed: torch.Tensor, next_norm: Optional[nn.LayerNorm] = None):
        """(the block's output, ``next_norm`` of it or None) from its input and ``ln_1`` of its input."""
        x, _ = self.self_attention(normed, normed, normed, need_weights=False)
        x, y = add_layer_norm(self.dropout(x), input, self.ln_2)
        return _residual(self.mlp(y), x, next_norm)


class FoldedTimmBlock(_NormsOnTheOps):
    """timm's ``Block`` (the same children: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2) with its norms
    on the ops: ``norm1`` on ``layer_norm``, the attention's residual add and ``norm2`` in one ``add_layer_norm``."""

    _CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: nn.Module):
        super().__init__()
        for name in self._CHILDREN:
            setattr(self, name, getattr(block, name))
        self.train(block.training)

    @property
    def first_norm(self) -> nn.LayerNorm:
        return self.norm1

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.chained(x, layer_norm(x, self.norm1), attn_mask=attn_mask, is_causal=is_causal)[0]

    def chained(self, x: torch.Tensor, normed: torch.Tensor, next_norm: Optional[nn.LayerNorm] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """(the block's output, ``next_norm`` of it or None) from its input and ``norm1`` of its input."""
        h = self.drop_path1(self.ls1(self.attn(normed, attn_mask=attn_mask, is_causal=is_causal)))
        x, y = add_layer_norm(h, x, self.norm2)
        return _residual(self.drop_path2(self.ls2(self.mlp(y))), x, next_norm)


def _residual(update: torch.Tensor, x: torch.Tensor, next_norm: Optional[nn.LayerNorm]):
    """(x + update, next_norm of it): the block's last residual add, fused with the next block's first norm."""
    if next_norm is None:
        return x + update, None
    return add_layer_norm(update, x, next_norm)


class FoldedBlocks(nn.Sequential):
    """A run of folded blocks (an ``nn.Sequential``'s, under the same names) in which each block's last residual add
    and the next block's first norm are one ``add_layer_norm``: every add and norm of the run but the last add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        normed = layer_norm(x, blocks[0].first_norm)
        for block, after in zip(blocks, blocks[1:] + [None]):
            x, normed = block.chained(x, normed, None if after is None else after.first_norm)
        return x


def fold_reason(block: nn.Module, measure: bool = True) -> Optional[str]:
    """Why this block cannot be folded (or is not worth it here), or None: the block is one ``fold`` takes, its two
    norms are LayerNorms the ops compute, and (``measure``) the ops measured faster here for its width and dtype."""
    if type(block) is EncoderBlock:
        norms = (block.ln_1, block.ln_2)
    elif type(block) is timm_layers.plain_block_type() and all(hasattr(block, n) for n in FoldedTimmBlock._CHILDREN):
        norms = (block.norm1, block.norm2)
    else:
        return f"{type(block).__name__} is not a block this folds"
    for norm in norms:
        reason = unsupported_reason(norm)
        if reason is not None:
            return reason
    if measure and not kernel_is_faster(norms[0].normalized_shape[0], norms[0].weight.dtype):
        return "ATen's add and LayerNorm measured faster here"
    return None


def fold(block: nn.Module) -> nn.Module:
    """The folded form of a block that ``fold_reason`` accepts."""
    return FoldedEncoderBlock(block) if type(block) is EncoderBlock else FoldedTimmBlock(block)


def chain(model: nn.Module) -> None:
    """Make each ``nn.Sequential`` of ``model`` whose children are all folded blocks a ``FoldedBlocks`` (in place)."""
    for fqn, module in list(model.named_modules()):
        if fqn and type(module) is nn.Sequential and len(module) > 1 and all(  # the model itself stays what it is
                isinstance(child, (FoldedEncoderBlock, FoldedTimmBlock)) for child in module):
            chained = FoldedBlocks(OrderedDict(module._modules))
            chained.train(module.training)
            model.set_submodule(fqn, chained)


def unfold(model: nn.Module) -> None:
    """Undo ``fold`` (in place): every folded block is its torchvision or timm block again, with the same children.
    The model as it ran before the blocks were folded, for before/after timings."""
    for fqn, module in list(model.named_modules()):
        if not fqn:
            continue  # the model itself stays what it is, as fold and chain leave it
        if isinstance(module, FoldedEncoderBlock):
            width = module.ln_1.normalized_shape[0]
            block = EncoderBlock(module.num_heads, width, width, 0.0, 0.0, nn.LayerNorm)
        elif isinstance(module, FoldedTimmBlock):
            block = timm_layers.plain_block_type()(module.norm1.normalized_shape[0], num_heads=1)
        else:
            continue
        for name in module._CHILDREN:
            setattr(block, name, getattr(module, name))
        block.train(module.training)
        model.set_submodule(fqn, block)
    for fqn, module in list(model.named_modules()):
        if fqn and isinstance(module, FoldedBlocks):
            plain = nn.Sequential(OrderedDict(module._modules))
            plain.train(module.training)
            model.set_submodule(fqn, plain)
