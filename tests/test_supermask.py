import argparse
import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torchvision
from torch._dynamo.testing import CompileCounter

import supermask
from helpers import assert_every_mask_acts, tiny_resnet, tiny_vit
from supermask import (
    SupermaskConv2d,
    SupermaskLinear,
    apply_supermask,
    load_supermask_state_dict,
    set_sparsity_fraction,
    sparsify_offline,
    sparsity_report,
    sparsity_schedule,
)


def pruned_tiles(layer):
    grid = supermask.tile_mask(layer.scores.detach(), layer.num_pruned)
    return int((grid == 0).sum())


##### Mask semantics #####


@pytest.mark.parametrize("shape,tile", [((64, 48), 16), ((50, 30), 16), ((33, 7), 4), ((10, 10), 1), ((5, 100), 32)])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77, 0.9])
def test_linear_mask_prunes_expected_tile_count(shape, tile, sparsity):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = SupermaskLinear(shape[1], shape[0], sparsity=sparsity, tile_size=tile)
    n = math.prod(math.ceil(d / tile) for d in shape)
    assert layer.scores.shape == tuple(math.ceil(d / tile) for d in shape)
    assert pruned_tiles(layer) == round(layer.sparsity * (n - 1))
    assert layer.get_mask().shape == layer.weight.shape


@pytest.mark.parametrize("kernel,tile", [(1, 8), (3, 8), (3, 2), (5, 1)])
def test_conv_mask_tiles_all_four_dimensions(kernel, tile):
    torch.manual_seed(2)
    layer = SupermaskConv2d(12, 20, kernel, sparsity=0.5, tile_size=tile, padding=kernel // 2)
    expected_grid = tuple(math.ceil(d / tile) for d in (20, 12, kernel, kernel))
    assert layer.scores.shape == expected_grid
    n = math.prod(expected_grid)
    assert pruned_tiles(layer) == round(0.5 * (n - 1))
    mask = layer.get_mask()
    assert mask.shape == layer.weight.shape
    # Each tile is constant: expanding the tile grid back reproduces the mask.
    grid = supermask.tile_mask(layer.scores.detach(), layer.num_pruned)
    assert torch.equal(supermask.expand_tiles(grid, layer.weight.shape, tile), mask)


def test_mask_is_constant_within_each_tile_and_cropped_at_edges():
    layer = SupermaskLinear(10, 7, sparsity=0.5, tile_size=4)
    with torch.no_grad():
        layer.scores.copy_(torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))
    mask = layer.get_mask()
    # n=6, k = 1 + round(0.5*5) = 3 -> threshold 2.0, tiles with scores 0 and 1 pruned.
    expected = torch.ones(7, 10)
    expected[0:4, 0:8] = 0
    assert torch.equal(mask, expected)


def test_ties_at_threshold_are_kept():
    layer = SupermaskLinear(4, 4, sparsity=0.5, tile_size=2)
    with torch.no_grad():
        layer.scores.fill_(1.0)
    assert torch.equal(layer.get_mask(), torch.ones(4, 4))


def test_sparsity_above_layer_maximum_is_lowered_with_warning():
    with pytest.warns(UserWarning, match="lowering it to the maximum"):
        layer = SupermaskLinear(8, 8, sparsity=0.9, tile_size=4)  # 4 tiles: at most 0.75
    assert layer.sparsity == pytest.approx(0.75)
    assert pruned_tiles(layer) == round(0.75 * 3)  # the percentile rule, as in the original


def test_straight_through_gradients_match_formulas():
    torch.manual_seed(3)
    layer = SupermaskLinear(10, 6, sparsity=0.5, tile_size=4)
    x = torch.randn(5, 10)
    upstream = torch.randn(5, 6)
    (layer(x) * upstream).sum().backward()

    mask = layer.get_mask().detach()
    grad_w_eff = upstream.t() @ x  # dL/dW_eff for y = x W_eff^T
    torch.testing.assert_close(layer.weight.grad, grad_w_eff * mask)
    per_element = grad_w_eff * layer.weight.detach()
    padded = torch.zeros(8, 12)
    padded[:6, :10] = per_element
    tile_sums = padded.reshape(2, 4, 3, 4).sum(dim=(1, 3))
    torch.testing.assert_close(layer.scores.grad, tile_sums)
    torch.testing.assert_close(layer.bias.grad, upstream.sum(0))


