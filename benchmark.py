"""Time dense, Supermask and block-sparse variants of a model on the same input, in one process.

    python benchmark.py --model vit_b_16 --batch-size 8 --sparsity-linear 0.9 --sp-linear-tile-size 64 --device cpu

Variants: ``dense`` (the model without masks), ``online`` (Supermask layers computing their masks every
forward), ``offline`` (masks frozen into dense weights), ``torch`` (the original SuperBlock: F.linear with
``to_sparse_bsr`` weights) and ``bsr`` (blocksparse.apply_bsr, kernel auto; ``--kernels`` adds others).
Every variant except ``dense`` must match ``offline``'s output; the check is printed. Masks are random at
the given sparsity (the Supermask score init is random) unless ``--weights-path`` loads trained ones.

``--layer 768x3072`` times one Linear (in x out) instead, ``--layer 768x3072x768`` an MLP pair (Linear, GELU,
Linear): dense against each block-sparse kernel.
``--quantize int8`` also times the int8 (W8A8) model: variant ``bsr-int8`` (apply_bsr, kernel auto, quantize int8),
or with ``--layer`` rows ``int8-auto`` and ``int8-fused``; their outputs are checked by relative L2 error.
``--sweep-sparsity`` / ``--sweep-tile-size`` time dense against bsr over a grid; ``--plot`` draws it.
"""

import argparse
import copy
import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter

import torch
from torch import nn
from tqdm import tqdm

import blocksparse
import blocksparse_fused
import blocksparse_int8
import checkpoints
import cli
import residual_norm
import supermask
import utils
from attention import restore_sdpa

# Output check against the offline model, relative to the largest |logit|.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# The int8 variants' check: ||y - ref|| / ||ref|| of the outputs (W8A8 rounds every weight and activation to 8 bits,
# so single logits can move further than TOLERANCE allows).
INT8_TOLERANCE = 0.1
BASELINES = ("dense", "online", "offline", "torch", "bsr-sdpa", "bsr-unfolded", "bsr-onednn")
SDPA_VARIANT = "bsr-sdpa"  # bsr with SDPA as its attention core (attention.restore_sdpa): the model before the fused core
# bsr with its transformer blocks as they were (residual_norm.unfold): ATen's residual adds and LayerNorms
UNFOLDED_VARIANT = "bsr-unfolded"
# bsr with every float block-sparse product on oneDNN's brgemm, one call per kept block, where apply_bsr chose our
# AMX kernel ("amx" products): the model before that kernel
ONEDNN_VARIANT = "bsr-onednn"
INT8_VARIANT = "bsr-int8"  # the model in int8: apply_bsr(kernel="auto", quantize="int8")


