"""The fused C++ kernel (kernel="fused") against a float64 reference, and the fallback without the extension.

Where the extension cannot be built here, the tests of the kernel itself check that kernel="fused" refuses with
a RuntimeError that says why, and the fallback test still runs.
"""
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import blocksparse_fused
from blocksparse import BlockSparseLinear, apply_bsr
from helpers import at_one_and_two_threads

FUSED = blocksparse_fused.available()
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=2e-3)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sparse_linear(in_features, out_features, blocksize, sparsity, *, bias=True, dtype=torch.float32, seed=0,
                  empty_rows=(0,)):
    """A frozen nn.Linear with random kept blocks, some block-rows empty, and a random bias."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    keep = torch.rand(out_features // blocksize, in_features // blocksize, generator=gen) >= sparsity
    for row in empty_rows:
        keep[row] = False
    linear.weight.normal_(generator=gen).mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))
    if bias:
        linear.bias.normal_(generator=gen)
    return linear.to(dtype)


def reference(linear, x):
    bias = None if linear.bias is None else linear.bias.double()
    return nn.functional.linear(x.double(), linear.weight.double(), bias)


def fused_layer(linear, blocksize):
    """The layer with kernel="fused", or None after checking the refusal where the extension is unavailable."""
    if not FUSED:
        with pytest.raises(RuntimeError, match="kernel='fused' needs the C\\+\\+ extension"):
            BlockSparseLinear.from_dense(linear, blocksize, kernel="fused")
        return None
    return BlockSparseLinear.from_dense(linear, blocksize, kernel="fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [8, 16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 7, 197, 3000])
def test_fused_matches_float64_reference(dtype, blocksize, tokens):
    linear = sparse_linear(256, 128, blocksize, 0.6, dtype=dtype, seed=blocksize + tokens)  # not square
    layer = fused_layer(linear, blocksize)
    if layer is None:
        return
    x = torch.randn(tokens, 256, dtype=dtype)
    for products in blocksparse_fused.product_kinds(dtype, blocksize):  # conversion measures; each must be exact
        layer.products = products
        y = layer(x)
        assert y.dtype == dtype and y.shape == (tokens, 128)
        torch.testing.assert_close(y.double(), reference(linear, x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_takes_any_leading_shape_strided_input_and_no_bias(dtype):
    linear = sparse_linear(128, 192, 32, 0.5, bias=False, dtype=dtype, seed=1, empty_rows=(0, 3))
    layer = fused_layer(linear, 32)
    if layer is None:
        return
    inputs = [torch.randn(128, dtype=dtype), torch.randn(2, 3, 5, 128, dtype=dtype),
              torch.randn(9, 256, dtype=dtype)[:, ::2],  # rows of stride 256, columns of stride 2
              torch.randn(256, 9, dtype=dtype)[:128].t(),  # column-major
              torch.randn(4, 2, 128, dtype=dtype).transpose(0, 1)]  # leading dimensions out of order
    for x in inputs:
        for products in blocksparse_fused.product_kinds(dtype, 32):
            layer.products = products
            y = layer(x)
            assert y.shape == x.shape[:-1] + (192,)
            torch.testing.assert_close(y.double(), reference(linear, x), **TOL[dtype])


@pytest.mark.parametrize("bias", [True, False])
def test_fused_all_zero_weight_gives_the_bias(bias):
    linear = sparse_linear(64, 128, 16, 1.0, bias=bias)
    layer = fused_layer(linear, 16)
    if layer is None:
        return
    assert layer.kept_blocks == 0
    x = torch.randn(5, 64)
    expected = linear.bias.expand(5, -1) if bias else torch.zeros(5, 128)
    torch.testing.assert_close(layer(x), expected)
    assert layer(torch.randn(0, 64)).shape == (0, 128)


def test_fused_repacks_when_the_dtype_changes():
    linear = sparse_linear(128, 128, 32, 0.5, seed=3)
    layer = fused_layer(linear, 32)
    if layer is None:
        return
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(3))
    layer.to(torch.bfloat16)  # in place, like every nn.Module.to
    rounded = linear.to(torch.bfloat16)  # the weights the layer holds now
    torch.testing.assert_close(layer(x.bfloat16()).double(), reference(rounded, x.bfloat16()), **TOL[torch.bfloat16])
    torch.testing.assert_close(layer.float()(x).double(), reference(rounded, x), **TOL[torch.float32])


def test_fused_layer_loads_a_state_dict_into_its_packed_blocks():
    first = sparse_linear(128, 128, 32, 0.5, dtype=torch.bfloat16, seed=8)
    layer = fused_layer(first, 32)
    if layer is None:
        return
    second = sparse_linear(128, 128, 32, 0.5, dtype=torch.bfloat16, seed=8)
    second.weight.mul_(2)  # the same blocks, other values
    layer.load_state_dict(fused_layer(second, 32).state_dict())
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).double(), reference(second, x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_is_bitwise_identical_at_one_and_two_threads(dtype):
    linear = sparse_linear(256, 512, 32, 0.8, dtype=dtype, seed=4)
    layer = fused_layer(linear, 32)
    if layer is None:
        return
    x = torch.randn(333, 256, dtype=dtype)
    for products in blocksparse_fused.product_kinds(dtype, 32):
        layer.products = products
        one, two = at_one_and_two_threads(lambda: layer(x))
        assert torch.equal(one, two)


def fused_model(in_features, hidden, out_features, blocksize, activation, *, seed):
    """Sequential(a fused layer 70% block-sparse, activation, nn.Linear) in eval mode; None as fused_layer."""
    layer = fused_layer(sparse_linear(in_features, hidden, blocksize, 0.7, seed=seed), blocksize)
    return None if layer is None else nn.Sequential(layer, activation, nn.Linear(hidden, out_features)).eval()


def test_fused_compiles_with_inductor_as_one_node():
    model = fused_model(128, 256, 8, 32, nn.GELU(), seed=5)
    if model is None:
        return
    x = torch.randn(2, 7, 128)
    with torch.inference_mode():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)  # inductor; fullgraph: no graph break around the op
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_model_exports():
    model = fused_model(64, 128, 4, 16, nn.ReLU(), seed=6)
    if model is None:
        return
    x = torch.randn(3, 64)
    exported = torch.export.export(model, (x,))
    ops = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any("superblock.fused_bsr_linear" in op for op in ops), ops
    x2 = torch.randn(3, 64)
    torch.testing.assert_close(exported.module()(x2), model(x2))


def test_vit_b_16_logits_with_mlp_and_attention_converted():
    from supermask import apply_supermask, sparsify_offline

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    apply_supermask(model, linear_sparsity=0.9, linear_sp_tilesize=64, attention_sparsity=0.9,
                    attention_sp_tilesize=64, skip_last_layer_sparsity=True)
    model = sparsify_offline(model).eval().requires_grad_(False)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = model(x)
        result = apply_bsr(model, blocksize=64, kernel="fused" if FUSED else "auto")
        kernels = {kernel for _, kernel, _ in result.converted}
        assert len(result.converted) == 48  # 12 layers: q/k/v, out, fc1, fc2
        assert kernels == ({"fused"} if FUSED else kernels - {"fused"})
        assert len(result.fused_mlps) == (12 if FUSED else 0)  # each MLP in one BlockSparseMLP kernel
        cores = {core for _, core in result.attention_cores}
        assert len(result.attention_cores) == 12 and cores == ({"fused"} if FUSED else cores - {"fused"})
        out = model(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)


def printed_by(script, env):
    """{first word: rest of line} of what `python -c script` prints, run from the repository root with `env`."""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return dict(line.split(" ", 1) for line in run.stdout.splitlines())


def test_without_the_extension_auto_falls_back_and_fused_says_why():
    script = """
