import pytest
import torch
import torchvision
from torch import nn

import attention_core
import blocksparse
import blocksparse_fused
import blocksparse_reference
import blocksparse_triton
from blocksparse import BlockSparseLinear, apply_bsr, block_sparse_layers
from supermask import SupermaskLinear

# "fused" where the C++ extension builds (tests/test_blocksparse_fused.py checks the fallback where it does not);
# "triton" runs in Triton's interpreter here (conftest.py sets TRITON_INTERPRET=1 without a GPU).
FUSED = ["fused"] if blocksparse_fused.available() else []
FAST_KERNELS = FUSED + ["bmm", "dense"] + (["triton"] if blocksparse_triton.triton_available() else [])
BSR_KERNELS = ["torch"]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def block_sparse_linear(in_features, out_features, blocksize, keep, *, bias=True, dtype=torch.float32, seed=0):
    """An nn.Linear whose weight is zero outside the blocks where `keep` (out/blocksize, in/blocksize) is True."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    if bias:
        nn.init.normal_(linear.bias)
    mask = keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1)
    linear.weight.mul_(mask)
    return linear.to(dtype)


def random_keep(out_features, in_features, blocksize, sparsity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(out_features // blocksize, in_features // blocksize, generator=gen) >= sparsity


def dense_reference(linear, x):
    """The exact product in float64, as the kernels' reference."""
    bias = None if linear.bias is None else linear.bias.double()
    return nn.functional.linear(x.double(), linear.weight.double(), bias)


@pytest.mark.parametrize("kernel", FAST_KERNELS + BSR_KERNELS)
@pytest.mark.parametrize("shape,blocksize,sparsity", [((64, 128), 16, 0.7), ((256, 64), 32, 0.5), ((128, 128), 64, 0.5)])
def test_bsr_linear_matches_dense_float32(kernel, shape, blocksize, sparsity):
    in_features, out_features = shape
    keep = random_keep(out_features, in_features, blocksize, sparsity)
    keep[0] = False  # a fully empty block-row: its outputs are just the bias
    linear = block_sparse_linear(in_features, out_features, blocksize, keep)
    layer = BlockSparseLinear.from_dense(linear, blocksize, kernel=kernel)
    for x in [torch.randn(in_features), torch.randn(5, in_features), torch.randn(2, 3, in_features)]:
        y = layer(x)
        assert y.shape == x.shape[:-1] + (out_features,)
        torch.testing.assert_close(y.double(), dense_reference(linear, x), **TOL[torch.float32])


@pytest.mark.parametrize("kernel", FAST_KERNELS)
@pytest.mark.parametrize("blocksize", [16, 32, 64])
def test_bsr_linear_matches_dense_bfloat16(kernel, blocksize):
    keep = random_keep(128, 256, blocksize, 0.6, seed=1)
    linear = block_sparse_linear(256, 128, blocksize, keep, dtype=torch.bfloat16)
    layer = BlockSparseLinear.from_dense(linear, blocksize, kernel=kernel)
    x = torch.randn(4, 7, 256, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), dense_reference(linear, x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("kernel", FUSED + ["bmm"])
@pytest.mark.parametrize("blocksize", [16, 64])
@pytest.mark.parametrize("layout", ["row_major", "column_major", "strided"])
def test_kernels_read_any_input_layout(kernel, blocksize, layout):
    keep = random_keep(256, 128, blocksize, 0.5, seed=2)
    keep[1] = False
    linear = block_sparse_linear(128, 256, blocksize, keep)
    layer = BlockSparseLinear.from_dense(linear, blocksize, kernel=kernel)
    x = {"row_major": torch.randn(9, 128), "column_major": torch.randn(128, 9).t(),
         "strided": torch.randn(9, 256)[:, ::2]}[layout]
    torch.testing.assert_close(layer(x).double(), dense_reference(linear, x), **TOL[torch.float32])


@pytest.mark.parametrize("kernel", FAST_KERNELS + BSR_KERNELS)
@pytest.mark.parametrize("keep_all", [True, False], ids=["fully_dense", "all_blocks_zero"])
def test_bsr_linear_handles_fully_dense_and_empty_weights(kernel, keep_all):
    keep = torch.full((4, 2), keep_all)
    linear = block_sparse_linear(64, 128, 32, keep)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel=kernel)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x).double(), dense_reference(linear, x), **TOL[torch.float32])
    assert layer.kept_blocks == (8 if keep_all else 0)


