"""The fused MLP kernel (BlockSparseMLP): a Linear -> activation -> Linear pair in one op, against float64.

Where the extension cannot be built here, apply_bsr must leave every pair as two layers, and these tests check that.
"""
import copy

import pytest
import torch
from torch import nn

import blocksparse
import blocksparse_fused
import blocksparse_int8
from blocksparse import BlockSparseLinear, apply_bsr, block_sparse_layers
from blocksparse_mlp import BlockSparseMLP
from helpers import at_one_and_two_threads
from supermask import sparsity_report
from test_blocksparse import random_keep
from test_blocksparse_fused import FUSED, TOL

ACTIVATIONS = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
               "identity": nn.Dropout(0.1)}


def sparse_mlp(dim, hidden, blocksize, activation, *, bias1=True, bias2=True, dtype=torch.float32, seed=0):
    """Sequential(Linear, activation, Linear), 70% of the blocks pruned at random, in eval mode.

    Hidden block 0 gets no kept block in the first Linear (a constant unit, act(bias)), hidden block 1 none in the
    second (a unit nobody reads), and the second Linear's block-row 0 is empty.
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, hidden, bias=bias1), ACTIVATIONS[activation], nn.Linear(hidden, dim, bias=bias2))
    keep1 = random_keep(hidden, dim, blocksize, 0.7, seed=seed)
    keep1[0], keep1[1] = False, True
    keep2 = random_keep(dim, hidden, blocksize, 0.7, seed=seed + 1)
    keep2[:, 1], keep2[:, 0], keep2[0] = False, True, False
    with torch.no_grad():
        for linear, keep in ((model[0], keep1), (model[2], keep2)):
            # nn.Linear's own scale, so the outputs are of order 1 and the tolerances mean what they say.
            bound = linear.in_features ** -0.5
            linear.weight.uniform_(-bound, bound, generator=gen).mul_(keep.repeat_interleave(blocksize, 0)
                                                                      .repeat_interleave(blocksize, 1))
            if linear.bias is not None:
                linear.bias.normal_(generator=gen)
    return model.eval().requires_grad_(False).to(dtype)


def fuse(model, blocksize, kernel="fused"):
    """A converted copy of ``model`` and apply_bsr's result; checks the pair was fused exactly when it could be."""
    converted = copy.deepcopy(model)
    result = apply_bsr(converted, blocksize, min_sparsity=0.3, kernel=kernel if FUSED else "auto")
    if FUSED and kernel == "fused":
        assert result.fused_mlps == ["0"] and isinstance(converted[0], BlockSparseMLP)
        assert all(isinstance(module, nn.Identity) for module in list(converted)[1:])
    elif not FUSED:
        assert result.fused_mlps == [] and isinstance(converted[0], BlockSparseLinear)
    return converted, result


def float64_reference(model, x):
    return copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 7, 197, 3000])
def test_fused_mlp_matches_float64_reference(dtype, blocksize, tokens):
    model = sparse_mlp(128, 256, blocksize, "gelu", dtype=dtype, seed=blocksize + tokens)
    fused, _ = fuse(model, blocksize)
    x = torch.randn(tokens, 128, dtype=dtype)
    with torch.inference_mode():
        expected = float64_reference(model, x)
        torch.testing.assert_close(fused(x).double(), expected, **TOL[dtype])


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias1,bias2", [(True, True), (True, False), (False, False)])
def test_fused_mlp_takes_each_activation_bias_leading_shape_and_strided_input(activation, bias1, bias2):
    # (True, False): the constant hidden block cannot be folded into a bias, so the kernel computes act(bias1).
    model = sparse_mlp(64, 192, 16, activation, bias1=bias1, bias2=bias2, seed=3)
    fused, _ = fuse(model, 16)
    wide = torch.randn(2, 5, 128)
    x = wide[..., ::2]  # rows of stride 2: not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(fused(x).double(), float64_reference(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias1", [True, False])