def get_args_parser(add_help=True):
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description="SuperBlock inference benchmark", add_help=add_help,
                                     formatter_class=cli.HelpFormatter)
    cli.add_model_args(parser)
    cli.add_supermask_args(parser)
    group = parser.add_argument_group("benchmark")
    group.add_argument("-b", "--batch-size", default=8, type=int, help="images per forward (default: 8)")
    group.add_argument("--image-size", default=224, type=int, help="input height and width (default: 224)")
    group.add_argument("--num-classes", default=1000, type=int, help="classifier outputs (default: 1000)")
    group.add_argument("--dtype", default="float32", choices=sorted(cli.DTYPES), help="weights and input (default: float32)")
    group.add_argument("--compile", default="off", nargs="?", const="on", choices=["off", "on", "both"],
                       help="torch.compile every variant; 'both' times each variant eager and compiled "
                            "(default: off; --compile alone means on)")
    group.add_argument("--iters", default=10, type=int, help="timed forwards per variant; the median is reported (default: 10)")
    group.add_argument("--warmup", default=2, type=int, help="untimed forwards before timing (default: 2)")
    group.add_argument("--blocksize", default=None, type=int,
                       help="block size for apply_bsr (default: --sp-linear-tile-size)")
    group.add_argument("--kernels", default="auto", type=str,
                       help=f"comma-separated blocksparse kernels to time as bsr-<kernel>, or 'all' "
                            f"({', '.join(blocksparse.KERNELS[:-1])}; default: auto)")
    group.add_argument("--baselines", default="dense,online,offline,torch", type=str,
                       help="comma-separated variants timed beside bsr; dense is always timed; bsr-sdpa is bsr with "
                            "SDPA as its attention core, as before the fused core; bsr-unfolded is bsr with its "
                            "transformer blocks' residual adds and LayerNorms on ATen, as before they were folded; "
                            "bsr-onednn is bsr with its block-sparse products on oneDNN's brgemm where it chose our "
                            "AMX kernel (default: dense,online,offline,torch)")
    group.add_argument("--quantize", default="none", choices=("none", "int8"),
                       help=f"int8 also times the int8 (W8A8) model as {INT8_VARIANT} (apply_bsr kernel auto, "
                            f"quantize int8), or with --layer rows int8-auto and int8-fused; CPU only, a block size "
                            f"that is a multiple of 16, no sweeps; checked by relative L2 error <= {INT8_TOLERANCE} "
                            f"(default: none)")
    group.add_argument("--min-sparsity", default=blocksparse.DEFAULT_MIN_SPARSITY, type=float,
                       help=f"apply_bsr's min_sparsity (default: {blocksparse.DEFAULT_MIN_SPARSITY})")
    group.add_argument("--threads", default=None, type=int, help="torch.set_num_threads (default: torch's choice)")
    group.add_argument("--seed", default=0, type=int, help="seed for masks, weights and input (default: 0)")
    group.add_argument("--default-malloc", action="store_true",
                       help="leave glibc's malloc as it is; by default freed memory is kept for reuse "
                            "(utils.keep_freed_memory), which spares every variant page faults (default: off)")
    group.add_argument("--smoke", action="store_true",
                       help="seconds-long check: vit_tiny on 32x32 images, 10 classes, 2 iterations (default: off)")
    group.add_argument("--layer", default=None, type=str, metavar="INxOUT",
                       help="time one Linear of this shape (e.g. 768x3072), or with INxHIDDENxOUT an MLP pair "
                            "(Linear, GELU, Linear), instead of a model (default: off)")
    group.add_argument("--tokens", default=1576, type=int,
                       help="rows of the --layer input (default: 1576, vit_b_16's tokens at batch 8)")
    group.add_argument("--sweep-sparsity", default=None, type=str,
                       help="comma-separated linear sparsities to sweep, dense vs bsr (default: off)")
    group.add_argument("--sweep-tile-size", default=None, type=str,
                       help="comma-separated tile sizes to sweep (default: --sp-linear-tile-size)")
    group.add_argument("--sweep-batch-size", default=None, type=str,
                       help="comma-separated batch sizes to sweep (default: --batch-size)")
    group.add_argument("--sweep-tokens", default=None, type=str,
                       help="with --layer: comma-separated token counts to sweep (default: --tokens)")
    group.add_argument("--output-json", default=None, type=str, help="write the results to this JSON file (default: none)")
    group.add_argument("--csv", default=None, type=str, help="write the result rows to this CSV file (default: none)")
    group.add_argument("--plot", default=None, type=str, metavar="FILE.png",
                       help="plot speed-up vs sparsity per tile size (needs a sweep and matplotlib; default: none)")
    return parser


def _int_list(text, flag):
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise utils.InputError(f"{flag} {text!r} must be comma-separated integers, e.g. 32,64") from None


def _fraction_list(text, flag):
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise utils.InputError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.5,0.9") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise utils.InputError(f"{flag} {text!r}: every sparsity must be in [0, 1)")
    return values


