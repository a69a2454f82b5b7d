"""The int8 (W8A8) ops and Int8BlockSparseLinear against their pure-PyTorch reference, bit for bit, and
apply_bsr(quantize="int8").

Every case of the ops runs on each instruction set they have ("amx", "vnni") and is skipped only where this CPU (or a
missing C++ extension) cannot run it. The reference (blocksparse_int8_reference) is computed from the dense float
weight, not from the layer's packed blocks, so a packing bug shows too.
"""
import copy
import os

import pytest
import torch
from torch import nn

import blocksparse
import blocksparse_fused
import blocksparse_int8
import blocksparse_int8_reference as int8_reference
import residual_norm
from attention import ProjectedAttention
from blocksparse import BlockSparseLinear, apply_bsr
from blocksparse_int8 import Int8BlockSparseLinear
from blocksparse_mlp import BlockSparseMLP
from helpers import at_one_and_two_threads, tiny_vit
from test_blocksparse_fused import printed_by, sparse_linear
from test_blocksparse_mlp import sparse_mlp

ISAS = blocksparse_int8.ISAS
DTYPES = (torch.float32, torch.bfloat16)  # the ops' input dtypes
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "identity")


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def need(isa, blocksize=16):
    """Skip unless the int8 ops run ``isa`` here for blocks of ``blocksize``; fail where the CPU has it but the ops
    refuse it (AMX failing its check against the reference at first use)."""
    if isa in blocksparse_int8.isas(blocksize):
        return
    name = blocksparse_int8.INSTRUCTION_SETS[isa]
    if (blocksparse_fused.available() and isa in torch.ops.superblock.int8_isas()
            and isa not in blocksparse_int8.hidden_isas()):
        pytest.fail(f"this CPU has {name}, but the int8 ops gave other results than the reference with it")
    why = blocksparse_int8.unavailable_reason(blocksize) or "this CPU lacks it"
    pytest.skip(f"the int8 ops cannot run {name} here: {why}")


def need_any(blocksize=16):
    """Skip unless the int8 ops run here at all."""
    reason = blocksparse_int8.unavailable_reason(blocksize)
    if reason is not None:
        pytest.skip(f"the int8 ops cannot run here: {reason}")


def quantized(linear):
    """(int8 weight, float32 channel scales, float32 bias) of a float Linear, for the reference."""
    weight_q, scale = int8_reference.quantize_weight(linear.weight)
    return weight_q, scale, None if linear.bias is None else linear.bias.detach().float()


def operands(linear, blocksize):
    """What the int8 ops read for ``linear``, packed as Int8BlockSparseLinear packs it."""
    return Int8BlockSparseLinear.from_dense(linear, blocksize, kernel="bmm").fused_operands()


def reference_linear(linear, x):
    """The W8A8 reference of ``linear`` on ``x`` of any leading shape, in x's dtype."""
    y = int8_reference.int8_linear(x.reshape(-1, linear.in_features), *quantized(linear))
    return y.reshape(*x.shape[:-1], linear.out_features)


def int8_layer(linear, blocksize, isa):
    """Int8BlockSparseLinear.from_dense(kernel="fused") with its instruction set forced to ``isa``."""
    need(isa, blocksize)
    layer = Int8BlockSparseLinear.from_dense(linear, blocksize)
    layer.isa = isa
    return layer