def test_fused_bfloat16_mlp_activates_in_its_epilogue_like_the_layers(activation, bias1):
    # bfloat16 on AVX-512 runs the bias and activation in registers as the first Linear's outputs are stored
    # (avx512_float.h), empty hidden block included; elsewhere ATen's activation runs on the buffer.
    model = sparse_mlp(64, 192, 16, activation, bias1=bias1, dtype=torch.bfloat16, seed=4)
    fused, _ = fuse(model, 16)
    x = torch.randn(2, 37, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x).double(), float64_reference(model, x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_mlps_gelu_is_within_rounding_of_nn_gelu(dtype):
    # Identity weights in both Linears: the op's output is its GELU of each input, rounded to the dtype.
    if not FUSED:
        return
    identity = torch.eye(64, dtype=dtype)
    blocks = blocksparse_fused.pack(identity.t().contiguous().unsqueeze(0))
    layer = (blocks, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), None)
    x = torch.linspace(-12, 12, 64 * 300, dtype=torch.float64).to(dtype).view(-1, 64)
    y = blocksparse_fused.fused_mlp(x, layer, layer, 64, "gelu", 64).double()
    expected = nn.functional.gelu(x.double())
    # The GELU's own error (bfloat16: the polynomial's 8.1e-5 max(1, |x|); float32: erf within 1.5e-7, avx512_float.h),
    # then rounding to the dtype (half a unit in the last place: 2^-8 of the value in bfloat16, 2^-24 in float32).
    gelu_error = (8.1e-5 if dtype == torch.bfloat16 else 1e-6) * x.double().abs().clamp(min=1)
    allowed = (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24) * (expected.abs() + gelu_error) + gelu_error
    worst = ((y - expected).abs() / allowed).max().item()
    assert worst <= 1, f"GELU off by {worst:.2f}x what {dtype} allows"


