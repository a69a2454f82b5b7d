"""Measure a trained SuperBlock model: accuracy and inference speed, with masks online, offline or block-sparse.

    online:   the Supermask layers compute weight * mask (the mask is cached between batches)
    offline:  --sparsify-weights freezes the masks into plain Linear/Conv2d weights
    BSR:      --bsr N also packs every eligible frozen Linear into N x N blocks (implies --sparsify-weights)

All three give the same accuracy; only the speed differs. With --bsr, --quantize int8 runs the converted layers
(and the Linears left dense for their sparsity) in int8 (W8A8) on the CPU, at a slightly different accuracy. Runs
as one process or under torchrun, where every validation image is counted exactly once.

Example:
    torchrun --nproc_per_node=8 evaluate.py --model vit_b_16 --batch-size 256 --sparsity-linear 0.9 \
        --sp-linear-tile-size 32 --weights-path model_299.pth --data-path /path/to/imagenet --bsr 32
"""

import argparse
import dataclasses
import json
import platform
import statistics

import torch
import torch.utils.data

import checkpoints
import cli
import data
import evaluation
import models
import supermask
import utils

# blocksparse.KERNELS, spelled out: importing blocksparse (torch.library, Triton) costs a second at every start.
BSR_KERNELS = ("auto", "fused", "bmm", "dense", "torch", "triton")
INT8_KERNELS = ("auto", "fused", "bmm")  # the kernels apply_bsr runs int8 layers with
DEFAULT_MODEL, DEFAULT_RESIZE, DEFAULT_CROP = "resnet18", 256, 224  # torchvision's, where no checkpoint says


@dataclasses.dataclass(frozen=True)
class Target:
    """What to evaluate, from the flags and --weights-path together: a compact file names its own model and blocks."""

    model: str
    bsr: int | None  # the block size, or None to stay dense
    sparsify_weights: bool  # freeze the masks into the weights (always with bsr)
    checkpoint: dict | None  # --weights-path, loaded
    quantize: str | None = None  # "int8": the block-sparse layers run W8A8

    @property
    def compact(self):
        """The checkpoint is a compact block-sparse file."""
        return checkpoints.is_compact_file(self.checkpoint)

    @property
    def mode(self):
        if self.bsr:
            return "bsr-int8" if self.quantize else "bsr"
        return "offline" if self.sparsify_weights else "online"


def resolve_target(args):
    """The Target of the flags; loads --weights-path and fills the Supermask flags, the model and the evaluation
    sizes it knows (InputError if it can't)."""
    checkpoint = checkpoints.load_checkpoint(args.weights_path) if args.weights_path else None
    if checkpoints.is_compact_file(checkpoint):
        target = Target(**_compact_target(args, checkpoint), checkpoint=checkpoint)
    else:
        # A checkpoint of this project knows the Supermask settings it was trained with: omitted flags take them.
        cli.resolve_supermask_args(args, checkpoint, source=f"--weights-path {args.weights_path}",
                                   fix="drop the flag to evaluate with the checkpoint's setting")
        _resolve_model_and_sizes(args, checkpoint)
        target = Target(model=args.model, bsr=args.bsr, sparsify_weights=args.sparsify_weights or bool(args.bsr),
                        checkpoint=checkpoint, quantize=None if args.quantize in (None, "none") else args.quantize)
    # torchvision's ViT would refuse such images only at the first batch, with an AssertionError.
    cli.check_image_size(target.model, args.val_crop_size, "--val-crop-size")
    return target


def _resolve_model_and_sizes(args, checkpoint):
    """Take --model and the evaluation sizes, when left out, from the args a checkpoint of this project stores.

    A --model other than the stored one is an InputError (its weights would not fit), and so is a ViT's
    --val-crop-size other than the size its position embedding was trained for; a CNN may be evaluated at any size.
    """
    stored = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    stored = stored if isinstance(stored, dict) else {}
    source = f"--weights-path {args.weights_path}"
    if args.model is None:
        args.model = stored.get("model") or DEFAULT_MODEL
    elif stored.get("model") and args.model != stored["model"]:
        raise utils.InputError(f"--model {args.model} contradicts {source}, which holds a {stored['model']}; drop "
                               f"--model to evaluate the checkpoint's")
    cli.check_model_name(args.model)
    trained_size = stored.get("val_crop_size")
    if (args.val_crop_size is not None and trained_size and args.val_crop_size != trained_size
            and models.is_vit(args.model)):
        raise utils.InputError(f"--val-crop-size {args.val_crop_size} contradicts {source}, a {args.model} trained "
                               f"for {trained_size}-pixel images; drop --val-crop-size (and --val-resize-size)")
    for name, default in (("val_crop_size", DEFAULT_CROP), ("val_resize_size", DEFAULT_RESIZE)):
        if getattr(args, name) is None:
            setattr(args, name, stored.get(name) or default)



