"""Where the time goes in a block-sparse vit_b_16: self CPU time per forward by kind of op, under torch.profiler.

    python benchmarks/profile_model.py [--variant int8] [--attention] [--kernel auto] [--core auto] [--norms auto]
        [--batch-size 8] [--iters 3]

vit_b_16 with a random head, blocks of --blocksize pruned at random (--sparsity of them) in every MLP Linear, and with
--attention in the attention projections (in_proj_weight, out_proj) too; then, by --variant: "dense" (float32, as
pruned), "float32" or "bf16" (apply_bsr on the float32 or bfloat16 model), "int8" (apply_bsr(quantize="int8") on the
bfloat16 model); --core sdpa puts back the attention core of before the fused one (SDPA in every ProjectedAttention,
nn.MultiheadAttention where the projections stay dense); --norms aten unfolds the blocks (residual_norm.unfold: ATen's
residual adds and LayerNorms, as before they were folded). One warm-up forward, then --iters forwards under the
profiler; the table groups each op's self CPU time into block-sparse and int8 layers (superblock::*), dense Linear,
the attention core, LayerNorm (with the residual adds folded into it) and the rest, then lists the top ops. Self times are the calling thread's: an op's work on intra-op threads counts once, as wall time;
an op that a superblock op calls (the float fused MLP's GELU) counts in the superblock group.
"""
import argparse
import collections
import os
import sys
import time

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import blocksparse  # noqa: E402
import residual_norm  # noqa: E402
from attention import restore_sdpa  # noqa: E402
import utils  # noqa: E402

VARIANTS = ("dense", "float32", "bf16", "int8")
GROUPS = ("block-sparse/int8 (superblock::*)", "dense Linear", "attention core", "LayerNorm (+ folded adds)",
          "the rest")
DENSE_LINEAR = {"aten::linear", "aten::addmm", "aten::mm", "aten::_int_mm"}
ATTENTION = {"aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax", "aten::_transform_bias_rescale_qkv",
             "aten::_native_multi_head_attention"}
LAYER_NORM = {"aten::layer_norm", "aten::native_layer_norm", "superblock::layer_norm", "superblock::add_layer_norm"}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--variant", default="int8", choices=VARIANTS, help="the model to profile (default: int8)")
    parser.add_argument("--attention", action="store_true",
                        help="also prune the attention projections, in_proj_weight and out_proj (default: MLPs only)")
    parser.add_argument("--blocksize", default=64, type=int, help="block edge of the pruning and of apply_bsr "
                        "(default: 64)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "fused"],
                        help="apply_bsr's kernel: 'auto' times each layer's forms and keeps the fastest, 'fused' runs "
                        "the C++ kernels everywhere, int8 ones for --variant int8 (default: auto)")
    parser.add_argument("--core", default="auto", choices=["auto", "sdpa"],
                        help="the attention core: 'auto' keeps apply_bsr's choice, 'sdpa' runs SDPA as before the "
                        "fused core existed (default: auto)")
    parser.add_argument("--norms", default="auto", choices=["auto", "aten"],
                        help="the blocks' residual adds and LayerNorms: 'auto' keeps apply_bsr's folding, 'aten' "
                        "unfolds the blocks, as before they were folded (default: auto)")
    parser.add_argument("--sparsity", default=0.9, type=float,
                        help="fraction of blocks pruned at random (default: 0.9)")
    parser.add_argument("-b", "--batch-size", default=8, type=int, help="images per forward (default: 8)")
    parser.add_argument("--image-size", default=224, type=int, help="image edge in pixels (default: 224)")
    parser.add_argument("--iters", default=3, type=int, help="profiled forwards after one warm-up (default: 3)")
    parser.add_argument("--top", default=12, type=int, help="ops listed by self time (default: 12)")
    return parser


def prune_blocks(weight, blocksize, sparsity, generator):
    """Zero ``sparsity`` of ``weight``'s ``blocksize`` blocks, chosen at random, in place."""
    rows, cols = weight.shape[0] // blocksize, weight.shape[1] // blocksize
    keep = torch.rand(rows, cols, generator=generator) >= sparsity
    weight.mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))