def test_conv_straight_through_gradient_is_tile_sum():
    torch.manual_seed(4)
    layer = SupermaskConv2d(4, 6, 3, sparsity=0.4, tile_size=2, padding=1)
    x = torch.randn(2, 4, 5, 5)
    w_eff = (layer.weight * layer.get_mask()).detach().requires_grad_()
    out = nn.functional.conv2d(x, w_eff, layer.bias.detach(), padding=1)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (layer(x) * upstream).sum().backward()
    per_element = w_eff.grad * layer.weight.detach()
    padded = torch.zeros(6, 4, 4, 4)
    padded[:, :, :3, :3] = per_element
    expected = padded.reshape(3, 2, 2, 2, 2, 2, 2, 2).sum(dim=(1, 3, 5, 7))
    torch.testing.assert_close(layer.scores.grad, expected)
    torch.testing.assert_close(layer.weight.grad, w_eff.grad * layer.get_mask().detach())


##### Every mask acts on the output #####


def test_changing_any_score_changes_the_output():
    torch.manual_seed(5)
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=8)
    checked = assert_every_mask_acts(model.eval(), torch.randn(2, 3, 16, 16))
    assert len(checked) == 5  # 2 blocks x 2 MLP Linears + the classifier


def test_attention_out_proj_stays_dense_and_is_reported():
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=8)
    attention = model.encoder.layers[0].self_attention
    assert type(attention.out_proj) is not SupermaskLinear
    rows = {r.name: r for r in sparsity_report(model).rows}
    assert "functionally" in rows["encoder.layers.encoder_layer_0.self_attention.out_proj"].note
    assert rows["encoder.layers.encoder_layer_0.mlp.0"].tile_size == 8


##### apply_supermask on real architectures #####


def test_top_level_layers_are_wrapped():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=4)
    assert isinstance(model[0], SupermaskLinear) and isinstance(model[2], SupermaskLinear)
    assert model(torch.randn(3, 16)).shape == (3, 4)


def test_single_layer_model_is_wrapped_as_its_own_child():
    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    model = apply_supermask(Single(), linear_sparsity=0.5, linear_sp_tilesize=2)
    assert isinstance(model.fc, SupermaskLinear)


def test_applying_twice_raises_and_names_how_to_change_the_sparsity():
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=16)
    with pytest.raises(ValueError, match=r"already has Supermask layers.*sparsity.*sparsify_offline\(model\) first"):
        apply_supermask(model, linear_sparsity=0.9, linear_sp_tilesize=8)
    assert {(layer.sparsity, layer.tile_size) for layer in supermask.supermask_layers(model)} == {(0.5, 16)}
    # Frozen first, the model takes new masks.
    apply_supermask(sparsify_offline(model), linear_sparsity=0.75, linear_sp_tilesize=8)
    assert {(layer.sparsity, layer.tile_size) for layer in supermask.supermask_layers(model)} == {(0.75, 8)}


def test_apply_supermask_adds_no_attribute_to_the_model_beyond_its_new_layers():
    model = tiny_vit()
    originals = [(module, set(vars(module))) for module in model.modules()]  # holding them keeps their ids unique
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=8, attention_sparsity=0.5,
                    attention_sp_tilesize=8, skip_last_layer_sparsity=True)
    present = {id(module) for module in model.modules()}
    kept = [(module, names) for module, names in originals if id(module) in present]
    assert kept[0][0] is model and len(kept) < len(originals)
    for module, names in kept:
        assert set(vars(module)) == names, type(module).__name__
    # What it chose is kept beside the model instead.
    assert "skip_last_layer_sparsity" in supermask.skipped_layers(model)["heads.head"]
    kinds = supermask.layer_kinds(model)
    assert kinds["encoder.layers.encoder_layer_0.mlp.0"] == ("linear", 0.5)
    assert kinds["encoder.layers.encoder_layer_1.self_attention.in_proj"] == ("attention", 0.5)
    assert supermask.layer_kinds(tiny_vit()) == {} and supermask.skipped_layers(tiny_vit()) == {}