def _compact_target(args, checkpoint):
    """Model, blocks, freezing and quantization of a compact file, which knows them: flags that say otherwise are
    InputErrors."""
    import compact

    try:
        compact.check_compact(checkpoint)
    except ValueError as e:
        raise utils.InputError(f"--weights-path {args.weights_path}: {e}") from None
    path, blocksize = args.weights_path, checkpoint["blocksize"]
    given = cli.given_supermask_flags(args)
    if given:
        raise utils.InputError(f"{given[0]} does not apply to compact checkpoint {path}, which holds its own blocks "
                               f"and sparsity; drop the flag")
    if args.bsr and args.bsr != blocksize:
        raise utils.InputError(f"--bsr {args.bsr} contradicts compact checkpoint {path}, which holds "
                               f"{blocksize}x{blocksize} blocks; drop --bsr")
    quantize = compact.quantization(checkpoint)
    if args.quantize is not None:
        raise utils.InputError(f"--quantize does not apply to compact checkpoint {path}, which says itself whether its "
                               f"layers are int8 (they are{'' if quantize else ' not'}); drop the flag")
    arch = checkpoint["architecture"]
    if args.model is not None and args.model != arch["model"]:
        raise utils.InputError(f"--model {args.model} contradicts compact checkpoint {path}, which holds a "
                               f"{arch['model']}; drop --model")
    if args.val_crop_size is None:  # the size the file's model was saved for; resized in torchvision's proportion
        args.val_crop_size = arch["image_size"]
        if args.val_resize_size is None:
            args.val_resize_size = round(arch["image_size"] * DEFAULT_RESIZE / DEFAULT_CROP)
    if args.val_resize_size is None:
        args.val_resize_size = round(args.val_crop_size * DEFAULT_RESIZE / DEFAULT_CROP)
    if models.is_vit(arch["model"]) and arch["image_size"] != args.val_crop_size:
        raise utils.InputError(f"compact checkpoint {path} holds a {arch['model']} for {arch['image_size']}-pixel "
                               f"images, not --val-crop-size {args.val_crop_size}; pass --val-crop-size "
                               f"{arch['image_size']} (and a --val-resize-size to match)")
    return dict(model=arch["model"], bsr=blocksize, sparsify_weights=True, quantize=quantize)


def check_quantize(args, target):
    """Refuse int8 where it cannot run (no --bsr, other blocks, kernel or device, a CPU without the int8 kernels)."""
    if not target.quantize:
        return
    # Checked once the target is known: a compact file refuses --quantize itself, with or without --bsr.
    if not target.bsr:
        raise utils.InputError("--quantize int8 quantizes the layers --bsr converts: add --bsr N (a multiple of 16, "
                               "e.g. the tile size of the masks)")
    if target.bsr % 16:
        raise utils.InputError(f"--quantize int8 takes --bsr a multiple of 16 (the int8 kernels' blocks), not "
                               f"{target.bsr}")
    what = f"compact checkpoint {args.weights_path} (int8 layers)" if target.compact else "--quantize int8"
    drop = "" if target.compact else ", or drop --quantize"
    if args.bsr_kernel not in INT8_KERNELS:
        raise utils.InputError(f"{what} runs with --bsr-kernel {', '.join(INT8_KERNELS)}, not {args.bsr_kernel}{drop}")
    if cli.process_device(args).type != "cpu":
        raise utils.InputError(f"{what} runs on the CPU, not {args.device}: pass --device cpu{drop}")
    if args.bsr_kernel == "bmm":
        return  # the pure-PyTorch reference runs anywhere
    import blocksparse_int8

    try:
        reason = blocksparse_int8.unavailable_reason(target.bsr)
    except ValueError as e:  # SUPERBLOCK_HIDE_ISA names an unknown instruction set
        raise utils.InputError(str(e)) from None
    if reason is not None:
        raise utils.InputError(f"{what} needs the int8 CPU kernels, which cannot run here: {reason}; pass "
                               f"--bsr-kernel bmm for the pure-PyTorch reference (slow){drop}")