def smoke_settings(args):
    """The flags with --smoke's small model and few iterations in place of theirs (a copy; `args` is unchanged)."""
    smoke = dict(model="vit_tiny", image_size=32, num_classes=10, iters=2, warmup=1,
                 sp_linear_tile_size=32 if args.sp_linear_tile_size == 1 else args.sp_linear_tile_size,
                 sparsity_linear=0.9 if args.sparsity_linear == 0.0 else args.sparsity_linear)
    return argparse.Namespace(**{**vars(args), **smoke})


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the flags ask to time, derived once from them: the variants, the grid of a sweep, device and dtype."""

    device: torch.device
    dtype: torch.dtype
    blocksize: int
    kernels: list  # blocksparse kernels, each timed as bsr-<kernel> (bsr for auto)
    quantize: str | None  # "int8": the int8 variant (or --layer rows) too
    baselines: list  # dense first, then any of online, offline, torch, bsr-sdpa
    layer_shape: tuple | None  # --layer's sides: (IN, OUT) or (IN, HIDDEN, OUT)
    sweep_sparsities: list | None  # None: no sweep
    sweep_tiles: list | None
    sweep_batches: list | None
    sweep_token_counts: list | None


def check_args(args):
    """The Plan of the flags; a mistake is a utils.InputError with a one-line message."""
    cli.check_model_name(args.model)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise utils.InputError(f"--device {args.device} is not cpu or cuda")
    utils.check_device(args.device)
    for flag, value in [("--batch-size", args.batch_size), ("--iters", args.iters), ("--image-size", args.image_size),
                        ("--tokens", args.tokens), ("--num-classes", args.num_classes)]:
        if value < 1:
            raise utils.InputError(f"{flag} {value} must be at least 1")
    if args.warmup < 0:
        raise utils.InputError(f"--warmup {args.warmup} must be at least 0")
    if args.threads is not None and args.threads < 1:
        raise utils.InputError(f"--threads {args.threads} must be at least 1")
    if not 0.0 <= args.min_sparsity <= 1.0:
        raise utils.InputError(f"--min-sparsity {args.min_sparsity} must be in [0, 1]")
    if args.layer is None:
        cli.check_image_size(args.model, args.image_size, "--image-size")
    blocksize = args.blocksize or args.sp_linear_tile_size
    # "all": every kernel that can run here at speed (Triton's CPU interpreter is for tests only).
    on_cuda = args.device.startswith("cuda")
    runnable = [k for k in blocksparse.KERNELS if k != "torch" and (k != "triton" or on_cuda)
                and (k != "fused" or (not on_cuda and blocksparse_fused.available()))]
    kernels = runnable if args.kernels == "all" else args.kernels.split(",")
    unknown = [k for k in kernels if k not in blocksparse.KERNELS]
    if unknown:
        raise utils.InputError(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(blocksparse.KERNELS)}")
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise utils.InputError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    baselines = ["dense"] + [b for b in baselines if b != "dense"]
    layer_shape = None
    if args.layer is not None:
        try:
            layer_shape = tuple(int(v) for v in args.layer.lower().split("x"))
            assert len(layer_shape) in (2, 3) and min(layer_shape) > 0
        except (ValueError, AssertionError):
            raise utils.InputError(f"--layer {args.layer!r} must be INxOUT (one Linear, e.g. 768x3072) or "
                                   f"INxHIDDENxOUT (an MLP pair, e.g. 768x3072x768)") from None
        if any(size % blocksize for size in layer_shape):
            raise utils.InputError(f"--layer {args.layer}: block size {blocksize} does not divide every side")
    sweep_sparsities = _fraction_list(args.sweep_sparsity, "--sweep-sparsity") if args.sweep_sparsity else None
    sweep_tiles = _int_list(args.sweep_tile_size, "--sweep-tile-size") if args.sweep_tile_size else None
    sweep_batches = _int_list(args.sweep_batch_size, "--sweep-batch-size") if args.sweep_batch_size else None
    if sweep_batches and any(b < 1 for b in sweep_batches):
        raise utils.InputError(f"--sweep-batch-size {args.sweep_batch_size!r}: every batch size must be at least 1")
    sweep_token_counts = _int_list(args.sweep_tokens, "--sweep-tokens") if args.sweep_tokens else None
    if sweep_token_counts and (args.layer is None or any(t < 1 for t in sweep_token_counts)):
        raise utils.InputError(f"--sweep-tokens {args.sweep_tokens!r} needs --layer and counts of at least 1")
    if sweep_token_counts and not sweep_sparsities:
        sweep_sparsities = [args.sparsity_linear]
    if sweep_sparsities and not sweep_token_counts:
        sweep_token_counts = [args.tokens]
    if (sweep_tiles or sweep_batches) and not sweep_sparsities:
        sweep_sparsities = [args.sparsity_linear]
    if sweep_sparsities and not sweep_tiles:
        sweep_tiles = [args.sp_linear_tile_size]
    if sweep_sparsities and not sweep_batches:
        sweep_batches = [args.batch_size]
    if args.plot and not sweep_sparsities:
        raise utils.InputError("--plot needs a sweep: add --sweep-sparsity and/or --sweep-tile-size")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise utils.InputError("--plot needs matplotlib: pip install matplotlib") from None
    nothing_sparse = args.sparsity_linear == 0.0 and args.sparsity_attention == 0.0 and not args.weights_path
    if args.layer is None and not sweep_sparsities and nothing_sparse:
        raise utils.InputError("--sparsity-linear and --sparsity-attention are 0: nothing to make sparse; "
                               "set one (e.g. 0.9) or --weights-path")
    quantize = None if args.quantize == "none" else args.quantize
    if quantize:
        _check_int8(args, blocksize, sweep=bool(sweep_sparsities))
    return Plan(device=torch.device(args.device), dtype=cli.DTYPES[args.dtype], blocksize=blocksize, kernels=kernels,
                quantize=quantize,
                baselines=baselines, layer_shape=layer_shape, sweep_sparsities=sweep_sparsities,
                sweep_tiles=sweep_tiles, sweep_batches=sweep_batches, sweep_token_counts=sweep_token_counts)


def _check_int8(args, blocksize, *, sweep):
    """--quantize int8's limits: the CPU, blocks of a multiple of 16, no sweep, and int8 kernels that run here."""
    if args.device != "cpu":
        raise utils.InputError(f"--quantize int8 runs on the CPU, not {args.device}: pass --device cpu")
    if blocksize % 16:
        raise utils.InputError(f"--quantize int8 takes a block size that is a multiple of 16 (--blocksize, or "
                               f"--sp-linear-tile-size), not {blocksize}")
    if sweep:
        raise utils.InputError("--quantize int8 times a model or a --layer, not a sweep: drop the --sweep-* flags")
    try:
        reason = blocksparse_int8.unavailable_reason(blocksize)
    except ValueError as e:  # SUPERBLOCK_HIDE_ISA names an unknown instruction set
        raise utils.InputError(str(e)) from None
    if reason is not None:
        raise utils.InputError(f"--quantize int8 needs the int8 CPU kernels, which cannot run here: {reason}; drop "
                               f"--quantize")


