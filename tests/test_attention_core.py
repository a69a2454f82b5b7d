"""The attention core: the fused C++ kernel against SDPA's math backend in float64, ProjectedAttention's cores
against nn.MultiheadAttention, and apply_bsr's choice between them."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_core
import blocksparse
import blocksparse_fused
from attention import ProjectedAttention
from helpers import at_one_and_two_threads
from test_blocksparse_fused import printed_by

# The fused kernel is part of the C++ extension, which every test machine builds.
assert blocksparse_fused.available(), blocksparse_fused.unavailable_reason()

# (dtype, products) for every form of the kernel this CPU runs: float32 inputs take float32 products, bfloat16 ones
# oneDNN's micro-kernels, float32 ones, and our AVX-512 BF16 kernel where the CPU has it.
PRODUCT_CASES = [(torch.float32, "float32")] + [(torch.bfloat16, p)
                                                for p in torch.ops.superblock.attention_core_products()]

# Relative L2 error against float64 on the same inputs; measured: float32 about 5e-7, bfloat16 about 2.2e-3 (SDPA's
# own bfloat16 result is as far).
RELATIVE_ERROR = {torch.float32: 2e-6, torch.bfloat16: 6e-3}


def truth(q, k, v, mask=None):
    """SDPA's math backend in float64 on the same (rounded) inputs, as (B, L, H, D)."""
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    return out.transpose(1, 2)


def relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype,products", PRODUCT_CASES)
@pytest.mark.parametrize("tokens", [1, 7, 197, 577, 1025])
@pytest.mark.parametrize("heads", [1, 3, 12])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_fused_kernel_matches_sdpa_math_in_float64(dtype, products, tokens, heads, head_dim):
    q, k, v = attention_core.sample(2, heads, tokens, head_dim, dtype, torch.Generator().manual_seed(tokens + heads))
    out = attention_core.fused(q, k, v, products=products)
    assert out.shape == (2, tokens, heads, head_dim) and out.dtype == dtype
    assert relative_error(out, truth(q, k, v)) < RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("dtype,products", PRODUCT_CASES)
def test_fused_kernel_takes_different_query_and_key_lengths_and_any_tile(dtype, products):
    gen = torch.Generator().manual_seed(1)
    dim = 64 if products == "amx" else 48  # 48: three column blocks of our AVX-512 kernel; AMX's take 32s
    q = torch.randn(3, 2, 50, dim, generator=gen).to(dtype)
    k, v = (torch.randn(3, 2, 33, dim, generator=gen).to(dtype) for _ in range(2))
    expected = truth(q, k, v)
    for tile in (1, 7, 64, 256):
        out = attention_core.fused(q, k, v, query_tile=tile, products=products)
        assert relative_error(out, expected) < RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_is_the_reference_up_to_rounding(dtype):
    q, k, v = attention_core.sample(2, 4, 97, 64, dtype, torch.Generator().manual_seed(2))
    expected = attention_core.reference(q, k, v)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(attention_core.fused(q, k, v), expected, **tolerance)
    assert relative_error(expected, truth(q, k, v)) < RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("dtype,products", PRODUCT_CASES)
def test_fused_kernel_is_bitwise_identical_at_one_and_two_threads(dtype, products):
    q, k, v = attention_core.sample(3, 5, 150, 64, dtype, torch.Generator().manual_seed(3))
    one, two = at_one_and_two_threads(lambda: attention_core.fused(q, k, v, products=products))
    assert torch.equal(one, two)


@pytest.mark.skipif("avx512_bf16" not in torch.ops.superblock.attention_core_products(),
                    reason="this CPU lacks AVX-512 BF16")
