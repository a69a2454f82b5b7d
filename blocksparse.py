"""Block-sparse Linear layers for fast inference: ``BlockSparseLinear``, the kernel choice and ``apply_bsr``.

A frozen ``nn.Linear`` whose weight has whole zero blocks (``blocksize x blocksize``) is packed once, in
``BlockSparseLinear.from_dense``, into only its kept blocks plus index buffers; ``apply_bsr`` converts every eligible
Linear of a model in place and reports what it left dense. Kernels (``kernel=``):

* ``"fused"``: the CPU kernel of ``blocksparse_fused`` (C++, ATen's brgemm micro-kernels, one custom op), float32,
  bfloat16 and float16. Built on first use; where it cannot be built, ``"auto"`` falls back to ``"bmm"``. A layer
  moved to float64 afterwards (``model.double()``) computes in float64 from the same blocks in pure PyTorch
  (``blocksparse_reference.blocks_forward``), slower, as a check of the others' numerics.
* ``"bmm"``: pure PyTorch (``blocksparse_reference``), grouped batched products; the reference and the fallback.
* ``"dense"``: plain ``F.linear`` with the (block-sparse) dense weight, for layers where block-sparse does not pay.
* ``"torch"``: the original SuperBlock approach, ``F.linear`` with a ``to_sparse_bsr`` weight; kept as the
  baseline. float32/float64 only, and slower than dense on CPU.
* ``"triton"``: CUDA only (or Triton's interpreter, for tests): the kernel of ``blocksparse_triton.py``.
* ``"auto"``: on CPU, measures ``"fused"`` (or ``"bmm"`` without the extension) against ``"dense"`` on the layer's
  own shape, blocks and dtype at conversion and keeps the faster (``choose_kernel``); on CUDA, ``"triton"`` from
  ``CUDA_BREAK_EVEN`` up.

Two "fused" layers of an MLP (Linear, GELU or ReLU, Linear) become one ``blocksparse_mlp.BlockSparseMLP`` whose single
op computes both per tile of tokens, the hidden activations kept in cache: always with ``kernel="fused"``, and with
``"auto"`` where that measures faster than the two layers in turn (``choose_mlp_fusion``).

Example::

    >>> result = apply_bsr(model.eval(), blocksize=64)
    >>> print(result)          # converted layers and the ones left dense, with reasons
    >>> with torch.inference_mode():
    ...     logits = model(images)

In a process of your own, also call ``utils.keep_freed_memory()`` once (evaluate.py and benchmark.py do): with
glibc's default settings the buffers each forward frees are handed back to the kernel and page-faulted in
again (benchmarks/RESULTS.md, "Allocator: glibc's malloc hands freed memory back, and every forward page-faults it
in again").
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import attention_core
import blocksparse_fused
import blocksparse_int8
import blocksparse_reference as reference
import blocksparse_triton
import patch_embedding
import residual_norm
import timm_attention
import timm_layers
from attention import ProjectedAttention, unsupported_attention_reason
from blocksparse_int8 import Int8BlockSparseLinear
from blocksparse_mlp import BlockSparseMLP, fused_activation
from supermask import find_classifier, num_pruned_tiles

KERNELS = ("auto", "fused", "bmm", "dense", "torch", "triton")
QUANTIZE = (None, "int8")

# On CUDA, "auto" runs the Triton kernel from this block sparsity up, and the dense product below it.
# An estimate, not yet a measurement: no GPU was available when it was set (benchmarks/RESULTS.md,
# "CUDA (still to be measured)").
CUDA_BREAK_EVEN = 0.5

# apply_bsr's default: the block sparsity below which a layer stays nn.Linear without being timed. It bounds which
# layers "auto" measures, not which run block-sparse: "auto" decides those by measurement. Where the fused kernel
# starts to pay: benchmarks/RESULTS.md, "`auto` over sparsity, block size, token count and dtype (never slower
# than dense)".
DEFAULT_MIN_SPARSITY = 0.5

AUTO_SAMPLE_TOKENS = blocksparse_fused.AUTO_SAMPLE_TOKENS


##### Kernel limits #####


def blocksize_divides(weight_shape: Tuple[int, int], blocksize: int) -> bool:
    """True if ``blocksize`` divides both dimensions of a Linear weight of ``weight_shape``."""
    return blocksize > 0 and weight_shape[0] % blocksize == 0 and weight_shape[1] % blocksize == 0


torch_bsr_supports_dtype = reference.torch_bsr_supports_dtype


def _check_blocksize(weight_shape: Tuple[int, int], blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not blocksize_divides(weight_shape, blocksize):
        out_features, in_features = weight_shape
        raise ValueError(
            f"blocksize {blocksize} does not divide the weight shape {out_features}x{in_features} "
            f"(out_features x in_features); pick a blocksize that divides both"
        )


def _check_kernel(kernel: str, weight: torch.Tensor, blocksize: int) -> None:
    """Raise (ValueError, or RuntimeError for a missing extension) when ``kernel`` cannot run this weight."""
    dtype, device = weight.dtype, weight.device
    if kernel == "triton":
        reason = blocksparse_triton.unsupported_triton_reason(blocksize, dtype)
        if reason is not None:
            raise ValueError(f"kernel='triton' cannot run this layer: {reason}")
        if not blocksparse_triton.triton_available():
            raise ValueError("kernel='triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests); use 'auto'")
    if kernel == "torch" and not torch_bsr_supports_dtype(dtype, device):
        raise ValueError(f"kernel='torch' uses PyTorch's sparse BSR kernels, which support float32/float64 only, "
                         f"not {dtype}; use kernel='fused' (or 'auto')")
    if kernel == "fused":
        if device.type != "cpu":
            raise ValueError(f"kernel='fused' runs on the CPU, not {device.type}; use kernel='auto'")
        if dtype not in blocksparse_fused.DTYPES:
            raise ValueError(f"kernel='fused' takes float32, bfloat16 or float16 weights, not {dtype}; "
                             f"use kernel='bmm'")
        blocksparse_fused.require()


##### Block masks and the auto choice #####


def block_mask(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Bool tensor (out/blocksize, in/blocksize): True where a ``blocksize`` block of ``weight`` has a nonzero."""
    _check_blocksize(tuple(weight.shape), blocksize)
    rows, cols = weight.shape[0] // blocksize, weight.shape[1] // blocksize
    return weight.detach().reshape(rows, blocksize, cols, blocksize).ne(0).any(dim=3).any(dim=1)


def block_sparsity(weight: torch.Tensor, blocksize: int) -> float:
    """Fraction of ``blocksize x blocksize`` blocks of ``weight`` that are entirely zero."""
    return 1.0 - block_mask(weight, blocksize).float().mean().item()


def reaches_sparsity(sparsity: float, threshold: float, num_blocks: int) -> bool:
    """Whether a weight of ``num_blocks`` blocks, ``sparsity`` of them all zero, is at least ``threshold`` sparse.

    Counted as a Supermask counts: trained at sparsity s, it prunes ``round(s * (n - 1))`` of n tiles, a little
    under s * n (0.6997 of 576 tiles at 0.7), and a layer trained at exactly the threshold must meet it.
    A threshold of 1 is met by all-zero weights only.
    """
    if threshold >= 1.0:
        return sparsity >= 1.0
    return round(sparsity * num_blocks) >= num_pruned_tiles(num_blocks, threshold)