def relative_error(actual, expected):
    """Relative L2 distance, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


##### The linear op #####


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("blocksize", [16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 7, 197, 3000])
@pytest.mark.parametrize("in_features,out_features,bias", [(128, 320, True), (320, 64, False)])
def test_int8_linear_op_matches_the_reference_bitwise(isa, dtype, blocksize, tokens, in_features, out_features, bias):
    need(isa, blocksize)
    empty_rows = (0,) if out_features > blocksize else ()  # an empty block-row, where one more is left
    linear = sparse_linear(in_features, out_features, blocksize, 0.5, bias=bias, seed=blocksize + tokens,
                           empty_rows=empty_rows)
    x = torch.randn(tokens, in_features, dtype=dtype)
    y = blocksparse_int8.int8_linear(x, operands(linear, blocksize), out_features, 64, isa)
    assert y.dtype == dtype and y.shape == (tokens, out_features)
    assert torch.equal(y, int8_reference.int8_linear(x, *quantized(linear)))


@pytest.mark.parametrize("isa", ISAS)
def test_every_token_tile_of_the_int8_linear_op_gives_the_same_bits(isa):
    need(isa, 32)
    linear = sparse_linear(128, 192, 32, 0.5, seed=1)
    x = torch.randn(301, 128)
    expected = int8_reference.int8_linear(x, *quantized(linear))
    for tile in (1, 5, *blocksparse_fused.TILE_CANDIDATES, 1000):
        y = blocksparse_int8.int8_linear(x, operands(linear, 32), 192, tile, isa)
        assert torch.equal(y, expected), f"tile_tokens={tile}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_op_with_an_all_zero_weight_gives_the_bias(isa, bias):
    need(isa)
    linear = sparse_linear(64, 128, 16, 1.0, bias=bias, seed=2)
    ops = operands(linear, 16)
    assert ops[0].shape[0] == 0, "no block is stored"
    y = blocksparse_int8.int8_linear(torch.randn(5, 64), ops, 128, 32, isa)
    assert torch.equal(y, linear.bias.expand(5, -1) if bias else torch.zeros(5, 128))
    assert blocksparse_int8.int8_linear(torch.randn(0, 64), ops, 128, 32, isa).shape == (0, 128)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int8_linear_op_takes_zero_huge_and_non_finite_tokens(isa, dtype):
    need(isa)
    linear = sparse_linear(128, 64, 16, 0.5, seed=3)
    x = torch.randn(7, 128, dtype=dtype)
    x[1] = 0  # scale 0: no division by it, the output is the bias
    x[2, 7] = 1e30  # every other value of the row quantizes to 0
    x[3, 9], x[4, 100], x[5, 0] = float("inf"), float("nan"), float("-inf")
    y = blocksparse_int8.int8_linear(x, operands(linear, 16), 64, 32, isa)
    expected = int8_reference.int8_linear(x, *quantized(linear))
    finite = [0, 1, 2, 6]
    assert torch.equal(y[finite], expected[finite]), "a token's scale must not reach other tokens"
    assert torch.equal(y[1], linear.bias.to(dtype)), "a token of zeros gives the bias exactly"
    assert y[2].isfinite().all() and y[2].abs().max() > 1e20
    assert y[3:6].isnan().all() and expected[3:6].isnan().all(), "a token holding inf or NaN gives NaN"


##### The module #####


@pytest.mark.parametrize("isa", ISAS)
def test_int8_layer_takes_leading_shapes_and_strided_input(isa):
    linear = sparse_linear(128, 96, 32, 0.5, seed=4)
    layer = int8_layer(linear, 32, isa)
    inputs = [torch.randn(2, 5, 128), torch.randn(2, 5, 256)[..., ::2], torch.randn(128, 9)[:, :7].t(),
              torch.randn(128)]
    for x in inputs:
        y = layer(x)
        assert y.shape == x.shape[:-1] + (96,)
        assert torch.equal(y, reference_linear(linear, x)), f"input of shape {tuple(x.shape)}, strides {x.stride()}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=dtype_id)
def test_int8_layer_returns_other_float_dtypes_computed_in_float32(isa, dtype):
    linear = sparse_linear(64, 64, 16, 0.5, seed=5)
    layer = int8_layer(linear, 16, isa)
    x = torch.randn(9, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert torch.equal(y, reference_linear(linear, x.float()).to(dtype))


@pytest.mark.parametrize("isa", ISAS)
def test_int8_layer_keeps_float32_scales_and_bias_through_a_dtype_cast(isa):
    linear = sparse_linear(64, 64, 16, 0.5, seed=6)
    layer = int8_layer(linear, 16, isa).to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert layer.block_values.dtype == torch.int8 and layer.compensation.dtype == torch.int32
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), reference_linear(linear, x))


@pytest.mark.parametrize("isa", ISAS)
def test_int8_layer_state_dict_round_trip_gives_the_same_outputs(isa):
    first = sparse_linear(128, 64, 16, 0.5, seed=7)
    second = copy.deepcopy(first)
    with torch.no_grad():  # the same blocks, other values: other int8 weights and compensation
        second.weight.mul_(torch.rand(second.weight.shape, generator=torch.Generator().manual_seed(7)) + 0.5)
        second.bias.mul_(-1)
    saved = int8_layer(first, 16, isa).state_dict()
    assert not {"packed_values", "compensation"} & set(saved), "derived buffers are not saved"
    fresh = int8_layer(second, 16, isa)
    fresh.load_state_dict(saved)
    x = torch.randn(11, 128)
    assert torch.equal(fresh(x), reference_linear(first, x))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int8_layer_fused_equals_its_bmm_reference(isa, dtype):
    linear = sparse_linear(128, 256, 32, 0.6, seed=8)
    x = torch.randn(50, 128, dtype=dtype)
    bmm = Int8BlockSparseLinear.from_dense(linear, 32, kernel="bmm")
    assert torch.equal(int8_layer(linear, 32, isa)(x), bmm(x))


@pytest.mark.parametrize("kernel", ["auto", "fused", "bmm"])
def test_block_sparse_linear_from_dense_with_quantize_builds_the_int8_layer(kernel):
    linear = sparse_linear(128, 256, 32, 0.6, seed=8)
    if kernel != "bmm":
        need_any(32)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel=kernel, quantize="int8")
    assert isinstance(layer, Int8BlockSparseLinear) and layer.kernel == ("bmm" if kernel == "bmm" else "fused")
    x = torch.randn(9, 128)
    assert torch.equal(layer(x), Int8BlockSparseLinear.from_dense(linear, 32, kernel="bmm")(x))
    with pytest.raises(ValueError, match="quantize='int8' runs kernel"):
        BlockSparseLinear.from_dense(linear, 32, kernel="dense", quantize="int8")
    with pytest.raises(ValueError, match="unknown quantize"):
        BlockSparseLinear.from_dense(linear, 32, quantize="int4")


@pytest.mark.parametrize("isa", ISAS)
def test_int8_layer_is_within_a_few_percent_of_the_float_linear(isa):
    linear = sparse_linear(256, 128, 32, 0.5, seed=9)
    x = torch.randn(64, 256)
    error = relative_error(int8_layer(linear, 32, isa)(x), linear(x))
    assert error < 0.03, f"relative L2 error {error:.4f}"


##### The MLP op #####


def int8_mlp_reference(model, x, activation, blocksize):
    return int8_reference.int8_mlp(x, quantized(model[0]), quantized(model[2]), activation, blocksize)


def int8_mlp_and_reference(isa, dtype, blocksize, activation):
    """(the int8 MLP op's output, the reference's) on 197 tokens of ``dtype``, tiles of 32 tokens."""
    need(isa, blocksize)
    # Hidden block 0 is constant (no kept block in the first Linear), hidden block 1 unread by the second.
    model = sparse_mlp(128, 256, blocksize, activation, seed=blocksize)
    first, second = operands(model[0], blocksize), operands(model[2], blocksize)
    assert len(set(second[2].tolist())) < 256 // blocksize, "the second Linear reads only some hidden blocks"
    x = torch.randn(197, 128, dtype=dtype)
    y = blocksparse_int8.int8_mlp(x, first, second, 128, activation, 32, isa)
    assert y.dtype == dtype and y.shape == (197, 128)
    return y, int8_mlp_reference(model, x, activation, blocksize)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("blocksize", [16, 32, 64])
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_int8_mlp_op_matches_the_reference_bitwise(isa, dtype, blocksize, activation):
    y, expected = int8_mlp_and_reference(isa, dtype, blocksize, activation)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("blocksize", [16, 32, 64])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_int8_mlp_op_with_gelu_is_within_rounding_of_the_reference(isa, dtype, blocksize, activation):
    # The kernel's GELU is a polynomial within 6e-5 of nn.GELU's: a hidden value near a rounding boundary of its
    # int8 step (amax / 127) may round the other way, so the outputs differ by a few such steps, not bit for bit.
    y, expected = int8_mlp_and_reference(isa, dtype, blocksize, activation)
    error = relative_error(y, expected)
    assert error < 3e-3, f"relative L2 error {error:.2e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_int8_mlp_op_is_close_to_its_two_int8_layers(isa, activation):
    # The two layers quantize all hidden units per token, the op only those the second Linear reads.
    need(isa)
    model = sparse_mlp(64, 192, 16, activation, seed=10)
    x = torch.randn(40, 64)
    y = blocksparse_int8.int8_mlp(x, operands(model[0], 16), operands(model[2], 16), 64, activation, 32, isa)
    hidden = int8_reference.ACTIVATIONS[activation](reference_linear(model[0], x))
    error = relative_error(y, reference_linear(model[2], hidden))
    assert error < 0.02, f"relative L2 error {error:.4f}"


@pytest.mark.parametrize("isa", ISAS)
def test_int8_ops_are_bitwise_identical_at_one_and_two_threads(isa):
    need(isa, 32)
    linear = sparse_linear(256, 512, 32, 0.8, seed=11)
    model = sparse_mlp(128, 512, 32, "gelu", seed=11)
    x, x_mlp = torch.randn(333, 256), torch.randn(333, 128)
    ops, first, second = operands(linear, 32), operands(model[0], 32), operands(model[2], 32)
    one, two = at_one_and_two_threads(lambda: blocksparse_int8.int8_linear(x, ops, 512, 32, isa))
    assert torch.equal(one, two), "linear"
    one, two = at_one_and_two_threads(lambda: blocksparse_int8.int8_mlp(x_mlp, first, second, 128, "gelu", 32, isa))
    assert torch.equal(one, two), "MLP"


##### Bad operands #####


@pytest.mark.parametrize("isa", ISAS)
def test_int8_linear_op_refuses_bad_operands(isa):
    need(isa)
    blocks, crow, col, scale, compensation, bias = operands(sparse_linear(64, 32, 16, 0.5, seed=12), 16)
    x = torch.randn(3, 64)
    bad_col, bad_crow = col.clone(), crow.clone()
    bad_col[0] = 4  # the input has 4 column blocks: 0..3
    bad_crow[-1] += 1  # one block more than there are
    cases = [
        ((x.half(), blocks, crow, col, scale, compensation, bias), "float32 or bfloat16 input expected"),
        ((x[0], blocks, crow, col, scale, compensation, bias), "expected a 2-D input"),
        ((x, blocks.float(), crow, col, scale, compensation, bias), "blocks must be contiguous int8"),
        ((x, blocks, crow.long(), col, scale, compensation, bias), "row_offsets and cols must be contiguous int32"),
        ((x, blocks, crow, bad_col, scale, compensation, bias), "row_offsets and cols do not index"),
        ((x, blocks, bad_crow, col, scale, compensation, bias), "row_offsets and cols do not index"),
        ((x, blocks, crow, col, scale.double(), compensation, bias), "weight_scale .* and compensation"),
        ((x, blocks, crow, col, scale, compensation[:-1], bias), "weight_scale .* and compensation"),
        ((x, blocks, crow, col, scale, compensation, bias[:-1]), "bias must be float32 with one value per output"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.superblock.int8_bsr_linear(*args, 32, 32, isa)
    with pytest.raises(RuntimeError, match="do not tile 48 outputs"):
        torch.ops.superblock.int8_bsr_linear(x, blocks, crow, col, scale, compensation, bias, 48, 32, isa)
    with pytest.raises(RuntimeError, match="tile_tokens must be positive"):
        torch.ops.superblock.int8_bsr_linear(x, blocks, crow, col, scale, compensation, bias, 32, 0, isa)
    with pytest.raises(RuntimeError, match="isa must be 'vnni' or 'amx', not 'avx2'"):
        torch.ops.superblock.int8_bsr_linear(x, blocks, crow, col, scale, compensation, bias, 32, 32, "avx2")


@pytest.mark.parametrize("isa", ISAS)
def test_int8_mlp_op_refuses_an_unknown_activation_and_layers_that_do_not_chain(isa):
    need(isa, 32)
    model = sparse_mlp(64, 128, 16, "gelu", seed=13)
    first, second = operands(model[0], 16), operands(model[2], 16)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="activation must be gelu, gelu_tanh, relu or identity, not swish"):
        blocksparse_int8.int8_mlp(x, first, second, 64, "swish", 32, isa)
    narrow = operands(sparse_linear(64, 64, 16, 0.5, seed=13), 16)  # 64 hidden units; the second reads 128
    with pytest.raises(RuntimeError, match="row_offsets and cols do not index .* blocks of a 64x64 weight"):
        blocksparse_int8.int8_mlp(x, narrow, second, 64, "gelu", 32, isa)
    coarse = operands(model[2], 32)
    with pytest.raises(RuntimeError, match="both Linears must have the same block size"):
        blocksparse_int8.int8_mlp(x, first, coarse, 64, "gelu", 32, isa)


##### Instruction sets #####


def test_amx_that_failed_its_check_is_not_offered(monkeypatch):
    need("amx")
    monkeypatch.setitem(blocksparse_int8._state, "amx_exact", {16: False})
    assert "amx" not in blocksparse_int8.isas(16)


def test_hidden_instruction_sets_are_not_offered_and_unknown_names_are_refused(monkeypatch):
    need_any()
    monkeypatch.setenv(blocksparse_int8.HIDE_VARIABLE, "amx")
    assert "amx" not in blocksparse_int8.isas(16)
    monkeypatch.setenv(blocksparse_int8.HIDE_VARIABLE, "amx, avx2")
    with pytest.raises(ValueError, match="SUPERBLOCK_HIDE_ISA=amx, avx2: unknown avx2; name some of amx, vnni, avx512"):
        blocksparse_int8.isas(16)
    with pytest.raises(ValueError, match="unknown avx2"):
        apply_bsr(nn.Sequential(nn.Linear(32, 32)).eval(), 16, quantize="int8")


def test_without_vnni_and_amx_int8_says_why_and_the_bmm_reference_still_runs():
    if not blocksparse_fused.available():
        pytest.skip(f"the C++ extension is unavailable: {blocksparse_fused.unavailable_reason()}")
    script = """