##### The model #####


def load_weights(model, args, checkpoint):
    """Load --weights-path (`checkpoint`, loaded) into the Supermask-prepared model; mistakes are InputErrors."""
    if args.model_ema:
        if not isinstance(checkpoint, dict) or checkpoint.get("model_ema") is None:
            raise utils.InputError(f"--model-ema: {args.weights_path} holds no EMA weights (train with --model-ema)")
        # AveragedModel's state: the model's entries under "module." plus its step counter.
        state_dict = {k[len("module."):]: v for k, v in checkpoint["model_ema"].items() if k.startswith("module.")}
    else:
        state_dict = checkpoints.model_state_dict(checkpoint)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise utils.InputError(f"{args.weights_path} holds no model weights (expected a state_dict or a "
                               f"checkpoint with a 'model' entry)")
    try:
        missing_scores = supermask.load_supermask_state_dict(model, state_dict)
    except ValueError as e:
        raise utils.InputError(f"{args.weights_path} does not fit --model {args.model} with these sparsity "
                               f"flags: {e}") from None
    if missing_scores:
        raise utils.InputError(
            f"{args.weights_path} has no masks for {len(missing_scores)} layer(s) that the sparsity flags "
            f"mask, e.g. {missing_scores[0]}: pass the sparsity flags the model was trained with")


def prepare_model(args, target, *, num_classes):
    """The model the flags describe: built, masked, loaded, frozen and block-sparse as asked. Returns (model, bsr)."""
    dtype = cli.DTYPES[args.dtype]
    if target.compact:
        model, bsr = load_compact_model(args, target.checkpoint, num_classes=num_classes)
        plot_masks(model, args, target)
        return model.to(dtype=dtype), bsr
    model = cli.build_model(args, num_classes=num_classes, image_size=args.val_crop_size)
    cli.apply_supermask_flags(model, args)
    if target.checkpoint is not None:
        load_weights(model, args, target.checkpoint)
        fraction = evaluation.ramp_fraction(target.checkpoint)
        if fraction is not None:  # the sparsity the masks had when it was saved
            supermask.set_sparsity_fraction(model, fraction)
    model.eval()
    plot_masks(model, args, target)  # the masks as learned, before block-sparse packing reorders anything
    if target.sparsify_weights:
        supermask.sparsify_offline(model)
    model.to(device=cli.process_device(args), dtype=dtype)
    bsr = None
    if target.bsr:
        import blocksparse

        bsr = blocksparse.apply_bsr(model, blocksize=target.bsr, kernel=args.bsr_kernel, quantize=target.quantize)
        if not bsr.converted:
            divides = any("not divisible by blocksize" not in reason for _, reason in bsr.left_dense)
            fix = ("no layer is sparse enough for block-sparse kernels to gain: evaluate it without --bsr" if divides
                   else "use a block size that divides the layers' shapes, e.g. the tile size of the masks")
            raise utils.InputError(f"--bsr {target.bsr} converted no layer ({bsr.skipped_summary()}); {fix}")
    return model, bsr


def plot_masks(model, args, target):
    """Draw --plot-masks (rank 0 only)."""
    if not args.plot_masks or not utils.is_main_process():
        return
    import plots

    tile_size = target.bsr or max(args.sp_linear_tile_size, args.sp_conv1x1_tile_size, args.sp_conv_tile_size,
                                  args.sp_attention_tile_size)
    try:
        utils.log(f"Mask picture: {plots.plot_masks(model, args.plot_masks, tile_size=tile_size)}")
    except (ImportError, ValueError) as e:
        raise utils.InputError(f"--plot-masks: {e}") from None


def load_compact_model(args, checkpoint, *, num_classes):
    """The block-sparse model of a compact checkpoint (evaluate.py --save-compact), ready to run."""
    import compact

    architecture = checkpoint["architecture"]
    if architecture["num_classes"] != num_classes:
        raise utils.InputError(f"{args.weights_path} classifies {architecture['num_classes']} classes but the data "
                               f"has {num_classes}")
    blocksize = checkpoint["blocksize"]
    quantized = ", int8 (W8A8) layers" if compact.quantization(checkpoint) else ""
    utils.log(f"Compact checkpoint {args.weights_path}: {architecture['model']}, {blocksize}x{blocksize} "
              f"blocks{quantized}")
    try:
        return compact.model_from_compact(checkpoint, kernel=args.bsr_kernel, device=cli.process_device(args))
    except (ValueError, KeyError, RuntimeError) as e:
        raise utils.InputError(f"cannot rebuild the model of compact checkpoint {args.weights_path}: {e}") from None