@dataclass(frozen=True)
class KernelChoice:
    """What ``choose_kernel`` decided for a layer: the kernel, the fused kernel's token tile, the timings behind it."""

    kernel: str
    tile_tokens: Optional[int] = None  # the fused kernel's fastest tile, when it was measured
    products: str = "blocks"  # and how it runs its products (blocksparse_fused.product_kinds)
    seconds: Dict[str, float] = field(default_factory=dict, compare=False)


_measured: Dict[tuple, KernelChoice] = {}  # one measurement per distinct layer, dtype and thread count


def faster_of(seconds: Dict[str, float]) -> str:
    """The kernel with the smallest time; "dense" on a tie, since it needs no packing."""
    return min(seconds, key=lambda k: (seconds[k], k != "dense"))


def cuda_kernel(mask: torch.Tensor, dtype: torch.dtype, blocksize: int) -> str:
    """"auto" on CUDA for a layer with this block ``mask``: "triton" from ``CUDA_BREAK_EVEN`` up, else "dense"."""
    triton_ok = blocksparse_triton.unsupported_triton_reason(blocksize, dtype) is None
    sparse_enough = reaches_sparsity(1.0 - mask.float().mean().item(), CUDA_BREAK_EVEN, mask.numel())
    return "triton" if triton_ok and sparse_enough else "dense"


@torch.no_grad()
def choose_kernel(linear: nn.Linear, blocksize: int, candidate: Optional[str] = None) -> KernelChoice:
    """The kernel ``kernel="auto"`` uses for this frozen Linear, measured where it runs.

    On CUDA: "triton" from ``CUDA_BREAK_EVEN`` up (an estimate), else "dense". On CPU: the block-sparse
    ``candidate`` ("fused" where the extension runs, else "bmm") and "dense" are timed on ``AUTO_SAMPLE_TOKENS``
    tokens of this layer's shape, blocks and dtype, and the faster is kept. Each distinct (shape, dtype, blocksize,
    kept blocks, threads) is measured once per process.
    """
    weight = linear.weight.detach()
    mask = block_mask(weight, blocksize)
    if weight.device.type == "cuda":
        return KernelChoice(cuda_kernel(mask, weight.dtype, blocksize))
    if candidate is None:
        fused_ok = weight.dtype in blocksparse_fused.DTYPES and blocksparse_fused.available()
        candidate = "fused" if fused_ok else "bmm"
    key = (tuple(weight.shape), weight.dtype, blocksize, int(mask.sum()), torch.get_num_threads(), candidate)
    if key not in _measured:
        seconds, setting = _time_candidates(linear, blocksize, candidate)
        tile, products = setting or (None, "blocks")
        _measured[key] = KernelChoice(faster_of(seconds), tile, products, seconds)
    return _measured[key]


