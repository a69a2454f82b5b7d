"""A block-sparse MLP in one fused CPU kernel: ``BlockSparseMLP``, which ``blocksparse.apply_bsr`` builds.

A ViT's MLP is Linear -> GELU -> Dropout -> Linear. Pruned to 90%, its expanding Linear is bound by writing its
outputs (the hidden activations, four times the tokens' width), not by its products, and the activation reads and
writes them once more. ``BlockSparseMLP`` holds the two converted ``BlockSparseLinear`` layers and the elementwise
modules between them, and on the CPU computes all three per tile of tokens in one op
(``blocksparse_fused.fused_mlp``; for two ``Int8BlockSparseLinear`` layers ``blocksparse_int8.int8_mlp``), so the
hidden activations stay in cache. In training mode, or off the CPU, it runs
the three one after the other: the same function. So does a float MLP moved to a dtype the fused kernel lacks
(float64, after ``model.double()``).
"""

from typing import List, Optional

import torch
from torch import nn

import blocksparse_fused
import blocksparse_int8


def fused_activation(between: List[nn.Module]) -> Optional[str]:
    """The fused kernel's name (``blocksparse_fused.MLP_ACTIVATIONS``) for the elementwise modules between two
    Linears, or None when the kernel cannot compute them. Dropout is the identity at inference."""
    names = []
    for module in between:
        if type(module) in (nn.Dropout, nn.Identity):
            continue
        if type(module) is nn.GELU:
            names.append("gelu" if module.approximate == "none" else "gelu_tanh")
        elif type(module) is nn.ReLU:
            names.append("relu")
        else:
            return None
    if len(names) > 1:
        return None
    return names[0] if names else "identity"


class BlockSparseMLP(nn.Module):
    """``fc2(between(fc1(x)))`` for two fused-kernel ``BlockSparseLinear`` layers, in one op per tile of tokens.

    ``second_name`` is the name ``fc2`` had in the ``nn.Sequential`` that holds this module (which now has an
    ``nn.Identity`` there), so a compact checkpoint can store both layers under their original names.
    """

    def __init__(self, fc1: nn.Module, between: List[nn.Module], fc2: nn.Module, *, tile_tokens: int,
                 products: str, second_name: str, isa: Optional[str] = None):
        super().__init__()
        activation = fused_activation(between)
        if activation is None:
            raise ValueError(f"the fused MLP kernel computes one of {', '.join(blocksparse_fused.MLP_ACTIVATIONS)} "
                             f"between its Linears, not {[type(m).__name__ for m in between]}")
        self.fc1 = fc1
        self.between = nn.Sequential(*between)
        self.fc2 = fc2
        self.activation = activation
        self.tile_tokens = tile_tokens
        self.products = products  # float layers: how the products run (blocksparse_fused.product_kinds)
        self.isa = isa  # int8 layers: the instruction set their kernel uses ("amx" or "vnni")
        self.second_name = second_name

    def __setstate__(self, state):
        # Unpickled (torch.save(model)), perhaps in a fresh process or on another CPU: load the ops and keep only
        # products and instruction sets that run here.
        super().__setstate__(state)
        blocksparse_fused.require_for_pickled_model()
        if self.isa is not None:
            blocksparse_int8.require(self.fc1.blocksize)
            available = blocksparse_int8.isas(self.fc1.blocksize)
            self.isa = self.isa if self.isa in available else available[0]
        self._keep_runnable_products()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the layers re-pack their blocks for a new dtype
        self._keep_runnable_products()
        return self

    def _keep_runnable_products(self) -> None:
        """Float layers: ``products`` where this CPU and dtype take it, else "blocks" (a pair measured on our AMX
        kernel in bfloat16, then moved to another dtype or unpickled on a CPU without AMX)."""
        if self.isa is None and self.fc1.block_values.dtype in blocksparse_fused.DTYPES:
            self.products = blocksparse_fused.valid_products(self.products, self.fc1.block_values.dtype,
                                                             self.fc1.blocksize)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Dropout acts in training; the kernel is the CPU's, and its float form has no float64.
        no_fused_dtype = self.isa is None and self.fc1.block_values.dtype not in blocksparse_fused.DTYPES
        if self.training or input.device.type != "cpu" or no_fused_dtype:
            return self.fc2(self.between(self.fc1(input)))
        self.fc1.check_input(input)
        x = input.reshape(-1, self.fc1.in_features)
        first, second = self.fc1.fused_operands(), self.fc2.fused_operands()
        if self.isa is not None:
            y = blocksparse_int8.int8_mlp(x.to(self.fc1.compute_dtype(x.dtype)), first, second, self.fc2.out_features,
                                          self.activation, self.tile_tokens, self.isa).to(input.dtype)
        else:
            y = blocksparse_fused.fused_mlp(x.to(first[0].dtype), first, second, self.fc2.out_features,
                                            self.activation, self.tile_tokens, self.products)
        return y.reshape(*input.shape[:-1], self.fc2.out_features)

    def extra_repr(self) -> str:
        variant = f"isa={self.isa!r}" if self.isa is not None else f"products={self.products!r}"
        return f"activation={self.activation!r}, tile_tokens={self.tile_tokens}, {variant}"