def test_what_apply_supermask_chose_does_not_keep_the_model_alive():
    model = apply_supermask(tiny_vit(), linear_sparsity=0.5, linear_sp_tilesize=8)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_unprunable_kinds_names_the_largest_tile_size_that_prunes():
    def masked(**kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers with fewer tiles than the sparsity needs warn
            return apply_supermask(tiny_vit(), **kwargs)

    model = masked(linear_sparsity=0.9, linear_sp_tilesize=1024, attention_sparsity=0.5, attention_sp_tilesize=8)
    # Every Linear is one tile at 1024. At 32 the MLP's 64x32 weight is 2 tiles, lowered to sparsity 0.5, of
    # which round(0.5) = 0 prune; at 31 it is 3x2 tiles, 4 of them pruned.
    assert supermask.unprunable_kinds(model) == {"linear": (1024, 0.9, 31)}
    for tile_size in (31, 32):
        probe = masked(linear_sparsity=0.9, linear_sp_tilesize=tile_size)
        assert ("linear" in supermask.unprunable_kinds(probe)) == (tile_size == 32), tile_size
    # One layer that prunes is enough: at 16 the classifier (10x32, 2 tiles) prunes none, but the MLPs do.
    assert supermask.unprunable_kinds(masked(linear_sparsity=0.9, linear_sp_tilesize=16)) == {}


def test_weights_and_bias_are_copied():
    model = nn.Sequential(nn.Linear(6, 5))
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    apply_supermask(model, linear_sparsity=0.3, linear_sp_tilesize=1)
    assert torch.equal(model[0].weight, weight) and torch.equal(model[0].bias, bias)


def test_skip_flags_on_vit():
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=8,
                    skip_last_layer_sparsity=True, skip_first_transformer_sparsity=True)
    assert type(model.heads.head) is nn.Linear
    assert type(model.encoder.layers[0].mlp[0]) is nn.Linear
    assert type(model.encoder.layers[0].mlp[3]) is nn.Linear
    assert isinstance(model.encoder.layers[1].mlp[0], SupermaskLinear)
    notes = {r.name: r.note for r in sparsity_report(model).rows}
    assert "skip_last_layer_sparsity" in notes["heads.head"]
    assert "skip_first_transformer_sparsity" in notes["encoder.layers.encoder_layer_0.mlp.0"]


def test_skip_last_layer_on_resnet_and_conv_categories():
    model = tiny_resnet()
    apply_supermask(model, linear_sparsity=0.5, conv1x1_sparsity=0.6, conv1x1_sp_tilesize=4,
                    conv_sparsity=0.3, conv_sp_tilesize=2, skip_last_layer_sparsity=True)
    assert type(model.fc) is nn.Linear
    downsample = model.layer2[0].downsample[0]  # a 1x1 conv
    assert isinstance(downsample, SupermaskConv2d) and downsample.sparsity == 0.6 and downsample.tile_size == 4
    assert isinstance(model.conv1, SupermaskConv2d) and model.conv1.sparsity == 0.3


def test_conv1x1_falls_under_conv_sparsity_when_its_own_is_zero():
    model = tiny_resnet()
    apply_supermask(model, conv_sparsity=0.4, conv_sp_tilesize=2)
    assert model.layer2[0].downsample[0].sparsity == 0.4
    assert type(model.fc) is nn.Linear  # linear_sparsity 0 leaves it unwrapped


def test_skip_last_layer_finds_classifier_of_other_architectures():
    model = torchvision.models.mobilenet_v3_small(num_classes=5)
    apply_supermask(model, linear_sparsity=0.5, skip_last_layer_sparsity=True)
    assert type(model.classifier[-1]) is nn.Linear
    assert isinstance(model.classifier[0], SupermaskLinear)


def test_filter_fn_excludes_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    apply_supermask(model, linear_sparsity=0.5, filter_fn=lambda module, fqn: fqn != "1")
    assert isinstance(model[0], SupermaskLinear) and type(model[1]) is nn.Linear


