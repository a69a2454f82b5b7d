"""A Triton kernel for block-sparse Linear on CUDA: y = x @ W^T + b with W stored as kept blocks only.

Layout (built once, by `blocksparse_reference.pack_blocks`): W of shape (N, K) is cut into blocksize x blocksize
blocks; block-row r (outputs r*blocksize up to (r+1)*blocksize) keeps the blocks `col[crow[r]:crow[r+1]]`, each
stored transposed as `values[i]` of shape (in, out) so the kernel multiplies x's tile by it directly. One program
computes a BLOCK_M x BLOCKSIZE tile of the output: it walks its block-row's kept blocks only, loading the matching
BLOCKSIZE columns of x (masked at the token edge, so any token count works without padding copies) and
accumulating in float32.

The op is registered as `superblock::bsr_linear` (torch.library.custom_op with a shape-only fake), so
torch.compile keeps it in the graph. On the CPU it runs only under TRITON_INTERPRET=1 (for tests).
"""

import os

import torch

from blocksparse_reference import pack_blocks  # noqa: F401  (the layout this kernel reads)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel is unavailable, the rest of SuperBlock is not affected
    triton = None


def triton_available():
    """True when Triton can run here: a CUDA device, or the interpreter (TRITON_INTERPRET=1) for tests."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_triton_reason(blocksize, dtype):
    """Why the kernel cannot take this block size and dtype, or None when it can."""
    if triton is None:
        return "Triton is not installed (it ships with the CUDA build of torch)"
    if blocksize < 16 or blocksize & (blocksize - 1):
        return f"block size {blocksize} is not a power of two >= 16 (tl.dot needs 16x16 tiles at least)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not float16, bfloat16 or float32"
    return None


if triton is not None:

    @triton.jit
    def _bsr_linear_kernel(
        x_ptr, values_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
        M, stride_xm, stride_xk, stride_ym, stride_yn,
        M_BUCKET, N, K,  # read by the autotuner's key only
        HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        row = tl.program_id(0)  # block-row fastest: neighbouring programs reuse the same x tile from L2
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_b = tl.arange(0, BLOCKSIZE)
        in_range = offs_m[:, None] < M
        start = tl.load(crow_ptr + row)
        end = tl.load(crow_ptr + row + 1)
        acc = tl.zeros((BLOCK_M, BLOCKSIZE), dtype=tl.float32)
        for i in range(start, end):
            col = tl.load(col_ptr + i)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (col * BLOCKSIZE + offs_b)[None, :] * stride_xk,
                        mask=in_range, other=0.0)
            w = tl.load(values_ptr + i * BLOCKSIZE * BLOCKSIZE + offs_b[:, None] * BLOCKSIZE + offs_b[None, :])
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + row * BLOCKSIZE + offs_b).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + (row * BLOCKSIZE + offs_b)[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=in_range)

    _CONFIGS = [
        triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
        for block_m, warps, stages in [(32, 4, 3), (64, 4, 3), (64, 8, 4), (128, 4, 3), (128, 8, 4), (256, 8, 3)]
    ]
    # Tuned once per (token-count bucket, layer shape, blocksize; the autotuner adds the dtypes), on
    # whatever GPU runs it: one it has not seen gets its own tuning rather than another card's table.
    _bsr_linear_autotuned = triton.autotune(
        configs=_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCKSIZE"])(_bsr_linear_kernel)


def _launch(x, values, crow, col, bias, out_features):
    m, _ = x.shape
    blocksize = values.shape[-1]
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    args = (x, values, crow, col, bias if bias is not None else y, y, m,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), triton.next_power_of_2(m), out_features, x.shape[1])
    # Triton's interpreter (numpy) has no bfloat16 dot: it multiplies in float32 there, on the GPU never.
    upcast = _interpreting() and x.dtype == torch.bfloat16
    common = dict(HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, IEEE=x.dtype == torch.float32 or upcast,
                  UPCAST=upcast)
    rows = out_features // blocksize
    if _interpreting():  # the interpreter cannot time configurations
        _bsr_linear_kernel[(rows, triton.cdiv(m, 32))](*args, BLOCK_M=32, **common)
    else:
        grid = lambda meta: (rows, triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
        _bsr_linear_autotuned[grid](*args, **common)
    return y


@torch.library.custom_op("superblock::bsr_linear", mutates_args=())
def bsr_linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
               bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (..., K) @ W^T + bias for W packed by pack_blocks, computed by the Triton kernel."""
    flat = x.reshape(-1, x.shape[-1])
    return _launch(flat, values, crow, col, bias, out_features).reshape(*x.shape[:-1], out_features)


@bsr_linear.register_fake
def _(x, values, crow, col, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)