def save_compact(model, args, target, *, num_classes):
    """Write --save-compact and report its size against the dense model's."""
    import compact

    sizes = compact.save_compact(model, args.save_compact, blocksize=target.bsr, architecture=dict(
        model=target.model, num_classes=num_classes, image_size=args.val_crop_size))
    utils.log(f"Compact checkpoint {args.save_compact}: {sizes['bytes'] / 2**20:.2f} MiB, "
              f"{100 * sizes['bytes'] / sizes['dense_bytes']:.1f}% of the dense weights "
              f"({sizes['dense_bytes'] / 2**20:.2f} MiB)")
    return sizes


##### main #####


def check_args(args):
    """Reject flag values and combinations that cannot work, with one line saying how to fix them."""
    if args.bsr is not None and args.bsr < 1:
        raise utils.InputError(f"--bsr must be a block size >= 1, got {args.bsr}")
    if args.weights and args.weights_path:
        raise utils.InputError("--weights and --weights-path both give weights; pass one of them")
    if args.model_ema and not args.weights_path:
        raise utils.InputError("--model-ema evaluates the EMA weights of a checkpoint: pass --weights-path too")
    if not args.weights_path and not args.weights:
        # Otherwise the model's random initialisation would be measured, and its accuracy reported as if trained.
        raise utils.InputError("no weights to evaluate: pass --weights-path CHECKPOINT (or --weights for "
                               "torchvision's pretrained weights)")
    if args.batch_size < 1:
        raise utils.InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.save_compact and not args.bsr:
        raise utils.InputError("--save-compact stores block-sparse layers: add --bsr N (e.g. the tile size of the "
                               "masks)")
    if args.model is not None:
        cli.check_model_name(args.model)
    cli.check_weights_path(args.weights_path)


def check_weights_classes(args, target, num_classes):
    """Refuse pretrained --weights of another class count than the data's: building the model would replace their
    classifier by an untrained one (as train.py does to fine-tune them), and its accuracy would mean nothing."""
    if not args.weights:
        return
    try:
        classes = models.pretrained_classes(target.model, args.weights)
    except ValueError as e:
        raise utils.InputError(f"--weights {args.weights}: {e}") from None
    if classes and classes != num_classes:
        raise utils.InputError(f"--weights {args.weights} classify {classes} classes and {args.data_path} has "
                               f"{num_classes}; evaluating them would measure an untrained classifier: fine-tune "
                               f"them first (train.py --weights {args.weights}), then evaluate that checkpoint with "
                               f"--weights-path")