import torch
from torch import nn
import blocksparse
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 16)).eval()
model.requires_grad_(False)
x = torch.randn(5, 64)
expected = model(x)
try:
    blocksparse.apply_bsr(model, 16, quantize="int8")
except RuntimeError as e:
    print("error", e)
result = blocksparse.apply_bsr(model, 16, quantize="int8", kernel="bmm")
print("kernels", " ".join(sorted({kernel for _, kernel, _ in result.converted})))
print("error_l2", ((model(x) - expected).norm() / expected.norm()).item())
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", **{blocksparse_int8.HIDE_VARIABLE: "amx,vnni"})
    env.pop(blocksparse_fused.DISABLE_VARIABLE, None)
    lines = printed_by(script, env)
    assert "needs the int8 CPU kernels" in lines["error"] and "AVX-512 VNNI" in lines["error"], lines["error"]
    assert "kernel='bmm'" in lines["error"], "the error says how to go on"
    assert lines["kernels"] == "int8/bmm"
    assert float(lines["error_l2"]) < 0.05


##### apply_bsr(quantize="int8") #####


def pruned_tiny_vit(relu=False):
    """tiny_vit with 16 classes, each MLP's Linears 5 of 8 blocks of 16 pruned (the second reads 3 of 4 hidden
    blocks), eval mode; with ``relu``, ReLU in its MLPs instead of GELU. Its attention projections and its
    classifier keep every block."""
    model = tiny_vit(num_classes=16)
    if relu:
        for layer in model.encoder.layers:
            layer.mlp[1] = nn.ReLU()
    keep1 = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 1]], dtype=torch.bool)  # 64x32: (hidden, input) blocks
    keep2 = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)  # 32x64: hidden block 1 unread
    with torch.no_grad():
        for layer in model.encoder.layers:
            for linear, keep in ((layer.mlp[0], keep1), (layer.mlp[3], keep2)):
                linear.weight.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
    return model.eval().requires_grad_(False)