@pytest.mark.parametrize("kernel", FAST_KERNELS + BSR_KERNELS)
def test_bsr_linear_without_bias_matches_dense(kernel):
    keep = random_keep(96, 64, 32, 0.5, seed=2)
    keep[1] = False
    linear = block_sparse_linear(64, 96, 32, keep, bias=False)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel=kernel)
    x = torch.randn(6, 64)
    torch.testing.assert_close(layer(x).double(), dense_reference(linear, x), **TOL[torch.float32])


def test_uneven_rows_are_grouped_with_bounded_groups():
    # Every block-row has a different kept count (0..15): more counts than MAX_GROUPS, so rows get padded.
    keep = torch.arange(16)[None, :] < torch.arange(16)[:, None]
    linear = block_sparse_linear(256, 256, 16, keep)
    layer = BlockSparseLinear.from_dense(linear, 16, kernel="bmm")
    assert 1 < layer.num_groups <= blocksparse_reference.MAX_GROUPS
    x = torch.randn(9, 256)
    torch.testing.assert_close(layer(x).double(), dense_reference(linear, x), **TOL[torch.float32])


@pytest.mark.parametrize("kernel", FAST_KERNELS + BSR_KERNELS)
def test_dense_weight_and_to_dense_reproduce_the_original(kernel):
    keep = random_keep(128, 64, 16, 0.75, seed=3)
    linear = block_sparse_linear(64, 128, 16, keep)
    layer = BlockSparseLinear.from_dense(linear, 16, kernel=kernel)
    torch.testing.assert_close(layer.dense_weight(), linear.weight)
    back = layer.to_dense()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back.weight, linear.weight)
    torch.testing.assert_close(back.bias, linear.bias)


def test_packing_stores_only_kept_blocks():
    keep = random_keep(512, 512, 32, 0.9, seed=4)
    linear = block_sparse_linear(512, 512, 32, keep)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel="bmm")
    stored = sum(b.numel() for name, b in layer.named_buffers() if name.endswith("_weight"))
    assert stored < 0.25 * linear.weight.numel(), "the packed weights should hold ~10% of the dense weight"
    assert layer.kept_blocks == int(keep.sum())
    assert not hasattr(layer, "weight"), "the bmm kernel must not keep the dense weight"


@pytest.mark.parametrize("kernel", FUSED + ["bmm", "torch"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_bsr_linear_runs_under_inference_mode_and_no_grad(kernel, mode):
    keep = random_keep(128, 64, 32, 0.5, seed=5)
    linear = block_sparse_linear(64, 128, 32, keep)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel=kernel)
    x = torch.randn(2, 5, 64)  # 3-D input: torch's own BSR F.linear fails on it under inference_mode
    with getattr(torch, mode)():
        y = layer(x)
    torch.testing.assert_close(y.double(), dense_reference(linear, x), **TOL[torch.float32])


@pytest.mark.parametrize("kernel", FUSED + ["bmm"])
def test_bsr_linear_under_torch_compile_matches_dense(kernel):
    keep = random_keep(128, 64, 32, 0.5, seed=6)
    keep[2] = False
    linear = block_sparse_linear(64, 128, 32, keep)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel=kernel)
    x = torch.randn(3, 4, 64)
    with torch.inference_mode():
        y = torch.compile(layer)(x)
    torch.testing.assert_close(y.double(), dense_reference(linear, x), **TOL[torch.float32])


@pytest.mark.parametrize("kernel,op", [("bmm", "superblock.bmm_blocks")]
                         + [("fused", "superblock.fused_bsr_linear")] * bool(FUSED))
def test_compiled_block_sparse_kernels_are_one_opaque_op(kernel, op):
    # Traced op by op, inductor fused the bmm products' slice writes into one slow kernel of masked selects.
    keep = random_keep(256, 128, 32, 0.6, seed=8)
    keep[1] = False  # an empty block-row
    keep[5] = torch.tensor([False, True, False, False])
    linear = block_sparse_linear(128, 256, 32, keep)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel=kernel)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x = torch.randn(2, 7, 128)
    with torch.inference_mode():
        y = torch.compile(layer, backend=capture, fullgraph=True)(x)
    calls = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum(op in call for call in calls) == 1, calls
    assert not any("index_select" in call or "bmm" in call.replace("bmm_blocks", "") for call in calls), calls
    torch.testing.assert_close(y.double(), dense_reference(linear, x), **TOL[torch.float32])


