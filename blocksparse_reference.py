"""The block layout every block-sparse kernel shares, and the pure-PyTorch kernels beside the fused one.

Layout (``pack_blocks``): a weight (out, in) is cut into ``blocksize x blocksize`` blocks; block-row r (outputs
r*blocksize up to (r+1)*blocksize) keeps the blocks ``col[crow[r]:crow[r+1]]``, each stored transposed as
``values[i]`` (in, out), the right-hand operand of ``x @ W.T``. The fused CPU kernel, the Triton kernel and compact
checkpoints use it.

Kernels here, in pure PyTorch:

* ``"bmm"``: block-rows are grouped by their number of kept blocks (at most ``MAX_GROUPS`` groups, short rows padded
  with zero blocks). Per group the input's needed column-blocks are gathered and one ``torch.baddbmm`` computes all
  its rows; a group of consecutive block-rows writes straight into its slice of the output. The reference and the
  fallback where the C++ extension cannot be built. Under torch.compile it runs as one opaque op (``bmm_blocks``).
* ``"torch"``: the original SuperBlock's approach, ``F.linear`` with a ``to_sparse_bsr`` weight; the baseline.
"""

import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# At most this many row groups per layer: a bound on the Python work per "bmm" forward, whatever the mask.
MAX_GROUPS = 6


##### The shared layout #####


class FrozenBlockLayer(nn.Module):
    """What every frozen block-sparse layer (float ``blocksparse.BlockSparseLinear``, int8
    ``blocksparse_int8.Int8BlockSparseLinear``) has: its shape, block edge, kernel and kept blocks."""

    def __init__(self, in_features: int, out_features: int, blocksize: int, kernel: str, kept_blocks: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.kernel = kernel
        self.kept_blocks = kept_blocks
        self.total_blocks = (in_features // blocksize) * (out_features // blocksize)
        self.tile_tokens: Optional[int] = None  # "fused": tokens per work item, measured at conversion

    def __setstate__(self, state):
        # A pickled model may be unpickled in a fresh process (the C++ ops not loaded yet) or on another CPU (with
        # other instruction sets): each kind of layer settles its kernel here.
        super().__setstate__(state)
        self.settle_on_this_cpu()

    def settle_on_this_cpu(self) -> None:
        """Make the layer's kernel runnable in this process and on this CPU (after unpickling)."""

    @property
    def sparsity(self) -> float:
        """Fraction of blocks that are entirely zero (and not stored)."""
        return 1.0 - self.kept_blocks / self.total_blocks

    def check_input(self, input: torch.Tensor) -> None:
        """Raise for an input of the wrong width, or one that needs gradients (this layer is frozen)."""
        if input.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(input.shape)}")
        if input.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{type(self).__name__} is for inference and its input requires grad (an input, or a "
                               f"parameter set to require grad after apply_bsr froze them): run the model under "
                               f"torch.inference_mode() or torch.no_grad(), or train the Supermask model "
                               f"(supermask.apply_supermask) and convert it to block-sparse afterwards")

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with."""
        raise NotImplementedError

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``dense_weight()`` (an int8 layer's dequantized weight, in float32)."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def setting_repr(self) -> str:
        """The kernel's measured setting, for the repr."""
        return ""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"kept_blocks={self.kept_blocks}/{self.total_blocks}, sparsity={self.sparsity:.3f}, "
                f"kernel={self.kernel!r}{self.setting_repr()}, bias={self.bias is not None}")


