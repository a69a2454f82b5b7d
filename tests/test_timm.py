"""timm models (timm/NAME): built by models.build_model, masked with the same flag semantics as torchvision's ViTs,
their Mlp fused by apply_bsr (float and int8), and a train -> evaluate -> compact run that gives back a timm model.

All on timm's deit_tiny_patch16_224 at 32 pixels with a random head: nothing is downloaded.
"""
import copy
import os
import sys

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import blocksparse  # noqa: E402
import blocksparse_int8  # noqa: E402
import compact  # noqa: E402
import models  # noqa: E402
import supermask  # noqa: E402
import timm_attention  # noqa: E402
from helpers import ROOT, assert_ok, run_in_process, run_script, write_image_folder  # noqa: E402

NAME = "timm/deit_tiny_patch16_224"
SIZE = 32
MLP_SPARSITY, ATTENTION_SPARSITY, TILE = 0.9, 0.5, 16


def deit(num_classes=5):
    torch.manual_seed(0)
    return models.build_model(NAME, num_classes=num_classes, image_size=SIZE)


def images(count=3):
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


##### Building #####


def test_build_model_makes_the_timm_model_at_the_image_size():
    model = deit(num_classes=7)
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert model.patch_embed.img_size == (SIZE, SIZE) and model.head.out_features == 7
    assert model(images(2)).shape == (2, 7)
    assert models.is_vit(NAME) and not models.is_vit("timm/resnet18")
    assert isinstance(models.build_model("timm/resnet18", num_classes=3, image_size=SIZE),
                      timm.models.resnet.ResNet)  # no img_size for a model that takes any size