def test_keeps_dtype_of_each_layer_and_float32_scores():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=2)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].scores.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converting_the_model_dtype_keeps_the_mask(dtype):
    torch.manual_seed(14)
    layer = SupermaskLinear(256, 256, sparsity=0.9, tile_size=2)  # 16k close scores: bf16 would make ties
    mask = layer.get_mask()
    layer.to(dtype)
    assert layer.weight.dtype == dtype and layer.scores.dtype == torch.float32
    assert torch.equal(layer.get_mask().float(), mask)


##### Online, offline, cache #####


def test_online_equals_offline_logits():
    torch.manual_seed(6)
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.7, linear_sp_tilesize=8)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        online = model(x)
        sparsify_offline(model)
        offline = model(x)
    assert not any(isinstance(m, supermask.SUPERMASK_LAYERS) for m in model.modules())
    assert online.abs().max() > 0
    torch.testing.assert_close(online, offline, rtol=0, atol=0)


def test_offline_state_dict_loads_into_plain_torchvision_model():
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.7, linear_sp_tilesize=8)
    sparsify_offline(model)
    plain = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    plain.load_state_dict(model.state_dict(), strict=True)
    # Frozen weights carry the pruned tiles as zeros.
    assert (plain.encoder.layers[0].mlp[0].weight == 0).float().mean() > 0.5


def test_eval_cache_follows_score_changes():
    torch.manual_seed(7)
    layer = SupermaskLinear(16, 16, sparsity=0.5, tile_size=4).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer(x)
        assert layer(x) is not None and layer._cached_weight is not None
        cached = layer._cached_weight
        layer(x)
        assert layer._cached_weight is cached, "mask recomputed although nothing changed"
        layer.scores.neg_()
        flipped = layer(x)
    expected = nn.functional.linear(x, layer.weight * layer.get_mask(), layer.bias)
    torch.testing.assert_close(flipped, expected.detach())
    assert not torch.allclose(first, flipped)


def test_eval_cache_follows_load_state_dict():
    torch.manual_seed(8)
    a = SupermaskLinear(16, 16, sparsity=0.5, tile_size=4).eval()
    b = SupermaskLinear(16, 16, sparsity=0.5, tile_size=4).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        a(x)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x))


##### Compile, dtypes #####


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph(training):
    torch.manual_seed(9)
    model = nn.Sequential(
        SupermaskLinear(16, 32, sparsity=0.5, tile_size=4), nn.ReLU(),
        SupermaskLinear(32, 8, sparsity=0.5, tile_size=8))
    model.train(training)
    x = torch.randn(4, 16)
    compiled = torch.compile(model, fullgraph=True, backend="eager" if training else "inductor")
    if training:
        compiled(x).sum().backward()
        assert model[0].scores.grad is not None and model[0].scores.grad.abs().sum() > 0
    else:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))


def test_tile_mask_reads_nothing_back_to_the_host():
    # Indexing the sorted scores with the num_pruned tensor read its value on the host (aten._local_scalar_dense):
    # a sync per forward, and inductor refused such a graph wherever a layer's forward was compiled on its own.
    from torch.fx.experimental.proxy_tensor import make_fx

    scores, num_pruned = torch.randn(8, 8), torch.tensor(20)
    graph = make_fx(supermask.tile_mask, tracing_mode="fake")(scores, num_pruned)
    assert "_local_scalar_dense" not in graph.code
    assert int((supermask.tile_mask(scores, num_pruned) == 0).sum()) == 20


