"""The residual add and LayerNorm ops (csrc/layer_norm.cpp) against ATen's, on one ViT activation.

    python benchmarks/residual_norm.py [--tokens 1576] [--width 768] [--rounds 7] [--calls 200]

For float32 and bfloat16, in one process: ATen's LayerNorm against ``superblock::layer_norm``, and ATen's add then
LayerNorm against ``superblock::add_layer_norm``, each the median over interleaved rounds of ``--calls`` calls
(benchmarks/RESULTS.md). Every output is checked against ATen's first.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import blocksparse_fused  # noqa: E402
import utils  # noqa: E402


def main(args):
    utils.keep_freed_memory()
    blocksparse_fused.require()
    ops = torch.ops.superblock
    print(f"{benchmark.cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.tokens} x {args.width}, ms per call (median of {args.rounds} rounds of {args.calls})")
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        x, residual, weight, bias = (torch.randn(*shape, generator=generator).to(dtype) for shape in
                                     ((args.tokens, args.width), (args.tokens, args.width), (args.width,), (args.width,)))
        shape, eps = (args.width,), 1e-6
        variants = {
            "ATen LayerNorm": lambda: F.layer_norm(x, shape, weight, bias, eps),
            "layer_norm": lambda: ops.layer_norm(x, weight, bias, eps),
            "ATen add + LayerNorm": lambda: F.layer_norm(x + residual, shape, weight, bias, eps),
            "add_layer_norm": lambda: ops.add_layer_norm(x, residual, weight, bias, eps)[1],
        }
        with torch.inference_mode():
            tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
            torch.testing.assert_close(variants["layer_norm"]().float(), variants["ATen LayerNorm"]().float(), **tolerance)
            torch.testing.assert_close(variants["add_layer_norm"]().float(), variants["ATen add + LayerNorm"]().float(),
                                       **tolerance)
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    fn()
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[name].append((time.perf_counter() - start) / args.calls * 1e3)
        ms = {name: statistics.median(t) for name, t in times.items()}
        print(f"{str(dtype)[6:]:9s} LayerNorm: ATen {ms['ATen LayerNorm']:.3f}, ours {ms['layer_norm']:.3f} "
              f"({ms['ATen LayerNorm'] / ms['layer_norm']:.2f}x); add + LayerNorm: ATen "
              f"{ms['ATen add + LayerNorm']:.3f}, ours {ms['add_layer_norm']:.3f} "
              f"({ms['ATen add + LayerNorm'] / ms['add_layer_norm']:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=1576, type=int, help="rows (default: 1576, vit_b_16 at batch 8)")
    parser.add_argument("--width", default=768, type=int, help="row width (default: 768)")
    parser.add_argument("--rounds", default=7, type=int, help="interleaved rounds (default: 7)")
    parser.add_argument("--calls", default=200, type=int, help="calls per variant and round (default: 200)")
    main(parser.parse_args())