def test_unknown_timm_name_is_one_clear_line():
    with pytest.raises(ValueError, match=r"timm/deit_tiny_patch16_22 is not a timm model; did you mean "
                                         r"timm/deit_tiny_patch16_224"):
        models.build_model("timm/deit_tiny_patch16_22", num_classes=3, image_size=SIZE)
    result = run_in_process("benchmark.py", ["--model", "timm/no_such_net", "--device", "cpu"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["benchmark.py: error: --model timm/no_such_net is not a timm model; see timm.list_models()"], \
        result.stderr


def test_image_size_not_a_multiple_of_the_patch_is_refused():
    result = run_in_process("benchmark.py", ["--model", NAME, "--device", "cpu", "--image-size", "40"])
    assert result.returncode == 2
    assert "--image-size 40 is not a multiple of timm/deit_tiny_patch16_224's patch size 16; pass 32 or 48" \
        in result.stderr, result.stderr


def test_without_timm_a_timm_model_says_how_to_install_it_and_torchvision_models_never_import_it():
    # The import fails as it does where timm is not installed.
    code = ("import sys, runpy; sys.modules['timm'] = None; "
            "import models, supermask, blocksparse, compact, cli; "
            "models.build_model('vit_tiny', num_classes=3, image_size=16); "
            "assert not [m for m in sys.modules if m.startswith('timm.')]; "
            "sys.argv = ['benchmark.py', '--model', 'timm/deit_tiny_patch16_224', '--device', 'cpu']; "
            "runpy.run_path('benchmark.py', run_name='__main__')")
    result = run_script(["-c", code])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["benchmark.py: error: --model timm/ models are PyTorch Image Models: pip install timm"], \
        result.stderr


def test_pretrained_weights_come_through_timm_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    pretrained = timm.create_model("deit_tiny_patch16_224", pretrained=False)  # 1000 classes, 224 pixels
    path = str(tmp_path / "deit_tiny.pth")
    torch.save(pretrained.state_dict(), path)
    model = models.build_model(NAME, weights=path, num_classes=5, image_size=SIZE)
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, pretrained.blocks[3].mlp.fc1.weight)
    assert model.pos_embed.shape == (1, 1 + (SIZE // 16) ** 2, 192)  # resampled by timm to the image size
    assert model.head.out_features == 5  # a new classifier for the data's classes
    assert models.pretrained_classes(NAME, path) == 1000 and models.pretrained_classes(NAME, "DEFAULT") == 1000
    with pytest.raises(ValueError, match="no pretrained weights no_such_tag .* its tags are fb_in1k"):
        models.build_model(NAME, weights="no_such_tag", num_classes=5, image_size=SIZE)


##### The Supermask flags mean the same on timm's models #####


def _mask_fraction(layer):
    if not isinstance(layer, supermask.SupermaskLinear):
        return 0.0
    return 1.0 - layer.get_mask().float().mean().item()


@pytest.mark.parametrize("attention,skip_last,skip_first", [
    (0.0, False, False), (ATTENTION_SPARSITY, False, False), (ATTENTION_SPARSITY, True, True)])
def test_each_layer_kind_is_masked_at_its_flag(attention, skip_last, skip_first):
    model = deit()
    supermask.apply_supermask(model, linear_sparsity=MLP_SPARSITY, linear_sp_tilesize=TILE,
                              attention_sparsity=attention, attention_sp_tilesize=TILE,
                              skip_last_layer_sparsity=skip_last, skip_first_transformer_sparsity=skip_first)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 12 * 4 + 1
    for name, layer in linears.items():
        first_block = name.startswith("blocks.0.")
        if name == "head":  # 5x192, 12 tiles: lowered to its maximum sparsity, 10 of them pruned
            expected = 0.0 if skip_last else 10 / 12
        elif skip_first and first_block:
            expected = 0.0
        elif ".attn." in name:  # qkv and proj
            expected = attention
        else:  # mlp.fc1, mlp.fc2
            expected = MLP_SPARSITY
        assert _mask_fraction(layer) == pytest.approx(expected, abs=0.01), f"{name}: {_mask_fraction(layer)}"
    kinds = supermask.layer_kinds(model)
    if attention:
        assert kinds["blocks.1.attn.qkv"] == kinds["blocks.1.attn.proj"] == ("attention", attention)
    else:
        assert supermask.skipped_layers(model)["blocks.1.attn.qkv"] == "attention_sparsity is 0"


def test_attention_projections_are_found_by_the_module_type_not_its_name():
    model = deit()
    # Renamed, timm's Attention is still an attention module; a Linear named "qkv" elsewhere is not.
    model.blocks[2].renamed = model.blocks[2].attn
    del model.blocks[2].attn
    projections = supermask.attention_projections(model)
    assert {"blocks.2.renamed.qkv", "blocks.2.renamed.proj", "blocks.3.attn.qkv"} <= projections
    assert not any("mlp" in name or name == "head" for name in projections)


##### Block-sparse inference #####


@pytest.fixture(scope="module")
def pruned():
    """deit_tiny with its MLPs 90% pruned, attention 50%, in 16x16 tiles, masks frozen into the weights."""
    model = deit().eval()
    supermask.apply_supermask(model, linear_sparsity=MLP_SPARSITY, linear_sp_tilesize=TILE,
                              attention_sparsity=ATTENTION_SPARSITY, attention_sp_tilesize=TILE,
                              skip_last_layer_sparsity=True)
    return supermask.sparsify_offline(model).requires_grad_(False)


def _mlp_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, timm.layers.Mlp)]


def test_apply_bsr_fuses_every_timm_mlp_and_matches_the_float_model(pruned):
    model = copy.deepcopy(pruned)
    result = blocksparse.apply_bsr(model, TILE, kernel="fused")
    assert result.fused_mlps == [f"{name}.fc1" for name in _mlp_names(pruned)] and len(result.fused_mlps) == 12
    assert all("hidden blocks unused" in what for _, _, what in result.mlp_pairs) and not result.unfused_mlps
    layers = blocksparse.block_sparse_layers(model)
    assert {"blocks.5.mlp.fc1", "blocks.5.mlp.fc2", "blocks.5.attn.qkv", "blocks.5.attn.proj"} <= set(layers)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), pruned(images()), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(blocksparse_int8.unavailable_reason(TILE) is not None,
                    reason=f"int8 kernels: {blocksparse_int8.unavailable_reason(TILE)}")
def test_int8_fuses_every_timm_mlp_and_matches_its_reference(pruned):
    model, reference = copy.deepcopy(pruned), copy.deepcopy(pruned)
    result = blocksparse.apply_bsr(model, TILE, kernel="fused", quantize="int8")
    blocksparse.apply_bsr(reference, TILE, kernel="bmm", quantize="int8")  # the pure-PyTorch int8 reference
    assert len(result.fused_mlps) == 12
    assert all(kernel.startswith("int8/") for name, kernel, _ in result.converted if name != "head")
    with torch.no_grad():
        out, expected, floats = model(images()), reference(images()), pruned(images())
    # As tests/test_blocksparse_int8.py bounds a torchvision ViT's: relative L2 error of the logits.
    to_reference, to_float = [((out - y).norm() / y.norm()).item() for y in (expected, floats)]
    assert to_reference < 2e-2, f"int8 fused against the int8 reference: relative L2 error {to_reference:.2e}"
    assert to_float < 0.1, f"int8 against the float model: relative L2 error {to_float:.4f}"


