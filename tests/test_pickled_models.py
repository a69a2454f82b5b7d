"""A converted model saved whole (torch.save(model)) and loaded in a fresh process, perhaps on another CPU."""
import os
import pickle

import pytest
import torch
from torch import nn

import attention_core
import blocksparse_fused
import blocksparse_int8
import residual_norm
from attention import ProjectedAttention
from blocksparse import BlockSparseLinear, apply_bsr
from blocksparse_int8 import Int8BlockSparseLinear
from blocksparse_mlp import BlockSparseMLP
from helpers import ROOT, run_script
from timm_attention import CoreAttention
from test_blocksparse import small_vit

# Loads the models torch.save wrote, runs each on its input and compares with the output it gave before saving; then
# prints every setting that names an instruction set. With "export" it exports each instead (the ops' fakes must be
# registered by the unpickling alone) and prints the SuperBlock ops in its graph.
LOADER = f"""
import sys
sys.path.insert(0, {ROOT!r})
import torch
saved = torch.load(sys.argv[1], weights_only=False)
for name, (model, x, expected) in saved.items():
    tolerance = 1e-5 if expected.dtype == torch.float32 else 1e-2
    if sys.argv[2:] == ["export"]:
        program = torch.export.export(model, (x,))
        ops = {{str(n.target).split(".")[1] for n in program.graph.nodes if str(n.target).startswith("superblock.")}}
        with torch.inference_mode():
            torch.testing.assert_close(program.module()(x), expected, rtol=tolerance, atol=tolerance)
        print(name, "exported", *sorted(ops))
        continue
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=tolerance, atol=tolerance)
    settings = sorted({{str(getattr(m, a)) for m in model.modules() for a in ("products", "isa", "core")
                        if hasattr(m, a)}})
    print(name, "ok", *settings)
"""
LOADED = [["float32", "ok"], ["bfloat16", "ok"], ["int8", "ok"]]


def converted_models():
    """{name: (model, input, output)}: float32, bfloat16 and int8 ViTs, converted with the fused kernels; where this
    CPU has AMX, set to use it everywhere it can (what another CPU may lack)."""
    models = {}
    for name, dtype, quantize in [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None),
                                  ("int8", torch.bfloat16, "int8")]:
        model = small_vit(blocksize=32).to(dtype)
        apply_bsr(model, blocksize=32, kernel="fused", quantize=quantize)
        for module in model.modules():
            if isinstance(module, (BlockSparseLinear, BlockSparseMLP)) and getattr(module, "isa", None) is None:
                if "amx" in blocksparse_fused.product_kinds(dtype, 32):
                    module.products = "amx"
            if isinstance(module, (Int8BlockSparseLinear, BlockSparseMLP)) and module.isa is not None:
                if "amx" in blocksparse_int8.isas(32):
                    module.isa = "amx"
            if isinstance(module, ProjectedAttention) and "fused-amx" in attention_core.fused_cores(dtype, 32):
                module.core = "fused-amx"
        models[name] = model
    return examples_of(models)


def folded_model():
    """{"folded": (model, input, output)}: a ViT whose blocks are folded and nothing else, its only C++ ops its
    norms' (a file of its own: loading the other models loads the ops too)."""
    # Frozen, as apply_bsr leaves a model: the ops compute no gradients, so export takes them only then.
    model = small_vit(blocksize=32).requires_grad_(False)
    for i, block in enumerate(model.encoder.layers):
        model.encoder.layers[i] = residual_norm.fold(block)
    residual_norm.chain(model)
    return examples_of({"folded": model})


def examples_of(models):
    examples = {}
    for name, model in models.items():
        x = torch.randn(2, 3, 32, 32).to(next(model.parameters()).dtype)
        with torch.inference_mode():
            examples[name] = (model, x, model(x))
    return examples


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickled")
    torch.save(converted_models(), folder / "models.pth")
    torch.save(folded_model(), folder / "folded.pth")
    (folder / "loader.py").write_text(LOADER)
    return folder


def load_elsewhere(saved, file="models.pth", *args, **env):
    os.environ.update(env)
    try:
        return run_script([str(saved / "loader.py"), str(saved / file), *args])
    finally:
        for key in env:
            del os.environ[key]


def test_a_pickled_model_runs_in_a_fresh_process(saved):
    result = load_elsewhere(saved)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split()[:2] for line in result.stdout.splitlines()] == LOADED
    result = load_elsewhere(saved, "folded.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[:2] == ["folded", "ok"]


def test_a_pickled_model_exports_in_a_fresh_process(saved):
    result = load_elsewhere(saved, "models.pth", "export")
    assert result.returncode == 0, result.stderr[-2000:]
    exported = {line.split()[0]: set(line.split()[2:]) for line in result.stdout.splitlines()}
    # The MLPs are pruned; in int8 the dense attention projections are int8 layers.
    assert {"fused_bsr_mlp", "attention_core"} <= exported["float32"]
    assert {"fused_bsr_mlp", "attention_core"} <= exported["bfloat16"]
    assert {"int8_bsr_mlp", "int8_bsr_linear", "attention_core"} <= exported["int8"]
    result = load_elsewhere(saved, "folded.pth", "export")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["folded", "exported", "add_layer_norm", "layer_norm"]


def test_a_pickled_model_drops_what_this_cpu_lacks(saved):
    # What a CPU without AMX (the AMD EPYC) does with a model converted on one with it; elsewhere the model never
    # asked for AMX and this checks the fresh process alone.
    result = load_elsewhere(saved, SUPERBLOCK_HIDE_ISA="amx")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == LOADED
    assert not any("amx" in word for line in lines for word in line.split()[2:]), lines


def test_a_pickled_model_says_why_it_cannot_load_without_the_extension(saved):
    result = load_elsewhere(saved, SUPERBLOCK_NO_EXTENSION="1")
    assert result.returncode != 0
    assert ("this pickled model runs SuperBlock's C++ kernels, which cannot run here: SUPERBLOCK_NO_EXTENSION=1 is "
            "set; unset SUPERBLOCK_NO_EXTENSION") in result.stderr



def test_an_unpickled_attention_takes_onednn_products_where_its_own_are_missing(monkeypatch):
    # As on a CPU without AMX or AVX-512 BF16: the op lists oneDNN's and float32 products alone.
    monkeypatch.setitem(attention_core._state, "products", ("onednn", "float32"))
    cores = ("fused-amx", "fused-avx512bf16", "fused-fp32", "fused", "sdpa", "plain")
    assert [attention_core.settled(core, 32) for core in cores] == [
        "fused", "fused", "fused-fp32", "fused", "sdpa", "plain"]
    import timm  # requirements-dev.txt
    attention = ProjectedAttention(nn.Linear(64, 192), nn.Linear(64, 64), embed_dim=64, num_heads=2,
                                   core="fused-amx")
    timm_attention = CoreAttention(timm.layers.Attention(64, num_heads=2), core="fused-avx512bf16")
    assert pickle.loads(pickle.dumps(attention)).core == "fused"
    assert pickle.loads(pickle.dumps(timm_attention)).core == "fused"
