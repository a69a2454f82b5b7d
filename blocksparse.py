"""Block-sparse Linear layers for fast inference on CPU, in pure PyTorch.

A frozen ``nn.Linear`` whose weight has whole zero blocks (``blocksize x blocksize``) is packed once, in
``BlockSparseLinear.from_dense``, into only its kept blocks plus index buffers. The forward pass then runs a
few dense batched matrix products over those blocks; it never loops over blocks in Python and never builds
indices. ``apply_bsr`` converts every eligible Linear of a model in place and reports what it left dense.

Kernels (``kernel=``; ``"auto"`` picks one, see ``choose_kernel``):

* ``"bmm"``: block-rows are grouped by their number of kept blocks (a few groups, short ones zero-padded).
  Per group, the input's needed column-blocks are gathered and one ``torch.baddbmm`` computes all rows of
  the group; the results are scattered into the output. Tokens stay the rows of every product.
* ``"bmm_t"``: the same groups on the transposed problem, ``y.T = W @ x.T``: the products are
  ``(bs, k*bs) @ (k*bs, tokens)`` over gathered rows of ``x.T`` (whole contiguous rows when the input is
  column-major, column strips of a row-major float32 input read transposed from block 64 up). The output is returned
  column-major (a transposed view, not copied back), which the next ``"bmm_t"`` layer reads for free. A group
  of rows keeping one block each skips the gather: one matmul per input column-block (``MAX_COLUMN_RUNS``).
  Faster than ``"bmm"`` for wide outputs and for both Linears of an MLP.
* ``"bsr_mm"``: PyTorch's sparse BSR matmul with the sparse operand first, ``torch.mm(W_bsr, x.T)``
  (MKL on CPU). float32/float64 only.
* ``"dense"``: plain ``F.linear`` with the (block-sparse) dense weight, for layers too dense to gain.
* ``"torch"``: the original SuperBlock approach, ``F.linear`` with a ``to_sparse_bsr`` weight; kept as the
  baseline. float32/float64 only, and slower than dense on CPU.
* ``"triton"``: CUDA only (or Triton's interpreter, for tests): the kernel of ``blocksparse_triton.py``, a
  custom op that torch.compile keeps in its graph. ``"auto"`` picks it for CUDA weights.

In ``"bmm"`` and ``"bmm_t"``, a group whose block-rows are consecutive (``apply_bsr`` reorders MLP hidden
units to make them so) is written straight into its slice of the output instead of being scattered.

Example::

    >>> result = apply_bsr(model.eval(), blocksize=64)
    >>> print(result)          # converted layers and the ones left dense, with reasons
    >>> with torch.inference_mode():
    ...     logits = model(images)

In a process of your own, also call ``utils.keep_freed_memory()`` once (evaluate.py and benchmark.py do): with
glibc's default settings the buffers each forward frees are handed back to the kernel and page-faulted in
again, which cost vit_b_16 a fifth of its block-sparse speed on CPU (benchmarks/RESULTS.md, "Allocator").
"""

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import blocksparse_triton
from attention import ProjectedAttention, unsupported_attention_reason
from supermask import num_pruned_tiles

KERNELS = ("auto", "bmm", "bmm_t", "bsr_mm", "dense", "torch", "triton")

# On CUDA, "auto" runs the Triton kernel from this block sparsity up, and the dense product below it.
# An estimate, not yet a measurement: no GPU was available when it was set (benchmarks/RESULTS.md).
CUDA_BREAK_EVEN = 0.5

# At most this many row groups per layer: a bound on the Python work per forward, whatever the mask.
MAX_GROUPS = 6

# "bmm_t": a group whose block-rows keep one block each is computed with one matmul per input column-block
# it reads (its rows sorted by column), straight from the input, instead of gathering a copy of the input
# first; when it reads at most this many column-blocks (a bound on the Python work per forward). Measured
# (768x3072 at 90%, block 64, one process): 4.6x -> 5.2x dense at two threads, 5.6x -> 6.3x at one.
MAX_COLUMN_RUNS = 16

# Below these block sparsities the dense product is as fast as the best block-sparse kernel on this 2-core
# CPU (768x3072 Linear, 1576 tokens; benchmarks/RESULTS.md, "Break-even"): 0.7 at blocksize 64 and 0.8 at
# 32 were measured; 16 and 128 were not and reuse their neighbours' values. A blocksize between two keys
# uses the smaller key's (higher) threshold.
DENSE_BREAK_EVEN = {16: 0.8, 32: 0.8, 64: 0.7, 128: 0.7}

# "bmm_t" with a row-major float32 input: from this blocksize up it gathers the input's column strips (bs floats
# each) instead of transposing the whole input first (2 ms for vit_b_16's 1576x768 at one thread or two).
# Measured in one process, 768x3072 at 90%, 2 threads: faster at block 64 (an MLP pair 5.5x -> 5.9x dense),
# slower at block 32, whose 128-byte strips gather poorly (3.3x -> 3.2x), and slower in bfloat16, whose
# products read the strips transposed on a slower path (3.7x -> 3.3x at block 64).
STRIP_GATHER_MIN_BLOCKSIZE = 64

# apply_bsr's default: layers at least this block-sparse are converted; the measured break-even at blocksize 64.
DEFAULT_MIN_SPARSITY = 0.7


##### Kernel limits #####