def int8_vit(kernel="fused", relu=False, **kwargs):
    """(float model, a converted copy, apply_bsr's result); min_sparsity 0.6 leaves the unpruned layers dense."""
    model = pruned_tiny_vit(relu)
    converted = copy.deepcopy(model)
    result = apply_bsr(converted, 16, min_sparsity=0.6, kernel=kernel, quantize="int8", **kwargs)
    return model, converted, result


VIT_INPUT = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_int8_vit_fuses_every_mlp_quantizes_attention_and_keeps_the_classifier_float():
    need_any()
    model, converted, result = int8_vit()
    mlps = [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]
    assert result.fused_mlps == mlps
    for layer in converted.encoder.layers:
        mlp = layer.mlp[0]
        assert isinstance(mlp, BlockSparseMLP) and mlp.isa in ISAS
        assert isinstance(mlp.fc1, Int8BlockSparseLinear) and isinstance(mlp.fc2, Int8BlockSparseLinear)
        assert mlp.fc1.sparsity > 0 and mlp.fc2.sparsity > 0
        attention = layer.self_attention
        assert isinstance(attention, ProjectedAttention)
        for projection in (attention.in_proj, attention.out_proj):
            assert isinstance(projection, Int8BlockSparseLinear), type(projection).__name__
            assert projection.sparsity == 0 and projection.kernel == "fused"
    assert type(converted.heads.head) is nn.Linear, "the classifier stays float by default"
    assert [name for name, _ in result.left_dense] == ["heads.head"]
    assert {kernel for _, kernel, _ in result.converted} <= {"int8/amx", "int8/vnni"}
    with torch.inference_mode():
        error = relative_error(converted(VIT_INPUT), model(VIT_INPUT))
    assert error < 0.1, f"logits' relative L2 error {error:.4f}"