@pytest.mark.parametrize("kernel", FUSED + ["bmm"])
def test_module_to_converts_packed_weights(kernel):
    keep = random_keep(128, 64, 32, 0.5, seed=7)
    linear = block_sparse_linear(64, 128, 32, keep)
    layer = BlockSparseLinear.from_dense(linear, 32, kernel=kernel).to(torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in layer.buffers() if b.is_floating_point())
    index = layer.group0_rows if kernel == "bmm" else layer.block_col  # the fused layout is re-packed for bfloat16
    assert index.dtype in (torch.int32, torch.int64), "index buffers must keep their integer dtype"
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).double(), dense_reference(linear, x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("faster", ["dense", "sparse"])
def test_auto_keeps_the_kernel_that_measured_faster(monkeypatch, faster):
    candidate = "fused" if FUSED else "bmm"
    timed = []

    def fake_timings(linear, blocksize, kernel):
        timed.append(kernel)
        return {"dense": 1.0, kernel: 0.5 if faster == "sparse" else 2.0}, ((64, "gather") if kernel == "fused" else None)

    monkeypatch.setattr(blocksparse, "_measured", {})
    monkeypatch.setattr(blocksparse, "_time_candidates", fake_timings)
    linear = block_sparse_linear(256, 256, 64, torch.eye(4, dtype=torch.bool))  # block sparsity 0.75
    layer = BlockSparseLinear.from_dense(linear, 64)
    assert timed == [candidate], "auto must time the block-sparse kernel that runs here against dense"
    assert layer.kernel == (candidate if faster == "sparse" else "dense")
    text = repr(layer)
    assert "blocksize=64" in text and f"kernel='{layer.kernel}'" in text and "sparsity=" in text
    assert ("tile_tokens=64, products='gather'" in text) == (layer.kernel == "fused")
    BlockSparseLinear.from_dense(linear, 64)
    assert len(timed) == 1, "a layer of the same shape, dtype and blocks must reuse the measurement"
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x).double(), dense_reference(linear, x), **TOL[torch.float32])


def test_auto_measures_both_kernels_on_the_layer_itself():
    linear = block_sparse_linear(256, 512, 32, random_keep(512, 256, 32, 0.9, seed=9))
    choice = blocksparse.choose_kernel(linear, 32)
    candidate = "fused" if FUSED else "bmm"
    assert set(choice.seconds) == {"dense", candidate} and all(t > 0 for t in choice.seconds.values())
    assert choice.kernel == blocksparse.faster_of(choice.seconds)
    assert (choice.tile_tokens in blocksparse_fused.TILE_CANDIDATES) if FUSED else choice.tile_tokens is None


def test_faster_of_prefers_dense_on_a_tie():
    assert blocksparse.faster_of({"dense": 1.0, "fused": 1.0}) == "dense"
    assert blocksparse.faster_of({"dense": 1.0, "fused": 0.9}) == "fused"


def test_rejects_blocksize_not_dividing_weight():
    linear = nn.Linear(100, 64)
    with pytest.raises(ValueError, match="does not divide the weight shape 64x100"):
        BlockSparseLinear.from_dense(linear, 32)


def test_rejects_unknown_kernel_and_bad_blocksize():
    linear = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        BlockSparseLinear.from_dense(linear, 32, kernel="fast")
    with pytest.raises(ValueError, match="positive int"):
        BlockSparseLinear.from_dense(linear, 0)


