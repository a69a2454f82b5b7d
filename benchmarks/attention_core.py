"""The attention core alone: SDPA's flash and math backends, the plain batched product, and SuperBlock's fused kernel
(each form: bfloat16 products on oneDNN's micro-kernels, "fused-fp32" float32 ones, "fused-avx512bf16" and "fused-amx"
our own).

    python benchmarks/attention_core.py [--shapes 8x12x197x64 1x12x197x64] [--dtypes float32 bfloat16] [--rounds 5]

Each shape is images x heads x tokens x head size. q, k and v are views into one (B, L, 3 * H * D) projection, as
ProjectedAttention makes them, and every variant returns (B, L, H * D), the layout the output projection reads (for
all but the fused kernel that is a copy, counted). Variants run in interleaved rounds on the same input in one
process; each round takes the median of --iters calls, and the table gives the median over rounds in ms and each
variant's speed against SDPA's flash kernel. Each output is checked against float64 first.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attention_core  # noqa: E402
import benchmark  # noqa: E402
import blocksparse_fused  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COLUMNS = ("sdpa flash", "sdpa math", "plain", "fused", "fused-fp32", "fused-avx512bf16", "fused-amx")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--shapes", nargs="+", default=["8x12x197x64", "1x12x197x64", "8x6x197x64", "2x12x577x64"],
                        help="BxHxLxD shapes (default: vit_b_16 at batch 8 and 1, DeiT-S at batch 8, vit_b_16 at "
                        "384 px)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="dtypes (default: float32 bfloat16)")
    parser.add_argument("--rounds", default=5, type=int, help="interleaved rounds (default: 5)")
    parser.add_argument("--iters", default=10, type=int, help="calls per variant per round (default: 10)")
    return parser


def parse_shape(text):
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape {text!r} is not BxHxLxD with four positive integers (e.g. 8x12x197x64)")
    return tuple(int(p) for p in parts)


def variants(dtype, head_dim):
    """{name: fn(q, k, v) -> (B, L, H * D)} for this dtype and head size."""
    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return run

    found = {"sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa math": sdpa(SDPBackend.MATH),
             "plain": lambda q, k, v: attention_core.run("plain", q, k, v)}
    if attention_core.fused_unavailable_reason(dtype, head_dim) is None:
        for core in attention_core.fused_cores(dtype, head_dim):
            found[core] = lambda q, k, v, core=core: attention_core.run(core, q, k, v)
    return found


@torch.inference_mode()
def measure(shape, dtype, rounds, iters):
    batch, heads, tokens, head_dim = shape
    q, k, v = attention_core.sample(batch, heads, tokens, head_dim, dtype, torch.Generator().manual_seed(0))
    expected = attention_core.reference(q.double(), k.double(), v.double()).reshape(batch, tokens, -1)
    fns = variants(dtype, head_dim)
    for name, fn in fns.items():
        error = ((fn(q, k, v).double() - expected).norm() / expected.norm()).item()
        if error > (1e-5 if dtype == torch.float32 else 1e-2):
            raise SystemExit(f"{name} is wrong at {shape} {dtype}: relative L2 error {error:.1e}")
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(blocksparse_fused.median_seconds(lambda: fn(q, k, v), iters))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main(args):
    shapes = [parse_shape(s) for s in args.shapes]
    print(f"{benchmark.cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>16s} {'dtype':>9s} " + " ".join(f"{n:>18s}" for n in COLUMNS))
    for shape in shapes:
        for dtype_name in args.dtypes:
            medians = measure(shape, DTYPES[dtype_name], args.rounds, args.iters)
            flash = medians["sdpa flash"]
            cells = [f"{medians[n] * 1e3:7.2f} ms {flash / medians[n]:5.2f}x" if n in medians else f"{'-':>18s}"
                     for n in COLUMNS]
            print(f"{'x'.join(map(str, shape)):>16s} {dtype_name:>9s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    if args.rounds < 1 or args.iters < 1:
        parser.error("--rounds and --iters must be at least 1")
    try:
        [parse_shape(s) for s in args.shapes]
    except ValueError as e:
        parser.error(str(e))
    main(args)
