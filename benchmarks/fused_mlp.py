"""vit_b_16 with each MLP as one fused kernel (BlockSparseMLP) against the same model with its two layers in turn.

    python benchmarks/fused_mlp.py [--blocksize 32] [--dtype float32] [--batch-size 8] [--iters 5]

One process, one set of random block masks (90% of each MLP Linear's blocks pruned): dense, the block-sparse model
with every BlockSparseMLP put back as its two layers, and the block-sparse model as apply_bsr left it; medians of
interleaved rounds and each one's speed-up over dense (benchmarks/RESULTS.md).
"""
import argparse
import copy
import os
import sys
import time

import torch
import torchvision
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import blocksparse  # noqa: E402
import utils  # noqa: E402
from blocksparse_mlp import BlockSparseMLP  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--blocksize", default=32, type=int, help="block size (default: 32)")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="default: float32")
parser.add_argument("--batch-size", default=8, type=int, help="images per forward (default: 8)")
parser.add_argument("--iters", default=5, type=int, help="timed rounds (default: 5)")
args = parser.parse_args()
utils.keep_freed_memory()
torch.manual_seed(0)
dtype, blocksize = getattr(torch, args.dtype), args.blocksize

dense = torchvision.models.vit_b_16(num_classes=10)
nn.init.normal_(dense.heads.head.weight)  # torchvision zero-initialises the head: every logit would be 0
with torch.no_grad():
    for layer in dense.encoder.layers:
        for linear in (layer.mlp[0], layer.mlp[3]):
            keep = torch.rand(linear.out_features // blocksize, linear.in_features // blocksize) >= 0.9
            linear.weight.mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))
dense = dense.eval().requires_grad_(False).to(dtype)
fused = copy.deepcopy(dense)
start = time.perf_counter()
result = blocksparse.apply_bsr(fused, blocksize)  # kernel="auto": measures every layer and pair
convert_seconds = time.perf_counter() - start
separate = copy.deepcopy(fused)
for seq in separate.modules():
    if isinstance(seq, nn.Sequential) and isinstance(seq[0], BlockSparseMLP):
        mlp = seq[0]  # put the pair back: fc1, the modules between, fc2 at its own place
        names = [name for name, _ in seq.named_children()]
        seq[0] = mlp.fc1
        for name, module in zip(names[1:], mlp.between):
            setattr(seq, name, module)
        setattr(seq, mlp.second_name, mlp.fc2)

variants = {"dense": dense, "two layers per MLP": separate, "fused MLP": fused}
x = torch.randn(args.batch_size, 3, 224, 224, dtype=dtype)
times = {name: [] for name in variants}
with torch.inference_mode():
    outputs = {name: model(x) for name, model in variants.items()}  # warm-up
    for _ in tqdm(range(args.iters), desc="timing rounds", leave=False):
        for name, model in variants.items():
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
print(f"{benchmark.cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, vit_b_16 batch "
      f"{args.batch_size}, {args.dtype}, block {blocksize}, {len(result.fused_mlps)} of 12 MLPs fused, converted in "
      f"{convert_seconds:.1f} s")
for name, seconds in medians.items():
    diff = (outputs[name].double() - outputs["dense"].double()).abs().max().item()
    print(f"{name:20s} {seconds * 1e3:8.0f} ms  {medians['dense'] / seconds:5.2f}x  max diff {diff:.2e}")
