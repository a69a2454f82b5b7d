"""The fused float ops' own AMX tile kernel (csrc/amx_tiles.h, products="amx"): offered exactly where it runs, the same
bits as one brgemm per kept block, and one clear error where AMX is missing or hidden."""
import os

import pytest
import torch
from torch import nn

import blocksparse_fused
import blocksparse_reference
from blocksparse import BlockSparseLinear
from test_blocksparse_fused import TOL, printed_by, reference, sparse_linear

FUSED = blocksparse_fused.available()
pytestmark = pytest.mark.skipif(not FUSED, reason="the C++ extension is unavailable here (its tests say why)")


def cpu_has_amx_bf16():
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " amx_bf16" in line for line in f)


AMX = "amx" in torch.ops.superblock.fused_products(torch.bfloat16) if FUSED else False  # it runs in this process


def packed_operands(linear, blocksize):
    values, crow, col = blocksparse_reference.pack_blocks(linear.weight, blocksize)
    return blocksparse_fused.pack(values), crow, col, linear.bias


def test_amx_is_offered_for_bfloat16_blocks_of_a_multiple_of_32_where_the_cpu_has_it():
    assert "amx" not in blocksparse_fused.product_kinds(torch.float32, 32)
    assert "amx" not in blocksparse_fused.product_kinds(torch.bfloat16, 16)
    if not cpu_has_amx_bf16():
        assert not AMX
    offered = "amx" in blocksparse_fused.product_kinds(torch.bfloat16, 32)
    assert offered == AMX, "where AMX runs, the AMX kernel must pass its check at first use and be offered"
    for dtype in (torch.float32, torch.bfloat16):
        assert blocksparse_fused.product_kinds(dtype, 64)[:2] == ("blocks", "gather")


@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 32, 33, 100])
def test_amx_gives_the_bits_of_one_brgemm_per_block(blocksize, tokens):
    linear = sparse_linear(4 * blocksize, 3 * blocksize, blocksize, 0.5, dtype=torch.bfloat16, seed=tokens)
    operands = packed_operands(linear, blocksize)
    x = torch.randn(tokens, 6 * blocksize, dtype=torch.bfloat16)[:, 1 : 1 + 4 * blocksize]  # rows of a wider tensor
    blocks = blocksparse_fused.fused_linear(x, *operands, 3 * blocksize, 32, "blocks")
    if not AMX:
        with pytest.raises(RuntimeError, match="products 'amx' need AMX"):
            blocksparse_fused.fused_linear(x, *operands, 3 * blocksize, 32, "amx")
        return
    for tile in (16, 32, 64):  # items of one row tile, two, and several
        amx = blocksparse_fused.fused_linear(x, *operands, 3 * blocksize, tile, "amx")
        torch.testing.assert_close(amx.double(), reference(linear, x), **TOL[torch.bfloat16])
        assert torch.equal(amx, blocks), f"tile {tile}: AMX adds in the order of the brgemm calls"


def test_the_fused_mlp_on_amx_gives_the_bits_of_one_brgemm_per_block():
    fc1 = sparse_linear(128, 512, 32, 0.7, dtype=torch.bfloat16, seed=1)
    fc2 = sparse_linear(512, 128, 32, 0.7, dtype=torch.bfloat16, seed=2)
    first, second = packed_operands(fc1, 32), packed_operands(fc2, 32)
    x = torch.randn(197, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    blocks = blocksparse_fused.fused_mlp(x, first, second, 128, "gelu", 64, "blocks")
    # The hidden activations are rounded to bfloat16, so one element can land a rounding step away: L2 over all.
    expected = reference(fc2, nn.functional.gelu(reference(fc1, x)).bfloat16())
    error = ((blocks.double() - expected).norm() / expected.norm()).item()
    assert error < 5e-3
    if AMX:
        assert torch.equal(blocksparse_fused.fused_mlp(x, first, second, 128, "gelu", 64, "amx"), blocks)


def test_a_layer_measured_on_amx_keeps_working_in_float32():
    layer = BlockSparseLinear.from_dense(sparse_linear(128, 128, 32, 0.5, dtype=torch.bfloat16, seed=3), 32,
                                         kernel="fused")
    layer.products = "amx" if AMX else "gather"
    layer.float()
    assert layer.products == ("blocks" if AMX else "gather")
    x = torch.randn(5, 128)
    expected = nn.functional.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), expected, **TOL[torch.float32])


def test_unknown_products_are_refused():
    linear = sparse_linear(64, 64, 32, 0.5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="products must be blocks, gather or amx, not 'tiles'"):
        blocksparse_fused.fused_linear(torch.randn(3, 64).bfloat16(), *packed_operands(linear, 32), 64, 16, "tiles")
    if AMX:
        f32 = sparse_linear(64, 64, 32, 0.5)
        with pytest.raises(RuntimeError, match="products 'amx' need bfloat16 blocks"):
            blocksparse_fused.fused_linear(torch.randn(3, 64), *packed_operands(f32, 32), 64, 16, "amx")


def test_hiding_amx_takes_it_out_of_the_choice():
    script = """
import torch
import blocksparse_fused
blocksparse_fused.require()
print("kinds", ",".join(blocksparse_fused.product_kinds(torch.bfloat16, 64)))
blocks = torch.zeros(1, 32, 64, 2, dtype=torch.bfloat16)
try:
    torch.ops.superblock.fused_bsr_linear(torch.zeros(2, 64, dtype=torch.bfloat16), blocks,
        torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), None, 64, 16, "amx")
except RuntimeError as e:
    print("error", str(e).splitlines()[0])
"""
    lines = printed_by(script, dict(os.environ, SUPERBLOCK_HIDE_ISA="amx", OMP_NUM_THREADS="1"))
    assert lines["kinds"] == "blocks,gather"
    assert "products 'amx' need AMX (amx_bf16), which this CPU lacks or SUPERBLOCK_HIDE_ISA hides" in lines["error"]