##### Timing #####


def _no_bars():
    """Progress bars only on a terminal: in a log file every redraw would be a line of its own."""
    return not sys.stderr.isatty()


@torch.inference_mode()
def time_forwards(fns, x, *, warmup, iters, device, rewarm=False):
    """Median seconds per call of each fn(x), first-call seconds and outputs, as dicts keyed like `fns`.

    Calls are interleaved (one call of every fn per round), so that load from other processes on a shared
    machine hits all variants alike and their ratios stay comparable; every other round runs them in reverse
    order, since the first of a round measured a few percent faster in calls of milliseconds (two copies of one
    dense layer gave 0.95x in one order, 1.03x in the other). With ``rewarm``, each timed call follows an untimed
    one of the same fn: for calls of milliseconds, whose data the previous variant evicted from the caches (one
    Linear timed right after the ``torch`` variant measured slower than on its own).
    """
    outs, first, times = {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        utils.synchronize(device)
        start = time.perf_counter()
        outs[name] = fn(x)
        utils.synchronize(device)
        first[name] = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        for fn in fns.values():
            fn(x)
    for round_index in tqdm(range(iters), desc="timing rounds", leave=False, disable=_no_bars()):
        for name, fn in (reversed(fns.items()) if round_index % 2 else fns.items()):
            if rewarm:
                fn(x)
            utils.synchronize(device)
            start = time.perf_counter()
            fn(x)
            utils.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, first, outs


def compare(out, ref, dtype, *, int8=False):
    """(difference, allowed difference, ok) of `out` against the reference output: the max abs difference, or for an
    int8 variant the relative L2 error ||out - ref|| / ||ref||."""
    if int8:
        diff = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        return diff, INT8_TOLERANCE, diff <= INT8_TOLERANCE
    diff = (out.float() - ref.float()).abs().max().item()
    allowed = TOLERANCE[dtype] * max(ref.float().abs().max().item(), 1.0)
    return diff, allowed, diff <= allowed


def _check_columns(name, out, ref, dtype):
    """The output check's columns of a row: max_diff (rel_l2 for int8 variants), allowed_diff, and whether it passed."""
    int8 = name.startswith(("int8", INT8_VARIANT))
    diff, allowed, ok = compare(out, ref, dtype, int8=int8)
    return {"rel_l2" if int8 else "max_diff": diff, "allowed_diff": allowed}, ok


##### Models #####


def build_variants(args, plan, dense, sparsity, tile_size, blocksize, variants):
    """The models to time, by name, built from the dense model; dense itself is not copied."""
    torch.manual_seed(args.seed)
    online = copy.deepcopy(dense)
    kwargs = {**cli.supermask_kwargs(args), "linear_sparsity": sparsity, "linear_sp_tilesize": tile_size}
    supermask.apply_supermask(online, **kwargs)
    if args.weights_path:
        checkpoint = checkpoints.load_checkpoint(args.weights_path)
        try:
            supermask.load_supermask_state_dict(online, checkpoints.model_state_dict(checkpoint))
        except ValueError as e:
            raise utils.InputError(f"--weights-path {args.weights_path}: {e}") from None
    online.eval()
    offline = supermask.sparsify_offline(copy.deepcopy(online))
    if any(name.startswith(("torch", "bsr")) for name in variants) and not any(
            blocksparse.blocksize_divides(tuple(m.weight.shape), blocksize)
            for m in offline.modules() if isinstance(m, nn.Linear)):
        # Otherwise every bsr variant would be the dense model, timed and reported as "0 Linear converted".
        shapes = sorted({tuple(m.weight.shape) for m in offline.modules() if isinstance(m, nn.Linear)})
        fitting = [b for b in (8, 16, 32, 64) if any(blocksparse.blocksize_divides(shape, b) for shape in shapes)]
        raise utils.InputError(f"block size {blocksize} divides no Linear layer of {args.model} (weights "
                               f"{', '.join('x'.join(map(str, shape)) for shape in shapes)}), so nothing would be "
                               f"converted; pass a --blocksize (or --sp-linear-tile-size) that divides the layers' "
                               f"shapes" + (f", e.g. {' or '.join(map(str, fitting))}" if fitting else ""))
    models, notes = {"dense": dense, "online": online, "offline": offline}, {}
    for name in variants:
        if not name.startswith(("torch", "bsr")):
            continue
        kernel = "torch" if name == "torch" else name.partition("-")[2] or "auto"
        quantize = "int8" if name == INT8_VARIANT else None
        if quantize or name in (SDPA_VARIANT, UNFOLDED_VARIANT, ONEDNN_VARIANT):
            kernel = "auto"
        if kernel == "torch" and not blocksparse.torch_bsr_supports_dtype(plan.dtype, plan.device):
            notes[name] = f"skipped: kernel {kernel} does not take {args.dtype} on {plan.device.type}"
            continue
        # Converted where it runs: the kernel choice and packing depend on device and dtype.
        model = copy.deepcopy(offline).to(device=plan.device, dtype=plan.dtype)
        result = blocksparse.apply_bsr(model, blocksize=blocksize, min_sparsity=args.min_sparsity, kernel=kernel,
                                       quantize=quantize)
        if name == SDPA_VARIANT:
            restore_sdpa(model)
        if name == UNFOLDED_VARIANT:
            residual_norm.unfold(model)
        if name == ONEDNN_VARIANT:
            _products_on_onednn(model)
        cores = "attention sdpa" if name == SDPA_VARIANT else attention_cores_label(result)
        if result.folded_blocks and name != UNFOLDED_VARIANT:
            cores += f", {len(result.folded_blocks)} blocks' add and LayerNorm folded"
        fused = f" ({len(result.fused_mlps)} MLPs as one kernel each)" if result.fused_mlps else ""
        notes[name] = (f"{len(result.converted)} Linear converted{fused}, {len(result.left_dense)} left dense; "
                       f"{_kernel_counts(model)}; {cores}")
        models[name] = model
    return {k: v for k, v in models.items() if k in variants}, notes


def base_model(args):
    """The dense model, in eval mode on the device and dtype, with a random classifier so logits are not all zero."""
    torch.manual_seed(args.seed)
    model = cli.build_model(args, num_classes=args.num_classes, image_size=args.image_size)
    for module in model.modules():
        # torchvision zero-initialises the ViT head: every variant would output zeros and "match".
        if isinstance(module, nn.Linear) and not module.weight.detach().abs().sum():
            nn.init.normal_(module.weight, std=0.02)
    return model.eval().requires_grad_(False)


def compile_apart(model, name):
    """torch.compile of ``model(x)`` in a frame of its own, so that no other variant shares its compiled code.

    torch.compile(model) caches on the forward's code object, which every variant of one model class shares:
    a later variant would recompile that entry (falling back to eager past dynamo's recompile limit) or, after
    a variant whose graph breaks (``kernel="torch"``), run that variant's partial graph and compile its own
    layers one by one. A function with its own code object keeps each variant's cache apart.
    """
    def forward(x):
        return model(x)

    forward.__code__ = forward.__code__.replace(co_name=f"forward_{name}")
    return torch.compile(forward)


def _prepare(name, model, args, plan):
    """{variant name: callable}: the model eager, compiled, or both (compiled ones named '<name>+compile')."""
    model = model.to(device=plan.device, dtype=plan.dtype)
    if args.compile == "off":
        return {name: model}
    if args.compile == "on":
        return {name: compile_apart(model, name)}
    return {name: model, f"{name}+compile": compile_apart(model, name)}


##### Modes #####


def run_model(args, plan):
    """Time every variant at the flags' sparsity; returns result rows."""
    variants = [v for v in BASELINES if v in plan.baselines]
    variants += [f"bsr-{k}" if k != "auto" else "bsr" for k in plan.kernels]
    variants += [INT8_VARIANT] if plan.quantize else []
    dense = base_model(args)
    models, notes = build_variants(args, plan, dense, args.sparsity_linear, args.sp_linear_tile_size, plan.blocksize,
                                   variants + ["offline"])
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(args.seed))
    x = x.to(device=plan.device, dtype=plan.dtype)
    fns = {}
    for name in tqdm(variants, desc="variants", leave=False, disable=_no_bars()):
        if name in models:
            fns.update(_prepare(name, models[name], args, plan))
    medians, first, outs = time_forwards(fns, x, warmup=args.warmup, iters=args.iters, device=plan.device)
    if "offline" not in outs:  # the reference every variant must match, run once untimed
        with torch.inference_mode():
            outs["offline"] = models["offline"].to(device=plan.device, dtype=plan.dtype)(x)
    rows, ref = [], outs["offline"]
    for name in variants:
        if name not in models:
            rows.append(dict(variant=name, note=notes.get(name, "")))
            continue
        for timed in [n for n in fns if n.partition("+")[0] == name]:
            rows.append(dict(variant=timed, ms=medians[timed] * 1e3, first_ms=first[timed] * 1e3,
                             images_per_s=args.batch_size / medians[timed], note=notes.get(name, ""),
                             out=outs[timed]))
    dense_ms = next(r["ms"] for r in rows if r["variant"] == "dense")
    torch_ms = next((r["ms"] for r in rows if r["variant"] == "torch" and "ms" in r), None)
    for row in rows:
        out = row.pop("out", None)
        if "ms" not in row:
            continue
        row["speedup_vs_dense"] = dense_ms / row["ms"]
        if torch_ms:
            row["speedup_vs_torch"] = torch_ms / row["ms"]
        if row["variant"].partition("+")[0] != "dense":  # dense has the unmasked weights
            columns, row["matches_offline"] = _check_columns(row["variant"], out, ref, plan.dtype)
            row.update(columns)
    return rows