def _time_candidates(linear: nn.Linear, blocksize: int, candidate: str):
    """({"dense": s, candidate: s}, the fused kernel's fastest (tile, products) or None), timed on
    AUTO_SAMPLE_TOKENS tokens."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    x = torch.randn(AUTO_SAMPLE_TOKENS, weight.shape[1], dtype=weight.dtype, device=weight.device)

    def dense():
        return F.linear(x, weight, bias)

    if candidate == "fused":  # dense in the same rounds: "auto" promises never slower than dense
        values, crow, col = reference.pack_blocks(weight, blocksize)
        packed, out_features = blocksparse_fused.pack(values), weight.shape[0]
        (setting, fused_seconds), dense_seconds = blocksparse_fused.fastest_setting_against(
            lambda tile, kind: blocksparse_fused.fused_linear(x, packed, crow, col, bias, out_features, tile, kind),
            x.shape[0], blocksparse_fused.product_kinds(weight.dtype, blocksize), dense)
        return {"dense": dense_seconds, "fused": fused_seconds}, setting
    layer = BlockSparseLinear.from_dense(linear, blocksize, kernel=candidate)
    return blocksparse_fused.median_seconds_each({"dense": dense, candidate: lambda: layer(x)}), None


_measured_mlps: Dict[tuple, tuple] = {}  # one measurement per distinct pair: (setting or None, seconds)


@torch.no_grad()
def choose_mlp_fusion(fc1: nn.Module, between: List[nn.Module], fc2: nn.Module,
                      always: bool = False) -> Optional[Tuple[int, str]]:
    """The fused MLP kernel's (tile_tokens, products) for a converted Linear pair, or None to keep its two layers.

    Only two "fused" layers of one kind (float ``BlockSparseLinear`` of one dtype, or ``Int8BlockSparseLinear``,
    whose setting's second item is then the instruction set) with the same block size, and between them modules the
    kernel computes
    (``blocksparse_mlp.fused_activation``), can be fused. With ``always`` (kernel="fused") they are. Otherwise
    (kernel="auto") the fused MLP at its fastest setting and the two layers with the modules between are timed on
    ``AUTO_SAMPLE_TOKENS`` tokens, and the faster is kept. Each distinct pair is measured once per process.
    """
    return _mlp_choice(fc1, between, fc2, always)[0]


def _mlp_choice(fc1, between, fc2, always):
    """(choose_mlp_fusion's setting, seconds of the form it keeps on the sample; None where the pair cannot fuse)."""
    activation = fused_activation(between)
    kinds = (BlockSparseLinear, Int8BlockSparseLinear)
    if (activation is None or type(fc1) is not type(fc2) or not isinstance(fc1, kinds)  # a layer left nn.Linear
            or fc1.blocksize != fc2.blocksize or not fc1.kernel == fc2.kernel == "fused"):
        return None, None
    first, second = fc1.fused_operands(), fc2.fused_operands()
    if isinstance(fc1, Int8BlockSparseLinear):
        dtype, variants = fc1.measured_dtype, blocksparse_int8.isas(fc1.blocksize)
        fused = blocksparse_int8.int8_mlp
    elif isinstance(fc1, BlockSparseLinear) and fc2.packed_values.dtype == first[0].dtype:
        dtype, fused = first[0].dtype, blocksparse_fused.fused_mlp
        variants = blocksparse_fused.product_kinds(dtype, fc1.blocksize)
    else:
        return None, None
    key = (type(fc1), fc1.in_features, fc1.out_features, fc2.out_features, fc1.blocksize, dtype, fc1.kept_blocks,
           fc2.kept_blocks, activation, torch.get_num_threads(), always)
    if key not in _measured_mlps:
        x = torch.randn(AUTO_SAMPLE_TOKENS, fc1.in_features, dtype=dtype)

        def run(tile, variant):
            return fused(x, first, second, fc2.out_features, activation, tile, variant)

        if always:
            setting, seconds = blocksparse_fused.fastest_setting(run, x.shape[0], variants)
        else:  # the two layers in the same rounds
            separate = nn.Sequential(fc1, *between, fc2)
            (setting, seconds), separate_seconds = blocksparse_fused.fastest_setting_against(
                run, x.shape[0], variants, lambda: separate(x))
            if separate_seconds <= seconds:
                setting, seconds = None, separate_seconds
        _measured_mlps[key] = setting, seconds
    return _measured_mlps[key]


##### The module #####


def _repack_after_load(module: "BlockSparseLinear", incompatible_keys) -> None:
    module._repack()  # a function, not a lambda: a converted model must pickle


class BlockSparseLinear(reference.FrozenBlockLayer):
    """A frozen Linear stored as its kept ``blocksize x blocksize`` blocks; build with ``from_dense``.

    Non-finite inputs follow ``torch.sparse``, not ``nn.Linear``: a pruned block is never read, so a NaN or inf in a
    token's input reaches only the outputs whose kept blocks read that input column (always NaN or inf there), where
    ``nn.Linear`` (0 * NaN = NaN) makes the token's whole output row NaN. The token's outputs from blocks that do not
    read it stay finite with kernels "fused", "torch" and "triton"; "bmm" (whose row groups pad with zero blocks) may
    and "dense" does make them NaN; other tokens are never affected. Int8 layers make the token's whole row NaN
    (its activation scale). Propagating as ``nn.Linear`` would cost a pass over every layer's input and output
    (measured +40% to +160% on a 90%-sparse fused MLP pair of vit_b_16, one thread, 2-core Xeon): check
    ``torch.isfinite(images).all()`` where non-finite inputs can occur.
    """

    def __init__(self, in_features: int, out_features: int, blocksize: int, kernel: str, kept_blocks: int):
        super().__init__(in_features, out_features, blocksize, kernel, kept_blocks)
        self.products = "blocks"  # "fused": how its products run (blocksparse_fused.product_kinds, measured)
        self.num_groups = 0  # "bmm": row groups, see blocksparse_reference.pack_groups
        self.group_spans: List[Optional[Tuple[int, int]]] = []  # per group: its rows' (start, end) if consecutive
        self.has_empty_rows = False
        self.empty_span: Optional[Tuple[int, int]] = None
        self.register_load_state_dict_post_hook(_repack_after_load)

    @classmethod
    def from_dense(cls, linear: nn.Linear, blocksize: int, kernel: str = "auto",
                   quantize: Optional[str] = None) -> nn.Module:
        """Pack ``linear`` (its weight's zero blocks are dropped) for ``kernel``; raises ValueError if it can't.

        With ``quantize="int8"`` the layer is a ``blocksparse_int8.Int8BlockSparseLinear`` (W8A8) instead: the C++
        int8 kernel for "auto" and "fused", the pure-PyTorch reference for "bmm" (``apply_bsr`` also weighs it
        against the float forms).
        """
        _check_quantize(quantize, kernel)
        if quantize == "int8":
            return Int8BlockSparseLinear.from_dense(linear, blocksize, kernel="bmm" if kernel == "bmm" else "fused")
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        weight = linear.weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(weight.shape)}")
        mask = block_mask(weight, blocksize)
        choice = None
        if kernel == "auto":
            choice = choose_kernel(linear, blocksize)
            kernel = choice.kernel
        _check_kernel(kernel, weight, blocksize)
        if kernel == "fused" and choice is None:
            choice = choose_kernel(linear, blocksize, candidate="fused")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, blocksize, kernel, int(mask.sum().item())).train(linear.training)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        module.register_buffer("bias", bias)
        if kernel == "dense":
            module.register_buffer("weight", weight.clone())
        elif kernel in ("fused", "triton"):
            values, crow, col = reference.pack_blocks(weight, blocksize)
            module.register_buffer("block_values", values)  # (kept, in, out): each block transposed
            module.register_buffer("block_crow", crow)
            module.register_buffer("block_col", col)
            if kernel == "fused":
                module.tile_tokens, module.products = choice.tile_tokens, choice.products
                # _repack packs the blocks, and keeps the products only where this layout takes them (a choice
                # measured earlier in the process may predate a layout check that failed).
                module.register_buffer("packed_values", values, persistent=False)
                module._repack()
        elif kernel == "torch":
            crow, col, values = reference.to_torch_bsr(weight, blocksize)
            module.register_buffer("crow_indices", crow)
            module.register_buffer("col_indices", col)
            module.register_buffer("values", values)
        else:
            groups, empty_rows = reference.pack_groups(weight, mask, blocksize)
            module.num_groups = len(groups)
            module.group_spans = [reference.row_span(rows) for rows, _, _ in groups]
            module.empty_span = reference.row_span(empty_rows)
            for i, (rows, cols, packed) in enumerate(groups):
                module.register_buffer(f"group{i}_rows", rows)
                module.register_buffer(f"group{i}_cols", cols)
                module.register_buffer(f"group{i}_weight", packed)
                module.register_buffer(f"group{i}_bias", None if bias is None else bias.view(-1, blocksize)[rows])
            module.has_empty_rows = empty_rows.numel() > 0
            if module.has_empty_rows:
                module.register_buffer("empty_rows", empty_rows)
                module.register_buffer("empty_bias", None if bias is None else bias.view(-1, blocksize)[empty_rows])
        return module

    def _apply(self, fn, recurse=True):
        # The fused kernel's block layout depends on the dtype: re-pack after .to(dtype) and friends.
        super()._apply(fn, recurse)
        self._repack()
        return self

    def _repack(self) -> None:
        """Derive the fused kernel's packed blocks (not saved in state_dict) from ``block_values`` again."""
        if self.kernel == "fused" and self.block_values.device.type == "cpu":
            # The C++ kernel has no float64: such a layer computes from block_values in pure PyTorch (forward).
            fused_dtype = self.block_values.dtype in blocksparse_fused.DTYPES
            self.packed_values = blocksparse_fused.pack(self.block_values) if fused_dtype else self.block_values
            if fused_dtype:  # "amx" is bfloat16's only: another dtype keeps the plain brgemm calls
                self.products = blocksparse_fused.valid_products(self.products, self.block_values.dtype,
                                                                 self.blocksize)

    def settle_on_this_cpu(self) -> None:
        # The packed layout and the products are this CPU's (blocksparse_fused.pack, product_kinds): derive both again.
        if self.kernel == "fused":
            blocksparse_fused.require_for_pickled_model()
            self._repack()

    def fused_operands(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(packed values, row offsets, columns, bias): what the fused kernel reads ("fused" layers only)."""
        return self.packed_values, self.block_crow, self.block_col, self.bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.check_input(input)
        lead = input.shape[:-1]
        # 2-D keeps every kernel on its fast path (torch's BSR F.linear fails on 3-D input under inference_mode).
        x = input.reshape(-1, self.in_features)
        if self.kernel == "fused" and self.block_values.dtype not in blocksparse_fused.DTYPES:
            y = reference.blocks_forward(x.to(self.block_values.dtype), self.block_values, self.block_crow,
                                         self.block_col, self.bias, self.out_features)
        elif self.kernel == "fused":
            y = blocksparse_fused.fused_linear(x.to(self.packed_values.dtype), *self.fused_operands(),
                                               self.out_features, self.tile_tokens, self.products)
        elif self.kernel == "dense":
            y = F.linear(x, self.weight, self.bias)
        elif self.kernel == "triton":
            y = blocksparse_triton.bsr_linear(x, self.block_values, self.block_crow, self.block_col, self.bias,
                                              self.out_features)
        elif self.kernel == "torch":
            shape = (self.out_features, self.in_features)
            y = reference.torch_bsr_forward(x, self.crow_indices, self.col_indices, self.values, self.bias, shape)
        else:
            y = self._bmm(x)
        return y.reshape(*lead, self.out_features)

    def _bmm(self, x: torch.Tensor) -> torch.Tensor:
        groups = [
            tuple(getattr(self, f"group{i}_{part}") for part in ("rows", "cols", "weight", "bias")) + (self.group_spans[i],)
            for i in range(self.num_groups)
        ]
        blocksize = self.blocksize
        block_rows, block_cols = self.out_features // blocksize, self.in_features // blocksize
        if torch.compiler.is_compiling():  # one opaque op: see blocksparse_reference.bmm_blocks
            tensors = [t for group in groups for t in group[:4]]
            spans = [v for span in self.group_spans for v in (span or (-1, -1))]
            if self.has_empty_rows:
                tensors += [self.empty_rows, self.empty_bias]
                spans += list(self.empty_span or (-1, -1))
            return reference.bmm_blocks(x, tensors, spans, self.has_empty_rows, block_rows, block_cols, blocksize)
        empty = (self.empty_rows, self.empty_bias, self.empty_span) if self.has_empty_rows else None
        return reference.bmm_forward(x, groups, empty, block_rows, block_cols, blocksize)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (the reference the kernels are tested against)."""
        shape = (self.out_features, self.in_features)
        if self.kernel == "dense":
            return self.weight.clone()
        if self.kernel in ("fused", "triton"):
            return reference.expand_blocks(self.block_values, self.block_crow, self.block_col, shape)
        if self.kernel == "torch":
            return reference.torch_bsr_weight(self.crow_indices, self.col_indices, self.values, shape).to_dense()
        blocksize = self.blocksize
        block_rows, block_cols = self.out_features // blocksize, self.in_features // blocksize
        floats = [b for b in self.buffers() if b.is_floating_point()] or [torch.empty(0)]
        blocks = torch.zeros(block_rows, block_cols, blocksize, blocksize, dtype=floats[0].dtype,
                             device=floats[0].device)
        for i in range(self.num_groups):
            rows, cols = getattr(self, f"group{i}_rows"), getattr(self, f"group{i}_cols")
            packed = getattr(self, f"group{i}_weight")
            k = cols.numel() // rows.numel()
            kept = packed.view(rows.numel(), blocksize, k, blocksize).permute(0, 2, 1, 3)  # (R, k, out, in)
            # Padding blocks are zero, so accumulating them into any column-block changes nothing.
            blocks.index_put_((rows[:, None].expand(-1, k), cols.view(-1, k)), kept, accumulate=True)
        return blocks.permute(0, 2, 1, 3).reshape(shape)

    def tile_mask(self) -> torch.Tensor:
        """Bool (out/blocksize, in/blocksize): True where a block is stored (for pictures of the mask)."""
        return block_mask(self.dense_weight(), self.blocksize)

    def setting_repr(self) -> str:
        return f", tile_tokens={self.tile_tokens}, products={self.products!r}" if self.tile_tokens is not None else ""


def block_sparse_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every ``BlockSparseLinear`` and ``Int8BlockSparseLinear`` of ``model`` by the name its Linear had before
    ``apply_bsr``.

    A ``BlockSparseMLP`` holds two of them as ``fc1`` and ``fc2``; they are listed under the names of the two
    Linears it replaced (its own name, and ``second_name`` beside it).
    """
    layers, inside_mlps = {}, set()
    for fqn, module in model.named_modules():  # a module comes before its children
        if isinstance(module, BlockSparseMLP):
            parent = fqn.rpartition(".")[0]
            layers[fqn] = module.fc1
            layers[f"{parent}.{module.second_name}" if parent else module.second_name] = module.fc2
            inside_mlps.update((id(module.fc1), id(module.fc2)))
        elif isinstance(module, (BlockSparseLinear, Int8BlockSparseLinear)) and id(module) not in inside_mlps:
            layers[fqn] = module
    return layers


##### Whole-model conversion #####


@dataclass
class BsrResult:
    """What ``apply_bsr`` did: converted layers (name, kernel, block sparsity) and dense ones (name, reason)."""

    converted: List[Tuple[str, str, float]] = field(default_factory=list)
    left_dense: List[Tuple[str, str]] = field(default_factory=list)
    # (first Linear, second Linear, what was done) for each Linear -> elementwise -> Linear pair whose
    # hidden units were reordered (and dead ones dropped) before packing; see _prepare_mlp_pair.
    mlp_pairs: List[Tuple[str, str, str]] = field(default_factory=list)
    # The first Linear of each pair now computed by one BlockSparseMLP (the second's place holds nn.Identity).
    fused_mlps: List[str] = field(default_factory=list)
    # (MLP module, why its Linears are not an MLP pair) for each MLP whose form the fused kernel does not compute
    # (timm's gated MLPs, an Mlp with a norm between its Linears); its Linears are converted one by one.
    unfused_mlps: List[Tuple[str, str]] = field(default_factory=list)
    # (attention module, what computes its core): a ProjectedAttention's core (attention_core.CORES), or
    # "nn.MultiheadAttention" where torch's module was kept.
    attention_cores: List[Tuple[str, str]] = field(default_factory=list)
    # The transformer blocks whose residual add and LayerNorm now run as one op (residual_norm.fold).
    folded_blocks: List[str] = field(default_factory=list)
    # The ViT patch embeddings now computed as one matrix product (patch_embedding.PatchwiseConv2d).
    patchwise_convolutions: List[str] = field(default_factory=list)

    def skipped_summary(self, most: int = 3) -> str:
        """The layers left dense and why, on one short line: the first ``most``, then how many more."""
        if not self.left_dense:
            return "no layer left dense"
        named = "; ".join(f"{name}: {reason}" for name, reason in self.left_dense[:most])
        more = len(self.left_dense) - most
        return f"{named}; and {more} more" if more > 0 else named

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} Linear layers to BlockSparseLinear (int8/...: W8A8 layers):"]
        lines += [f"  {name:40s} kernel={kernel:6s} block sparsity={sp:.3f}" for name, kernel, sp in self.converted]
        lines.append(f"left {len(self.left_dense)} Linear layers dense:")
        lines += [f"  {name:40s} {reason}" for name, reason in self.left_dense]
        if self.mlp_pairs:
            lines.append(f"reordered the hidden units of {len(self.mlp_pairs)} Linear pairs:")
            lines += [f"  {first} -> {second}: {what}" for first, second, what in self.mlp_pairs]
        if self.fused_mlps:
            lines.append(f"fused {len(self.fused_mlps)} of them into one BlockSparseMLP kernel each: "
                         + ", ".join(self.fused_mlps))
        if self.unfused_mlps:
            lines.append(f"left {len(self.unfused_mlps)} MLPs unfused (their Linears converted one by one):")
            lines += [f"  {name}: {reason}" for name, reason in self.unfused_mlps]
        if self.attention_cores:
            counts = Counter(core for _, core in self.attention_cores)
            lines.append(f"attention cores of {len(self.attention_cores)} attention modules: "
                         + ", ".join(f"{core} x{count}" for core, count in counts.items()))
        if self.folded_blocks:
            lines.append(f"folded the residual add and LayerNorm of {len(self.folded_blocks)} transformer blocks")
        if self.patchwise_convolutions:
            lines.append("computed the patch embedding as one matrix product: " + ", ".join(self.patchwise_convolutions))
        return "\n".join(lines)


# Modules that act on each hidden unit independently: between two Linears they let the hidden units be
# permuted (and a constant unit be folded into the next bias) without changing the function.
ELEMENTWISE = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
               nn.Mish, nn.Identity, nn.Dropout)


# timm's Mlp computes these attributes in this order: fc1 and fc2 with the elementwise act, drop1, norm between
# (drop2 follows fc2, outside the pair).
TIMM_MLP_BETWEEN = ("act", "drop1", "norm")


def _mlp_pairs(model: nn.Module, unfused: Optional[List[Tuple[str, str]]] = None) -> List[Tuple[str, str, List[str]]]:
    """(first, second, between) names for each nn.Sequential run Linear, elementwise modules, Linear in ``model``, and
    each timm ``Mlp`` whose modules between fc1 and fc2 are elementwise. An MLP that cannot be a pair (timm's gated
    MLPs, a norm between the Linears) is appended to ``unfused`` as (name, why)."""
    pairs = []
    mlp_type, gated = timm_layers.mlp_type(), timm_layers.gated_mlp_types()
    for fqn, seq in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        if mlp_type is not None and type(seq) is mlp_type:
            first, second = seq.fc1, seq.fc2
            between = [getattr(seq, name) for name in TIMM_MLP_BETWEEN]
            odd = [type(m).__name__ for m in between if type(m) not in ELEMENTWISE]
            if type(first) is not nn.Linear or type(second) is not nn.Linear:
                why = "its fc1 and fc2 are not nn.Linear (use_conv: 1x1 convolutions)"
            elif odd:
                why = (f"{', '.join(odd)} between fc1 and fc2 is not elementwise (the fused kernel computes one "
                       f"elementwise activation there)")
            else:
                pairs.append((prefix + "fc1", prefix + "fc2", [prefix + name for name in TIMM_MLP_BETWEEN]))
                continue
            if unfused is not None:
                unfused.append((fqn, why))
            continue
        if gated and isinstance(seq, gated):
            if unfused is not None:
                unfused.append((fqn, f"{type(seq).__name__} is gated: its hidden units multiply two projections "
                                     f"(act(gate) * value), which the fused kernel (one elementwise activation "
                                     f"between two Linears) does not compute"))
            continue
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (first_name, first) in enumerate(children):
            if type(first) is not nn.Linear:
                continue
            j = i + 1
            while j < len(children) and type(children[j][1]) in ELEMENTWISE:
                j += 1
            if j < len(children) and j > i + 1 and type(children[j][1]) is nn.Linear:
                second = children[j][1]
                if second.in_features == first.out_features:
                    pairs.append((prefix + first_name, prefix + children[j][0],
                                  [prefix + name for name, _ in children[i + 1:j]]))
    return pairs


@torch.no_grad()
def _prepare_mlp_pair(first: nn.Linear, second: nn.Linear, between: List[nn.Module], blocksize: int):
    """New (first, second) Linears computing the same function, fewer blocks and hidden units reordered.

    Hidden block h (``blocksize`` units) is *dead* when ``second`` has no kept block in its column h: its
    values are never used, so ``first``'s block-row h is zeroed (fewer blocks to multiply). When ``first``
    has no kept block in row h, the unit is the constant ``act(bias)``; if every Dropout between has p=0 and
    ``second`` has a bias, ``second @ act(bias)`` is folded into that bias and the unit becomes dead too.
    Then the hidden blocks are sorted by ``first``'s kept count per row, the order "bmm" groups them in
    (``blocksparse_reference.pack_groups``), so every group of ``first`` is a run of consecutive rows that it
    writes without a scatter. Returns (first, second, description).
    """
    w1, w2 = first.weight.detach().clone(), second.weight.detach().clone()
    b1 = None if first.bias is None else first.bias.detach().clone()
    b2 = None if second.bias is None else second.bias.detach().clone()
    hidden = w1.shape[0] // blocksize
    folded = 0
    if b1 is not None and b2 is not None and all(not isinstance(m, nn.Dropout) or m.p == 0 for m in between):
        constant = ~block_mask(w1, blocksize).any(dim=1) & block_mask(w2, blocksize).any(dim=0)
        units = constant.repeat_interleave(blocksize)
        value = b1[units]
        for module in between:
            value = module(value)
        b2 += w2[:, units] @ value
        w2[:, units] = 0
        folded = int(constant.sum())
    dead = ~block_mask(w2, blocksize).any(dim=0)
    units = dead.repeat_interleave(blocksize)
    w1[units] = 0
    if b1 is not None:
        b1[units] = 0
    order = reference.block_row_order(block_mask(w1, blocksize))
    units = (order[:, None] * blocksize + torch.arange(blocksize)).flatten()
    pair = []
    for layer, weight, bias in ((first, w1[units], None if b1 is None else b1[units]), (second, w2[:, units], b2)):
        new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        pair.append(new.requires_grad_(layer.weight.requires_grad).train(layer.training))
    what = (f"{int(dead.sum())} of {hidden} hidden blocks unused ({folded} constant ones folded into the "
            f"second bias), blocks sorted by kept count")
    return pair[0], pair[1], what


EXCLUDED = "excluded by filter_fn"

# Dense int8 layers (every block kept) are cut into the largest of these blocks that divides their shape.
INT8_DENSE_BLOCKS = (64, 32, 16)


def kernel_label(layer: nn.Module) -> str:
    """How ``BsrResult`` names a converted layer's kernel: "fused", "bmm", ...; "int8/amx", "int8/vnni", "int8/bmm"."""
    if isinstance(layer, Int8BlockSparseLinear):
        return f"int8/{layer.isa or layer.kernel}"
    return layer.kernel


def _check_quantize(quantize: Optional[str], kernel: str) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; choose None or 'int8'")
    if quantize == "int8" and kernel not in ("auto", "fused", "bmm"):
        raise ValueError(f"quantize='int8' runs kernel 'auto', 'fused' or 'bmm' (the pure-PyTorch reference), "
                         f"not {kernel!r}")


def _quantize_filter(model, blocksize, kernel, quantize, quantize_filter_fn) -> Callable[[nn.Module, str], bool]:
    """apply_bsr's checks of its quantize arguments; the layers to quantize, as a filter."""
    _check_quantize(quantize, kernel)
    if quantize is None:
        return lambda module, fqn: False
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 16 != 0:
        raise ValueError(f"quantize='int8' takes a blocksize that is a multiple of 16, not {blocksize!r}")
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"quantize='int8' runs on the CPU; the model is on {', '.join(sorted(devices))}")
    if kernel != "bmm":
        blocksparse_int8.require(blocksize)
    # Plain Linears, and the out_proj of an nn.MultiheadAttention (a Linear subclass that ProjectedAttention calls
    # as a module); other subclasses stay dense before this filter is asked.
    linear_types = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    if quantize_filter_fn is not None:
        return lambda module, fqn: type(module) in linear_types and quantize_filter_fn(module, fqn)
    classifier = find_classifier(model)
    return lambda module, fqn: type(module) in linear_types and fqn != classifier


