"""The residual add and LayerNorm in one op (csrc/layer_norm.cpp), and the transformer blocks folded onto it.

The ops against float64 (the sum exactly as torch rounds it), at widths with and without a vector tail, both dtypes,
bias or none; degenerate rows; 1 vs 2 threads; the clear errors; compile and export; torchvision's and timm's blocks
folded by apply_bsr giving the model's logits, gradients in training, and unfold giving the blocks back.
"""
import copy
import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

import blocksparse
import blocksparse_fused
import residual_norm
from helpers import at_one_and_two_threads, tiny_deit
from test_blocksparse_fused import printed_by

blocksparse_fused.require()  # builds or loads the ops these tests call
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
ops = torch.ops.superblock


def norm_of(width, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(width, eps=1e-6, bias=bias)
    with torch.no_grad():  # a weight and bias of their own, so a kernel that skips either fails
        norm.weight.normal_(generator=gen)
        if bias:
            norm.bias.normal_(generator=gen)
    return norm.to(dtype).requires_grad_(False)


def float64_layer_norm(x, norm):
    bias = None if norm.bias is None else norm.bias.double()
    return residual_norm.reference(x.double(), torch.zeros_like(x, dtype=torch.float64), norm.weight.double(), bias,
                                   norm.eps)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 7, 16, 33, 100, 768])
@pytest.mark.parametrize("bias", [True, False])
def test_the_ops_match_float64_and_the_sum_is_torchs(dtype, width, bias):
    norm = norm_of(width, dtype, bias, seed=width)
    gen = torch.Generator().manual_seed(width)
    x, residual = (torch.randn(2, 9, width, generator=gen).mul(3).add(1).to(dtype) for _ in range(2))
    torch.testing.assert_close(ops.layer_norm(x, norm.weight, norm.bias, norm.eps).double(),
                               float64_layer_norm(x, norm), **TOL[dtype])
    total, normed = ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    assert torch.equal(total, x + residual), "the sum is rounded as torch rounds x + residual"
    assert torch.equal(normed, ops.layer_norm(total, norm.weight, norm.bias, norm.eps)), "normed from the rounded sum"
    torch.testing.assert_close(normed.double(), float64_layer_norm(x + residual, norm), **TOL[dtype])


def test_the_ops_take_strided_input_and_keep_its_shape():
    norm = norm_of(48, torch.float32)
    wide = torch.randn(3, 5, 96)
    x = wide[..., ::2]  # not contiguous
    got = ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), float64_layer_norm(x, norm), **TOL[torch.float32])
    total, normed = ops.add_layer_norm(x, x.transpose(0, 1).contiguous().transpose(0, 1), norm.weight, None, 1e-5)
    assert torch.equal(total, x + x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_constant_row_gives_the_bias_and_a_nan_stays_in_its_row(dtype):
    norm = norm_of(40, dtype)
    x = torch.randn(3, 40).to(dtype)
    x[0] = 5.0  # variance 0: (x - mean) is 0, rstd finite through eps
    x[1, 7] = float("nan")
    got = ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    assert torch.equal(got[0], norm.bias)
    assert got[1].isnan().all() and not got[[0, 2]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_ops_are_bitwise_identical_at_one_and_two_threads(dtype):
    norm = norm_of(768, dtype)
    x, residual = torch.randn(2, 1576, 768).to(dtype)
    one, two = at_one_and_two_threads(lambda: ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps))
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_the_ops_refuse_operands_that_do_not_fit_with_a_clear_error():
    norm = norm_of(16, torch.float32)
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="weight must be one"):
        ops.layer_norm(x, torch.ones(8), None, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.layer_norm(x.half(), norm.weight.half(), None, 1e-5)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        ops.add_layer_norm(x, torch.randn(4, 15), norm.weight, norm.bias, 1e-5)


##### Folded blocks #####


def tiny_vit(dtype=torch.float32):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises it: logits would all be 0
    for module in model.modules():  # LayerNorms of their own, not ones and zeros
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.3)
            nn.init.normal_(module.bias, 0.0, 0.3)
    return model.eval().requires_grad_(False).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bsr_folds_each_encoder_block_and_the_model_gives_the_same_logits(dtype):
    dense = tiny_vit(dtype)
    converted = copy.deepcopy(dense)
    result = blocksparse.apply_bsr(converted, 16, min_sparsity=0.0, kernel="fused")
    assert result.folded_blocks == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert all(type(block) is residual_norm.FoldedEncoderBlock for block in converted.encoder.layers)
    assert "folded the residual add and LayerNorm of 2 transformer blocks" in str(result)
    keys = list(converted.state_dict())
    x = torch.randn(3, 3, 32, 32).to(dtype)
    with torch.inference_mode():
        expected = dense.double()(x.double())
        torch.testing.assert_close(converted(x).double(), expected, **TOL[dtype])
        residual_norm.unfold(converted)
        assert all(type(block) is EncoderBlock for block in converted.encoder.layers)
        assert list(converted.state_dict()) == keys, "the same children under the same names"
        torch.testing.assert_close(converted(x).double(), expected, **TOL[dtype])