def run_sweep(args, plan):
    """Dense vs bsr at every sweep sparsity, tile size and batch size; returns result rows.

    Only dense and bsr are timed; the offline model runs once per cell, as the reference bsr must match.
    """
    dense = base_model(args)
    rows = []
    grid = [(t, s) for t in plan.sweep_tiles for s in plan.sweep_sparsities]
    for tile, sparsity in tqdm(grid, desc="sweep", leave=False, disable=_no_bars()):
        models, _ = build_variants(args, plan, dense, sparsity, tile, tile, ["dense", "offline", "bsr"])
        fns = {}
        for name in ["dense", "bsr"]:
            fns.update(_prepare(name, models[name], args, plan))
        offline = models["offline"].to(device=plan.device, dtype=plan.dtype)
        for batch in plan.sweep_batches:
            x = torch.randn(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(args.seed))
            x = x.to(device=plan.device, dtype=plan.dtype)
            times, _, outs = time_forwards(fns, x, warmup=args.warmup, iters=args.iters, device=plan.device)
            with torch.inference_mode():
                diff, allowed, ok = compare(outs["bsr"], offline(x), plan.dtype)
            rows.append(dict(tile_size=tile, sparsity=sparsity, batch=batch, dense_ms=times["dense"] * 1e3,
                             bsr_ms=times["bsr"] * 1e3, speedup_vs_dense=times["dense"] / times["bsr"],
                             max_diff=diff, matches_offline=ok, kernels=_kernel_counts(models["bsr"])))
    return rows