@pytest.mark.parametrize("kernel", BSR_KERNELS)
def test_torch_bsr_kernels_reject_bfloat16_with_a_clear_error(kernel):
    linear = nn.Linear(64, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32/float64 only"):
        BlockSparseLinear.from_dense(linear, 32, kernel=kernel)
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 64), 32, kernel=kernel)
    with pytest.raises(ValueError, match="float32/float64 only"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("kernel", FAST_KERNELS + BSR_KERNELS)
def test_input_that_requires_grad_is_refused_with_a_clear_error(kernel):
    layer = BlockSparseLinear.from_dense(block_sparse_linear(64, 64, 32, torch.eye(2, dtype=torch.bool)), 32,
                                         kernel=kernel)
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="BlockSparseLinear is for inference"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (2, 64)


@pytest.mark.parametrize("kernel", FAST_KERNELS + BSR_KERNELS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch_gives_an_empty_output(kernel, lead):
    keep = random_keep(128, 64, 16, 0.5, seed=2)
    keep[0] = False  # an empty block-row too
    layer = BlockSparseLinear.from_dense(block_sparse_linear(64, 128, 16, keep), 16, kernel=kernel)
    with torch.inference_mode():
        y = layer(torch.randn(*lead, 64))
    assert y.shape == (*lead, 128)


@pytest.mark.parametrize("kernel", FAST_KERNELS + BSR_KERNELS + ["int8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_reaches_the_outputs_whose_kept_blocks_read_it(kernel, bad):
    # Input column-block 1 is read by block-row 2 only; block-rows 0 and 1 prune it, block-row 3 keeps nothing.
    keep = torch.tensor([[True, False, True, False], [False, False, True, True], [True] * 4, [False] * 4])
    linear = block_sparse_linear(64, 64, 16, keep)
    quantize = "int8" if kernel == "int8" else None
    layer = BlockSparseLinear.from_dense(linear, 16, kernel="bmm" if quantize else kernel, quantize=quantize)
    x = torch.randn(3, 64)
    x[1, 20] = bad
    with torch.inference_mode():
        y = layer(x)
    finite = y.isfinite().view(3, 4, 16).all(dim=2)  # (token, block-row)
    assert finite[[0, 2]].all(), "other tokens are never affected"
    assert not finite[1, 2], "the outputs whose kept blocks read the value are NaN or inf"
    if kernel in ("fused", "torch", "triton"):  # pruned blocks are not read: the token's other outputs stay finite
        assert finite[1].tolist() == [True, True, False, True]
    if kernel in ("dense", "int8"):  # as nn.Linear: the token's whole row
        assert not finite[1].any()


def test_rejects_input_of_wrong_width():
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 64), 32, kernel="bmm")
    with pytest.raises(ValueError, match="last dimension 64"):
        layer(torch.randn(2, 32))


##### apply_bsr on whole models #####


def small_vit(blocksize=16, sparsity=0.75):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: logits would all be 0
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layers):
            for linear in (layer.mlp[0], layer.mlp[3]):
                out_f, in_f = linear.weight.shape
                keep = random_keep(out_f, in_f, blocksize, sparsity, seed=i)
                linear.weight.mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))
    return model.eval()


def apply_bsr_to_vit(model, kernel):
    """(result, converted names, input, logits before): apply_bsr at blocksize 16 on a 32x32-image ViT."""
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    result = apply_bsr(model, blocksize=16, min_sparsity=0.5, kernel=kernel)
    return result, {name for name, _, _ in result.converted}, x, expected


@pytest.mark.parametrize("kernel", ["auto", "bmm", "torch"])
def test_apply_bsr_keeps_vit_logits_and_reports_dense_layers(kernel):
    model = small_vit()
    result, converted, x, expected = apply_bsr_to_vit(model, kernel)
    assert converted == {f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(2) for j in (0, 3)}
    layers = block_sparse_layers(model)  # by their original names, also where a pair became one BlockSparseMLP
    assert set(layers) == converted and all(isinstance(layer, BlockSparseLinear) for layer in layers.values())
    reasons = dict(result.left_dense)
    assert "block sparsity 0.000" in reasons["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert "block sparsity 0.000" in reasons["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    # Dense attention keeps nn.MultiheadAttention (and its fast path), unless "auto" measured its own core faster.
    core = dict(result.attention_cores)["encoder.layers.encoder_layer_0.self_attention"]
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention) == (core == "nn.MultiheadAttention")
    assert core in ("nn.MultiheadAttention",) + (attention_core.CORES[1:] if kernel == "auto" else ())
    assert reasons["heads.head"] == "shape 10x64 not divisible by blocksize 16"
    assert "heads.head" in str(result) and "mlp.0" in str(result)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel,quantize", [(k, None) for k in FUSED + ["bmm", "dense", "torch"]] + [("bmm", "int8")])