@torch.no_grad()
def _quantized(linear: nn.Linear, blocksize: int, kernel: str, *, sparse: bool, in_pair: bool) -> Tuple[nn.Module, str]:
    """(W8A8 form of ``linear``, "") : block-sparse, or dense int8 where not ``sparse`` (in ``blocksize`` blocks for
    an MLP pair's layer, so that the pair can fuse). With kernel "auto" its float form is timed too on the same
    sample, and where that is faster (float form, why it stayed float) is returned."""
    shape = tuple(linear.weight.shape)
    sizes = ((blocksize,) if in_pair else ()) + INT8_DENSE_BLOCKS
    size = blocksize if sparse else next((b for b in sizes if blocksize_divides(shape, b)), None)
    if size is None:
        return linear, f"no int8 block size ({', '.join(map(str, INT8_DENSE_BLOCKS))}) divides its shape"
    int8 = Int8BlockSparseLinear.from_dense(linear, size, kernel="bmm" if kernel == "bmm" else "fused")
    if kernel != "auto":
        return int8, ""
    float_kernel = choose_kernel(linear, blocksize).kernel if sparse else "dense"
    float_form = linear if float_kernel == "dense" else BlockSparseLinear.from_dense(linear, blocksize, kernel="auto")
    # Both forms in the same interleaved rounds: measured apart, a drift of the VM's speed could decide.
    x = torch.randn(AUTO_SAMPLE_TOKENS, shape[1], dtype=int8.measured_dtype)
    seconds = blocksparse_fused.median_seconds_each({"int8": lambda: int8(x), float_kernel: lambda: float_form(x)})
    if seconds["int8"] < seconds[float_kernel]:
        return int8, ""
    if float_kernel == "dense":
        return linear, "float dense measured faster than int8"
    return float_form, ""