def attention_cores_label(result):
    """What computes the attention of a model apply_bsr converted, e.g. "attention fused:12"."""
    counts = Counter(core for _, core in result.attention_cores)
    return "attention " + (" ".join(f"{core}:{n}" for core, n in counts.items()) or "none")


def _products_on_onednn(model):
    """Every float fused layer and MLP that runs our AMX kernel switched to one brgemm per kept block."""
    for module in model.modules():
        if getattr(module, "products", None) == "amx":
            module.products = "blocks"


def _kernel_counts(model):
    """How many block-sparse layers of each kernel a model holds (``blocksparse.kernel_label``: "fused", "int8/amx",
    ...), and fused MLPs ("mlp", "mlp-int8"), e.g. 'fused:24 mlp:12'; "/amx" marks float ones on our AMX kernel."""
    counts = {}
    for module in model.modules():
        if isinstance(module, (blocksparse.BlockSparseLinear, blocksparse.Int8BlockSparseLinear)):
            label = blocksparse.kernel_label(module)
        elif isinstance(module, blocksparse.BlockSparseMLP):
            label = "mlp" if module.isa is None else "mlp-int8"
        else:
            continue
        if getattr(module, "products", None) == "amx":
            label += "/amx"
        counts[label] = counts.get(label, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "none"


def _random_block_sparse_linear(in_features, out_features, blocksize, sparsity, gen):
    linear = nn.Linear(in_features, out_features).requires_grad_(False)
    keep = torch.rand(out_features // blocksize, in_features // blocksize, generator=gen) >= sparsity
    linear.weight.mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))
    return linear