def test_converted_model_pickles_and_the_copy_runs(kernel, quantize):
    import io
    import pickle

    model = small_vit()
    apply_bsr(model, blocksize=16, kernel=kernel, quantize=quantize)
    x = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    with torch.inference_mode():
        expected = model(x)
        for copy in copies:
            torch.testing.assert_close(copy(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", FUSED + ["bmm"])
def test_converted_model_runs_without_no_grad_as_the_readme_writes_it(kernel):
    model = small_vit()  # its parameters require grad, as a freshly trained model's do
    apply_bsr(model, blocksize=16, kernel=kernel)
    assert not any(p.requires_grad for p in model.parameters()), "apply_bsr freezes the model"
    x = torch.randn(2, 3, 32, 32)
    y = model(x)  # no torch.no_grad(): the README's path
    with torch.inference_mode():
        torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="BlockSparseLinear is for inference and its input requires grad"):
        model(x.requires_grad_())  # gradients asked for: refused, not silently wrong


@pytest.mark.parametrize("kernel", FUSED + ["bmm"])
def test_converted_model_computes_in_float64_after_double(kernel):
    import copy

    model = small_vit()
    dense = copy.deepcopy(model).double()
    apply_bsr(model, blocksize=16, kernel=kernel)  # "fused": each MLP becomes one BlockSparseMLP
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected_float32 = model(x)
        y = model.double()(x.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, dense(x.double()), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model.float()(x), expected_float32, rtol=0, atol=0)


def test_skipped_summary_names_three_layers_and_counts_the_rest():
    model = small_vit()
    result = apply_bsr(model, blocksize=7)  # divides no layer of the ViT: every Linear stays dense
    summary = result.skipped_summary()
    assert len(result.left_dense) > 3
    assert summary.count("not divisible by blocksize 7") == 3
    assert summary.endswith(f"; and {len(result.left_dense) - 3} more")
    assert blocksparse.BsrResult(left_dense=[("a", "why")]).skipped_summary() == "a: why"


def test_apply_bsr_leaves_layers_below_min_sparsity_dense():
    model = small_vit(sparsity=0.0)  # MLP weights keep every block
    result = apply_bsr(model, blocksize=16, min_sparsity=0.5)
    assert not result.converted
    assert any(name.endswith("mlp.0") and "block sparsity 0.000 < min_sparsity 0.5" in reason
               for name, reason in result.left_dense)
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())


def trained_at(sparsity, in_features, out_features, blocksize):
    """A frozen nn.Linear with the tile mask a Supermask at `sparsity` leaves: round(s * (n - 1)) of n pruned."""
    torch.manual_seed(0)
    layer = SupermaskLinear(in_features, out_features, sparsity=sparsity, tile_size=blocksize)
    return layer.to_linear().requires_grad_(False)


def test_a_layer_trained_at_the_threshold_meets_it():
    # 576 tiles at 0.7: 402 pruned, 0.6997 < 0.7; likewise 0.7995 for 1152 tiles at 0.8.
    model = nn.Sequential(trained_at(0.7, 384, 384, 16)).eval()
    assert blocksparse.block_sparsity(model[0].weight, 16) < 0.7
    result = apply_bsr(model, blocksize=16, min_sparsity=0.7)
    assert [name for name, _, _ in result.converted] == ["0"]


@pytest.mark.parametrize("zero_blocks,converted", [(402, True), (401, False)])
def test_the_threshold_counts_blocks_as_a_supermask_prunes_them(zero_blocks, converted):
    keep = torch.ones(24 * 24, dtype=torch.bool)
    keep[torch.randperm(24 * 24, generator=torch.Generator().manual_seed(0))[:zero_blocks]] = False
    model = nn.Sequential(block_sparse_linear(384, 384, 16, keep.view(24, 24))).eval()
    result = apply_bsr(model, blocksize=16, min_sparsity=0.7)
    assert bool(result.converted) == converted


def test_apply_bsr_refuses_a_model_in_training_mode():
    model = nn.Sequential(nn.Linear(32, 32), nn.Sequential(nn.ReLU(), nn.Linear(32, 32)))
    with pytest.raises(ValueError, match=r"the model is in training mode; call model.eval\(\) first"):
        apply_bsr(model, blocksize=16)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="its module 1 is in training mode"):
        apply_bsr(model, blocksize=16)
    assert all(type(m) is not BlockSparseLinear for m in model.modules()), "nothing is converted before refusing"