def test_conv_compile_fullgraph_eval():
    torch.manual_seed(10)
    layer = SupermaskConv2d(3, 8, 3, sparsity=0.5, tile_size=2, padding=1).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="eager")(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_mask_applied_in_weight_dtype(dtype):
    torch.manual_seed(11)
    layer = SupermaskLinear(32, 16, sparsity=0.5, tile_size=8, dtype=dtype)
    mask = layer.get_mask()
    assert mask.dtype == dtype
    x = torch.randn(4, 32, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    expected = nn.functional.linear(x.float(), (layer.weight * mask).float(), layer.bias.float())
    torch.testing.assert_close(out.float(), expected.detach(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.scores.grad is not None


##### Loading checkpoints #####


def test_loads_original_superblock_checkpoint_with_shift_scale_and_dead_scores():
    torch.manual_seed(12)
    source = tiny_vit()
    apply_supermask(source, linear_sparsity=0.5, linear_sp_tilesize=8)
    state = {"module." + k: v for k, v in source.state_dict().items()}
    for name, module in source.named_modules():
        if isinstance(module, SupermaskLinear):
            state[f"module.{name}.shift"] = torch.tensor([0.0])
            state[f"module.{name}.scale"] = torch.tensor([2.0])
    # The original wrapped attention out_proj too, with scores that were never applied.
    out_proj = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    state[f"module.{out_proj}.scores"] = torch.randn(4, 4)
    state[f"module.{out_proj}.shift"] = torch.tensor([0.0])
    state[f"module.{out_proj}.scale"] = torch.tensor([1.0])

    target = tiny_vit()
    torch.manual_seed(99)
    apply_supermask(target, linear_sparsity=0.5, linear_sp_tilesize=8)
    with pytest.warns(UserWarning, match="Dropped the scores of 1 attention out_proj"):
        missing = load_supermask_state_dict(target, state)
    assert missing == []
    layer = target.encoder.layers[0].mlp[0]
    torch.testing.assert_close(layer.weight, source.encoder.layers[0].mlp[0].weight * 2)
    torch.testing.assert_close(layer.scores, source.encoder.layers[0].mlp[0].scores)


def test_loads_original_checkpoint_with_pickled_namespace_weights_only(tmp_path):
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=8)
    path = tmp_path / "model_299.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="vit_b_16"), "epoch": 299}, path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, weights_only=True)
    target = tiny_vit()
    apply_supermask(target, linear_sparsity=0.5, linear_sp_tilesize=8)
    load_supermask_state_dict(target, checkpoint["model"])
    torch.testing.assert_close(target.encoder.layers[1].mlp[3].scores, model.encoder.layers[1].mlp[3].scores)


def test_dense_checkpoint_loads_and_keeps_initial_scores():
    dense = tiny_vit()
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=8)
    missing = load_supermask_state_dict(model, dense.state_dict())
    assert "encoder.layers.encoder_layer_0.mlp.0" in missing
    torch.testing.assert_close(model.encoder.layers[0].mlp[0].weight, dense.encoder.layers[0].mlp[0].weight)


def test_score_shape_mismatch_names_layer_and_fitting_tile_size():
    source = tiny_vit()
    apply_supermask(source, linear_sparsity=0.5, linear_sp_tilesize=4)
    target = tiny_vit()
    apply_supermask(target, linear_sparsity=0.5, linear_sp_tilesize=8)
    with pytest.raises(ValueError, match=r"encoder\.layers\.encoder_layer_0\.mlp\.0.*tile size 4 would fit"):
        load_supermask_state_dict(target, source.state_dict())


def test_scores_for_a_dense_layer_are_an_error():
    source = tiny_vit()
    apply_supermask(source, linear_sparsity=0.5, linear_sp_tilesize=8)
    target = tiny_vit()
    apply_supermask(target, linear_sparsity=0.5, linear_sp_tilesize=8, skip_last_layer_sparsity=True)
    with pytest.raises(ValueError, match=r"heads\.head.*skip_last_layer_sparsity"):
        load_supermask_state_dict(target, source.state_dict())


def test_checkpoint_of_another_model_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        load_supermask_state_dict(tiny_vit(num_classes=10), tiny_vit(num_classes=3).state_dict())


##### Report and errors #####


def test_report_totals_match_masks():
    torch.manual_seed(13)
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.8, linear_sp_tilesize=8)
    report = sparsity_report(model)
    pruned = sum(int((m.get_mask() == 0).sum()) for m in model.modules() if isinstance(m, SupermaskLinear))
    assert report.pruned_params == pruned
    layers = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    attention_inputs = sum(m.in_proj_weight.numel() for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert report.total_params == layers + attention_inputs
    text = str(report)
    assert "encoder.layers.encoder_layer_1.mlp.3" in text and "prunable weights pruned" in text


def test_verbose_prints_report(capsys):
    apply_supermask(tiny_vit(), linear_sparsity=0.5, verbose=True)
    assert "heads.head" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs,match", [
    (dict(linear_sparsity=1.0), "linear_sparsity must be a number in \\[0, 1\\)"),
    (dict(conv_sparsity=-0.1), "conv_sparsity"),
    (dict(linear_sparsity=0.5, linear_sp_tilesize=0), "linear_sp_tilesize must be an integer >= 1"),
    (dict(conv1x1_sp_tilesize=2.5), "conv1x1_sp_tilesize"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_supermask(tiny_vit(), **kwargs)


def test_sparsify_offline_keeps_each_layers_mode():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=64,
                                                 mlp_dim=128, num_classes=10)
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=16, attention_sparsity=0.5,
                    attention_sp_tilesize=16)
    sparsify_offline(model.eval())
    assert not any(m.training for m in model.modules()), "frozen layers of an eval model must be in eval mode"


@pytest.mark.parametrize("training", [False, True])
def test_apply_supermask_gives_new_modules_the_mode_of_what_they_replace(training):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=10, dropout=0.5, attention_dropout=0.5)
    apply_supermask(model.train(training), linear_sparsity=0.5, linear_sp_tilesize=8, conv_sparsity=0.5,
                    conv_sp_tilesize=4, attention_sparsity=0.5, attention_sp_tilesize=8)
    wrong = [name for name, m in model.named_modules() if m.training != training]
    assert not wrong, f"modules not in the model's mode (training={training}): {wrong}"
    if not training:  # the attention's dropout=0.5 must not act in eval mode
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(model(x), model(x))
        import blocksparse

        blocksparse.apply_bsr(sparsify_offline(model), blocksize=8, min_sparsity=0.0, kernel="bmm")  # no refusal