@torch.no_grad()
def pruned_vit(args):
    """vit_b_16 in eval mode, a random head, its MLP Linears (and with --attention its projections) pruned."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(num_classes=10, image_size=args.image_size)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: every logit would be 0
    generator = torch.Generator().manual_seed(0)
    for layer in model.encoder.layers:
        weights = [layer.mlp[0].weight, layer.mlp[3].weight]
        if args.attention:
            weights += [layer.self_attention.in_proj_weight, layer.self_attention.out_proj.weight]
        for weight in weights:
            prune_blocks(weight, args.blocksize, args.sparsity, generator)
    return model.eval().requires_grad_(False)


def convert(model, args):
    """The --variant form of ``model`` (in place) and a line saying what apply_bsr did, or None for "dense"."""
    if args.variant == "dense":
        return model, None
    if args.variant in ("bf16", "int8"):
        model = model.to(torch.bfloat16)
    start = time.perf_counter()
    result = blocksparse.apply_bsr(model, args.blocksize, kernel=args.kernel,
                                   quantize="int8" if args.variant == "int8" else None)
    seconds = time.perf_counter() - start
    if args.core == "sdpa":
        restore_sdpa(model)
    if args.norms == "aten":
        residual_norm.unfold(model)
    cores = collections.Counter(core for _, core in result.attention_cores)
    kernels = collections.Counter(kernel for _, kernel, _ in result.converted)
    what = (f"apply_bsr in {seconds:.1f} s: {len(result.converted)} layers converted "
            f"({', '.join(f'{n} {k}' for k, n in sorted(kernels.items()))}), {len(result.left_dense)} left dense, "
            f"{len(result.fused_mlps)} MLPs fused; attention cores: "
            f"{', '.join(f'{n} {c}' for c, n in sorted(cores.items()))}{' (replaced by sdpa)' if args.core == 'sdpa' else ''}; "
            f"{0 if args.norms == 'aten' else len(result.folded_blocks)} blocks' add and LayerNorm folded")
    return model, what


def group_of(event):
    """Which of GROUPS a profiled op counts in: an op that a superblock op calls (the float fused MLP's GELU) counts
    as part of it."""
    if event.name == "superblock::attention_core":
        return GROUPS[2]
    if event.name in LAYER_NORM:
        return GROUPS[3]
    parent = event
    while parent is not None:
        if parent.name.startswith("superblock::"):
            return GROUPS[0]
        parent = parent.cpu_parent
    name = event.name
    if name in DENSE_LINEAR:
        return GROUPS[1]
    if name in ATTENTION or "scaled_dot_product" in name:
        return GROUPS[2]
    return GROUPS[4]


def main(args):
    utils.keep_freed_memory()
    print(f"{benchmark.cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, what = convert(pruned_vit(args), args)
    dtype = torch.bfloat16 if args.variant in ("bf16", "int8") else torch.float32
    pruned = "the MLPs and attention projections" if args.attention else "the MLPs"
    print(f"vit_b_16, {args.variant} ({dtype}, kernel {args.kernel}), batch {args.batch_size}, {args.image_size} px, "
          f"blocks of {args.blocksize} {args.sparsity:.0%} pruned in {pruned}")
    if what:
        print(what)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, dtype=dtype)
    with torch.inference_mode():
        model(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.iters):
                model(x)
            wall = (time.perf_counter() - start) / args.iters
    groups, ops, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        ms = event.self_cpu_time_total / 1e3 / args.iters
        groups[group_of(event)] += ms
        ops[event.name] += ms
        calls[event.name] += 1 / args.iters
    total = sum(groups.values())
    print(f"\n{wall * 1e3:.0f} ms per forward under the profiler; self CPU time {total:.0f} ms per forward")
    print(f"{'group':36s} {'ms/forward':>10s} {'share':>7s}")
    for group in GROUPS:
        print(f"{group:36s} {groups[group]:10.1f} {groups[group] / total:7.1%}")
    print(f"\ntop {args.top} ops by self CPU time")
    print(f"{'op':48s} {'ms/forward':>10s} {'share':>7s} {'calls/forward':>14s}")
    for name, ms in ops.most_common(args.top):
        print(f"{name[:48]:48s} {ms:10.1f} {ms / total:7.1%} {calls[name]:14.0f}")


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    if args.iters < 1:
        parser.error(f"--iters must be at least 1, not {args.iters}")
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), not {args.sparsity}")
    if args.image_size % 16 != 0:
        parser.error(f"--image-size must be a multiple of vit_b_16's 16-pixel patches, not {args.image_size}")
    main(args)
