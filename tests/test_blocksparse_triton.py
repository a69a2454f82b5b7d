"""The Triton kernel's exactness, on the CPU through Triton's interpreter (small shapes: it is slow)."""

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 when there is no GPU.
triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with the CUDA build of torch)")

from blocksparse_triton import bsr_linear, pack_blocks, unsupported_triton_reason  # noqa: E402


def block_sparse_weight(out_features, in_features, blocksize, keep, dtype, seed=0, empty_rows=()):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features)
    kept = torch.rand(out_features // blocksize, in_features // blocksize) < keep
    for row in empty_rows:
        kept[row] = False
    mask = kept.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1)
    return (weight * mask).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("tokens", [1, 37])
def test_triton_bsr_linear_matches_dense(dtype, tol, tokens):
    weight = block_sparse_weight(64, 96, 16, keep=0.4, dtype=dtype, empty_rows=(1,))
    bias = torch.randn(64).to(dtype)
    x = torch.randn(2, tokens, 96).to(dtype)
    values, crow, col = pack_blocks(weight, 16)
    assert values.shape[0] == int((weight.reshape(4, 16, 6, 16).ne(0).any(3).any(1)).sum())
    out = bsr_linear(x, values, crow, col, bias, 64)
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    assert out.shape == (2, tokens, 64) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * 10)


def test_triton_bsr_linear_without_bias_and_block_32():
    weight = block_sparse_weight(64, 64, 32, keep=0.5, dtype=torch.float32, seed=1)
    x = torch.randn(5, 64)
    out = bsr_linear(x, *pack_blocks(weight, 32), None, 64)
    torch.testing.assert_close(out, x @ weight.t(), rtol=1e-4, atol=1e-4)


def test_fully_empty_weight_gives_bias():
    weight = torch.zeros(32, 32)
    bias = torch.randn(32)
    out = bsr_linear(torch.randn(3, 32), *pack_blocks(weight, 16), bias, 32)
    torch.testing.assert_close(out, bias.expand(3, 32))


def test_pack_blocks_keeps_only_nonzero_blocks_transposed():
    weight = torch.zeros(32, 48)
    weight[16:32, 0:16] = torch.arange(256.0).reshape(16, 16)
    values, crow, col = pack_blocks(weight, 16)
    assert crow.tolist() == [0, 0, 1] and col.tolist() == [0]
    torch.testing.assert_close(values[0], weight[16:32, 0:16].t())


def test_compile_keeps_the_op_in_the_graph():
    from torch._dynamo.testing import CompileCounter

    weight = block_sparse_weight(32, 32, 16, keep=0.5, dtype=torch.float32, seed=2)
    packed = pack_blocks(weight, 16)
    counter = CompileCounter()
    fn = torch.compile(lambda x: bsr_linear(x, *packed, None, 32) * 2, backend=counter, fullgraph=True)
    x = torch.randn(4, 32)
    torch.testing.assert_close(fn(x), 2 * x @ weight.t(), rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1


def test_unsupported_block_sizes_and_dtypes_are_named():
    assert "power of two" in unsupported_triton_reason(24, torch.float16)
    assert "power of two >= 16" in unsupported_triton_reason(8, torch.float16)
    assert "dtype" in unsupported_triton_reason(32, torch.float64)
    assert unsupported_triton_reason(64, torch.bfloat16) is None