def test_report_rows_say_what_each_layer_is_now():
    import blocksparse

    torch.manual_seed(3)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)  # head zero-initialised
    apply_supermask(model, linear_sparsity=0.75, linear_sp_tilesize=8, skip_last_layer_sparsity=True)
    masked = {r.name: r for r in sparsity_report(model).rows}
    assert masked["encoder.layers.encoder_layer_0.mlp.0"].note == "masked"
    assert masked["encoder.layers.encoder_layer_0.mlp.0"].target_sparsity == 0.75
    head = masked["heads.head"]
    assert head.actual_sparsity == 1.0 and not head.pruned and "zero-initialised" in head.note
    assert head.note.startswith("dense: classifier, skipped by skip_last_layer_sparsity"), head.note
    frozen_report = sparsity_report(sparsify_offline(model.eval()))
    frozen = {r.name: r for r in frozen_report.rows}
    row = frozen["encoder.layers.encoder_layer_0.mlp.0"]
    assert row.note.startswith("frozen") and row.target_sparsity is None and 0.7 < row.actual_sparsity < 0.8
    assert frozen["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"].note == "dense: attention_sparsity is 0"
    pruned = sum(round(r.numel * r.actual_sparsity) for r in frozen_report.rows if r.name != "heads.head")
    assert frozen_report.pruned_params == pruned, "an all-zero classifier is not counted as pruned"
    blocksparse.apply_bsr(model, blocksize=8)
    converted = {r.name: r for r in sparsity_report(model).rows}["encoder.layers.encoder_layer_0.mlp.0"]
    assert converted.note.startswith("block-sparse, kernel=") and converted.target_sparsity is None
    assert " -  " in str(sparsity_report(model)), "rows without a target show '-', not 0.000"


##### Score initialisation and sparsity schedules #####


def test_magnitude_init_keeps_exactly_the_largest_norm_tiles():
    torch.manual_seed(0)
    linear = nn.Linear(20, 12)
    layer = SupermaskLinear.from_linear(linear, sparsity=0.5, tile_size=4, score_init="magnitude")
    tiles = torch.nn.functional.pad(linear.weight.detach(), (0, 0, 0, 0)).reshape(3, 4, 5, 4)
    norms = tiles.square().sum(dim=(1, 3)).sqrt()
    torch.testing.assert_close(layer.scores.detach(), norms)
    kept = supermask.tile_mask(layer.scores.detach(), layer.num_pruned).bool()
    n_pruned = round(0.5 * (15 - 1))
    largest = norms.flatten().argsort(descending=True)[: 15 - n_pruned]
    expected = torch.zeros(15, dtype=torch.bool)
    expected[largest] = True
    assert torch.equal(kept.flatten(), expected)