def test_apply_bsr_respects_filter_fn_and_skips_linear_subclasses():
    class TaggedLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(32, 32), TaggedLinear(32, 32), nn.Linear(32, 32)).eval()
    with torch.no_grad():
        for m in model:
            m.weight[:16].zero_()
    result = apply_bsr(model, blocksize=16, min_sparsity=0.5, filter_fn=lambda module, fqn: fqn != "2")
    assert [name for name, _, _ in result.converted] == ["0"]
    reasons = dict(result.left_dense)
    assert "Linear subclass" in reasons["1"] and reasons["2"] == "excluded by filter_fn"


def test_apply_bsr_keeps_resnet_logits():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=64).eval()
    with torch.no_grad():
        model.fc.weight[:, :384].zero_()  # 3 in 4 of the fc's column-blocks are zero
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    result = apply_bsr(model, blocksize=32)
    assert [name for name, _, _ in result.converted] == ["fc"]
    assert isinstance(model.fc, BlockSparseLinear) and model.fc.sparsity == 0.75
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def attention_sparse_vit(blocksize=16, sparsity=0.75, attention=True):
    """small_vit with the attention projections (q/k/v and output) pruned in blocks too, via Supermask."""
    from supermask import apply_supermask, sparsify_offline

    torch.manual_seed(1)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight)
    apply_supermask(model, linear_sparsity=sparsity, linear_sp_tilesize=blocksize,
                    attention_sparsity=sparsity if attention else 0.0, attention_sp_tilesize=blocksize)
    return sparsify_offline(model).eval()


@pytest.mark.parametrize("kernel", ["auto"] + FUSED + ["bmm"])
def test_apply_bsr_converts_attention_projections_and_keeps_logits(kernel):
    from attention import ProjectedAttention

    model = attention_sparse_vit()
    _, converted, x, expected = apply_bsr_to_vit(model, kernel)
    for i in range(2):
        attention = model.encoder.layers[i].self_attention
        assert isinstance(attention, ProjectedAttention)
        assert isinstance(attention.in_proj, BlockSparseLinear) and isinstance(attention.out_proj, BlockSparseLinear)
        assert {f"encoder.layers.encoder_layer_{i}.self_attention.in_proj",
                f"encoder.layers.encoder_layer_{i}.self_attention.out_proj"} <= converted
    with torch.inference_mode():
        out = model(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_apply_bsr_on_attention_compiles():
    model = attention_sparse_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        apply_bsr(model, blocksize=16, min_sparsity=0.5, kernel="bmm")
        torch.testing.assert_close(torch.compile(model)(x), expected, atol=1e-4, rtol=1e-4)  # inductor


def test_auto_on_cuda_picks_triton_from_the_break_even_and_dense_below():
    def mask(sparsity, rows=48, cols=12):
        keep = torch.ones(rows * cols, dtype=torch.bool)
        keep[: round(sparsity * keep.numel())] = False
        return keep.view(rows, cols)

    assert blocksparse.cuda_kernel(mask(0.9), torch.bfloat16, 64) == "triton"
    assert blocksparse.cuda_kernel(mask(0.2), torch.bfloat16, 64) == "dense"
    assert blocksparse.cuda_kernel(mask(0.9), torch.bfloat16, 24) == "dense"  # not a power of two


def test_tile_mask_shows_the_stored_blocks():
    keep = random_keep(64, 32, 16, 0.5, seed=3)
    layer = BlockSparseLinear.from_dense(block_sparse_linear(32, 64, 16, keep), 16, kernel="bmm")
    assert torch.equal(layer.tile_mask(), keep)


##### Consecutive row groups and MLP pairs #####


@pytest.mark.parametrize("bias", [True, False])
def test_consecutive_row_groups_write_in_place_and_match_dense(bias):
    # Block-rows sorted by kept count (0, 0, 1, 1, 2, 3): every group and the empty rows are consecutive.
    keep = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]],
                        dtype=torch.bool)
    linear = block_sparse_linear(64, 96, 16, keep, bias=bias)
    layer = BlockSparseLinear.from_dense(linear, 16, kernel="bmm")
    assert layer.empty_span == (0, 2) and all(span is not None for span in layer.group_spans)
    for x in [torch.randn(64), torch.randn(5, 64), torch.randn(2, 3, 64)]:
        torch.testing.assert_close(layer(x).double(), dense_reference(linear, x), **TOL[torch.float32])
    with torch.inference_mode():
        y = torch.compile(layer)(torch.randn(2, 3, 64))
    assert y.shape == (2, 3, 96)