def apply_bsr(
    model: nn.Module,
    blocksize: int,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    kernel: str = "auto",
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    quantize: Optional[str] = None,
    quantize_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> BsrResult:
    """Replace every eligible ``nn.Linear`` of ``model`` (in place) by a ``BlockSparseLinear``.

    Args:
        model: a model in eval mode with frozen, already-pruned weights (e.g. after ``supermask.sparsify_offline``).
        blocksize: block edge; a layer whose weight shape it does not divide stays dense.
        min_sparsity: a layer with fewer all-zero blocks than a Supermask at this sparsity prunes stays dense
            (``reaches_sparsity``: a layer trained at exactly 0.7 meets 0.7). With ``kernel="auto"`` the layers
            above it are measured and run block-sparse only where that is faster (``choose_kernel``).
        kernel: one of ``KERNELS`` for every converted layer.
        filter_fn: ``filter_fn(module, fqn) -> bool``; layers it rejects stay dense.
        quantize: None, or ``"int8"``: every layer it converts runs W8A8 (``blocksparse_int8.Int8BlockSparseLinear``:
            int8 weights with a scale per output channel, activations quantized per token inside the op), and so
            does every Linear left dense for its sparsity alone, as a dense int8 layer (every block kept; blocks of
            64, 32 or 16). With ``kernel="auto"`` each layer's int8 and float forms are timed on its shape and the
            faster is kept; ``"fused"`` always runs the int8 C++ kernels, ``"bmm"`` the pure-PyTorch int8
            reference. CPU only; ``blocksize`` must be a multiple of 16.
        quantize_filter_fn: ``quantize_filter_fn(module, fqn) -> bool``: the layers ``quantize`` applies to (default:
            every Linear but the classifier, ``supermask.find_classifier``, which stays in float).

    An ``nn.MultiheadAttention`` reads its projection weights directly, so when its q/k/v input projection
    (``in_proj_weight``) or its ``out_proj`` is worth converting, the module is replaced by an
    ``attention.ProjectedAttention`` computing the same attention through the converted projections
    (reported as ``<name>.in_proj`` and ``<name>.out_proj``). Linear subclasses stay dense (a Supermask
    layer must be made a plain Linear first, with ``supermask.sparsify_offline``). On CPU the ProjectedAttention's
    core (``attention_core.CORES``) is the fastest measured on the model's shape (``kernel="auto"``; the sequence
    length is the model's ``seq_length`` where it has one) or the fused C++ kernel (``kernel="fused"``), and an
    attention module whose projections stay dense becomes a ProjectedAttention too where that measures faster
    than ``nn.MultiheadAttention``'s fast path; ``BsrResult.attention_cores`` lists each choice. With kernel "auto"
    or "fused", each pre-norm transformer block (torchvision's ``EncoderBlock``, timm's ``Block``) runs its residual
    adds and LayerNorms as one pass each (``residual_norm``: the same children and state dict) where that measures
    faster here ("auto") or runs ("fused"); ``BsrResult.folded_blocks`` lists them. Likewise a ViT's patch embedding
    (torchvision's ``conv_proj``, timm's ``patch_embed.proj``) runs as one matrix product over its patches
    (``patch_embedding``; ``BsrResult.patchwise_convolutions``).

    Two Linears in an ``nn.Sequential`` with only elementwise modules between them (``ELEMENTWISE``, e.g.
    torchvision's ``MLPBlock``: Linear, GELU, Dropout, Linear, Dropout), or fc1 and fc2 of timm's ``Mlp`` (act,
    drop1 and norm between them elementwise; a gated MLP is listed in ``BsrResult.unfused_mlps`` with the reason),
    both to be converted, are replaced by an
    equivalent pair first (``_prepare_mlp_pair``, listed in ``BsrResult.mlp_pairs``): hidden units the second
    Linear never reads are dropped from the first, constant ones are folded into the second's bias, and the hidden
    units are reordered so that "bmm" writes its output without a scatter. The model computes the same function;
    its hidden activations come in another order. Where both became "fused" layers and ``choose_mlp_fusion`` says
    so, the pair becomes one ``BlockSparseMLP`` at the first Linear's place (``nn.Identity`` at the others; listed
    in ``BsrResult.fused_mlps``; ``block_sparse_layers`` still finds both layers by their old names).

    The model is frozen: every parameter gets ``requires_grad=False`` (block-sparse layers cannot back-propagate), so
    it runs as it is, with or without ``torch.no_grad()``. A block-sparse layer whose input requires grad anyway (an
    input, or a parameter set to require grad again) raises RuntimeError rather than give wrong gradients.

    Returns:
        ``BsrResult`` listing converted layers and the ones left dense, with the reason.

    Example::

        >>> result = apply_bsr(model, blocksize=64)
        >>> print(result)
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if isinstance(model, nn.Linear):
        raise ValueError("apply_bsr converts the Linear layers a model contains, not a Linear itself; wrap it "
                         "(nn.Sequential(linear)) or call BlockSparseLinear.from_dense(linear, blocksize)")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    quantizes = _quantize_filter(model, blocksize, kernel, quantize, quantize_filter_fn)
    training = next((fqn for fqn, m in model.named_modules() if m.training), None)
    if training is not None:
        what = f"its module {training}" if training else "the model"
        raise ValueError(f"apply_bsr converts a model for inference, but {what} is in training mode; call "
                         f"model.eval() first (block-sparse layers are frozen)")
    # Gradients cannot flow through block-sparse layers: without this, any parameter still requiring grad (the patch
    # embedding, a LayerNorm) makes the next block-sparse layer's input require grad, and it refuses to run.
    model.requires_grad_(False)
    result = BsrResult()

    def reason_to_stay_dense(module, fqn):
        if filter_fn is not None and not filter_fn(module, fqn):
            return EXCLUDED
        if not blocksize_divides(tuple(module.weight.shape), blocksize):
            out_features, in_features = module.weight.shape
            return f"shape {out_features}x{in_features} not divisible by blocksize {blocksize}"
        sparsity = block_sparsity(module.weight, blocksize)
        if not reaches_sparsity(sparsity, min_sparsity, module.weight.numel() // blocksize**2):
            return f"block sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
        return None

    def convert(module, fqn):
        reason = reason_to_stay_dense(module, fqn)
        if reason != EXCLUDED and quantizes(module, fqn):
            # An MLP pair's layers are weighed against float together, fused or not, once both are int8.
            in_pair = fqn in pair_layers
            converted, why_float = _quantized(module, blocksize, "fused" if kernel == "auto" and in_pair else kernel,
                                              sparse=reason is None, in_pair=in_pair)
            if converted is not module:
                result.converted.append((fqn, kernel_label(converted), converted.sparsity))
                return converted
            reason = f"{reason}; {why_float}" if reason else why_float
        if reason is not None:
            result.left_dense.append((fqn, reason))
            return module
        sparse = BlockSparseLinear.from_dense(module, blocksize, kernel=kernel)
        result.converted.append((fqn, sparse.kernel, sparse.sparsity))
        return sparse

    pair_layers = set()  # an MLP pair's Linears, for quantize: filled once the pairs are found

    def float_form(linear, fqn):
        # What apply_bsr without quantize makes of this Linear: an MLP pair's float candidate.
        if reason_to_stay_dense(linear, fqn) is not None:
            return linear
        return BlockSparseLinear.from_dense(linear, blocksize, kernel="auto")

    tokens = _attention_tokens(model)
    timm_attention_type = timm_layers.plain_attention_type()
    for fqn, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            _convert_attention(model, fqn, module, convert, reason_to_stay_dense, quantizes, result,
                               kernel=kernel, tokens=tokens)
        elif timm_attention_type is not None and type(module) is timm_attention_type:
            _convert_timm_attention(model, fqn, module, result, kernel=kernel, tokens=tokens)
    prepared = []
    if kernel in ("auto", "fused", "bmm"):
        for first_name, second_name, between_names in _mlp_pairs(model, result.unfused_mlps):
            first, second = model.get_submodule(first_name), model.get_submodule(second_name)
            between = [model.get_submodule(name) for name in between_names]
            if all(reason_to_stay_dense(layer, name) is None or quantizes(layer, name)
                   for layer, name in ((first, first_name), (second, second_name))):
                first, second, what = _prepare_mlp_pair(first, second, between, blocksize)
                model.set_submodule(first_name, first)
                model.set_submodule(second_name, second)
                result.mlp_pairs.append((first_name, second_name, what))
                prepared.append((first_name, second_name, between_names))
    pair_layers.update(name for first, second, _ in prepared for name in (first, second) if quantize)
    float_pairs = {name: model.get_submodule(name) for name in pair_layers}
    decided = {name for name, _ in result.left_dense}  # the attention projections
    for fqn, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or fqn in decided:
            continue
        if type(module) is not nn.Linear:
            result.left_dense.append(
                (fqn, f"{type(module).__name__} is a Linear subclass; make it a plain nn.Linear first")
            )
        else:
            converted = convert(module, fqn)
            if converted is not module:
                model.set_submodule(fqn, converted)
    for first_name, second_name, between_names in prepared:
        if kernel == "auto" and first_name in pair_layers and second_name in pair_layers:
            float_pair = [float_form(float_pairs[name], name) for name in (first_name, second_name)]
            _keep_faster_pair(model, first_name, second_name, between_names, float_pair, result)
        _fuse_mlp(model, first_name, second_name, between_names, always=kernel == "fused", result=result)
    if kernel in ("auto", "fused"):
        _fold_blocks(model, result, measure=kernel == "auto")
        _patchwise_convolutions(model, result, measure=kernel == "auto")
    return result


def _patchwise_convolutions(model: nn.Module, result: BsrResult, *, measure: bool) -> None:
    """Compute each ViT patch embedding's convolution as one matrix product (``patch_embedding.PatchwiseConv2d``)
    where it runs on the CPU and (``measure``) measured faster here."""
    for fqn, conv, image_size in patch_embedding.patch_convolutions(model):
        if (patch_embedding.unsupported_reason(conv) is None and conv.weight.device.type == "cpu"
                and (not measure or patch_embedding.is_faster(conv, image_size))):
            model.set_submodule(fqn, patch_embedding.PatchwiseConv2d(conv))
            result.patchwise_convolutions.append(fqn)


def _fold_blocks(model: nn.Module, result: BsrResult, *, measure: bool) -> None:
    """Fold each pre-norm transformer block's residual adds and LayerNorms into the ops (``residual_norm.fold``, and
    ``residual_norm.chain`` for a run of blocks) where they run and (``measure``) measured faster here."""
    for fqn, module in list(model.named_modules()):
        if fqn and residual_norm.fold_reason(module, measure=measure) is None:
            model.set_submodule(fqn, residual_norm.fold(module))
            result.folded_blocks.append(fqn)
    residual_norm.chain(model)


def _keep_faster_pair(model, first_name, second_name, between_names, float_pair, result):
    """An int8 MLP pair (kernel "auto") or its float form, whichever runs faster as a whole: each fused where that
    is faster (``_mlp_choice``), else as two layers, timed on the same sample; the float form replaces the int8 one
    in the model and in ``result`` where it wins."""
    between = [model.get_submodule(name) for name in between_names]
    int8_pair = [model.get_submodule(first_name), model.get_submodule(second_name)]
    x = torch.randn(AUTO_SAMPLE_TOKENS, int8_pair[0].in_features, dtype=int8_pair[0].measured_dtype)
    seconds = {}
    for form, (fc1, fc2) in {"int8": int8_pair, "float": float_pair}.items():
        seconds[form] = _mlp_choice(fc1, between, fc2, always=False)[1]
        if seconds[form] is None:  # not fusable: the two layers in turn
            separate = nn.Sequential(fc1, *between, fc2)
            seconds[form] = blocksparse_fused.median_seconds(lambda: separate(x))
    if seconds["int8"] <= seconds["float"]:
        return
    names = (first_name, second_name)
    result.converted = [entry for entry in result.converted if entry[0] not in names]
    for name, layer in zip(names, float_pair):
        model.set_submodule(name, layer)
        if isinstance(layer, BlockSparseLinear):
            result.converted.append((name, layer.kernel, layer.sparsity))
        else:
            result.left_dense.append((name, "float dense measured faster than int8"))


def _fuse_mlp(model, first_name, second_name, between_names, *, always, result):
    """Replace a converted pair by one BlockSparseMLP where ``choose_mlp_fusion`` says so."""
    fc1, fc2 = model.get_submodule(first_name), model.get_submodule(second_name)
    between = [model.get_submodule(name) for name in between_names]
    setting = choose_mlp_fusion(fc1, between, fc2, always=always)
    if setting is None:
        return
    tile_tokens, variant = setting
    int8 = isinstance(fc1, Int8BlockSparseLinear)
    mlp = BlockSparseMLP(fc1, between, fc2, tile_tokens=tile_tokens, products="blocks" if int8 else variant,
                         isa=variant if int8 else None, second_name=second_name.rpartition(".")[2])
    model.set_submodule(first_name, mlp.eval())  # apply_bsr converts eval-mode models only
    for name in between_names + [second_name]:
        model.set_submodule(name, nn.Identity().eval())
    result.fused_mlps.append(first_name)


def _convert_attention(model, fqn, mha, convert, reason_to_stay_dense, quantizes, result, *, kernel, tokens):
    """Replace `mha` by a ProjectedAttention with block-sparse projections, when either one is worth it, or with
    dense ones where its attention core makes it faster than nn.MultiheadAttention (kernel "auto")."""
    in_name, out_name = f"{fqn}.in_proj", f"{fqn}.out_proj"
    unsupported = unsupported_attention_reason(mha)
    if unsupported is not None:
        result.left_dense.append((in_name, unsupported))
        result.left_dense.append((out_name, unsupported))
        return
    projected = ProjectedAttention.from_attention(mha, lambda linear: linear).requires_grad_(False)
    if fqn == "":
        raise ValueError("apply_bsr needs a model that contains the nn.MultiheadAttention, not the module itself")
    projections = (projected.in_proj, projected.out_proj)
    names = (in_name, out_name)
    projected.core, projected.query_tile = _attention_core(projected.in_proj.weight, projected.num_heads,
                                                           projected.head_dim, kernel, tokens)
    if all(reason_to_stay_dense(layer, name) is not None and not quantizes(layer, name)
           for layer, name in zip(projections, names)):
        # Neither projection gains: keep nn.MultiheadAttention and its fused fast path, unless the core pays.
        result.left_dense += [(name, reason_to_stay_dense(layer, name)) for layer, name in zip(projections, names)]
        _keep_faster_attention(model, fqn, mha, projected, kernel, tokens, result)
        return
    projected.in_proj = convert(projected.in_proj, in_name)
    projected.out_proj = convert(projected.out_proj, out_name)
    if projected.in_proj is projections[0] and projected.out_proj is projections[1]:
        # Both projections measured faster as they were.
        _keep_faster_attention(model, fqn, mha, projected, kernel, tokens, result)
        return
    projected.train(mha.training)
    model.set_submodule(fqn, projected)
    result.attention_cores.append((fqn, projected.core))


def _attention_tokens(model: nn.Module) -> int:
    """How many tokens the model's attention sees, to time its cores on: torchvision's ViT says (``seq_length``),
    timm's says through its patch embedding and prefix tokens; otherwise ``attention_core.SAMPLE_TOKENS``."""
    tokens = getattr(model, "seq_length", None)
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(tokens, int) and isinstance(patches, int):
        tokens = patches + getattr(model, "num_prefix_tokens", 0)
    return tokens if isinstance(tokens, int) and tokens > 0 else attention_core.SAMPLE_TOKENS


