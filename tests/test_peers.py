import os
import sys

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "benchmarks"))  # after the root: benchmarks/attention_core.py must not shadow the module
import peers  # noqa: E402


def tiny_vit():
    # A vit_b_16 in miniature: two layers, width 64, MLP 128; block 16 divides every projection.
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)


def zero_blocks(weight, blocksize):
    rows, cols = weight.shape
    blocks = weight.detach().reshape(rows // blocksize, blocksize, cols // blocksize, blocksize)
    return int((blocks.abs().sum(dim=(1, 3)) == 0).sum())


def prune(model, attention):
    generator = torch.Generator().manual_seed(0)
    for weight in peers.prunable_weights(model, attention).values():
        peers.prune_blocks_(weight, 16, 0.9, generator)


def test_prune_zeroes_exact_block_count_only_in_mlp_linears():
    torch.manual_seed(0)
    model = tiny_vit()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prune(model, attention=False)
    mlp_weights = {f"encoder.layers.encoder_layer_{i}.mlp.{j}.weight" for i in range(2) for j in (0, 3)}
    assert set(peers.prunable_weights(model)) == mlp_weights
    for name, param in model.named_parameters():
        if name in mlp_weights:
            # 128x64 in 16x16 blocks: 32 blocks, round(0.9 * 32) = 29 zeroed
            assert zero_blocks(param, 16) == 29, f"{name}: {zero_blocks(param, 16)} zero blocks, expected 29"
            kept = param != 0
            assert torch.equal(param[kept], before[name][kept]), f"{name}: kept weights changed"
        else:
            assert torch.equal(param, before[name]), f"{name} is not an MLP Linear weight but was changed"


def test_prune_with_attention_covers_the_projections():
    torch.manual_seed(0)
    model = tiny_vit()
    prune(model, attention=True)
    for i in range(2):
        attention = model.encoder.layers[i].self_attention
        # in_proj 192x64: 48 blocks, round(43.2) = 43; out_proj 64x64: 16 blocks, round(14.4) = 14
        assert zero_blocks(attention.in_proj_weight, 16) == 43
        assert zero_blocks(attention.out_proj.weight, 16) == 14
        assert zero_blocks(model.encoder.layers[i].mlp[0].weight, 16) == 29


def test_missing_peer_package_skips_its_rows_with_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    setup = peers.Setup(model=nn.Linear(4, 4), x=torch.randn(1, 4), threads=1, blocksize=16, workdir="unused")
    for name in ["onnxruntime-float32", "onnxruntime-int8", "openvino-float32", "openvino-int8"]:
        fn, note = peers.build(name, setup)
        assert fn is None, f"{name} was built without its package"
        assert note.startswith("skipped:") and "pip install -r requirements-bench.txt" in note, note


def test_failing_build_becomes_a_row_not_an_exception(monkeypatch):
    def broken(name, setup):
        raise RuntimeError("exporter crashed\nlong traceback")

    monkeypatch.setitem(peers.BUILDERS, "onnxruntime", broken)
    fn, note = peers.build("onnxruntime-float32", setup=None)
    assert fn is None and note == "failed: RuntimeError: exporter crashed"


def test_superblock_int8_without_quantize_keyword_is_skipped(monkeypatch):
    def apply_bsr(model, blocksize, min_sparsity=0.5, kernel="auto", filter_fn=None):
        raise AssertionError("int8 must pass quantize=")

    monkeypatch.setattr(peers.blocksparse, "apply_bsr", apply_bsr)
    setup = peers.Setup(model=nn.Sequential(nn.Linear(4, 4)), x=torch.randn(1, 4), threads=1, blocksize=16,
                        workdir="unused")
    fn, note = peers.build("superblock-int8", setup)
    assert fn is None and note == "skipped: SuperBlock int8 not available in this checkout"


def test_rejects_unknown_variant_in_only():
    args = peers.get_args_parser().parse_args(["--only", "torch-float32,tensorrt-int8"])
    with pytest.raises(peers.utils.InputError, match="unknown tensorrt-int8; choose from torch-float32"):
        peers.main(args)