import warnings, torch
from torch import nn
import blocksparse, blocksparse_fused
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    linear = nn.Linear(64, 64).requires_grad_(False)
    linear.weight[:32].zero_()
    auto = blocksparse.BlockSparseLinear.from_dense(linear, 16)
    blocksparse.BlockSparseLinear.from_dense(linear, 16)
print("auto", auto.kernel)
print("notices", sum("fused block-sparse CPU kernel is unavailable" in str(w.message) for w in caught))
x = torch.randn(3, 64)
print("close", torch.allclose(auto(x), linear(x), atol=1e-5))
try:
    blocksparse.BlockSparseLinear.from_dense(linear, 16, kernel="fused")
except RuntimeError as e:
    print("error", e)
"""
    lines = printed_by(script, dict(os.environ, SUPERBLOCK_NO_EXTENSION="1", OMP_NUM_THREADS="1"))
    assert lines["auto"] in ("bmm", "dense")
    assert lines["notices"] == "1", "the fallback is announced once per process"
    assert lines["close"] == "True"
    assert "SUPERBLOCK_NO_EXTENSION=1 is set" in lines["error"] and "unset SUPERBLOCK_NO_EXTENSION" in lines["error"]


def test_a_failed_build_falls_back_with_one_notice(tmp_path):
    # No compiler: a fresh extension folder (nothing cached) and a C++ compiler that does not exist.
    script = """
import warnings
from torch import nn
import blocksparse, blocksparse_fused
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    linear = nn.Linear(64, 64).requires_grad_(False)
    linear.weight[:32].zero_()
    print("auto", blocksparse.BlockSparseLinear.from_dense(linear, 16).kernel)