def _layer_model(args, plan, blocksize, sparsity, gen):
    """nn.Sequential of the --layer Linear, or of the MLP pair with GELU between, with random block masks."""
    sizes = plan.layer_shape
    layers = [_random_block_sparse_linear(a, b, blocksize, sparsity, gen) for a, b in zip(sizes, sizes[1:])]
    if len(layers) == 2:
        layers.insert(1, nn.GELU())
    return nn.Sequential(*layers).eval().to(device=plan.device, dtype=plan.dtype)


def run_layer_sweep(args, plan):
    """--layer with a sweep: dense vs bsr (kernel auto) at every sparsity, tile size and --sweep-tokens count."""
    rows = []
    grid = [(t, s) for t in plan.sweep_tiles for s in plan.sweep_sparsities]
    for tile, sparsity in tqdm(grid, desc="sweep", leave=False, disable=_no_bars()):
        gen = torch.Generator().manual_seed(args.seed)
        dense = _layer_model(args, plan, tile, sparsity, gen)
        bsr = copy.deepcopy(dense)
        blocksparse.apply_bsr(bsr, blocksize=tile, min_sparsity=args.min_sparsity, kernel="auto")
        fns = {**_prepare("dense", dense, args, plan), **_prepare("bsr", bsr, args, plan)}
        for tokens in plan.sweep_token_counts:
            x = torch.randn(tokens, plan.layer_shape[0], generator=gen).to(device=plan.device,
                                                                           dtype=plan.dtype)
            times, _, outs = time_forwards(fns, x, warmup=args.warmup, iters=args.iters, device=plan.device,
                                           rewarm=True)
            diff, allowed, ok = compare(outs["bsr"], outs["dense"], plan.dtype)
            rows.append(dict(tile_size=tile, sparsity=sparsity, tokens=tokens, dense_ms=times["dense"] * 1e3,
                             bsr_ms=times["bsr"] * 1e3, speedup_vs_dense=times["dense"] / times["bsr"],
                             max_diff=diff, matches_dense=ok, kernels=_kernel_counts(bsr)))
    return rows


def run_layer(args, plan):
    """One Linear (--layer INxOUT) or an MLP pair (INxHIDDENxOUT: Linear, GELU, Linear) with random block masks:
    dense vs every requested kernel (converted by apply_bsr), and with --quantize int8 the int8 layers of the kernels
    auto and fused; result rows."""
    blocksize, sizes = plan.blocksize, plan.layer_shape
    gen = torch.Generator().manual_seed(args.seed)
    dense = _layer_model(args, plan, blocksize, args.sparsity_linear, gen)
    x = torch.randn(args.tokens, sizes[0], generator=gen).to(device=plan.device, dtype=plan.dtype)
    kernels = ["torch"] + [k for k in plan.kernels if k != "torch"]
    with torch.inference_mode():
        ref = dense(x)
    rows, fns = [], {"dense": dense}
    for name in kernels:
        if name == "torch" and not blocksparse.torch_bsr_supports_dtype(plan.dtype, plan.device):
            rows.append(dict(variant=name, note=f"skipped: does not take {args.dtype} on {args.device}"))
            continue
        model = copy.deepcopy(dense)
        result = blocksparse.apply_bsr(model, blocksize=blocksize, min_sparsity=0.0, kernel=name)
        chosen = "/".join(kernel for _, kernel, _ in result.converted) + (" mlp" if result.fused_mlps else "")
        fns["torch" if name == "torch" else f"bsr-{name}" + (f" ({chosen})" if name == "auto" else "")] = model
    for name in ["auto", "fused"] if plan.quantize else []:
        # Every block kept at --sparsity-linear 0: the dense int8 layer. No classifier here stays float.
        model = copy.deepcopy(dense)
        blocksparse.apply_bsr(model, blocksize=blocksize, min_sparsity=0.0, kernel=name, quantize=plan.quantize,
                              quantize_filter_fn=lambda module, fqn: True)
        fns[f"int8-{name}" + (f" ({_kernel_counts(model)})" if name == "auto" else "")] = model
    fns = {timed: fn for name, layer in fns.items() for timed, fn in _prepare(name, layer, args, plan).items()}
    medians, _, outs = time_forwards(fns, x, warmup=args.warmup, iters=args.iters, device=plan.device,
                                     rewarm=True)
    for name in fns:
        columns, ok = _check_columns(name, outs[name], ref, plan.dtype)
        rows.append(dict(variant=name, ms=medians[name] * 1e3, speedup_vs_dense=medians["dense"] / medians[name],
                         **columns, matches_dense=ok))
    return rows


