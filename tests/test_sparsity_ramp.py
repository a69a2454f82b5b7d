import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounter

import supermask
from supermask import SupermaskConv2d, SupermaskLinear, apply_supermask, set_sparsity_fraction, sparsity_schedule
from test_supermask import tiny_resnet, tiny_vit


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