def test_a_run_of_folded_blocks_fuses_each_last_add_with_the_next_norm_and_each_block_still_runs_alone():
    model = tiny_vit()
    blocksparse.apply_bsr(model, 16, min_sparsity=0.0, kernel="fused")
    assert type(model.encoder.layers) is residual_norm.FoldedBlocks
    x = torch.randn(2, 3, 32, 32)
    with torch.profiler.profile() as profile, torch.inference_mode():
        model(x)
    names = [event.name for event in profile.events()]
    # Two blocks: the first norm, then per block its add + second norm, and once between them add + next norm.
    assert names.count("superblock::layer_norm") == 1 and names.count("superblock::add_layer_norm") == 3, names
    tokens = torch.randn(2, 5, 64)
    with torch.inference_mode():
        one_by_one = model.encoder.layers[1](model.encoder.layers[0](tokens))
        torch.testing.assert_close(model.encoder.layers(tokens), one_by_one)
    residual_norm.unfold(model)
    assert type(model.encoder.layers) is nn.Sequential


def test_apply_bsr_keeps_the_blocks_where_aten_measured_faster(monkeypatch):
    monkeypatch.setattr(residual_norm, "kernel_is_faster", lambda width, dtype: False)
    model = tiny_vit()
    result = blocksparse.apply_bsr(model, 16, min_sparsity=0.0, kernel="auto")
    assert result.folded_blocks == [] and all(type(b) is EncoderBlock for b in model.encoder.layers)
    model = tiny_vit()
    assert blocksparse.apply_bsr(model, 16, min_sparsity=0.0, kernel="bmm").folded_blocks == []


def test_without_the_extension_no_block_is_folded_and_the_reason_says_why(monkeypatch):
    monkeypatch.setattr(blocksparse_fused, "available", lambda: False)
    monkeypatch.setattr(blocksparse_fused, "unavailable_reason", lambda: "no compiler")
    model = tiny_vit()
    assert residual_norm.fold_reason(model.encoder.layers[0]) == "the C++ extension is unavailable (no compiler)"
    assert blocksparse.apply_bsr(model, 16, min_sparsity=0.0, kernel="auto").folded_blocks == []


def test_kernel_is_faster_measures_once_per_width_and_dtype():
    first = residual_norm.kernel_is_faster(64, torch.float32)
    assert isinstance(first, bool) and (64, torch.float32) in residual_norm._state["faster"]
    assert residual_norm.kernel_is_faster(64, torch.float32) is first


def test_a_folded_model_moved_to_a_dtype_the_ops_do_not_take_runs_atens_ops():
    dense = tiny_vit()
    converted = copy.deepcopy(dense)
    blocksparse.apply_bsr(converted, 16, min_sparsity=0.0, kernel="fused")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.profiler.profile() as profile:
        got = converted.to(torch.float64)(x.double())
    assert not any(event.name.startswith("superblock::add_layer_norm") for event in profile.events())
    with torch.inference_mode():
        torch.testing.assert_close(got, dense.double()(x.double()))