def blocksize_divides(weight_shape: Tuple[int, int], blocksize: int) -> bool:
    """True if ``blocksize`` divides both dimensions of a Linear weight of ``weight_shape``."""
    return blocksize > 0 and weight_shape[0] % blocksize == 0 and weight_shape[1] % blocksize == 0


def torch_bsr_supports_dtype(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> bool:
    """True if PyTorch's sparse BSR kernels (``bsr_mm``, ``torch``) accept ``dtype`` on ``device``'s type."""
    if device.type == "cuda":  # PyTorch's own Triton BSR kernels take half precision too
        return dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return dtype in (torch.float32, torch.float64)


def _check_blocksize(weight_shape: Tuple[int, int], blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not blocksize_divides(weight_shape, blocksize):
        out_features, in_features = weight_shape
        raise ValueError(
            f"blocksize {blocksize} does not divide the weight shape {out_features}x{in_features} "
            f"(out_features x in_features); pick a blocksize that divides both"
        )


def _check_kernel_dtype(kernel: str, dtype: torch.dtype, blocksize: int = 16,
                        device: torch.device = torch.device("cpu")) -> None:
    if kernel == "triton":
        reason = blocksparse_triton.unsupported_triton_reason(blocksize, dtype)
        if reason is not None:
            raise ValueError(f"kernel='triton' cannot run this layer: {reason}")
        if not blocksparse_triton.triton_available():
            raise ValueError("kernel='triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests); use 'auto'")
    if kernel in ("bsr_mm", "torch") and not torch_bsr_supports_dtype(dtype, device):
        raise ValueError(
            f"kernel={kernel!r} uses PyTorch's sparse BSR kernels, which support float32/float64 only, "
            f"not {dtype}; use kernel='bmm' (or 'auto')"
        )


##### Block masks and the auto choice #####


def block_mask(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Bool tensor (out/bs, in/bs): True where a ``blocksize`` block of ``weight`` has a nonzero."""
    _check_blocksize(tuple(weight.shape), blocksize)
    nbr, nbc = weight.shape[0] // blocksize, weight.shape[1] // blocksize
    return weight.detach().reshape(nbr, blocksize, nbc, blocksize).ne(0).any(dim=3).any(dim=1)


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


def dense_break_even(blocksize: int) -> float:
    """Block sparsity below which ``kernel="auto"`` stays dense for this blocksize (measured)."""
    keys = [k for k in sorted(DENSE_BREAK_EVEN) if k <= blocksize]
    return DENSE_BREAK_EVEN[keys[-1]] if keys else 1.0


def choose_kernel(weight_shape: Tuple[int, int], dtype: torch.dtype, blocksize: int, sparsity: float,
                  device: torch.device = torch.device("cpu")) -> str:
    """The kernel ``kernel="auto"`` uses for a weight of this shape, dtype, blocksize and block sparsity."""
    out_features, in_features = weight_shape
    num_blocks = -(-out_features // blocksize) * -(-in_features // blocksize)
    if device.type == "cuda":
        triton_ok = blocksparse_triton.unsupported_triton_reason(blocksize, dtype) is None
        return "triton" if triton_ok and reaches_sparsity(sparsity, CUDA_BREAK_EVEN, num_blocks) else "dense"
    if not reaches_sparsity(sparsity, dense_break_even(blocksize), num_blocks):
        return "dense"
    # Measured (768->3072, 1 thread): an expanding layer has many short rows; gathering whole rows of x.T
    # and leaving the output column-major beats gathering column strips of x (1.2x at blocksize 64 and 32).
    # apply_bsr also runs both Linears of an MLP pair with "bmm_t", whatever their shapes (see there).
    if out_features >= 2 * in_features:
        return "bmm_t"
    return "bmm"


##### Packing #####


def _partition_counts(counts: List[int], max_groups: int) -> List[Tuple[int, int]]:
    """Split sorted positive ``counts`` into <= max_groups runs minimising padded blocks; (start, end) pairs."""
    n = len(counts)
    inf = float("inf")
    # cost[g][j]: padded blocks for the first j rows in g runs; each run pads to its last (largest) count.
    cost = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    cost[0][0] = 0
    starts = [i for i in range(n) if i == 0 or counts[i] != counts[i - 1]]
    ends = [i + 1 for i in range(n) if i == n - 1 or counts[i] != counts[i + 1]]
    for g in range(1, max_groups + 1):
        for j in ends:
            for i in starts:
                if i < j and cost[g - 1][i] + (j - i) * counts[j - 1] < cost[g][j]:
                    cost[g][j] = cost[g - 1][i] + (j - i) * counts[j - 1]
                    cut[g][j] = i
    # Fewest groups within 3% of the best padding: each group is one more set of ops per forward.
    best = min(cost[g][n] for g in range(1, max_groups + 1))
    groups = next(g for g in range(1, max_groups + 1) if cost[g][n] <= 1.03 * best)
    runs, j = [], n
    for g in range(groups, 0, -1):
        runs.append((cut[g][j], j))
        j = cut[g][j]
    return runs[::-1]


def block_row_order(mask: torch.Tensor) -> torch.Tensor:
    """Block-rows sorted by kept count, then by first kept column: the order row groups are packed in."""
    counts = mask.sum(dim=1)
    first_col = mask.to(torch.int8).argmax(dim=1)
    return torch.argsort(counts * (mask.shape[1] + 1) + first_col, stable=True)


def _column_runs(cols: torch.Tensor) -> List[Tuple[int, int, int]]:
    """(column-block, start, end) for each run of equal values in sorted ``cols``; [] if over MAX_COLUMN_RUNS."""
    values, counts = torch.unique_consecutive(cols, return_counts=True)
    if values.numel() > MAX_COLUMN_RUNS:
        return []
    ends = counts.cumsum(0).tolist()
    return [(int(v), end - int(c), end) for v, c, end in zip(values.tolist(), counts.tolist(), ends)]


def _pack_groups(weight: torch.Tensor, mask: torch.Tensor, blocksize: int, max_groups: int):
    """Kept blocks grouped by row count: list of (rows, cols, weight) with weight (R, bs, k*bs)."""
    bs = blocksize
    nbr, nbc = mask.shape
    blocks = weight.detach().reshape(nbr, bs, nbc, bs).permute(0, 2, 1, 3)  # (row, col, out, in)
    counts = mask.sum(dim=1)
    # Kept column-blocks first, in ascending order, for every block-row.
    cols_sorted = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    order = block_row_order(mask)  # a group of one-block rows comes sorted by column (see MAX_COLUMN_RUNS)
    order = order[counts[order] > 0]
    sorted_counts = counts[order].tolist()
    groups = []
    for start, end in _partition_counts(sorted_counts, max_groups) if sorted_counts else []:
        rows = order[start:end]
        k = sorted_counts[end - 1]
        cols = cols_sorted[rows, :k]
        # A short row is padded with its first dropped column-blocks, which are all zero: exact, no masking.
        kept = blocks[rows[:, None], cols]  # (R, k, out, in)
        packed = kept.permute(0, 2, 1, 3).reshape(len(rows), bs, k * bs).contiguous()
        groups.append((rows.clone(), cols.reshape(-1).clone(), packed))
    empty_rows = (counts == 0).nonzero().flatten()
    return groups, empty_rows


##### Forward kernels #####


def _span(rows: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(start, end) if ``rows`` is a run of consecutive block-rows, else None (then results are scattered)."""
    if rows.numel() == 0:
        return None
    start, end = int(rows[0]), int(rows[0]) + rows.numel()
    return (start, end) if torch.equal(rows, torch.arange(start, end, device=rows.device)) else None


def _bmm_rows(x, groups, empty_rows, nbr, nbc, bs):
    """Tokens as rows: gather column strips of x (n, in), bmm per group into y (n, out)."""
    n = x.shape[0]
    xb = x.reshape(n, nbc, bs)
    y = x.new_empty(n, nbr, bs)
    for rows, cols, weight, bias, span in groups:
        r = rows.shape[0]
        a = xb.index_select(1, cols).view(n, r, -1).transpose(0, 1)  # (R, n, k*bs)
        w = weight.transpose(1, 2)  # (R, k*bs, bs)
        if span is not None:  # consecutive rows: the product writes straight into y (a strided view, no copy)
            out = y[:, span[0]:span[1]].transpose(0, 1)
            if bias is None:
                torch.bmm(a, w, out=out)
            else:
                torch.baddbmm(bias.view(r, 1, bs), a, w, out=out)
            continue
        out = torch.bmm(a, w) if bias is None else torch.baddbmm(bias.view(r, 1, bs), a, w)
        y.index_copy_(1, rows, out.transpose(0, 1))
    if empty_rows is not None:
        rows, bias, span = empty_rows
        fill = y.new_zeros(n, rows.shape[0], bs) if bias is None else bias.view(1, -1, bs).expand(n, -1, bs)
        if span is not None:
            y[:, span[0]:span[1]] = fill
        else:
            y.index_copy_(1, rows, fill)
    return y.view(n, nbr * bs)


def _bmm_cols(x, groups, empty_rows, nbr, nbc, bs):
    """Transposed: bmm per group of W's blocks with the input's gathered rows of x.T (in, n), into y.T (out, n).

    A group of one-block rows with ``column_runs`` skips the gather: one matmul per column-block it reads.

    Returns the (n, out) view of y.T: column-major (``y.t()`` of a contiguous tensor), not copied back. An
    elementwise op keeps that layout, and a following "bmm_t" layer then gathers whole contiguous rows of its
    x.T, so an MLP never transposes its hidden activations. A row-major input is transposed once, except in float32
    from ``STRIP_GATHER_MIN_BLOCKSIZE`` up: there its column strips are gathered and the product reads them
    transposed.
    """
    n = x.shape[0]
    transposed = x.t().is_contiguous() or bs < STRIP_GATHER_MIN_BLOCKSIZE or x.dtype != torch.float32
    source = x.t().contiguous().view(nbc, bs * n) if transposed else x.contiguous().view(n, nbc, bs)
    yt = x.new_empty(nbr, bs, n)
    for rows, cols, weight, bias, span, column_runs in groups:
        r = rows.shape[0]
        if column_runs:  # one block per row, rows sorted by column: one matmul per column-block, no gather
            out = yt[span[0]:span[1]] if span is not None else yt.new_empty(r, bs, n)
            for col, start, end in column_runs:
                x_col = source[col].view(bs, n) if transposed else x[:, col * bs:(col + 1) * bs].t()
                w, o = weight[start:end].reshape(-1, bs), out[start:end].view(-1, n)
                if bias is None:
                    torch.mm(w, x_col, out=o)
                else:
                    torch.addmm(bias[start:end].reshape(-1, 1), w, x_col, out=o)
            if span is None:
                yt.index_copy_(0, rows, out)
            continue
        if transposed:
            a = source.index_select(0, cols).view(r, -1, n)  # (R, k*bs, n)
        else:
            a = source.index_select(1, cols).view(n, r, -1).permute(1, 2, 0)  # (R, k*bs, n), a strided view
        if span is not None:  # consecutive rows: a contiguous slice of y.T takes the product directly
            out = yt[span[0]:span[1]]
            if bias is None:
                torch.bmm(weight, a, out=out)
            else:
                torch.baddbmm(bias.view(r, bs, 1), weight, a, out=out)
            continue
        out = torch.bmm(weight, a) if bias is None else torch.baddbmm(bias.view(r, bs, 1), weight, a)
        yt.index_copy_(0, rows, out)
    if empty_rows is not None:
        rows, bias, span = empty_rows
        fill = yt.new_zeros(rows.shape[0], bs, n) if bias is None else bias.view(-1, bs, 1).expand(-1, bs, n)
        if span is not None:
            yt[span[0]:span[1]] = fill
        else:
            yt.index_copy_(0, rows, fill)
    return yt.view(nbr * bs, n).t()


# Under torch.compile the bmm kernels run as one opaque op. Traced, their products written into slices of the
# output become, in inductor, one pointwise kernel of nested masked selects over the whole output, fused with
# what follows: an MLP pair (768-3072-768, block 64, 90%) took 30 ms compiled against 16.5 ms eager.
# The op's arguments flatten the groups: per group its rows, cols, weight and bias tensors, and in `layout`
# its span (-1, -1 if none) and its column runs (a count, then (col, start, end) each); then the empty rows.


def _flat_layout(spans, column_runs, empty_span):
    layout = []
    for span, runs in zip(spans, column_runs):
        layout += list(span or (-1, -1)) + [len(runs)] + [v for run in runs for v in run]
    return layout + list(empty_span or (-1, -1))


@torch.library.custom_op("superblock::bmm_blocks", mutates_args=())
def bmm_blocks(x: torch.Tensor, transposed: bool, tensors: List[Optional[torch.Tensor]], layout: List[int],
               has_empty_rows: bool, nbr: int, nbc: int, bs: int) -> torch.Tensor:
    """The "bmm" (or, ``transposed``, "bmm_t") product of 2-D x with the flattened groups, as one op."""
    def span_at(pos):
        return (layout[pos], layout[pos + 1]) if layout[pos] >= 0 else None

    groups, pos = [], 0
    for i in range((len(tensors) - 2 * has_empty_rows) // 4):
        count = layout[pos + 2]
        runs = [tuple(layout[pos + 3 + 3 * j:pos + 6 + 3 * j]) for j in range(count)]
        group = tuple(tensors[4 * i:4 * i + 4]) + (span_at(pos),)
        groups.append(group + (runs,) if transposed else group)
        pos += 3 + 3 * count
    empty = (tensors[-2], tensors[-1], span_at(pos)) if has_empty_rows else None
    run = _bmm_cols if transposed else _bmm_rows
    return run(x, groups, empty, nbr, nbc, bs)


@bmm_blocks.register_fake
def _(x, transposed, tensors, layout, has_empty_rows, nbr, nbc, bs):
    n = x.shape[0]
    return x.new_empty(nbr * bs, n).t() if transposed else x.new_empty(n, nbr * bs)


@torch.compiler.disable
def _torch_bsr_forward(kernel, x, crow, col, values, bias, shape):
    """Sparse BSR paths; run eagerly because torch.compile cannot trace sparse tensors."""
    if not torch_bsr_supports_dtype(x.dtype, x.device):
        _check_kernel_dtype(kernel, x.dtype, device=x.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        w = torch.sparse_bsr_tensor(crow, col, values, size=shape, check_invariants=False)
    if kernel == "torch":
        return F.linear(x, w, bias)
    yt = torch.mm(w, x.t()) if bias is None else torch.addmm(bias[:, None], w, x.t())
    return yt.t().contiguous()


##### The module #####


class BlockSparseLinear(nn.Module):
    """A frozen Linear stored as its kept ``blocksize x blocksize`` blocks; build with ``from_dense``."""

    def __init__(self, in_features: int, out_features: int, blocksize: int, kernel: str, kept_blocks: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.kernel = kernel
        self.kept_blocks = kept_blocks
        self.total_blocks = (in_features // blocksize) * (out_features // blocksize)
        self.num_groups = 0
        self.group_spans: List[Optional[Tuple[int, int]]] = []  # per group: its rows' (start, end) if consecutive
        self.group_column_runs: List[List[Tuple[int, int, int]]] = []  # per group: see _column_runs ("bmm_t")
        self.has_empty_rows = False
        self.empty_span: Optional[Tuple[int, int]] = None

    @property
    def sparsity(self) -> float:
        """Fraction of blocks that are entirely zero (and not stored)."""
        return 1.0 - self.kept_blocks / self.total_blocks

    @classmethod
    def from_dense(cls, linear: nn.Linear, blocksize: int, kernel: str = "auto") -> "BlockSparseLinear":
        """Pack ``linear`` (its weight's zero blocks are dropped) for ``kernel``; raises ValueError if it can't."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        weight = linear.weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(weight.shape)}")
        mask = block_mask(weight, blocksize)
        kept = int(mask.sum().item())
        if kernel == "auto":
            kernel = choose_kernel(tuple(weight.shape), weight.dtype, blocksize, 1.0 - kept / mask.numel(),
                                   device=weight.device)
        _check_kernel_dtype(kernel, weight.dtype, blocksize, weight.device)
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, blocksize, kernel, kept)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        module.register_buffer("bias", bias)
        if kernel == "dense":
            module.register_buffer("weight", weight.clone())
        elif kernel == "triton":
            values, crow, col = blocksparse_triton.pack_blocks(weight, blocksize)
            module.register_buffer("block_values", values)  # (kept, in, out): each block transposed
            module.register_buffer("block_crow", crow)
            module.register_buffer("block_col", col)
        elif kernel in ("bsr_mm", "torch"):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
                bsr = weight.to_sparse_bsr((blocksize, blocksize))
            module.register_buffer("crow_indices", bsr.crow_indices())
            module.register_buffer("col_indices", bsr.col_indices())
            module.register_buffer("values", bsr.values())
        else:
            groups, empty_rows = _pack_groups(weight, mask, blocksize, MAX_GROUPS)
            module.num_groups = len(groups)
            module.group_spans = [_span(rows) for rows, _, _ in groups]
            module.group_column_runs = [
                _column_runs(cols) if kernel == "bmm_t" and cols.numel() == rows.numel() else []
                for rows, cols, _ in groups
            ]
            module.empty_span = _span(empty_rows)
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(input.shape)}")
        lead = input.shape[:-1]
        # 2-D keeps every kernel on its fast path (torch's BSR F.linear fails on 3-D input under inference_mode).
        x = input.reshape(-1, self.in_features)
        if self.kernel == "dense":
            y = F.linear(x, self.weight, self.bias)
        elif self.kernel == "triton":
            y = blocksparse_triton.bsr_linear(x, self.block_values, self.block_crow, self.block_col, self.bias,
                                              self.out_features)
        elif self.kernel in ("bsr_mm", "torch"):
            shape = (self.out_features, self.in_features)
            y = _torch_bsr_forward(self.kernel, x, self.crow_indices, self.col_indices, self.values, self.bias, shape)
        else:
            groups = [
                (
                    getattr(self, f"group{i}_rows"),
                    getattr(self, f"group{i}_cols"),
                    getattr(self, f"group{i}_weight"),
                    getattr(self, f"group{i}_bias"),
                    self.group_spans[i],
                )
                for i in range(self.num_groups)
            ]
            bs = self.blocksize
            nbr, nbc = self.out_features // bs, self.in_features // bs
            transposed = self.kernel == "bmm_t"
            if torch.compiler.is_compiling():  # one opaque op: see bmm_blocks
                tensors = [t for group in groups for t in group[:4]]
                if self.has_empty_rows:
                    tensors += [self.empty_rows, self.empty_bias]
                runs = self.group_column_runs if transposed else [[] for _ in groups]
                layout = _flat_layout(self.group_spans, runs, self.empty_span)
                y = bmm_blocks(x, transposed, tensors, layout, self.has_empty_rows, nbr, nbc, bs)
            else:
                if transposed:
                    groups = [group + (self.group_column_runs[i],) for i, group in enumerate(groups)]
                empty = (self.empty_rows, self.empty_bias, self.empty_span) if self.has_empty_rows else None
                y = (_bmm_cols if transposed else _bmm_rows)(x, groups, empty, nbr, nbc, bs)
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (the reference the kernels are tested against)."""
        if self.kernel == "dense":
            return self.weight.clone()
        shape = (self.out_features, self.in_features)
        if self.kernel == "triton":
            bs = self.blocksize
            blocks = self.block_values.new_zeros(self.out_features // bs, self.in_features // bs, bs, bs)
            rows = torch.repeat_interleave(torch.arange(blocks.shape[0], device=blocks.device),
                                           self.block_crow.diff().long())
            blocks[rows, self.block_col.long()] = self.block_values.transpose(1, 2)
            return blocks.permute(0, 2, 1, 3).reshape(shape)
        if self.kernel in ("bsr_mm", "torch"):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
                bsr = torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values, size=shape, check_invariants=False)
                return bsr.to_dense()
        bs = self.blocksize
        nbr, nbc = self.out_features // bs, self.in_features // bs
        floats = [b for b in self.buffers() if b.is_floating_point()] or [torch.empty(0)]
        blocks = torch.zeros(nbr, nbc, bs, bs, dtype=floats[0].dtype, device=floats[0].device)
        for i in range(self.num_groups):
            rows, cols = getattr(self, f"group{i}_rows"), getattr(self, f"group{i}_cols")
            packed = getattr(self, f"group{i}_weight")
            k = cols.numel() // rows.numel()
            kept = packed.view(rows.numel(), bs, k, bs).permute(0, 2, 1, 3)  # (R, k, out, in)
            # Padding blocks are zero, so accumulating them into any column-block changes nothing.
            blocks.index_put_((rows[:, None].expand(-1, k), cols.view(-1, k)), kept, accumulate=True)
        return blocks.permute(0, 2, 1, 3).reshape(shape)

    def tile_mask(self) -> torch.Tensor:
        """Bool (out/bs, in/bs): True where a block is stored (for pictures of the mask)."""
        return block_mask(self.dense_weight(), self.blocksize)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
            f"kept_blocks={self.kept_blocks}/{self.total_blocks}, sparsity={self.sparsity:.3f}, "
            f"kernel={self.kernel!r}, bias={self.bias is not None}"
        )


##### Whole-model conversion #####


@dataclass
class BsrResult:
    """What ``apply_bsr`` did: converted layers (name, kernel, block sparsity) and dense ones (name, reason)."""

    converted: List[Tuple[str, str, float]] = field(default_factory=list)
    left_dense: List[Tuple[str, str]] = field(default_factory=list)
    # (first Linear, second Linear, what was done) for each Linear -> elementwise -> Linear pair whose
    # hidden units were reordered (and dead ones dropped) before packing; see _prepare_mlp_pair.
    mlp_pairs: List[Tuple[str, str, str]] = field(default_factory=list)

    def skipped_summary(self) -> str:
        """The layers left dense and why, on one line."""
        return "; ".join(f"{name}: {reason}" for name, reason in self.left_dense) or "no layer left dense"

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} Linear layers to BlockSparseLinear:"]
        lines += [f"  {name:40s} kernel={kernel:6s} block sparsity={sp:.3f}" for name, kernel, sp in self.converted]
        lines.append(f"left {len(self.left_dense)} Linear layers dense:")
        lines += [f"  {name:40s} {reason}" for name, reason in self.left_dense]
        if self.mlp_pairs:
            lines.append(f"reordered the hidden units of {len(self.mlp_pairs)} Linear pairs:")
            lines += [f"  {first} -> {second}: {what}" for first, second, what in self.mlp_pairs]
        return "\n".join(lines)


# Modules that act on each hidden unit independently: between two Linears they let the hidden units be
# permuted (and a constant unit be folded into the next bias) without changing the function.
ELEMENTWISE = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
               nn.Mish, nn.Identity, nn.Dropout)


def _mlp_pairs(model: nn.Module) -> List[Tuple[str, str, List[nn.Module]]]:
    """(first, second, between) for each nn.Sequential run Linear, elementwise modules, Linear in ``model``."""
    pairs = []
    for fqn, seq in model.named_modules():
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
                    prefix = f"{fqn}." if fqn else ""
                    pairs.append((prefix + first_name, prefix + children[j][0], [m for _, m in children[i + 1:j]]))
    return pairs


@torch.no_grad()
def _prepare_mlp_pair(first: nn.Linear, second: nn.Linear, between: List[nn.Module], blocksize: int):
    """New (first, second) Linears computing the same function, hidden units reordered for the bmm kernels.

    Hidden block h (``blocksize`` units) is *dead* when ``second`` has no kept block in its column h: its
    values are never used, so ``first``'s block-row h is zeroed (fewer blocks to multiply). When ``first``
    has no kept block in row h, the unit is the constant ``act(bias)``; if every Dropout between has p=0 and
    ``second`` has a bias, ``second @ act(bias)`` is folded into that bias and the unit becomes dead too.
    Then the hidden blocks are sorted by ``first``'s kept count per row, the order ``_pack_groups`` groups
    them in, so every group of ``first`` is a run of consecutive rows that the kernels write without a
    scatter. Returns (first, second, description).
    """
    bs = blocksize
    w1, w2 = first.weight.detach().clone(), second.weight.detach().clone()
    b1 = None if first.bias is None else first.bias.detach().clone()
    b2 = None if second.bias is None else second.bias.detach().clone()
    hidden = w1.shape[0] // bs
    folded = 0
    if b1 is not None and b2 is not None and all(not isinstance(m, nn.Dropout) or m.p == 0 for m in between):
        constant = ~block_mask(w1, bs).any(dim=1) & block_mask(w2, bs).any(dim=0)
        units = constant.repeat_interleave(bs)
        value = b1[units]
        for module in between:
            value = module(value)
        b2 += w2[:, units] @ value
        w2[:, units] = 0
        folded = int(constant.sum())
    dead = ~block_mask(w2, bs).any(dim=0)
    units = dead.repeat_interleave(bs)
    w1[units] = 0
    if b1 is not None:
        b1[units] = 0
    order = block_row_order(block_mask(w1, bs))
    units = (order[:, None] * bs + torch.arange(bs)).flatten()
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



def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def apply_bsr(
    model: nn.Module,
    blocksize: int,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    kernel: str = "auto",
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> BsrResult:
    """Replace every eligible ``nn.Linear`` of ``model`` (in place) by a ``BlockSparseLinear``.

    Args:
        model: a model with frozen, already-pruned weights (e.g. after ``supermask.sparsify_offline``).
        blocksize: block edge; a layer whose weight shape it does not divide stays dense.
        min_sparsity: a layer with fewer all-zero blocks than a Supermask at this sparsity prunes stays dense
            (``reaches_sparsity``: a layer trained at exactly 0.7 meets 0.7). The default, 0.7, is the
            measured break-even at blocksize 64 on a 2-core CPU (benchmarks/RESULTS.md); at blocksize 32 the
            break-even is about 0.8, and ``kernel="auto"`` runs layers below it with the dense kernel.
        kernel: one of ``KERNELS`` for every converted layer.
        filter_fn: ``filter_fn(module, fqn) -> bool``; layers it rejects stay dense.

    An ``nn.MultiheadAttention`` reads its projection weights directly, so when its q/k/v input projection
    (``in_proj_weight``) or its ``out_proj`` is worth converting, the module is replaced by an
    ``attention.ProjectedAttention`` computing the same attention through the converted projections
    (reported as ``<name>.in_proj`` and ``<name>.out_proj``). Linear subclasses stay dense (a Supermask
    layer must be made a plain Linear first, with ``supermask.sparsify_offline``).

    Two Linears in an ``nn.Sequential`` with only elementwise modules between them (``ELEMENTWISE``, e.g.
    torchvision's ``MLPBlock``: Linear, GELU, Dropout, Linear, Dropout), both converted by a bmm kernel,
    are replaced by an equivalent pair first (``_prepare_mlp_pair``, listed in ``BsrResult.mlp_pairs``):
    hidden units the second Linear never reads are dropped from the first, constant ones are folded into
    the second's bias, and the hidden units are reordered so the first Linear writes its output without a
    scatter. The model computes the same function; its hidden activations come in another order.

    Returns:
        ``BsrResult`` listing converted layers and the ones left dense, with the reason.

    Example::

        >>> result = apply_bsr(model, blocksize=64)
        >>> print(result)
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    result = BsrResult()

    def reason_to_stay_dense(module, fqn):
        if filter_fn is not None and not filter_fn(module, fqn):
            return "excluded by filter_fn"
        if not blocksize_divides(tuple(module.weight.shape), blocksize):
            out_features, in_features = module.weight.shape
            return f"shape {out_features}x{in_features} not divisible by blocksize {blocksize}"
        sparsity = block_sparsity(module.weight, blocksize)
        if not reaches_sparsity(sparsity, min_sparsity, module.weight.numel() // blocksize**2):
            return f"block sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
        return None

    pair_kernels = {}  # "auto" on an MLP pair: both Linears run "bmm_t", unless one is better off dense

    def convert(module, fqn, row_major=False):
        reason = reason_to_stay_dense(module, fqn)
        if reason is not None:
            result.left_dense.append((fqn, reason))
            return module
        chosen = pair_kernels.get(fqn, kernel)
        if chosen == "auto" and row_major:
            weight = module.weight
            chosen = choose_kernel(tuple(weight.shape), weight.dtype, blocksize, block_sparsity(weight, blocksize),
                                   device=weight.device)
            chosen = "bmm" if chosen == "bmm_t" else chosen
        sparse = BlockSparseLinear.from_dense(module, blocksize, kernel=chosen)
        result.converted.append((fqn, sparse.kernel, 1.0 - sparse.kept_blocks / sparse.total_blocks))
        return sparse

    for fqn, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            _convert_attention(model, fqn, module, convert, reason_to_stay_dense, result)
    if kernel in ("auto", "bmm", "bmm_t"):
        for first_name, second_name, between in _mlp_pairs(model):
            first, second = model.get_submodule(first_name), model.get_submodule(second_name)
            if reason_to_stay_dense(first, first_name) is None and reason_to_stay_dense(second, second_name) is None:
                first, second, what = _prepare_mlp_pair(first, second, between, blocksize)
                _set_submodule(model, first_name, first)
                _set_submodule(model, second_name, second)
                result.mlp_pairs.append((first_name, second_name, what))
                if kernel == "auto":
                    # "bmm_t" leaves the hidden activations column-major, which the second "bmm_t" reads
                    # without a transpose: measured faster than any other pair of kernels (1 thread).
                    for name, layer in ((first_name, first), (second_name, second)):
                        choice = choose_kernel(tuple(layer.weight.shape), layer.weight.dtype, blocksize,
                                               block_sparsity(layer.weight, blocksize), device=layer.weight.device)
                        pair_kernels[name] = "bmm_t" if choice in ("bmm", "bmm_t") else choice
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
                _set_submodule(model, fqn, converted)
    return result


def _convert_attention(model, fqn, mha, convert, reason_to_stay_dense, result):
    """Replace `mha` by a ProjectedAttention with block-sparse projections, when either one is worth it."""
    in_name, out_name = f"{fqn}.in_proj", f"{fqn}.out_proj"
    unsupported = unsupported_attention_reason(mha)
    if unsupported is not None:
        result.left_dense.append((in_name, unsupported))
        result.left_dense.append((out_name, unsupported))
        return
    projected = ProjectedAttention.from_attention(mha, lambda linear: linear)
    if all(reason_to_stay_dense(layer, name) is not None
           for layer, name in [(projected.in_proj, in_name), (projected.out_proj, out_name)]):
        # Neither projection gains: keep nn.MultiheadAttention and its fused fast path.
        result.left_dense.append((in_name, reason_to_stay_dense(projected.in_proj, in_name)))
        result.left_dense.append((out_name, reason_to_stay_dense(projected.out_proj, out_name)))
        return
    # Attention splits its projections into heads: "bmm_t"'s column-major output would cost a copy there
    # (vit_b_16, block 64, 90%: 2.62x dense with "bmm" against 2.09x with "bmm_t", same run).
    projected.in_proj = convert(projected.in_proj, in_name, row_major=True)
    projected.out_proj = convert(projected.out_proj, out_name, row_major=True)
    projected.train(mha.training)
    if fqn == "":
        raise ValueError("apply_bsr needs a model that contains the nn.MultiheadAttention, not the module itself")
    _set_submodule(model, fqn, projected)


##### Compact checkpoints #####

COMPACT_FORMAT = "superblock-compact"
COMPACT_VERSION = 1


def _attention_key(fqn: str, model: nn.Module) -> str:
    """The plain nn.MultiheadAttention name of a ProjectedAttention entry (X.in_proj.weight -> X.in_proj_weight)."""
    owner, _, leaf = fqn.rpartition(".")
    layer, _, projection = owner.rpartition(".")
    if projection == "in_proj" and isinstance(model.get_submodule(layer) if layer else model, ProjectedAttention):
        return f"{layer}.in_proj_{leaf}" if layer else f"in_proj_{leaf}"
    return fqn


@torch.no_grad()
def save_compact(model: nn.Module, path: str, *, architecture: dict, blocksize: int) -> dict:
    """Write the deployable model: kept blocks and their indices for block-sparse layers, dense tensors otherwise.

    ``architecture`` holds what rebuilds the dense model (``model``, ``num_classes``, ``image_size``: the
    arguments of ``utils.build_model``). No scores, no optimizer state; loads with
    ``torch.load(weights_only=True)``. Returns the file's size and that of the same model stored dense.
    """
    import utils

    sparse, sparse_prefixes = {}, []
    for fqn, module in model.named_modules():
        if isinstance(module, BlockSparseLinear):
            values, crow, col = blocksparse_triton.pack_blocks(module.dense_weight(), module.blocksize)
            sparse[fqn] = {"shape": [module.out_features, module.in_features], "values": values.cpu(),
                           "crow": crow.cpu(), "col": col.cpu(),
                           "bias": None if module.bias is None else module.bias.cpu()}
            sparse_prefixes.append(fqn + ".")
    dense = {_attention_key(k, model): v.cpu() for k, v in model.state_dict().items()
             if not k.startswith(tuple(sparse_prefixes))}
    utils.save_checkpoint({"format": COMPACT_FORMAT, "version": COMPACT_VERSION, "architecture": dict(architecture),
                           "blocksize": blocksize, "dense": dense, "sparse": sparse}, path)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.values()) + sum(
        (layer["shape"][0] * layer["shape"][1] + (0 if layer["bias"] is None else layer["bias"].numel()))
        * layer["values"].element_size() for layer in sparse.values())
    return {"bytes": os.path.getsize(path), "dense_bytes": dense_bytes}


def is_compact(checkpoint) -> bool:
    """True for a dict written by save_compact."""
    return isinstance(checkpoint, dict) and checkpoint.get("format") == COMPACT_FORMAT


def _expand_blocks(layer: dict) -> torch.Tensor:
    out_features, in_features = layer["shape"]
    values, crow, col = layer["values"], layer["crow"], layer["col"]
    bs = values.shape[-1]
    blocks = values.new_zeros(out_features // bs, in_features // bs, bs, bs)
    rows = torch.repeat_interleave(torch.arange(blocks.shape[0]), crow.diff().long())
    blocks[rows, col.long()] = values.transpose(1, 2)
    return blocks.permute(0, 2, 1, 3).reshape(out_features, in_features)


@torch.no_grad()
def model_from_compact(checkpoint: dict, *, kernel: str = "auto", device=None) -> Tuple[nn.Module, "BsrResult"]:
    """Rebuild the block-sparse model a compact checkpoint (already loaded) describes; returns (model, BsrResult)."""
    import argparse

    import utils

    if checkpoint.get("version", 0) > COMPACT_VERSION:
        raise ValueError(f"compact checkpoint format version {checkpoint['version']} is newer than this SuperBlock "
                         f"reads ({COMPACT_VERSION}); update SuperBlock")
    arch = checkpoint["architecture"]
    model = utils.build_model(argparse.Namespace(model=arch["model"], weights=None),
                              num_classes=arch["num_classes"], image_size=arch["image_size"])
    state = dict(checkpoint["dense"])
    floats = [t for t in state.values() if t.is_floating_point()]
    model.to(dtype=floats[0].dtype if floats else torch.float32)
    for fqn, layer in checkpoint["sparse"].items():
        weight = _expand_blocks(layer)
        owner, _, projection = fqn.rpartition(".")
        if projection == "in_proj" and isinstance(model.get_submodule(owner), nn.MultiheadAttention):
            state[f"{owner}.in_proj_weight"], bias_key = weight, f"{owner}.in_proj_bias"
        else:
            state[f"{fqn}.weight"], bias_key = weight, f"{fqn}.bias"
        if layer["bias"] is not None:
            state[bias_key] = layer["bias"]
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    sparse_layers = set(checkpoint["sparse"])
    result = apply_bsr(model, checkpoint["blocksize"], min_sparsity=0.0, kernel=kernel,
                       filter_fn=lambda module, fqn: fqn in sparse_layers)
    return model, result


def load_compact(path: str, *, kernel: str = "auto", device=None) -> nn.Module:
    """The ready-to-run block-sparse model saved by save_compact (ValueError when the file is not one)."""
    import utils

    try:
        checkpoint = utils.load_checkpoint(path)
    except utils.InputError as e:
        raise ValueError(str(e)) from None
    if not is_compact(checkpoint):
        raise ValueError(f"{path} is not a compact SuperBlock checkpoint (write one with evaluate.py --save-compact)")
    return model_from_compact(checkpoint, kernel=kernel, device=device)[0]