def test_magnitude_init_pads_edge_tiles_and_covers_convs():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 6, 3)
    layer = SupermaskConv2d.from_conv(conv, sparsity=0.3, tile_size=2, score_init="magnitude")
    w = conv.weight.detach()
    assert layer.scores.shape == (3, 3, 2, 2)
    torch.testing.assert_close(layer.scores[2, 2, 1, 1], w[4:6, 4:5, 2:3, 2:3].norm())
    torch.testing.assert_close(layer.scores[0, 1, 0, 1], w[0:2, 2:4, 0:2, 2:3].norm())


def test_apply_supermask_magnitude_init_on_resnet_and_attention():
    model = tiny_resnet()
    apply_supermask(model, conv_sparsity=0.5, conv_sp_tilesize=4, score_init="magnitude")
    torch.testing.assert_close(model.conv1.scores, supermask.tile_norms(model.conv1.weight.detach(), 4))
    vit = tiny_vit()
    apply_supermask(vit, attention_sparsity=0.5, attention_sp_tilesize=8, score_init="magnitude")
    in_proj = vit.encoder.layers[0].self_attention.in_proj
    torch.testing.assert_close(in_proj.scores, supermask.tile_norms(in_proj.weight.detach(), 8))


def test_unknown_score_init_is_an_error():
    with pytest.raises(ValueError, match="score_init must be one of kaiming, magnitude"):
        apply_supermask(tiny_vit(), linear_sparsity=0.5, score_init="random")


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("cubic", [0.0, 1 - 0.75 ** 3, 1 - 0.5 ** 3, 1 - 0.25 ** 3, 1.0]),
])
def test_schedule_fraction_per_step(schedule, expected):
    got = [sparsity_schedule(schedule, step, 4) for step in range(5)]
    assert got == pytest.approx(expected)
    assert sparsity_schedule(schedule, 100, 4) == 1.0


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="choose one of constant, linear, cubic"):
        sparsity_schedule("exponential", 0, 10)


def test_set_sparsity_fraction_scales_each_layers_target():
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.8, linear_sp_tilesize=8, attention_sparsity=0.6,
                    attention_sp_tilesize=8)
    set_sparsity_fraction(model, 0.5)
    for layer in supermask.supermask_layers(model):
        assert layer.sparsity == pytest.approx(0.5 * layer.target_sparsity)
        assert int(layer.num_pruned) == supermask.num_pruned_tiles(layer.scores.numel(), layer.sparsity)
    set_sparsity_fraction(model, 0.0)
    assert all(bool((layer.get_mask() == 1).all()) for layer in supermask.supermask_layers(model))


def test_changing_sparsity_does_not_recompile():
    torch.manual_seed(2)
    model = nn.Sequential(SupermaskLinear(32, 32, sparsity=0.9, tile_size=4), nn.ReLU(),
                          SupermaskLinear(32, 8, sparsity=0.9, tile_size=4))
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    zeros = []
    for step in range(5):
        set_sparsity_fraction(model, sparsity_schedule("linear", step, 4))
        compiled(x).sum().backward()
        zeros.append(int((model[0].get_mask() == 0).sum()))
    assert counter.frame_count == 1, f"recompiled {counter.frame_count - 1} times while the sparsity changed"
    assert zeros == sorted(zeros) and zeros[0] == 0 and zeros[-1] > 0, zeros


def test_apply_supermask_refuses_a_bare_layer_with_a_clear_error():
    # It masks the layers a model contains: given one, it used to register a child named "" and mask nothing.
    with pytest.raises(ValueError, match=r"not a layer itself; wrap it \(nn.Sequential\(layer\)\)"):
        apply_supermask(nn.Linear(64, 64), linear_sparsity=0.5, linear_sp_tilesize=16)