def main(args):
    check_args(args)
    utils.keep_freed_memory()  # no page faults for buffers freed and reallocated every step
    # Every output is checked (its folder created) now, not found unwritable after the whole evaluation.
    for flag, path in (("--output-json", args.output_json), ("--save-compact", args.save_compact),
                       ("--plot-masks", args.plot_masks)):
        if path:
            cli.prepare_output_file(path, flag)
    target = resolve_target(args)
    check_quantize(args, target)
    cli.init_distributed_mode(args)
    device = cli.process_device(args)

    dataset, eval_sampler = data.load_val_data(args)
    data_loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=eval_sampler, num_workers=args.workers,
        pin_memory=device.type == "cuda")
    num_classes = len(dataset.classes)
    check_weights_classes(args, target, num_classes)
    model, bsr = prepare_model(args, target, num_classes=num_classes)
    note = None if target.compact else evaluation.ramp_note(target.checkpoint, args.weights_path)
    if note:
        utils.log(note)
    utils.log(supermask.sparsity_report(model))
    if bsr is not None:
        utils.log(bsr)
    if args.save_compact and utils.is_main_process():
        save_compact(model, args, target, num_classes=num_classes)
    if args.compile:
        model = torch.compile(model)

    mode = target.mode
    acc1, acc5, times, nonfinite = evaluation.evaluate(
        model, data_loader, device=device, num_classes=num_classes, dtype=cli.DTYPES[args.dtype],
        autocast=cli.autocast(args.amp, device), warmup=args.warmup_batches, desc=f"Test ({mode})")
    # Throughput from the images actually timed: the last batch may be smaller than --batch-size.
    timed_images = sum(images for _, images in times)
    timed_seconds = sum(seconds for seconds, _ in times)
    batch_time = statistics.median(seconds for seconds, _ in times) if times else float("nan")
    result = {
        "acc1": acc1, "acc5": acc5, "images": len(dataset), "nonfinite_images": nonfinite,
        "batch_time_ms": 1000 * batch_time,
        "images_per_s": timed_images / timed_seconds if timed_seconds > 0 else float("nan"),
        "timed_batches": len(times), "timed_images": timed_images,
        "peak_memory_mb": evaluation.peak_memory_mb(device),
        "mode": mode, "quantize": target.quantize, "sparsity_note": note,
        "bsr_converted": {name: kernel for name, kernel, _ in bsr.converted} if bsr else {},
        "bsr_dense": dict(bsr.left_dense) if bsr else {},
        "config": {
            "model": target.model, "flags": {k: v for k, v in vars(args).items() if _is_plain(v)},
            "dtype": args.dtype, "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "processes": utils.get_world_size(),
            "machine": platform.processor() or platform.machine(),
        },
    }
    if nonfinite:
        utils.log(evaluation.nonfinite_note(nonfinite, len(dataset)))
    utils.log(f"Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
    utils.log(f"Model time per batch {result['batch_time_ms']:.2f} ms (median of {len(times)} timed batches, "
              f"{timed_images} images, {mode}, {args.dtype}), {result['images_per_s']:.1f} images/s, "
              f"peak memory {result['peak_memory_mb']:.0f} MB")
    if args.output_json and utils.is_main_process():
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _is_plain(value):
    return value is None or isinstance(value, (bool, int, float, str))


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="SuperBlock evaluation: accuracy and speed of a sparse model",
                                     add_help=add_help, formatter_class=cli.HelpFormatter)
    cli.add_data_args(parser, sizes_from_checkpoint=True)
    cli.add_model_args(parser, model=None, model_help=f" (default: the model of the --weights-path checkpoint, else "
                                                      f"{DEFAULT_MODEL})")
    cli.add_supermask_args(parser)
    cli.add_distributed_args(parser)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--model-ema", action="store_true",
                       help="evaluate the checkpoint's EMA weights instead of its model weights (default: off)")
    group.add_argument("--sparsify-weights", action="store_true",
                       help="freeze the masks into the weights before evaluating (offline; default: online)")
    group.add_argument("--bsr", default=None, type=int, metavar="N",
                       help="also convert the frozen Linear layers to N x N block-sparse weights; implies "
                            "--sparsify-weights (default: off)")
    group.add_argument("--bsr-kernel", default="auto", choices=BSR_KERNELS,
                       help="block-sparse kernel: auto measures the fused C++ kernel (or bmm without it) against "
                            "dense per layer shape and keeps the faster; see blocksparse.py (default: auto)")
    group.add_argument("--quantize", default=None, choices=("none", "int8"),
                       help="with --bsr: int8 runs the converted Linears, and those left dense for their sparsity, "
                            "in int8 (W8A8: int8 weights, activations quantized per token) on the CPU (--bsr-kernel "
                            "auto: each where int8 measures faster than float); needs --bsr a multiple of 16; a "
                            "compact checkpoint says itself (default: none)")
    group.add_argument("--dtype", default="float32", choices=sorted(cli.DTYPES),
                       help="dtype of the weights and inputs (default: float32)")
    group.add_argument("--amp", action="store_true",
                       help="autocast: float16 on CUDA, bfloat16 on CPU (default: off)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    group.add_argument("--warmup-batches", default=1, type=int,
                       help="batches left out of the timing (default: 1)")
    group.add_argument("--output-json", default=None, type=str,
                       help="write accuracy, timings and the configuration to this JSON file (default: none)")
    group.add_argument("--save-compact", default=None, type=str, metavar="FILE",
                       help="write the block-sparse model (kept blocks only, no scores or optimizer state) to FILE; "
                            "needs --bsr; evaluate it later with --weights-path FILE and no sparsity flags "
                            "(default: none)")
    group.add_argument("--plot-masks", default=None, type=str, metavar="FILE.png",
                       help="draw each sparse layer's tile mask to this PNG (needs matplotlib; default: none)")
    return parser


def interrupted_message():
    """What Ctrl-C leaves behind: evaluate.py writes its outputs only at the end, so nothing of this run."""
    return "Interrupted; the evaluation did not finish and wrote no results"


if __name__ == "__main__":
    cli.run(main, get_args_parser(), interrupted=interrupted_message)