print("reason", blocksparse_fused.unavailable_reason())
print("notices", sum("kernel is unavailable" in str(w.message) for w in caught))
"""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"),
               OMP_NUM_THREADS="1")
    env.pop("SUPERBLOCK_NO_EXTENSION", None)
    lines = printed_by(script, env)
    assert lines["auto"] in ("bmm", "dense")
    assert lines["reason"].startswith("building the C++ extension (csrc/) failed"), lines["reason"]
    assert lines["notices"] == "1"


def test_a_build_says_one_line_while_it_compiles_and_a_cached_one_says_nothing(tmp_path):
    script = "import blocksparse_fused; print('reason', blocksparse_fused.unavailable_reason())"
    # A fresh extension folder: cpp_extension compiles (here with a compiler that does not exist, to stay fast).
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("SUPERBLOCK_NO_EXTENSION", None)
    fresh = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    said = [line for line in fresh.stderr.splitlines() if "Building the fused block-sparse CPU kernel" in line]
    assert len(said) == 1, fresh.stderr
    if not FUSED:
        return
    # This process has loaded the extension, so its library is cached: the next process loads it in silence.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cached = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "reason None" in cached.stdout, cached.stderr
    assert "Building" not in cached.stderr, cached.stderr


def test_the_plain_layout_fallback_is_exact_too(monkeypatch):
    # A CPU whose packed bfloat16 micro-kernel gave wrong products gets the plain layout (ATen's generic GEMM).
    linear = sparse_linear(128, 64, 32, 0.5, dtype=torch.bfloat16, seed=7)
    if not FUSED:
        fused_layer(linear, 32)
        return
    monkeypatch.setitem(blocksparse_fused._loaded, "exact", {(torch.bfloat16, 32): False})
    layer = fused_layer(linear, 32)
    assert layer.packed_values.dim() == 3, "the plain layout keeps (kept, in, out) blocks"
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).double(), reference(linear, x), **TOL[torch.bfloat16])


def test_fused_op_refuses_indices_outside_the_weight():
    linear = sparse_linear(64, 32, 16, 0.5, seed=9)
    layer = fused_layer(linear, 16)
    if layer is None:
        return
    values, crow, col, bias = layer.fused_operands()
    x = torch.randn(3, 64)
    bad_col = col.clone()
    bad_col[0] = 4  # the input has 4 column blocks: 0..3
    bad_crow = crow.clone()
    bad_crow[-1] += 1  # one block more than there are
    for crow_, col_ in ((crow, bad_col), (bad_crow, col)):
        with pytest.raises(RuntimeError, match="row_offsets and cols do not index"):
            blocksparse_fused.fused_linear(x, values, crow_, col_, bias, 32, 32)


def test_median_seconds_each_times_the_candidates_in_interleaved_rounds():
    calls = []
    fns = {key: (lambda key=key: calls.append(key)) for key in ("a", "b", "c")}
    seconds = blocksparse_fused.median_seconds_each(fns, repeats=3)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 3, "one warm-up each, then one call of each per round"
    assert set(seconds) == {"a", "b", "c"} and all(s >= 0 for s in seconds.values())


def test_fastest_setting_against_times_its_baseline_in_the_same_rounds():
    calls = []
    (setting, seconds), baseline_seconds = blocksparse_fused.fastest_setting_against(
        lambda tile, variant: calls.append((tile, variant)), 32, ["blocks"], lambda: calls.append("dense"))
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]  # tiles 32 and 64 (at most twice the tokens), dense
    assert rounds == [[(32, "blocks"), (64, "blocks"), "dense"]] * 6, "a warm-up each, then five interleaved rounds"
    assert setting in ((32, "blocks"), (64, "blocks")) and seconds >= 0 and baseline_seconds >= 0


@pytest.mark.slow
def test_every_kernel_source_compiles_for_a_cpu_without_avx512(tmp_path):
    # The extension is built for the CPU it runs on (-march=native), so on an AVX-512 machine a helper or lambda that
    # lacks its function's target attribute goes unnoticed, and the build fails on an AVX2-only CPU. Build each
    # source for x86-64-v3 (AVX2, no AVX-512) instead; -O0 still inlines the intrinsics, where such a mismatch fails.
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    for source in blocksparse_fused.SOURCES:
        run = subprocess.run(["g++", "-std=c++20", "-O0", "-march=x86-64-v3", "-fopenmp", "-fPIC", *includes, "-c",
                              source, "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True, timeout=600)
        errors = [line for line in run.stderr.splitlines() if "error" in line]
        assert run.returncode == 0, f"{os.path.basename(source)}: {errors[:3]}"