def test_int8_vit_quantizes_the_classifier_when_the_filter_says_so():
    need_any()
    model, converted, result = int8_vit(quantize_filter_fn=lambda module, fqn: True)
    assert isinstance(converted.heads.head, Int8BlockSparseLinear)
    assert result.left_dense == []
    with torch.inference_mode():
        error = relative_error(converted(VIT_INPUT), model(VIT_INPUT))
    assert error < 0.1, f"logits' relative L2 error {error:.4f}"


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "gelu"])
def test_int8_vit_with_the_bmm_kernel_matches_the_fused_one(relu):
    need_any()
    _, fused, _ = int8_vit(relu=relu)
    _, bmm, result = int8_vit(kernel="bmm", relu=relu)
    assert result.fused_mlps == [], "the reference runs the two layers in turn"
    layers = [m for m in bmm.modules() if isinstance(m, (Int8BlockSparseLinear, BlockSparseLinear, BlockSparseMLP))]
    assert len(layers) == 8 and all(isinstance(m, Int8BlockSparseLinear) and m.kernel == "bmm" for m in layers)
    assert {kernel for _, kernel, _ in result.converted} == {"int8/bmm"}
    for attention in (m for m in fused.modules() if isinstance(m, ProjectedAttention)):
        attention.core = "sdpa"  # as "bmm" leaves it: this test compares the int8 layers
    residual_norm.unfold(fused)  # so are the blocks' norms
    fused.conv_proj = fused.conv_proj.to_conv()  # and the patch embedding
    with torch.inference_mode():
        y, expected = fused(VIT_INPUT), bmm(VIT_INPUT)
    if relu:
        assert torch.equal(y, expected)
    else:  # the fused MLP's GELU is a polynomial (see test_int8_mlp_op_with_gelu_is_within_rounding_of_the_reference)
        error = relative_error(y, expected)
        assert error < 2e-2, f"logits' relative L2 error {error:.2e}"