def test_our_bfloat16_kernel_takes_head_sizes_of_16_and_steps_aside_for_others():
    q, k, v = attention_core.sample(1, 2, 9, 24, torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 16, not 24"):
        attention_core.fused(q, k, v, products="avx512_bf16")
    assert "fused-avx512bf16" not in attention_core.fused_cores(torch.bfloat16, 24)
    expected = attention_core.run("fused", q, k, v)  # run() falls back to oneDNN's products for such a head
    assert torch.equal(attention_core.run("fused-avx512bf16", q, k, v), expected)


@pytest.mark.skipif("amx" not in torch.ops.superblock.attention_core_products(), reason="this CPU lacks AMX")
def test_our_amx_kernel_takes_head_sizes_of_32_and_steps_aside_for_others():
    q, k, v = attention_core.sample(1, 2, 9, 48, torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 32, not 48"):
        attention_core.fused(q, k, v, products="amx")
    assert "fused-amx" not in attention_core.fused_cores(torch.bfloat16, 48)
    assert "fused-amx" in attention_core.fused_cores(torch.bfloat16, 64)
    expected = attention_core.run("fused", q, k, v)  # run() falls back to oneDNN's products for such a head
    assert torch.equal(attention_core.run("fused-amx", q, k, v), expected)


def test_a_nan_query_gives_a_nan_row_and_leaves_the_others():
    q, k, v = attention_core.sample(1, 2, 9, 32, torch.float32, torch.Generator().manual_seed(4))
    q = q.clone()
    q[0, 1, 4, 0] = float("nan")
    out = attention_core.fused(q, k, v)
    assert out[0, 4, 1].isnan().all()
    assert not out[0, :4].isnan().any() and not out[0, 5:].isnan().any() and not out[0, 4, 0].isnan().any()


@pytest.mark.parametrize("dtype,products", PRODUCT_CASES)
def test_huge_scores_give_the_softmax_of_their_differences(dtype, products):
    # Scores near 1e35 (float32 reaches 3.4e38): only differences from the row's max may reach exp, or the row
    # overflows to inf/NaN.
    q, k, v = attention_core.sample(1, 2, 40, 64, dtype, torch.Generator().manual_seed(5))
    q = q * 3e17
    k = k * 3e17
    out = attention_core.fused(q, k, v, products=products)
    assert out.isfinite().all()
    assert relative_error(out, truth(q, k, v)) < RELATIVE_ERROR[dtype]


def test_fused_kernel_refuses_bad_operands_with_a_reason():
    q, k, v = attention_core.sample(1, 2, 9, 32, torch.float32)
    with pytest.raises(RuntimeError, match="D must be contiguous"):
        attention_core.fused(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
    with pytest.raises(RuntimeError, match="share a dtype"):
        attention_core.fused(q, k.double(), v)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        attention_core.fused(q.half(), k.half(), v.half())
    with pytest.raises(RuntimeError, match="products must be onednn, float32, avx512_bf16 or amx, not tiles"):
        attention_core.fused(q, k, v, products="tiles")
    assert "float32 or bfloat16" in attention_core.fused_unavailable_reason(torch.float16, 64)
    assert "even head size" in attention_core.fused_unavailable_reason(torch.bfloat16, 33)


def test_fused_op_has_a_fake_that_compile_and_export_use():
    q, k, v = attention_core.sample(2, 3, 20, 32, torch.float32)
    attention_core.fused_unavailable_reason(torch.float32, 32)  # registers the fake
    torch.library.opcheck(torch.ops.superblock.attention_core.default, (q, k, v, 0.2, 8, "float32"))


def self_attention(batch_first=True, dropout=0.0, seed=0, heads=4, dim=64):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=batch_first)
    with torch.no_grad():  # torch zeroes the biases: make them count
        for p in mha.parameters():
            p.normal_(std=0.3)
    return mha.eval()


@pytest.mark.parametrize("core", attention_core.CORES[1:])
@pytest.mark.parametrize("batch_first", [True, False])
def test_projected_attention_cores_equal_multihead_attention(core, batch_first):
    mha = self_attention(batch_first)
    projected = ProjectedAttention.from_attention(mha, lambda linear: linear)
    projected.core = core
    x = torch.randn(3, 11, 64) if batch_first else torch.randn(11, 3, 64)
    with torch.no_grad():
        expected, _ = mha(x, x, x, need_weights=False)
        out, weights = projected(x, x, x, need_weights=False)
        unbatched, _ = projected(x[0] if batch_first else x[:, 0], *(x[0] if batch_first else x[:, 0],) * 2,
                                 need_weights=False)
    assert weights is None and expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unbatched, expected[0] if batch_first else expected[:, 0], rtol=1e-5, atol=1e-5)


def test_masks_and_weights_take_sdpa_and_still_equal_multihead_attention():
    mha = self_attention()
    projected = ProjectedAttention.from_attention(mha, lambda linear: linear)
    projected.core = "fused"
    x = torch.randn(2, 6, 64)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    with torch.no_grad():
        for kwargs in ({"key_padding_mask": padding, "need_weights": False}, {"attn_mask": causal, "need_weights": False},
                       {"need_weights": True}):
            expected, expected_weights = mha(x, x, x, **kwargs)
            out, weights = projected(x, x, x, **kwargs)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            if kwargs["need_weights"]:
                torch.testing.assert_close(weights, expected_weights)


def test_dropout_acts_in_training_only():
    mha = self_attention(dropout=0.5)
    projected = ProjectedAttention.from_attention(mha, lambda linear: linear)
    projected.core = "fused"
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        expected, _ = mha(x, x, x, need_weights=False)
        evaluated, _ = projected(x, x, x, need_weights=False)
        projected.train()
        torch.manual_seed(0)
        first, _ = projected(x, x, x, need_weights=False)
        second, _ = projected(x, x, x, need_weights=False)
    torch.testing.assert_close(evaluated, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)  # dropped different weights each call
    assert not torch.allclose(first, expected)


def test_unknown_core_is_refused():
    with pytest.raises(ValueError, match="unknown attention core 'flash'"):
        ProjectedAttention(nn.Linear(8, 24), nn.Linear(8, 8), embed_dim=8, num_heads=2, core="flash")


class Encoder(nn.Module):
    """One self-attention block, called as torchvision's ViT calls it."""

    def __init__(self, core):
        super().__init__()
        mha = self_attention()
        self.attention = ProjectedAttention.from_attention(mha, lambda linear: linear)
        self.attention.core = core

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_fused_core_compiles_fullgraph_and_exports_as_one_op():
    model = Encoder("fused").eval().requires_grad_(False)
    x = torch.randn(2, 13, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (x,))
    ops = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum("superblock.attention_core" in op for op in ops) == 1, ops
    x2 = torch.randn(2, 13, 64)
    torch.testing.assert_close(exported.module()(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_fused_core_steps_aside_when_the_input_needs_gradients():
    model = Encoder("fused").eval()
    x = torch.randn(2, 5, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_choose_times_every_core_and_keeps_the_fastest(dtype):
    core, tile, seconds = attention_core.choose(2, 32, dtype, tokens=20)
    assert tile in attention_core.QUERY_TILES if core in attention_core.PRODUCTS else tile == attention_core.QUERY_TILE
    # float32 inputs take float32 products whatever the fused core: timed once, as "fused"
    assert set(seconds) == {"sdpa", "plain"} | set(attention_core.fused_cores(dtype, 32))
    assert len(attention_core.fused_cores(dtype, 32)) == (1 if dtype == torch.float32 else len(PRODUCT_CASES) - 1)
    assert core == min(seconds, key=seconds.get)


class Block(nn.Module):
    """A model holding one nn.MultiheadAttention, dense: apply_bsr has nothing to prune in it."""

    def __init__(self):
        super().__init__()
        self.self_attention = self_attention()

    def forward(self, x):
        return self.self_attention(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("faster", ["mha", "projected"])
def test_auto_keeps_multihead_attention_unless_the_core_makes_it_faster(monkeypatch, faster):
    block = Block().eval()
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        expected = block(x)
    timings = {"mha": 1.0, "projected": 2.0} if faster == "mha" else {"mha": 2.0, "projected": 1.0}
    monkeypatch.setattr(attention_core, "choose", lambda *args, **kwargs: ("fused", 32, {}))
    monkeypatch.setattr(blocksparse_fused, "median_seconds_each",
                        lambda fns, repeats=5: {key: (fn(), timings[key])[1] for key, fn in fns.items()})
    result = blocksparse.apply_bsr(block, blocksize=16)
    kept = isinstance(block.self_attention, nn.MultiheadAttention)
    assert kept == (faster == "mha")
    assert result.attention_cores == [("self_attention", "nn.MultiheadAttention" if kept else "fused")]
    assert ("fused x1" in str(result)) == (not kept)
    assert kept or block.self_attention.query_tile == 32  # the tile choose() measured fastest
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_a_kernel_that_fails_its_self_check_is_left_out_with_one_warning(monkeypatch):
    monkeypatch.setitem(attention_core._state, "checked", {})
    monkeypatch.setitem(attention_core._state, "choices", {})
    wrong = attention_core.fused
    monkeypatch.setattr(attention_core, "fused", lambda *args, **kwargs: wrong(*args, **kwargs) * 1.01)
    with pytest.warns(UserWarning, match="failed its check against the reference"):
        reason = attention_core.fused_unavailable_reason(torch.float32, 32)
    assert "failed its check" in reason
    core, _, seconds = attention_core.choose(2, 32, torch.float32, tokens=20)
    assert set(seconds) == {"sdpa", "plain"} and core in seconds  # neither fused core
    block = Block().eval()
    with pytest.warns(UserWarning, match=r"head size 16\)"):  # one check per dtype and head size
        result = blocksparse.apply_bsr(block, blocksize=16, kernel="fused")
    assert result.attention_cores == [("self_attention", "nn.MultiheadAttention")]


def test_a_core_set_by_hand_in_a_fresh_process_loads_and_checks_the_kernel_itself():
    script = """
import torch
from torch import nn
from attention import ProjectedAttention
mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
projected = ProjectedAttention.from_attention(mha, lambda linear: linear).eval().requires_grad_(False)
projected.core = "fused"  # no apply_bsr: nothing has loaded the extension yet
x = torch.randn(2, 9, 64)
with torch.no_grad():
    error = (projected(x, x, x, need_weights=False)[0] - mha(x, x, x, need_weights=False)[0]).abs().max().item()

class Call(nn.Module):
    def forward(self, x):
        return projected(x, x, x, need_weights=False)[0]

graph = torch.export.export(Call(), (x,)).graph
print("error", error)
print("ops", sum("superblock.attention_core" in str(node.target) for node in graph.nodes))
"""
    printed = printed_by(script, dict(os.environ, OMP_NUM_THREADS="1"))
    assert float(printed["error"]) < 1e-5 and printed["ops"] == "1"