@pytest.mark.parametrize("kernel", ["fused", "bmm"])
def test_apply_bsr_runs_timm_attention_on_the_fused_core_with_the_same_logits(pruned, kernel):
    model = copy.deepcopy(pruned)
    x = images()
    with torch.no_grad():
        expected = model(x)
    result = blocksparse.apply_bsr(model, TILE, kernel=kernel)
    attentions = [m for m in model.modules() if isinstance(m, timm_attention.CoreAttention)]
    timm_ones = [m for m in model.modules() if type(m) is timm.layers.attention.Attention]
    if kernel == "fused":  # each block's attention runs our kernel; "bmm" (pure PyTorch) leaves timm's own
        assert len(attentions) == 12 and not timm_ones and {m.core for m in attentions} == {"fused"}
        assert result.attention_cores == [(f"blocks.{i}.attn", "fused") for i in range(12)]
    else:
        assert not attentions and len(timm_ones) == 12
        assert {core for _, core in result.attention_cores} == {"timm Attention"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_core_attention_equals_timm_attention_with_masks_dropout_and_gradients():
    torch.manual_seed(0)
    original = timm.layers.attention.Attention(32, num_heads=4, qkv_bias=True, attn_drop=0.5).eval()
    core = timm_attention.CoreAttention(copy.deepcopy(original), "fused")
    assert set(core.state_dict()) == set(original.state_dict())  # the same children under the same names
    x = torch.randn(2, 7, 32)
    mask = torch.zeros(7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}):
            torch.testing.assert_close(core(x, **kwargs), original(x, **kwargs), rtol=1e-5, atol=1e-5)
    core.train()
    torch.manual_seed(1)
    first, second = core(x), core(x)
    assert not torch.allclose(first, second)  # attention dropout acts in training
    first.sum().backward()
    assert core.qkv.weight.grad is not None


def test_a_gated_mlp_is_left_unfused_with_the_reason():
    model = nn.Sequential(timm.layers.SwiGLU(in_features=64, hidden_features=256)).eval()
    for layer in (model[0].fc1_g, model[0].fc1_x, model[0].fc2):
        with torch.no_grad():
            layer.weight[:, 16:] = 0  # 3 of 4 column blocks pruned
    result = blocksparse.apply_bsr(model, TILE, kernel="fused")
    assert not result.fused_mlps
    assert result.unfused_mlps == [("0", result.unfused_mlps[0][1])] and "SwiGLU is gated" in result.unfused_mlps[0][1]
    assert "left 1 MLPs unfused" in str(result)


##### train.py -> evaluate.py --bsr --save-compact -> load_compact #####


def test_train_evaluate_compact_gives_back_a_timm_model_with_the_same_outputs(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), classes=3, train_per_class=4, val_per_class=2, size=SIZE)
    common = ["--data-path", data, "--model", NAME, "--device", "cpu", "-j", "0", "--val-crop-size", str(SIZE),
              "--val-resize-size", str(SIZE), "--sparsity-linear", "0.75", "--sp-linear-tile-size", str(TILE),
              "--sparsity-attention", "0.5", "--sp-attention-tile-size", str(TILE)]
    out = str(tmp_path / "run")
    trained = run_script(["train.py", *common, "--train-crop-size", str(SIZE), "-b", "6", "--epochs", "1",
                          "--output-dir", out], timeout=300)
    assert_ok(trained)
    path = str(tmp_path / "compact.pth")
    evaluated = run_in_process("evaluate.py", [*common, "-b", "6", "--weights-path", os.path.join(out, "checkpoint.pth"),
                                               "--bsr", str(TILE), "--save-compact", path])
    assert_ok(evaluated)
    loaded = compact.load_compact(path)
    assert isinstance(loaded, timm.models.vision_transformer.VisionTransformer)
    assert isinstance(loaded.blocks[0].mlp.fc1, blocksparse.BlockSparseMLP)
    assert torch.load(path, weights_only=True)["architecture"]["model"] == NAME
    # The same model, from the training checkpoint: masks frozen into a dense timm model.
    dense = models.build_model(NAME, num_classes=3, image_size=SIZE).eval()
    supermask.apply_supermask(dense, linear_sparsity=0.75, linear_sp_tilesize=TILE, attention_sparsity=0.5,
                              attention_sp_tilesize=TILE)
    supermask.load_supermask_state_dict(dense, torch.load(os.path.join(out, "checkpoint.pth"),
                                                          weights_only=False)["model"])
    supermask.sparsify_offline(dense)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), dense(images()), atol=1e-4, rtol=1e-4)
    rerun = run_in_process("evaluate.py", ["--data-path", data, "--device", "cpu", "-j", "0", "-b", "6",
                                           "--weights-path", path])  # no flags: the file names its timm model
    assert_ok(rerun)
    assert "Acc@1" in rerun.stdout and ROOT
    assert sys.modules.get("timm") is timm


def test_transformer_embedding_decay_reaches_timms_position_embedding_and_class_token():
    import argparse

    import train

    model = deit()
    args = argparse.Namespace(bias_weight_decay=None, transformer_embedding_decay=0.0, norm_weight_decay=None,
                              weight_decay=0.05, opt="adamw", lr=1e-3)
    optimizer = train.build_optimizer(model, args)
    no_decay = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert id(model.blocks[0].mlp.fc1.weight) not in no_decay