def test_a_folded_block_in_training_gives_the_blocks_gradients():
    torch.manual_seed(0)
    block = EncoderBlock(2, 32, 64, dropout=0.0, attention_dropout=0.0, norm_layer=nn.LayerNorm)
    for norm in (block.ln_1, block.ln_2):
        nn.init.normal_(norm.weight, 1.0, 0.3)
    folded = residual_norm.FoldedEncoderBlock(copy.deepcopy(block))
    x = torch.randn(2, 5, 32, requires_grad=True)
    grads = []
    for module in (block, folded):
        x.grad = None
        module(x).square().sum().backward()
        grads.append((x.grad.clone(), module.ln_2.weight.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


def test_compile_keeps_the_ops_and_export_exports_them():
    model = tiny_vit()
    blocksparse.apply_bsr(model, 16, min_sparsity=0.0, kernel="fused")
    block = model.encoder.layers  # FoldedBlocks: two folded blocks, chained
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        expected = block(x)
        torch.testing.assert_close(torch.compile(block, backend="inductor", fullgraph=True)(x), expected)
    exported = torch.export.export(block, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"superblock.add_layer_norm.default", "superblock.layer_norm.default"} <= targets, targets
    with torch.inference_mode():
        torch.testing.assert_close(exported.module()(x), expected)


def test_timm_blocks_are_folded_and_give_the_same_logits():
    pytest.importorskip("timm")
    model, converted, result = tiny_deit(depth=2)
    assert result.folded_blocks == ["blocks.0", "blocks.1"]
    assert all(type(block) is residual_norm.FoldedTimmBlock for block in converted.blocks)
    assert type(converted.blocks) is residual_norm.FoldedBlocks
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4)
        residual_norm.unfold(converted)
        assert all(type(block) is type(model.blocks[0]) for block in converted.blocks)
        torch.testing.assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4)


def test_the_portable_loops_match_too_where_avx512_is_hidden():
    # SUPERBLOCK_HIDE_ISA=avx512 makes the ops (and the fused MLP's activation) take the loops a CPU without AVX-512
    # runs; each error printed is against float64, relative to the largest value.
    script = """
import copy, torch
from torch import nn
import blocksparse, blocksparse_fused
blocksparse_fused.require()
ops = torch.ops.superblock
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    worst = 0.0
    for width in (7, 33, 768):
        norm = nn.LayerNorm(width).to(dtype).requires_grad_(False)
        norm.weight.normal_(generator=gen), norm.bias.normal_(generator=gen)
        x, r = (torch.randn(5, width, generator=gen).to(dtype) for _ in range(2))
        total, normed = ops.add_layer_norm(x, r, norm.weight, norm.bias, norm.eps)
        assert torch.equal(total, x + r)
        expected = nn.functional.layer_norm(total.double(), (width,), norm.weight.double(), norm.bias.double(), 1e-5)
        for got in (normed, ops.layer_norm(total, norm.weight, norm.bias, norm.eps)):
            worst = max(worst, ((got.double() - expected).abs().max() / expected.abs().max()).item())
    print("norm_" + str(dtype)[6:], worst)
mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval().requires_grad_(False)
mlp[0].bias.normal_(generator=gen)
mlp = mlp.to(torch.bfloat16)
fused = copy.deepcopy(mlp)
blocksparse.apply_bsr(fused, 16, min_sparsity=0.0, kernel="fused")
x = torch.randn(9, 64, generator=gen).to(torch.bfloat16)
expected = copy.deepcopy(mlp).double()(x.double())
print("mlp_bfloat16", ((fused(x).double() - expected).abs().max() / expected.abs().max()).item())
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", SUPERBLOCK_HIDE_ISA="avx512")
    env.pop(blocksparse_fused.DISABLE_VARIABLE, None)
    printed = printed_by(script, env)
    assert float(printed["norm_float32"]) < 1e-5 and float(printed["norm_bfloat16"]) < 1e-2, printed
    assert float(printed["mlp_bfloat16"]) < 2e-2, printed


def test_blocks_the_ops_cannot_take_stay_as_they_are_and_a_mixed_run_is_not_chained():
    torch.manual_seed(0)
    no_affine = EncoderBlock(2, 32, 64, 0.0, 0.0, lambda width: nn.LayerNorm(width, elementwise_affine=False)).eval()
    assert residual_norm.fold_reason(no_affine, measure=False) == \
        "the ops take a LayerNorm over the last dimension with a weight"
    plain = EncoderBlock(2, 32, 64, 0.0, 0.0, nn.LayerNorm).eval()
    model = nn.Sequential(nn.Sequential(copy.deepcopy(plain), no_affine), nn.Sequential(plain, copy.deepcopy(plain)))
    model.eval().requires_grad_(False)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        expected = model(x)
    result = blocksparse.apply_bsr(model, 16, min_sparsity=1.0, kernel="fused")
    assert result.folded_blocks == ["0.0", "1.0", "1.1"]
    assert type(model[0]) is nn.Sequential and type(model[0][1]) is EncoderBlock, "a run with an unfolded block"
    assert type(model[1]) is residual_norm.FoldedBlocks
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected)