@pytest.mark.parametrize("int8_is_faster", [True, False])
def test_auto_keeps_int8_only_where_that_measures_faster(int8_is_faster, monkeypatch):
    need_any()
    int8_seconds, float_sparse_seconds, dense_seconds = (1.0, 2.0, 3.0) if int8_is_faster else (3.0, 1.0, 2.0)

    def fastest_setting(run, tokens, variants):
        if "blocks" in variants:  # the float kernels
            return (64, "blocks"), float_sparse_seconds
        return (64, variants[0]), int8_seconds

    monkeypatch.setattr(blocksparse_fused, "fastest_setting", fastest_setting)
    monkeypatch.setattr(blocksparse_fused, "fastest_setting_against",
                        lambda run, tokens, variants, baseline: (fastest_setting(run, tokens, variants), dense_seconds))
    monkeypatch.setattr(blocksparse_fused, "median_seconds", lambda fn, repeats=5: dense_seconds)
    # A layer's int8 form against its float one in the same rounds; every other comparison a tie (the attention's
    # core against nn.MultiheadAttention: the module stays).
    seconds = {"int8": int8_seconds, "fused": float_sparse_seconds, "dense": dense_seconds}
    monkeypatch.setattr(blocksparse_fused, "median_seconds_each",
                        lambda fns, repeats=5: {key: seconds.get(key, dense_seconds) for key in fns})
    monkeypatch.setitem(residual_norm._state, "faster", {})  # measured under the tie: not kept for later tests
    monkeypatch.setattr(blocksparse, "_measured", {})
    monkeypatch.setattr(blocksparse, "_measured_mlps", {})
    monkeypatch.setattr(blocksparse_int8, "_measured", {})
    _, converted, result = int8_vit(kernel="auto")
    int8 = [m for m in converted.modules() if isinstance(m, Int8BlockSparseLinear)]
    for layer in converted.encoder.layers:
        mlp = layer.mlp[0]
        assert isinstance(mlp, BlockSparseMLP), "each pair is fused: timed faster than its two layers"
        assert isinstance(mlp.fc1, Int8BlockSparseLinear) == int8_is_faster
        assert isinstance(mlp.fc2, Int8BlockSparseLinear) == int8_is_faster
        projected = isinstance(layer.self_attention, ProjectedAttention)
        assert projected == int8_is_faster, "dense attention projections are int8 only where int8 is faster"
    if int8_is_faster:
        assert len(int8) == 8 and [name for name, _ in result.left_dense] == ["heads.head"]
    else:
        assert int8 == []
        assert sum("float dense measured faster than int8" in why for _, why in result.left_dense) == 4