def bsr_mlp(blocksize=16, hidden=128, dim=64, dropout=0.0, bias=True, sparsity=0.5, seed=0):
    """torchvision's MLPBlock (Linear, GELU, Dropout, Linear, Dropout) with block-sparse weights that have an
    empty block-row in the first Linear (a constant hidden block) and an empty block-column in the second
    (an unused hidden block)."""
    from torchvision.models.vision_transformer import MLPBlock

    torch.manual_seed(seed)
    mlp = MLPBlock(dim, hidden, dropout).eval().requires_grad_(False)
    if not bias:
        mlp[0].bias = mlp[3].bias = None
    keep1 = random_keep(hidden, dim, blocksize, sparsity, seed=seed)
    keep1[0] = False  # hidden block 0 is GELU(bias): constant
    keep1[1] = True
    keep2 = random_keep(dim, hidden, blocksize, sparsity, seed=seed + 1)
    keep2[:, 1] = False  # hidden block 1 is never read
    keep2[:, 0] = True
    for linear, keep in ((mlp[0], keep1), (mlp[3], keep2)):
        linear.weight.mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))
        if bias:
            nn.init.normal_(linear.bias)
    return nn.Sequential(mlp).eval()


@pytest.mark.parametrize("kernel", ["auto"] + FUSED + ["bmm"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_pair_is_reordered_and_keeps_outputs(kernel, bias):
    model = bsr_mlp(bias=bias)
    first_kept = int(blocksparse.block_mask(model[0][0].weight, 16).sum())
    xs = [torch.randn(64), torch.randn(5, 64), torch.randn(2, 3, 64)]
    with torch.inference_mode():
        expected = [model(x) for x in xs]
    result = apply_bsr(model, blocksize=16, min_sparsity=0.3, kernel=kernel)
    assert [(a, b) for a, b, _ in result.mlp_pairs] == [("0.0", "0.3")]
    assert "reordered the hidden units" in str(result)
    layers = block_sparse_layers(model)
    first, second = layers["0.0"], layers["0.3"]
    assert isinstance(first, BlockSparseLinear) and isinstance(second, BlockSparseLinear)
    # The unused block-row (and, with biases, the constant one folded into the second bias) is gone.
    assert first.kept_blocks < first_kept
    # "bmm" must find the first Linear's groups consecutive (the other kernels write each block-row in place).
    assert first.kernel != "bmm" or (first.group_spans and all(span is not None for span in first.group_spans))
    assert kernel == "auto" or first.kernel == second.kernel == kernel
    with torch.inference_mode():
        for x, y in zip(xs, expected):
            torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


def test_mlp_pair_with_dropout_keeps_constant_units_and_outputs():
    model = bsr_mlp(dropout=0.1)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        expected = model(x)
    result = apply_bsr(model, blocksize=16, min_sparsity=0.3)
    assert "(0 constant ones folded" in result.mlp_pairs[0][2], "Dropout p>0: constant units must not be folded"
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_mlp_pair_in_bfloat16_and_under_torch_compile_matches():
    model = bsr_mlp().to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(x).double()
        apply_bsr(model, blocksize=16, min_sparsity=0.3)
        torch.testing.assert_close(model(x).double(), expected, **TOL[torch.bfloat16])
        torch.testing.assert_close(torch.compile(model)(x).double(), expected, **TOL[torch.bfloat16])


def test_mlp_pair_is_left_alone_with_dense_kernels():
    model = bsr_mlp()
    result = apply_bsr(model, blocksize=16, min_sparsity=0.3, kernel="dense")
    assert result.mlp_pairs == []


def test_apply_bsr_refuses_a_bare_linear_with_a_clear_error():
    # It converts the Linears a model contains: given one, it used to register a child named "" and leave it dense.
    with pytest.raises(ValueError, match=r"not a Linear itself; wrap it \(nn.Sequential\(linear\)\)"):
        apply_bsr(nn.Linear(64, 64).eval(), 16, min_sparsity=0.0)