def test_every_tile_setting_of_the_fused_mlp_gives_the_same_result():
    model = sparse_mlp(128, 512, 32, "gelu", seed=7)
    fused, _ = fuse(model, 32)
    if not FUSED:
        return
    x = torch.randn(300, 128)
    with torch.inference_mode():
        expected = float64_reference(model, x)
        for tile in blocksparse_fused.TILE_CANDIDATES:
            for products in blocksparse_fused.product_kinds(torch.float32, 32):
                fused[0].tile_tokens, fused[0].products = tile, products
                torch.testing.assert_close(fused(x).double(), expected, atol=1e-4, rtol=1e-4,
                                           msg=f"tile_tokens={tile}, products={products}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_is_bitwise_identical_at_one_and_two_threads(dtype):
    model = sparse_mlp(128, 512, 32, "gelu", dtype=dtype, seed=8)
    fused, _ = fuse(model, 32)
    x = torch.randn(333, 128, dtype=dtype)
    with torch.inference_mode():
        for products in blocksparse_fused.product_kinds(dtype, 32) if FUSED else ("blocks",):
            if FUSED:
                fused[0].tile_tokens, fused[0].products = 32, products
            one, two = at_one_and_two_threads(lambda: fused(x))
            assert torch.equal(one, two)


def test_fused_mlp_in_training_mode_runs_its_three_parts():
    mlp = sparse_mlp(64, 128, 16, "gelu", seed=9)
    model = nn.Sequential(mlp[0], mlp[1], nn.Dropout(0.5), mlp[2]).eval()
    fused, _ = fuse(model, 16)
    if not FUSED:
        return
    mlp = fused[0]
    x = torch.randn(6, 64)
    with torch.no_grad():
        inference = fused(x)
        mlp.train()
        torch.manual_seed(0)
        training = fused(x)
        torch.manual_seed(0)
        by_hand = mlp.fc2(mlp.between(mlp.fc1(x)))
    torch.testing.assert_close(training, by_hand)
    assert not torch.allclose(training, inference), "Dropout(0.5) acts in training mode"


def test_a_pair_with_an_activation_the_kernel_lacks_stays_two_layers():
    model = sparse_mlp(64, 128, 16, "gelu", seed=10)
    model[1] = nn.SiLU().eval()
    converted = copy.deepcopy(model)
    result = apply_bsr(converted, 16, min_sparsity=0.3, kernel="fused" if FUSED else "auto")
    assert result.fused_mlps == [] and len(result.mlp_pairs) == 1
    assert isinstance(converted[0], BlockSparseLinear) and isinstance(converted[2], BlockSparseLinear)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused_is_faster", [True, False])
def test_auto_fuses_a_pair_only_where_that_measures_faster(fused_is_faster, monkeypatch):
    if not FUSED:
        return
    model = sparse_mlp(64, 128, 16, "gelu", seed=11)
    first = BlockSparseLinear.from_dense(model[0], 16, kernel="fused")
    second = BlockSparseLinear.from_dense(model[2], 16, kernel="fused")
    fused_seconds = 1.0 if fused_is_faster else 3.0
    monkeypatch.setattr(blocksparse_fused, "fastest_setting",
                        lambda run, tokens, variants: ((64, "blocks"), fused_seconds))
    monkeypatch.setattr(blocksparse_fused, "fastest_setting_against",  # the two layers in the same rounds: 2 s
                        lambda run, tokens, variants, baseline: (((64, "blocks"), fused_seconds), 2.0))
    monkeypatch.setattr(blocksparse, "_measured_mlps", {})
    chosen = blocksparse.choose_mlp_fusion(first, [model[1]], second)
    assert chosen == ((64, "blocks") if fused_is_faster else None)
    assert blocksparse.choose_mlp_fusion(first, [model[1]], second, always=True) == (64, "blocks")


def test_fused_mlp_compiles_as_one_node_and_exports():
    model = sparse_mlp(64, 128, 16, "gelu", seed=12)
    fused, _ = fuse(model, 16)
    if not FUSED:
        return
    x = torch.randn(2, 7, 64)
    with torch.inference_mode():
        expected = float64_reference(model, x)
        compiled = torch.compile(fused, fullgraph=True)  # inductor; fullgraph: no graph break around the op
        torch.testing.assert_close(compiled(x).double(), expected, atol=1e-5, rtol=1e-5)
    exported = torch.export.export(fused, (x,))
    ops = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any("superblock.fused_bsr_mlp" in op for op in ops), ops
    assert not any("superblock.fused_bsr_linear" in op for op in ops), "the pair must be one op, not two"
    x2 = torch.randn(2, 7, 64)
    with torch.inference_mode():
        torch.testing.assert_close(exported.module()(x2).double(), float64_reference(model, x2), atol=1e-5,
                                   rtol=1e-5)


def test_fused_mlp_follows_a_dtype_change():
    model = sparse_mlp(64, 128, 16, "gelu", seed=13)
    fused, _ = fuse(model, 16)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        expected = float64_reference(model, x)
        fused.to(torch.bfloat16)
        torch.testing.assert_close(fused(x.bfloat16()).double(), expected, **TOL[torch.bfloat16])


def test_block_sparse_layers_lists_a_fused_pair_under_its_linears_names():
    model = nn.Sequential(sparse_mlp(64, 128, 16, "gelu", seed=14)).eval()  # the pair is "0.0" and "0.2"
    converted = copy.deepcopy(model)
    apply_bsr(converted, 16, min_sparsity=0.3, kernel="fused" if FUSED else "auto")
    layers = block_sparse_layers(converted)
    assert set(layers) == {"0.0", "0.2"}
    assert layers["0.0"].out_features == 128 and layers["0.2"].in_features == 128
    assert {row.name for row in sparsity_report(converted).rows} == {"0.0", "0.2"}


def test_the_fused_mlp_op_refuses_an_unknown_activation_and_layers_that_do_not_chain():
    if not FUSED:
        return
    model = sparse_mlp(64, 128, 16, "gelu", seed=15)
    mlp = fuse(model, 16)[0][0]
    with pytest.raises(RuntimeError, match="activation must be gelu, gelu_tanh, relu or identity, not swish"):
        blocksparse_fused.fused_mlp(torch.randn(2, 64), mlp.fc1.fused_operands(), mlp.fc2.fused_operands(), 64,
                                    "swish", 32)
    narrow = BlockSparseLinear.from_dense(sparse_mlp(64, 64, 16, "gelu", seed=17)[0], 16, kernel="fused")
    with pytest.raises(RuntimeError, match="row_offsets and cols do not index .* blocks of a 64x64 weight"):
        blocksparse_fused.fused_mlp(torch.randn(2, 64), narrow.fused_operands(), mlp.fc2.fused_operands(), 64,
                                    "gelu", 32)


def test_fused_mlp_takes_no_tokens_and_an_all_zero_second_layer():
    model = sparse_mlp(64, 128, 16, "gelu", seed=16)
    model[2].weight.zero_()  # no hidden unit is read: the output is the second bias, whatever the input
    fused, result = fuse(model, 16)
    assert "8 of 8 hidden blocks unused" in result.mlp_pairs[0][2]
    with torch.inference_mode():
        assert fused(torch.randn(0, 64)).shape == (0, 64)
        x = torch.randn(5, 64)
        torch.testing.assert_close(fused(x), model[2].bias.expand(5, 64))


@pytest.mark.parametrize("int8_is_faster", [True, False])
def test_int8_auto_weighs_an_mlp_pair_against_its_float_form_as_a_whole(int8_is_faster, monkeypatch):
    # apply_bsr(quantize="int8", kernel="auto") makes both Linears of a pair int8, then keeps the int8 pair (fused
    # where faster) or its float form, whichever runs the whole MLP faster on the sample.
    model = sparse_mlp(64, 128, 16, "gelu", seed=13)
    everything = dict(quantize_filter_fn=lambda module, fqn: True)  # the second Linear is this model's last
    if not blocksparse_int8.isas(16):
        with pytest.raises(RuntimeError, match="AVX-512 VNNI"):
            apply_bsr(model, 16, min_sparsity=0.3, quantize="int8", **everything)
        return
    real = blocksparse._mlp_choice

    def timed(fc1, between, fc2, always):
        setting, _ = real(fc1, between, fc2, always)
        int8 = isinstance(fc1, blocksparse_int8.Int8BlockSparseLinear)
        return setting, 1.0 if int8 == int8_is_faster else 2.0

    monkeypatch.setattr(blocksparse, "_mlp_choice", timed)
    converted = copy.deepcopy(model)
    result = apply_bsr(converted, 16, min_sparsity=0.3, quantize="int8", **everything)
    layers = block_sparse_layers(converted)
    kinds = {type(layers[name]) for name in ("0", "2")}
    assert kinds == {blocksparse_int8.Int8BlockSparseLinear if int8_is_faster else BlockSparseLinear}
    assert sorted(name for name, _, _ in result.converted) == ["0", "2"]
    assert all(kernel.startswith("int8/") == int8_is_faster for _, kernel, _ in result.converted)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=0.05, atol=0.05)


def test_a_pair_with_a_layer_left_nn_linear_is_not_fused():
    model = sparse_mlp(64, 128, 16, "gelu", seed=13)
    fc1 = BlockSparseLinear.from_dense(model[0], 16, kernel="fused" if FUSED else "bmm")
    assert blocksparse.choose_mlp_fusion(fc1, [model[1]], model[2]) is None  # was an AttributeError


def test_the_modules_a_fused_mlp_leaves_behind_are_in_eval_mode_so_apply_bsr_runs_again():
    model = sparse_mlp(64, 128, 16, "gelu", seed=14)
    converted, result = fuse(model, 16)
    assert not any(module.training for module in converted.modules())
    apply_bsr(converted, 16, min_sparsity=0.3)  # a second call found the new nn.Identity in training mode