@torch.no_grad()
def pack_blocks(weight: torch.Tensor, blocksize: int):
    """(values (kept, in, out), crow (rows+1,) int32, col (kept,) int32): the non-zero blocks of ``weight``."""
    out_features, in_features = weight.shape
    rows, cols = out_features // blocksize, in_features // blocksize
    blocks = weight.reshape(rows, blocksize, cols, blocksize).transpose(1, 2)  # (rows, cols, out, in)
    kept = blocks.ne(0).any(dim=-1).any(dim=-1)
    crow = torch.zeros(rows + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = kept.sum(dim=1).cumsum(0)
    row_index, col_index = kept.nonzero(as_tuple=True)
    values = blocks[row_index, col_index].transpose(1, 2).contiguous()
    return values, crow, col_index.to(torch.int32)


def expand_blocks(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """The dense (out, in) weight that ``pack_blocks`` packed into ``values, crow, col``."""
    out_features, in_features = shape
    blocksize = values.shape[-1]
    blocks = values.new_zeros(out_features // blocksize, in_features // blocksize, blocksize, blocksize)
    rows = torch.repeat_interleave(torch.arange(blocks.shape[0], device=values.device), crow.diff().long())
    blocks[rows, col.long()] = values.transpose(1, 2)
    return blocks.permute(0, 2, 1, 3).reshape(out_features, in_features)


def blocks_forward(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                   bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` for 2-D x from W's kept blocks (``pack_blocks``' layout), in pure PyTorch and any dtype.

    What a "fused" layer computes in a dtype its C++ kernel lacks (float64, after ``.double()``): pruned blocks are
    not read, as in the kernel. It holds every kept block's product at once (tokens x kept blocks x blocksize)."""
    n, blocksize = x.shape[0], values.shape[-1]
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=x.device), crow.diff().long())
    inputs = x.reshape(n, -1, blocksize).index_select(1, col.long())  # (n, kept, blocksize): each block's input
    products = torch.einsum("nki,kio->nko", inputs, values)
    y = x.new_zeros(n, out_features // blocksize, blocksize).index_add_(1, rows, products).view(n, out_features)
    return y if bias is None else y + bias


def block_row_order(mask: torch.Tensor) -> torch.Tensor:
    """Block-rows sorted by kept count, then by first kept column: the order "bmm" packs its row groups in."""
    counts = mask.sum(dim=1)
    first_col = mask.to(torch.int8).argmax(dim=1)
    return torch.argsort(counts * (mask.shape[1] + 1) + first_col, stable=True)


##### "bmm": row groups #####


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


def pack_groups(weight: torch.Tensor, mask: torch.Tensor, blocksize: int, max_groups: int = MAX_GROUPS):
    """Kept blocks grouped by row count: ([(rows, cols, weight), ...], empty block-rows).

    A group's weight is (R, blocksize, k*blocksize): its R block-rows of k blocks each, side by side.
    """
    block_rows, block_cols = mask.shape
    # (block-row, block-column, out, in)
    blocks = weight.detach().reshape(block_rows, blocksize, block_cols, blocksize).permute(0, 2, 1, 3)
    counts = mask.sum(dim=1)
    # Kept column-blocks first, in ascending order, for every block-row.
    cols_sorted = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    order = block_row_order(mask)
    order = order[counts[order] > 0]
    sorted_counts = counts[order].tolist()
    groups = []
    for start, end in _partition_counts(sorted_counts, max_groups) if sorted_counts else []:
        rows = order[start:end]
        k = sorted_counts[end - 1]
        cols = cols_sorted[rows, :k]
        # A short row is padded with its first dropped column-blocks, which are all zero: exact, no masking.
        kept = blocks[rows[:, None], cols]  # (R, k, out, in)
        packed = kept.permute(0, 2, 1, 3).reshape(len(rows), blocksize, k * blocksize).contiguous()
        groups.append((rows.clone(), cols.reshape(-1).clone(), packed))
    empty_rows = (counts == 0).nonzero().flatten()
    return groups, empty_rows


def row_span(rows: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(start, end) if ``rows`` is a run of consecutive block-rows, else None (then results are scattered)."""
    if rows.numel() == 0:
        return None
    start, end = int(rows[0]), int(rows[0]) + rows.numel()
    return (start, end) if torch.equal(rows, torch.arange(start, end, device=rows.device)) else None


def bmm_forward(x, groups, empty_rows, block_rows: int, block_cols: int, blocksize: int) -> torch.Tensor:
    """Gather the column-blocks of x (n, in) each group reads, one bmm per group, into y (n, out)."""
    n = x.shape[0]
    xb = x.reshape(n, block_cols, blocksize)
    y = x.new_empty(n, block_rows, blocksize)
    for rows, cols, weight, bias, span in groups:
        r = rows.shape[0]
        # (R, n, k*blocksize); the width spelled out, not -1, which an empty batch (n = 0) leaves undetermined
        a = xb.index_select(1, cols).view(n, r, cols.numel() // r * blocksize).transpose(0, 1)
        w = weight.transpose(1, 2)  # (R, k*blocksize, blocksize)
        if span is not None:  # consecutive rows: the product writes straight into y (a strided view, no copy)
            out = y[:, span[0]:span[1]].transpose(0, 1)
            if bias is None:
                torch.bmm(a, w, out=out)
            else:
                torch.baddbmm(bias.view(r, 1, blocksize), a, w, out=out)
            continue
        out = torch.bmm(a, w) if bias is None else torch.baddbmm(bias.view(r, 1, blocksize), a, w)
        y.index_copy_(1, rows, out.transpose(0, 1))
    if empty_rows is not None:
        rows, bias, span = empty_rows
        if bias is None:
            fill = y.new_zeros(n, rows.shape[0], blocksize)
        else:
            fill = bias.view(1, -1, blocksize).expand(n, -1, blocksize)
        if span is not None:
            y[:, span[0]:span[1]] = fill
        else:
            y.index_copy_(1, rows, fill)
    return y.view(n, block_rows * blocksize)


# Under torch.compile "bmm" runs as one opaque op. Traced, its products written into slices of the output become,
# in inductor, one pointwise kernel of nested masked selects over the whole output, fused with what follows, and
# slower than eager (benchmarks/RESULTS.md, "torch.compile on the CPU (block 64, 90% MLP sparsity)"). The op's
# arguments flatten the groups: per group its rows, cols, weight and bias, in `spans` its (start, end) or
# (-1, -1); then the empty rows, their bias and span.


@torch.library.custom_op("superblock::bmm_blocks", mutates_args=())
def bmm_blocks(x: torch.Tensor, tensors: List[Optional[torch.Tensor]], spans: List[int], has_empty_rows: bool,
               block_rows: int, block_cols: int, blocksize: int) -> torch.Tensor:
    """``bmm_forward`` of 2-D x with the flattened groups, as one op."""
    def span_at(i):
        return (spans[2 * i], spans[2 * i + 1]) if spans[2 * i] >= 0 else None

    count = (len(tensors) - 2 * has_empty_rows) // 4
    groups = [tuple(tensors[4 * i:4 * i + 4]) + (span_at(i),) for i in range(count)]
    empty = (tensors[-2], tensors[-1], span_at(count)) if has_empty_rows else None
    return bmm_forward(x, groups, empty, block_rows, block_cols, blocksize)


@bmm_blocks.register_fake
def _(x, tensors, spans, has_empty_rows, block_rows, block_cols, blocksize):
    return x.new_empty(x.shape[0], block_rows * blocksize)


##### "torch": PyTorch's sparse BSR tensors #####


def torch_bsr_supports_dtype(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> bool:
    """True if PyTorch's sparse BSR matmul (kernel "torch") accepts ``dtype`` on ``device``'s type."""
    if device.type == "cuda":  # PyTorch's own Triton BSR kernels take half precision too
        return dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return dtype in (torch.float32, torch.float64)


def to_torch_bsr(weight: torch.Tensor, blocksize: int):
    """(crow_indices, col_indices, values) of ``weight.to_sparse_bsr``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        bsr = weight.to_sparse_bsr((blocksize, blocksize))
    return bsr.crow_indices(), bsr.col_indices(), bsr.values()


def torch_bsr_weight(crow, col, values, shape) -> torch.Tensor:
    """The sparse BSR tensor of ``to_torch_bsr``'s parts."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        return torch.sparse_bsr_tensor(crow, col, values, size=shape, check_invariants=False)


@torch.compiler.disable
def torch_bsr_forward(x, crow, col, values, bias, shape):
    """``F.linear`` with a sparse BSR weight; run eagerly because torch.compile cannot trace sparse tensors."""
    if not torch_bsr_supports_dtype(x.dtype, x.device):
        raise ValueError(f"kernel='torch' uses PyTorch's sparse BSR kernels, which support float32/float64 only, "
                         f"not {x.dtype}; use kernel='fused' (or 'auto')")
    return F.linear(x, torch_bsr_weight(crow, col, values, shape), bias)