def _attention_core(weight: torch.Tensor, num_heads: int, head_dim: int, kernel: str, tokens: int) -> Tuple[str, int]:
    """(core, query tile) an attention module whose projection has this weight runs: the fastest measured here
    ("auto"), the fused kernel where it takes the dtype ("fused"), else SDPA as before."""
    if weight.device.type != "cpu" or kernel not in ("auto", "fused"):
        return "sdpa", attention_core.QUERY_TILE
    if kernel == "fused":
        runs = attention_core.fused_unavailable_reason(weight.dtype, head_dim) is None
        return "fused" if runs else "sdpa", attention_core.QUERY_TILE
    return attention_core.choose(num_heads, head_dim, weight.dtype, tokens)[:2]


def _convert_timm_attention(model, fqn, module, result, *, kernel, tokens):
    """Put a ``timm_attention.CoreAttention`` in the place of timm's ``Attention`` where its core is not SDPA."""
    reason = timm_attention.unsupported_reason(module)
    core, tile = ("sdpa", 0) if reason else _attention_core(module.qkv.weight, module.num_heads, module.head_dim,
                                                             kernel, tokens)
    if core == "sdpa":
        result.attention_cores.append((fqn, "timm Attention"))
        return
    model.set_submodule(fqn, timm_attention.CoreAttention(module, core, query_tile=tile))
    result.attention_cores.append((fqn, core))


@torch.no_grad()
def _keep_faster_attention(model, fqn, mha, projected, kernel, tokens, result):
    """Put `projected` (dense projections, its chosen core) in `mha`'s place where it runs faster than torch's
    module and its fast path, timed on the same sample ("auto"); "fused" always does, where its core is not SDPA."""
    if projected.core == "sdpa" or kernel not in ("auto", "fused"):
        result.attention_cores.append((fqn, "nn.MultiheadAttention"))
        return
    if kernel == "auto":
        batch = max(1, -(-attention_core.SAMPLE_ITEMS // mha.num_heads))
        shape = (batch, tokens, mha.embed_dim) if mha.batch_first else (tokens, batch, mha.embed_dim)
        weight = mha.in_proj_weight
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        seconds = blocksparse_fused.median_seconds_each({
            "mha": lambda: mha(x, x, x, need_weights=False), "projected": lambda: projected(x, x, x, need_weights=False)})
        if seconds["mha"] <= seconds["projected"]:
            result.attention_cores.append((fqn, "nn.MultiheadAttention"))
            return
    projected.train(mha.training)
    model.set_submodule(fqn, projected)
    result.attention_cores.append((fqn, projected.core))
