"""Every setting `kernel="auto"` chooses between for the fused kernel, timed on vit_b_16's MLP Linears (RESULTS.md).

    python benchmarks/fused_settings.py [--tokens 1576] [--sparsity 0.9]

For 768x3072 and 3072x768 at blocks 32 and 64, float32 and bfloat16: dense, then the speed-up over dense of each
token tile with each kind of products (`blocksparse_fused.product_kinds`: one brgemm per block, a row's inputs
gathered into one panel, and on an AMX CPU our own tile kernel for bfloat16), as `tile:kind`.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import blocksparse_fused  # noqa: E402
import blocksparse_reference  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", default=1576, type=int, help="input rows (default: 1576, vit_b_16 at batch 8)")
parser.add_argument("--sparsity", default=0.9, type=float, help="fraction of blocks pruned (default: 0.9)")
args = parser.parse_args()
if not blocksparse_fused.available():
    sys.exit(f"the fused kernel is unavailable: {blocksparse_fused.unavailable_reason()}")
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for blocksize in (32, 64):
        for out_features, in_features in ((3072, 768), (768, 3072)):
            keep = torch.rand(out_features // blocksize, in_features // blocksize) >= args.sparsity
            mask = keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1)
            weight = (torch.randn(out_features, in_features) * mask).to(dtype)
            bias = torch.randn(out_features).to(dtype)
            values, crow, col = blocksparse_reference.pack_blocks(weight, blocksize)
            packed = blocksparse_fused.pack(values)
            x = torch.randn(args.tokens, in_features).to(dtype)
            dense = blocksparse_fused.median_seconds(lambda: F.linear(x, weight, bias), 7)
            cells = []
            for kind in blocksparse_fused.product_kinds(dtype, blocksize):
                for tile in blocksparse_fused.TILE_CANDIDATES:
                    seconds = blocksparse_fused.median_seconds(
                        lambda: blocksparse_fused.fused_linear(x, packed, crow, col, bias, out_features, tile, kind), 7)
                    cells.append(f"{tile}:{kind} {dense / seconds:.2f}")
            print(f"{str(dtype):14s} block {blocksize} {in_features}x{out_features}: dense {dense * 1e3:.2f} ms, "
                  + " ".join(cells))
