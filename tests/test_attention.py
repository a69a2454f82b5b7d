import pytest
import torch
import torch.nn as nn
import torchvision

from attention import ProjectedAttention
from supermask import (SupermaskLinear, apply_supermask, load_supermask_state_dict, skipped_layers, sparsify_offline,
                       sparsity_report)
from helpers import assert_every_mask_acts, tiny_vit


def plain_projections(mha):
    return ProjectedAttention.from_attention(mha, lambda linear: linear)


def random_attention(batch_first, bias=True, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first)
    with torch.no_grad():  # torchvision/torch zero the biases: make them count
        for p in mha.parameters():
            p.normal_(std=0.3)
    return mha


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_projected_attention_equals_multihead_attention(batch_first, need_weights, training):
    mha = random_attention(batch_first).train(training)
    projected = plain_projections(mha).train(training)
    x = torch.randn((3, 7, 32) if batch_first else (7, 3, 32))
    expected_out, expected_weights = mha(x, x, x, need_weights=need_weights)
    out, weights = projected(x, x, x, need_weights=need_weights)
    torch.testing.assert_close(out, expected_out)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights)
    else:
        assert weights is None


def test_cross_attention_with_masks_equals_multihead_attention():
    mha = random_attention(batch_first=True).eval()
    projected = plain_projections(mha).eval()
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    padding = torch.tensor([[False] * 5 + [True], [False] * 4 + [True] * 2])
    attn_mask = torch.rand(5, 6) > 0.8
    attn_mask[:, 0] = False
    for need_weights in (True, False):
        expected = mha(query, key, value, key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
        got = projected(query, key, value, key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
        torch.testing.assert_close(got[0], expected[0])


def test_unbatched_input_equals_multihead_attention():
    mha = random_attention(batch_first=True).eval()
    x = torch.randn(5, 32)
    torch.testing.assert_close(plain_projections(mha)(x, x, x)[0], mha(x, x, x)[0])


def test_supermask_attention_with_all_tiles_kept_equals_the_module_it_replaced():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        apply_supermask(model, attention_sparsity=1e-9, attention_sp_tilesize=8)  # 0 tiles pruned
        attention = model.encoder.layers[0].self_attention
        assert isinstance(attention, ProjectedAttention)
        assert isinstance(attention.in_proj, SupermaskLinear) and isinstance(attention.out_proj, SupermaskLinear)
        torch.testing.assert_close(model(x), expected)


def test_changing_any_attention_score_changes_the_output():
    model = tiny_vit().eval()
    apply_supermask(model, attention_sparsity=0.5, attention_sp_tilesize=8)
    checked = assert_every_mask_acts(model, torch.randn(2, 3, 16, 16))
    assert len(checked) == 4 and all("self_attention" in name for name in checked), checked


def test_attention_scores_get_gradients_in_training():
    model = tiny_vit().train()
    apply_supermask(model, attention_sparsity=0.5, attention_sp_tilesize=8)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    attention = model.encoder.layers[1].self_attention
    assert attention.in_proj.scores.grad.abs().sum() > 0
    assert attention.out_proj.scores.grad.abs().sum() > 0


def test_offline_attention_is_plain_multihead_attention_loading_strictly_into_torchvision():
    torch.manual_seed(2)
    model = tiny_vit().eval()
    apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=8, attention_sparsity=0.7,
                    attention_sp_tilesize=8)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        online = model(x)
        sparsify_offline(model)
        offline = model(x)
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)
    torch.testing.assert_close(offline, online)
    plain = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    plain.load_state_dict(model.state_dict(), strict=True)
    assert (plain.encoder.layers[0].self_attention.in_proj_weight == 0).float().mean() > 0.5


def test_dense_checkpoint_loads_into_attention_sparse_model():
    dense = tiny_vit()
    model = tiny_vit()
    torch.manual_seed(3)
    apply_supermask(model, attention_sparsity=0.5, attention_sp_tilesize=8)
    missing = load_supermask_state_dict(model, dense.state_dict())
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" in missing
    torch.testing.assert_close(model.encoder.layers[0].self_attention.in_proj.weight,
                               dense.encoder.layers[0].self_attention.in_proj_weight)
    # Plain load_state_dict understands the dense key names too.
    model.encoder.layers[1].self_attention.load_state_dict(
        dense.encoder.layers[1].self_attention.state_dict(), strict=False)


def test_attention_checkpoint_into_model_without_attention_sparsity_is_an_error():
    source = tiny_vit()
    apply_supermask(source, attention_sparsity=0.5, attention_sp_tilesize=8)
    target = tiny_vit()
    apply_supermask(target, linear_sparsity=0.5, linear_sp_tilesize=8)
    with pytest.raises(ValueError, match="self_attention"):
        load_supermask_state_dict(target, source.state_dict())


def test_skip_first_transformer_keeps_its_attention_dense_and_report_lists_projections():
    model = tiny_vit()
    apply_supermask(model, attention_sparsity=0.5, attention_sp_tilesize=8, skip_first_transformer_sparsity=True)
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)
    rows = {r.name: r for r in sparsity_report(model).rows}
    assert "skip_first_transformer" in rows["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"].note
    assert rows["encoder.layers.encoder_layer_1.self_attention.in_proj"].tile_size == 8
    assert rows["encoder.layers.encoder_layer_1.self_attention.out_proj"].target_sparsity == 0.5


def test_attention_compiles_fullgraph_in_training_and_inference():
    model = tiny_vit()
    apply_supermask(model, attention_sparsity=0.5, attention_sp_tilesize=8)
    attention = model.encoder.layers[0].self_attention
    x = torch.randn(2, 17, 32)
    # Training through dynamo's graph capture; inference through inductor as well.
    compiled = torch.compile(attention, fullgraph=True, backend="eager")
    attention.train()
    compiled(x, x, x, need_weights=False)[0].sum().backward()
    assert attention.in_proj.scores.grad is not None
    attention.eval()
    with torch.no_grad():
        expected = attention(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(compiled(x, x, x, need_weights=False)[0], expected)
        inductor = torch.compile(attention, fullgraph=True)
        torch.testing.assert_close(inductor(x, x, x, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)


def test_unsupported_attention_stays_dense_with_reason():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    apply_supermask(model, attention_sparsity=0.5)
    assert isinstance(model.attn, nn.MultiheadAttention)
    assert "key/value dimensions" in skipped_layers(model)["attn"]


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_projects_q_k_and_v_in_one_call(batch_first):
    projected = plain_projections(random_attention(batch_first)).eval()
    calls = []
    projected.in_proj.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    x = torch.randn(3, 7, 32)
    projected(x, x, x, need_weights=False)
    assert len(calls) == 1, f"in_proj ran {len(calls)} times for self-attention"