def test_int8_vit_compiles_in_one_graph_and_exports_with_the_int8_ops():
    need_any()
    _, converted, _ = int8_vit()
    with torch.inference_mode():
        expected = converted(VIT_INPUT)
        compiled = torch.compile(converted, fullgraph=True)  # inductor; fullgraph: no graph break around the ops
        torch.testing.assert_close(compiled(VIT_INPUT), expected, atol=1e-5, rtol=1e-5)
    exported = torch.export.export(converted, (VIT_INPUT,))
    ops = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum("superblock.int8_bsr_mlp" in op for op in ops) == 2, ops
    assert sum("superblock.int8_bsr_linear" in op for op in ops) == 4, ops
    with torch.inference_mode():
        assert torch.equal(exported.module()(VIT_INPUT), expected)


def test_apply_bsr_refuses_bad_quantize_arguments():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval().requires_grad_(False)
    with pytest.raises(ValueError, match="unknown quantize 'int4'; choose None or 'int8'"):
        apply_bsr(copy.deepcopy(model), 16, quantize="int4")
    for kernel in ("dense", "torch"):
        with pytest.raises(ValueError, match=f"quantize='int8' runs kernel 'auto', 'fused' or 'bmm' .*not '{kernel}'"):
            apply_bsr(copy.deepcopy(model), 16, kernel=kernel, quantize="int8")
    with pytest.raises(ValueError, match="takes a blocksize that is a multiple of 16, not 8"):
        apply_bsr(copy.deepcopy(model), 8, kernel="bmm", quantize="int8")
    with pytest.raises(ValueError, match="quantize='int8' runs on the CPU; the model is on meta"):
        apply_bsr(copy.deepcopy(model).to("meta"), 16, kernel="bmm", quantize="int8")
    with pytest.raises(ValueError, match="int8 layers run kernel 'fused' or 'bmm'"):
        Int8BlockSparseLinear.from_dense(model[0], 16, kernel="dense")