##### Reporting #####


def cpu_model():
    """The CPU's model name, as lscpu prints it (figures only mean something beside it)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def machine_info(args, plan, *, malloc):
    """Thread count, versions and machine, as printed in the header."""
    fused = "unavailable" if not blocksparse_fused.available() else f"loaded in {blocksparse_fused.build_seconds():.1f} s"
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), processor=cpu_model(), fused_kernel=fused,
                cpu_count=os.cpu_count(), platform=platform.platform(), device=str(plan.device),
                dtype=args.dtype, compile=args.compile, malloc=malloc, command=" ".join(["python"] + sys.argv))


def format_rows(rows):
    """A fixed-width table of result rows."""
    keys = [k for k in rows[0] if k != "note"] if rows else []
    for row in rows:
        keys += [k for k in row if k not in keys and k != "note"]
    keys.append("note")

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.2f}"
        return "" if v is None else str(v)

    table = [keys] + [[cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def plot(rows, path, title=""):
    """Speed-up of bsr over dense against sparsity: one panel per batch size (or token count), a line per tile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel = "batch" if "batch" in rows[0] else "tokens"
    values = sorted({r[panel] for r in rows})
    fig, axes = plt.subplots(1, len(values), figsize=(4 * len(values) + 1, 3.6), sharey=True, squeeze=False)
    for ax, value in zip(axes[0], values):
        for tile in sorted({r["tile_size"] for r in rows}):
            points = sorted((r["sparsity"], r["speedup_vs_dense"]) for r in rows
                            if r["tile_size"] == tile and r[panel] == value)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"block {tile}")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{panel} {value}")
        ax.set_xlabel("sparsity (fraction of tiles pruned)")
    axes[0][0].set_ylabel("speed-up vs dense")
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def main(args):
    """Run the benchmark the flags describe and print (and save) its results."""
    if args.smoke:
        args = smoke_settings(args)
    plan = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "keep freed memory" if not args.default_malloc and utils.keep_freed_memory() else "unchanged"
    info = machine_info(args, plan, malloc=malloc)
    print(f"torch {info['torch']}, {info['threads']} threads, {info['processor']} ({info['cpu_count']} CPUs), "
          f"device {info['device']}, {args.dtype}, compile {args.compile}, malloc {info['malloc']}, "
          f"fused kernel {info['fused_kernel']}")
    if args.layer and plan.sweep_sparsities:
        print(f"{'Linear' if len(plan.layer_shape) == 2 else 'MLP pair'} {args.layer}, sweep sparsity "
              f"{plan.sweep_sparsities} x tile {plan.sweep_tiles} x tokens {plan.sweep_token_counts}")
        rows = run_layer_sweep(args, plan)
    elif args.layer:
        print(f"{'Linear' if len(plan.layer_shape) == 2 else 'MLP pair'} {args.layer}, {args.tokens} tokens, "
              f"block {plan.blocksize}, sparsity {args.sparsity_linear}")
        rows = run_layer(args, plan)
    elif plan.sweep_sparsities:
        print(f"{args.model}, sweep sparsity {plan.sweep_sparsities} x tile {plan.sweep_tiles} x batch {plan.sweep_batches}")
        rows = run_sweep(args, plan)
    else:
        print(f"{args.model}, batch {args.batch_size}, linear sparsity {args.sparsity_linear}, "
              f"tile {args.sp_linear_tile_size}, attention sparsity {args.sparsity_attention} "
              f"tile {args.sp_attention_tile_size}, block {plan.blocksize}, median of {args.iters} after {args.warmup} warm-up")
        rows = run_model(args, plan)
    print(format_rows(rows))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(machine=info, rows=rows), f, indent=2)
    if args.csv:
        keys = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        what = f"MLP pair {args.layer}" if args.layer else args.model
        plot(rows, args.plot, title=f"{what}, {args.dtype}, {info['threads']} threads, {info['processor']}")
        print(f"plot written to {args.plot}")
    return rows


if __name__ == "__main__":
    cli.run(main, get_args_parser())
