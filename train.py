"""Train a torchvision classification model with Supermask block sparsity.

Flags follow torchvision's references/classification/train.py, so its recipes copy over; the Supermask flags
(--sparsity-linear, --sp-linear-tile-size, ...) choose which layers learn tile masks. Runs as one process
(`python train.py`, CPU or one GPU) or several (`torchrun --nproc_per_node=N train.py`, or under SLURM).

Example (`make demo` runs the full command; TRAINING.md has it and the ImageNet recipes):
    python sample_data.py demo/data
    python train.py --data-path demo/data --model vit_tiny --device cpu --train-crop-size 16 \
        --val-resize-size 16 --val-crop-size 16 --sparsity-linear 0.9 --sp-linear-tile-size 16 \
        --opt adamw --lr 2e-3 --lr-scheduler cosineannealinglr --epochs 30 --output-dir demo/output
"""
import argparse
import contextlib
import datetime
import math
import os
import sys
import time

import torch
import torch.utils.data
from torch import nn
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

import checkpoints
import cli
import data
import distillation
import evaluation
import models
import presets
import sampler
import supermask
import transforms
import utils

OPTIMIZERS = ("sgd", "sgd_nesterov", "rmsprop", "adamw")
LR_SCHEDULERS = ("steplr", "cosineannealinglr", "exponentiallr")


##### Progress #####


class Progress:
    """Per-step progress on rank 0: a tqdm bar on a terminal, otherwise a log line every print_freq steps.

    Metrics are read from the device only every print_freq steps, so the loop does not sync on every step.
    """

    def __init__(self, *, total, desc, print_freq):
        self.total = total
        self.desc = desc
        self.print_freq = print_freq
        self.enabled = utils.is_main_process()
        show_bar = self.enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if show_bar else None
        self.last_time = time.time()
        self.last_images = 0

    def step(self, index, *, images_seen, metrics):
        """Record that step `index` (0-based) finished; `metrics` is a callable returning a dict, called rarely."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        if index % self.print_freq != 0 and index + 1 != self.total:
            return
        values = metrics()  # syncs with the device
        now = time.time()
        values["img/s"] = (images_seen - self.last_images) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_images = now, images_seen
        text = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
        else:
            fields = "  ".join(f"{k} {v}" for k, v in text.items())
            utils.log(f"{self.desc} [{index + 1}/{self.total}]  {fields}")

    def close(self):
        """Remove the bar (the epoch's summary line follows)."""
        if self.bar is not None:
            self.bar.close()


##### One epoch #####


def train_one_epoch(*, model, criterion, optimizer, data_loader, device, epoch, args, model_ema, scaler, autocast,
                    teacher=None):
    """One pass over the training data; returns (mean loss, images per second) of this process."""
    model.train()
    steps = len(data_loader)
    progress = Progress(total=steps, desc=f"Epoch {epoch}", print_freq=max(args.print_freq, 1))
    loss_sum = torch.zeros((), device=device)
    images_seen = 0
    optimizer_steps = 0
    start = time.time()
    optimizer.zero_grad(set_to_none=True)
    ramp_steps = args.sparsity_warmup_epochs * steps
    for i, (image, target) in enumerate(data_loader):
        image = image.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        step = epoch * steps + i
        if step < ramp_steps:
            # The ramp sets integer buffers in place: no host sync, no recompilation; after it, the targets hold.
            fraction = ramp_fraction(args, step, ramp_steps)
            for module in (model, model_ema):
                if module is not None:
                    supermask.set_sparsity_fraction(module, fraction)
        # With gradient accumulation the optimizer steps every accumulation_steps batches and at the epoch's end.
        is_update = (i + 1) % args.accumulation_steps == 0 or i + 1 == steps
        # DDP need not all-reduce gradients on the batches that only accumulate.
        sync = contextlib.nullcontext() if is_update or not args.distributed else model.no_sync()
        with sync:
            with autocast():
                output = model(image)
                loss = criterion(output, target)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_output = teacher(image)
                    loss = distillation.distillation_loss(
                        output, teacher_output, loss, alpha=args.distill_alpha, temperature=args.distill_temperature
                    )
            scaled = loss / args.accumulation_steps
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if is_update:
            if scaler is not None:
                if args.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                if args.clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None and optimizer_steps % args.model_ema_steps == 0:
                model_ema.update_parameters(model)
                if epoch < args.lr_warmup_epochs:
                    # During warmup the average restarts at every update, i.e. it copies the weights.
                    model_ema.n_averaged.fill_(0)
            optimizer_steps += 1
        loss_sum += loss.detach()
        images_seen += image.shape[0]
        progress.step(
            i,
            images_seen=images_seen,
            metrics=lambda: {"loss": (loss_sum / (i + 1)).item(), "lr": optimizer.param_groups[0]["lr"]},
        )
    progress.close()
    mean_loss = (loss_sum / max(steps, 1)).item()
    return mean_loss, images_seen / max(time.time() - start, 1e-9)


def ramp_fraction(args, step, ramp_steps):
    """The fraction of the target sparsities that step `step` (0-based) of a `ramp_steps`-step ramp trains at.

    Counted from the step's end, so the ramp's last step (that of epoch --sparsity-warmup-epochs - 1) and that
    epoch's evaluation and checkpoint are at the targets; 1 after the ramp.
    """
    return supermask.sparsity_schedule(args.sparsity_schedule, step + 1, ramp_steps)


##### Setup #####


# The meaningful range of each numeric flag that check_args does not check on its own: (flag, attribute,
# lowest, highest, whether the lowest is allowed, whether the highest is); None leaves that side open. Flags
# whose default is None (off) are checked when given.
NUMERIC_RANGES = [
    ("--workers", "workers", 0, None, True, True),
    ("--val-resize-size", "val_resize_size", 1, None, True, True),
    ("--val-crop-size", "val_crop_size", 1, None, True, True),
    ("--train-crop-size", "train_crop_size", 1, None, True, True),
    ("--norm-weight-decay", "norm_weight_decay", 0, None, True, True),
    ("--bias-weight-decay", "bias_weight_decay", 0, None, True, True),
    ("--transformer-embedding-decay", "transformer_embedding_decay", 0, None, True, True),
    ("--label-smoothing", "label_smoothing", 0, 1, True, False),
    ("--mixup-alpha", "mixup_alpha", 0, None, True, True),
    ("--cutmix-alpha", "cutmix_alpha", 0, None, True, True),
    ("--lr-warmup-epochs", "lr_warmup_epochs", 0, None, True, True),
    ("--lr-warmup-decay", "lr_warmup_decay", 0, 1, False, True),  # the warmup's starting factor of --lr
    ("--lr-step-size", "lr_step_size", 1, None, True, True),
    ("--lr-gamma", "lr_gamma", 0, None, False, True),
    ("--lr-min", "lr_min", 0, None, True, True),
    ("--clip-grad-norm", "clip_grad_norm", 0, None, False, True),
    ("--ra-magnitude", "ra_magnitude", 0, 30, True, True),  # RandAugment's 31 magnitude bins
    ("--augmix-severity", "augmix_severity", 1, 10, True, True),  # AugMix's range
    ("--random-erase", "random_erase", 0, 1, True, True),
    ("--hflip-prob", "hflip_prob", 0, 1, True, True),
    ("--ra-reps", "ra_reps", 1, None, True, True),
    ("--model-ema-steps", "model_ema_steps", 1, None, True, True),
    ("--model-ema-decay", "model_ema_decay", 0, 1, True, False),
    ("--print-freq", "print_freq", 1, None, True, True),
    ("--start-epoch", "start_epoch", 0, None, True, True),
    ("--seed", "seed", 0, None, True, True),  # numpy's seed sequences take no negative numbers
    ("--world-size", "world_size", 1, None, True, True),
]


def _range_text(low, high, low_in, high_in):
    if high is None:
        return f"at least {low}" if low_in else f"above {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_numeric_ranges(args):
    """Refuse a numeric flag outside NUMERIC_RANGES, or a float flag that is not finite (nan passes every `<`)."""
    for flag, name, low, high, low_in, high_in in NUMERIC_RANGES:
        value = getattr(args, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not low_in) or \
                (high is not None and (value > high or (value == high and not high_in))):
            raise utils.InputError(f"{flag} must be {_range_text(low, high, low_in, high_in)}, got {value}")
    for flag, name in (("--lr", "lr"), ("--wd", "weight_decay"), ("--momentum", "momentum"),
                       ("--distill-alpha", "distill_alpha"), ("--distill-temperature", "distill_temperature")):
        if not math.isfinite(getattr(args, name)):
            raise utils.InputError(f"{flag} must be a finite number, got {getattr(args, name)}")
    low, high = args.train_crop_scale
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= 1):
        raise utils.InputError(f"--train-crop-scale {low} {high} must be two area fractions with 0 < MIN <= MAX <= 1")


def check_args(args):
    """Reject flag values and combinations that cannot work, before any data is read."""
    check_numeric_ranges(args)
    if args.epochs < 0:
        raise utils.InputError(f"--epochs {args.epochs} is negative; pass the number of epochs to train (1 or more)")
    if args.epochs < 1 and not args.test_only:
        raise utils.InputError(f"--epochs {args.epochs} trains nothing; pass --epochs 1 or more (or --test-only to "
                               f"only evaluate)")
    if args.lr_scheduler == "cosineannealinglr" and args.lr_warmup_epochs >= args.epochs and not args.test_only:
        raise utils.InputError(
            f"--lr-warmup-epochs {args.lr_warmup_epochs} leaves no epochs for cosine annealing; "
            f"use fewer than --epochs {args.epochs}"
        )
    cli.check_model_name(args.model)
    if args.weights:
        try:
            models.resolve_weights(args.model, args.weights)
        except ValueError as e:
            raise utils.InputError(f"--weights {args.weights}: {e}") from None
    if models.is_vit(args.model) and args.train_crop_size != args.val_crop_size and not args.test_only:
        raise utils.InputError(
            f"{args.model} is built for one image size, but --train-crop-size {args.train_crop_size} differs from "
            f"--val-crop-size {args.val_crop_size}; make them equal"
        )
    cli.check_image_size(args.model, *((args.val_crop_size, "--val-crop-size") if args.test_only
                                       else (args.train_crop_size, "--train-crop-size")))
    # torch would refuse these with a traceback, the batch size only once the data loader is built.
    if args.batch_size < 1:
        raise utils.InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    for flag, value in (("--lr", args.lr), ("--wd", args.weight_decay), ("--momentum", args.momentum)):
        if value < 0:
            raise utils.InputError(f"{flag} {value} is negative; pass 0 or more")
    if args.keep_last is not None and args.keep_last < 0:
        raise utils.InputError(f"--keep-last {args.keep_last} is negative; pass 0 or more (or leave it out to keep "
                               f"all)")
    if args.start_over and args.resume:
        raise utils.InputError("--start-over discards the run in --output-dir, --resume continues one; pass one of "
                               "them")
    if args.accumulation_steps < 1:
        raise utils.InputError(f"--accumulation-steps must be at least 1, got {args.accumulation_steps}")
    if args.backend == "tv_tensor" and not args.use_v2:
        raise utils.InputError("--backend tv_tensor needs --use-v2")
    cli.check_weights_path(args.weights_path)
    if args.sparsity_warmup_epochs < 0 or (args.sparsity_warmup_epochs > args.epochs and not args.test_only):
        raise utils.InputError(f"--sparsity-warmup-epochs {args.sparsity_warmup_epochs} must be between 0 and "
                               f"--epochs {args.epochs}")
    if not 0.0 <= args.distill_alpha <= 1.0 or args.distill_temperature <= 0:
        raise utils.InputError("--distill-alpha must be in [0, 1] and --distill-temperature above 0")
    data.check_data_path(args.data_path)


def resolve_resume(args):
    """The checkpoint to resume from, loaded: (path, checkpoint), or (None, None) for a fresh start.

    --resume PATH, or with --resume auto the newest checkpoint in --output-dir that loads.
    """
    if not args.resume:
        return None, None
    if args.resume == "auto":
        removed = checkpoints.remove_stale_temporary_files(args.output_dir)
        if removed:
            utils.log(f"Removed {len(removed)} temporary file(s) of interrupted checkpoint writes: "
                      f"{', '.join(removed)}")
        path, checkpoint = checkpoints.load_latest_checkpoint(args.output_dir)
        if path is None and args.test_only:
            raise utils.InputError(f"--resume auto found no checkpoint in --output-dir {args.output_dir}")
    else:
        if os.path.isdir(args.resume):
            raise utils.InputError(f"--resume {args.resume} is a folder; pass a checkpoint file in it, or --resume "
                                   f"auto --output-dir {args.resume}")
        if not os.path.isfile(args.resume):
            raise utils.InputError(f"--resume {args.resume} does not exist; pass a checkpoint file or --resume auto")
        path, checkpoint = args.resume, checkpoints.load_checkpoint(args.resume)
    if path is not None:
        check_training_checkpoint(checkpoint, path)
    return path, checkpoint


def check_training_checkpoint(checkpoint, path):
    """Refuse a file --resume cannot continue from, saying what to pass instead."""
    if checkpoints.is_compact_file(checkpoint):
        raise utils.InputError(f"--resume {path} is a compact inference file (evaluate.py --save-compact) without "
                               f"training state; resume from the run's checkpoint.pth, or evaluate it with "
                               f"evaluate.py --weights-path {path}")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
        raise utils.InputError(f"--resume {path} is not a train.py checkpoint (it has no 'model' and 'epoch' entries); "
                               f"to start a new run from its weights pass --weights-path {path}")


def check_resume_continues(args, checkpoint, path):
    """Refuse a resume that cannot step: another optimizer than the checkpoint's, or no epochs left to train.

    An optimizer's state loads into another kind without complaint (AdamW's into SGD) and fails at the first
    step; sgd and sgd_nesterov share a state, but loading it would also bring back the stored nesterov setting.
    """
    if args.test_only:
        return
    stored = checkpoint.get("args")
    stored_opt = stored.get("opt") if isinstance(stored, dict) else getattr(stored, "opt", None)
    if stored_opt is not None and str(stored_opt).lower() != args.opt:
        raise utils.InputError(f"--opt {args.opt} differs from the optimizer {path} was trained with (--opt "
                               f"{str(stored_opt).lower()}), whose state cannot continue in another; resume with --opt "
                               f"{str(stored_opt).lower()}, or start a new run from its weights with --weights-path "
                               f"{path}")
    last = checkpoint["epoch"]
    if last + 1 >= args.epochs:
        raise utils.InputError(f"--resume {path} holds epoch {last}, and --epochs {args.epochs} ends with epoch "
                               f"{args.epochs - 1}: there is nothing left to train; pass --epochs {last + 2} or more "
                               f"to train further, or --test-only to evaluate it")


def _launch_rank():
    """This process's rank as torchrun or SLURM set it (cli.init_distributed_mode reads the same variables)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def check_output_dir(args, resume_path):
    """Create --output-dir; refuse to write a fresh run over an earlier run's checkpoints unless asked to.

    Overwriting would replace its checkpoint.pth and model_<epoch>.pth files and leave its later epochs mixed
    in with the new run's. Resuming from a checkpoint in the folder continues that run, which is no overwrite.
    """
    if not args.output_dir or args.test_only:
        return
    cli.prepare_output_dir(args.output_dir)
    if _launch_rank() == 0:  # the process that writes the checkpoints; the others join the process group later
        checkpoints.lock_output_dir(args.output_dir)
    earlier = checkpoints.checkpoint_files(args.output_dir)
    if not earlier:
        return
    if args.start_over:
        for path in earlier:
            with contextlib.suppress(FileNotFoundError):  # another process of this run removed it first
                os.remove(path)
        checkpoints.remove_stale_temporary_files(args.output_dir)
        utils.log(f"--start-over: removed the earlier run's {len(earlier)} checkpoint file(s) in {args.output_dir}")
        return
    if resume_path and os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), args.output_dir):
        return
    names = ", ".join(os.path.basename(path) for path in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
    raise utils.InputError(f"--output-dir {args.output_dir} already holds a run ({names}); continue it with --resume "
                           f"auto, pass --start-over to delete its checkpoints and start again, or pick another folder")


def load_data(args):
    """Training and validation data sets, their samplers, and the number of classes."""
    interpolation = InterpolationMode(args.interpolation)
    train_transform = presets.ClassificationPresetTrain(
        crop_size=args.train_crop_size,
        interpolation=interpolation,
        crop_scale=tuple(args.train_crop_scale),
        hflip_prob=args.hflip_prob,
        auto_augment_policy=args.auto_augment,
        ra_magnitude=args.ra_magnitude,
        augmix_severity=args.augmix_severity,
        random_erase_prob=args.random_erase,
        backend=args.backend,
        use_v2=args.use_v2,
    )
    dataset = data.image_folder(os.path.join(args.data_path, "train"), train_transform, cache=args.cache_dataset)
    dataset_test, test_sampler = data.load_val_data(args)
    if dataset_test.classes != dataset.classes:
        raise utils.InputError(
            f"train/ and val/ under {args.data_path} have different class folders; give them the same classes"
        )
    world_size, rank = utils.get_world_size(), utils.get_rank()
    if args.ra_sampler:
        train_sampler = sampler.RASampler(
            dataset, num_replicas=world_size, rank=rank, seed=args.seed, repetitions=args.ra_reps
        )
    else:
        # Also for one process: it reshuffles by seed + epoch, so a resumed run sees the same order.
        train_sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed
        )
    return dataset, dataset_test, train_sampler, test_sampler, len(dataset.classes)


def build_optimizer(model, args):
    """The optimizer --opt names, with torchvision's per-group weight decay options."""
    custom_keys = []
    if args.bias_weight_decay is not None:
        custom_keys.append(("bias", args.bias_weight_decay))
    if args.transformer_embedding_decay is not None:
        keys = ["class_token", "position_embedding", "relative_position_bias_table"]
        if callable(getattr(model, "no_weight_decay", None)):  # a timm model names its own (pos_embed, cls_token)
            keys += sorted(model.no_weight_decay())
        for key in keys:
            custom_keys.append((key, args.transformer_embedding_decay))
    parameters = utils.set_weight_decay(
        model,
        args.weight_decay,
        norm_weight_decay=args.norm_weight_decay,
        custom_keys_weight_decay=custom_keys or None,
    )
    if args.opt.startswith("sgd"):
        return torch.optim.SGD(
            parameters,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            nesterov="nesterov" in args.opt,
        )
    if args.opt == "rmsprop":
        return torch.optim.RMSprop(
            parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, eps=0.0316, alpha=0.9
        )
    return torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)


def build_lr_scheduler(optimizer, args):
    """The per-epoch schedule: optional warmup, then step, cosine or exponential decay."""
    if args.lr_scheduler == "steplr":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    elif args.lr_scheduler == "cosineannealinglr":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=args.epochs - args.lr_warmup_epochs, eta_min=args.lr_min
        )
    else:
        main = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_gamma)
    if args.lr_warmup_epochs <= 0:
        return main
    if args.lr_warmup_method == "linear":
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs
        )
    else:
        warmup = torch.optim.lr_scheduler.ConstantLR(
            optimizer, factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs
        )
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, schedulers=[warmup, main], milestones=[args.lr_warmup_epochs]
    )


def gather_rng_states():
    """Every process's generator states, as a list indexed by rank (collective: all ranks must call it)."""
    state = checkpoints.get_rng_state()
    if not utils.is_dist_avail_and_initialized():
        return [state]
    states = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


# The newest complete checkpoint of this process's run, for the message on Ctrl-C: {"path", "epoch"}.
last_checkpoint = {}


def save_checkpoints(*, checkpoint, output_dir, epoch, keep_last=None):
    """Write model_<epoch>.pth and checkpoint.pth atomically (rank 0 only); keep only the newest keep_last epochs."""
    if not utils.is_main_process():
        return
    checkpoint = checkpoints.with_checksum(checkpoint)  # hashed once for both files
    try:
        with checkpoints.deferred_interrupt():  # Ctrl-C now would leave model_<epoch>.pth and checkpoint.pth apart
            if keep_last != 0:
                checkpoints.save_checkpoint(checkpoint, os.path.join(output_dir, f"model_{epoch}.pth"),
                                            checksum=False)
            checkpoints.save_checkpoint(checkpoint, os.path.join(output_dir, "checkpoint.pth"), checksum=False)
            last_checkpoint.update(path=os.path.join(output_dir, "checkpoint.pth"), epoch=epoch,
                                   output_dir=output_dir)
    except checkpoints.DiskFullError as e:
        kept = ", ".join(os.path.basename(path) for path in checkpoints.checkpoint_files(output_dir))
        kept = f"{output_dir} keeps {kept}" if kept else f"{output_dir} holds no checkpoint"
        raise utils.InputError(f"{e} (epoch {epoch}); {kept}; free some space and continue with --resume auto") \
            from None
    if keep_last is not None:
        # After the new files are complete, so a crash in between never leaves fewer than asked for.
        for old_epoch, path in checkpoints.epoch_files(output_dir).items():
            if old_epoch <= epoch - keep_last:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def load_model_weights(model, state_dict, *, source):
    """Load weights into a Supermask-prepared model; a mismatch is an InputError naming the checkpoint."""
    try:
        supermask.load_supermask_state_dict(model, state_dict)
    except ValueError as e:
        raise utils.InputError(f"{source} does not fit this model: {e}") from None


##### main #####


def main(args):
    """Train (or with --test-only evaluate) as the flags say; --output-dir stays locked while it runs."""
    try:
        return run_training(args)
    finally:
        checkpoints.release_output_dir_locks()


def run_training(args):
    """main's work: check the flags and files, load the data and model, then evaluate or train."""
    utils.keep_freed_memory()  # no page faults for buffers freed and reallocated every step
    check_args(args)
    if args.output_dir and not args.test_only and os.path.isdir(args.output_dir) and _launch_rank() == 0:
        # Before --resume auto clears temporary files: they may be a running run's checkpoint being written.
        checkpoints.lock_output_dir(args.output_dir)
    resume_path, resume_checkpoint = resolve_resume(args)
    if resume_path:
        check_resume_continues(args, resume_checkpoint, resume_path)
    # Loaded before any data is read, so a wrong file fails at once.
    start_checkpoint = checkpoints.load_checkpoint(args.weights_path) if args.weights_path else None
    if checkpoints.is_compact_file(start_checkpoint):
        raise utils.InputError(f"--weights-path {args.weights_path} is a compact inference file (evaluate.py "
                               f"--save-compact) and cannot be trained further; pass the training checkpoint it was "
                               f"made from (checkpoint.pth or model_<epoch>.pth), or evaluate it with evaluate.py "
                               f"--weights-path {args.weights_path}")
    # A resumed run continues with the Supermask settings it was trained with: omitted flags take them.
    cli.resolve_supermask_args(args, resume_checkpoint, source=f"--resume {resume_path}",
                                 fix="drop the flag to resume with the checkpoint's setting, or start a new run "
                                     "from it with --weights-path instead of --resume")
    check_output_dir(args, resume_path)
    if resume_path:
        last_checkpoint.update(path=resume_path, epoch=resume_checkpoint["epoch"], output_dir=args.output_dir)
    cli.init_distributed_mode(args)
    device = cli.process_device(args)
    settings = cli.changed_settings(args, get_args_parser(add_help=False))
    utils.log("Settings (flags not at their defaults; --help lists all):\n  " + "\n  ".join(settings))

    if args.use_deterministic_algorithms:
        # cuBLAS needs this to be deterministic; it must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True

    dataset, dataset_test, train_sampler, test_sampler, num_classes = load_data(args)
    if args.test_only and args.weights and not resume_path:
        classes = models.pretrained_classes(args.model, args.weights)
        if classes != num_classes:  # build_model would give them a new, untrained classifier
            raise utils.InputError(f"--test-only evaluates --weights {args.weights} as they are, but they classify "
                                   f"{classes} classes and {args.data_path} has {num_classes}; fine-tune them first "
                                   f"(train.py without --test-only)")
    loader_generator = torch.Generator()
    mix = transforms.get_mixup_cutmix(
        mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, num_classes=num_classes
    )
    loader_args = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    # BatchNorm cannot train on a batch of one image ("Expected more than 1 value per channel"), and the gradient
    # of one image is mostly noise: a last training batch of one is left out, each epoch another image as the
    # order reshuffles. Every other last batch trains, as in torchvision's reference, and evaluation sees all.
    drop_single = len(train_sampler) > 1 and len(train_sampler) % args.batch_size == 1
    if drop_single:
        utils.log(f"Notice: each process's {len(train_sampler)} training images in batches of {args.batch_size} "
                  f"leave a last batch of 1 image, which BatchNorm cannot train on; it is left out of each epoch")
    data_loader = torch.utils.data.DataLoader(
        dataset, sampler=train_sampler, collate_fn=transforms.MixCollate(mix) if mix is not None else None,
        generator=loader_generator, drop_last=drop_single, **loader_args)
    data_loader_test = torch.utils.data.DataLoader(dataset_test, sampler=test_sampler, **loader_args)

    utils.log("Creating model")
    # The same seed on every rank gives every rank the same initial model (DDP also broadcasts rank 0's).
    utils.seed_everything(args.seed)
    image_size = args.val_crop_size if args.test_only else args.train_crop_size
    model = cli.build_model(args, num_classes=num_classes, image_size=image_size)
    start_state = checkpoints.model_state_dict(start_checkpoint) if start_checkpoint is not None else None
    if args.test_only:
        # A checkpoint saved inside a sparsity ramp is evaluated at the sparsity training evaluated it at.
        tested, tested_path = (resume_checkpoint, resume_path) if resume_path else (start_checkpoint, args.weights_path)
        test_fraction = evaluation.ramp_fraction(tested)
        test_note = evaluation.ramp_note(tested, tested_path)
    start_checkpoint = None  # not held in memory for the whole run
    starts_dense = bool(args.weights) or (start_state is not None and not any(k.endswith(".scores") for k in start_state))
    if starts_dense and start_state is not None:
        load_model_weights(model, start_state, source=args.weights_path)  # before the masks: magnitude init reads it
    if args.distill and not starts_dense:
        raise utils.InputError("--distill learns from the dense model the run starts from: pass --weights or a "
                               "dense --weights-path checkpoint")
    teacher = distillation.frozen_teacher(model).to(device) if args.distill else None
    score_init = args.score_init if args.score_init != "auto" else "magnitude" if starts_dense else "kaiming"
    utils.log(f"Mask scores: {score_init} initialisation" + (" (from the dense starting weights)" if starts_dense else ""))
    cli.apply_supermask_flags(model, args, score_init=score_init)
    if start_state is not None and not starts_dense:
        load_model_weights(model, start_state, source=args.weights_path)
    model.to(device)
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # From here on each rank draws its own augmentation and dropout randomness.
    utils.seed_everything(args.seed + utils.get_rank())

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    lr_scheduler = build_lr_scheduler(optimizer, args)
    autocast = cli.autocast(args.amp, device)

    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module

    model_ema = None
    if args.model_ema:
        # Scale the decay so that the averaging horizon, counted in images, does not depend on the number of
        # processes, the batch size or the update interval (pycls's adjustment, as in torchvision):
        # updates per epoch ~ dataset / (world_size * batch_size * accumulation_steps * model_ema_steps).
        adjust = (
            args.world_size * args.batch_size * args.accumulation_steps * args.model_ema_steps / max(args.epochs, 1)
        )
        alpha = min(1.0, (1.0 - args.model_ema_decay) * adjust)
        model_ema = utils.ExponentialMovingAverage(model_without_ddp, decay=1.0 - alpha, device=device)

    if resume_path:
        checkpoint, resume_checkpoint = resume_checkpoint, None  # not held in memory for the whole run
        load_model_weights(model_without_ddp, checkpoint["model"], source=resume_path)
        if model_ema is not None and checkpoint.get("model_ema") is not None:
            model_ema.load_state_dict(checkpoint["model_ema"])
        if not args.test_only:
            try:
                optimizer.load_state_dict(checkpoint["optimizer"])
                lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            except (ValueError, KeyError) as e:
                raise utils.InputError(
                    f"the optimizer state in {resume_path} does not fit the optimizer flags ({e}); "
                    "resume with the flags it was trained with"
                ) from None
            if scaler is not None and checkpoint.get("scaler") is not None:
                scaler.load_state_dict(checkpoint["scaler"])
            rng_states = checkpoint.get("rng_states") or []
            if len(rng_states) == utils.get_world_size():
                checkpoints.set_rng_state(rng_states[utils.get_rank()])
            else:
                utils.log(f"{resume_path} was written by {len(rng_states)} processes; random streams restart")
        args.start_epoch = checkpoint["epoch"] + 1
        utils.log(f"Resumed from {resume_path} (epoch {checkpoint['epoch']})")

    if args.test_only and test_fraction is not None:
        for module in (model_without_ddp, model_ema):
            if module is not None:
                supermask.set_sparsity_fraction(module, test_fraction)
    if args.test_only and test_note:
        utils.log(test_note)
    utils.log(str(supermask.sparsity_report(model_without_ddp)))

    # Evaluate the unwrapped model: DDP's forward would sync buffers across ranks, and the ranks' validation
    # shards may differ in length by one batch.
    def run_eval(module, desc):
        acc1, acc5, _, nonfinite = evaluation.evaluate(
            module, data_loader_test, device=device, autocast=autocast, num_classes=num_classes, desc=desc, timed=False
        )
        if nonfinite:
            utils.log(evaluation.nonfinite_note(nonfinite, len(dataset_test)))
        return acc1, acc5

    if args.test_only:
        acc1, acc5 = run_eval(model_without_ddp, "Test")
        utils.log(f"Test  Acc@1 {acc1:.3f}  Acc@5 {acc5:.3f}")
        if model_ema is not None:
            acc1, acc5 = run_eval(model_ema, "Test EMA")
            utils.log(f"Test  EMA Acc@1 {acc1:.3f}  Acc@5 {acc5:.3f}")
        return

    utils.log("Start training")
    start_time = time.time()
    steps = len(data_loader)
    for epoch in range(args.start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        # Workers seed their augmentation from this generator: a fixed stream per (seed, epoch, rank).
        loader_generator.manual_seed(utils.derived_seed(args.seed, epoch, utils.get_rank()))
        loss, images_per_second = train_one_epoch(
            model=model,
            criterion=criterion,
            optimizer=optimizer,
            data_loader=data_loader,
            device=device,
            epoch=epoch,
            args=args,
            model_ema=model_ema,
            scaler=scaler,
            autocast=autocast,
            teacher=teacher,
        )
        lr = optimizer.param_groups[0]["lr"]
        lr_scheduler.step()
        utils.log(f"Epoch {epoch}  train loss {loss:.4f}  lr {lr:.4g}  img/s {images_per_second:.1f}"
                  f"  mask sparsity {supermask.mean_sparsity(model_without_ddp):.3f}")
        acc1, acc5 = run_eval(model_without_ddp, f"Test {epoch}")
        utils.log(f"Epoch {epoch}  Acc@1 {acc1:.3f}  Acc@5 {acc5:.3f}")
        if model_ema is not None:
            acc1, acc5 = run_eval(model_ema, f"Test EMA {epoch}")
            utils.log(f"Epoch {epoch}  EMA Acc@1 {acc1:.3f}  Acc@5 {acc5:.3f}")
        if args.output_dir:
            checkpoint = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "model_ema": model_ema.state_dict() if model_ema is not None else None,
                "epoch": epoch,
                "args": dict(vars(args)),
                "rng_states": gather_rng_states(),
                # The sparsity this epoch's weights were evaluated at, for --test-only and evaluate.py.
                evaluation.RAMP_FRACTION_KEY: ramp_fraction(args, (epoch + 1) * steps - 1,
                                                            args.sparsity_warmup_epochs * steps),
            }
            save_checkpoints(checkpoint=checkpoint, output_dir=args.output_dir, epoch=epoch, keep_last=args.keep_last)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    utils.log(f"Training time {total_time}")


def get_args_parser(add_help=True):
    """The command-line flags: torchvision's classification training flags plus the Supermask ones."""
    parser = argparse.ArgumentParser(
        description="Train a classification model with Supermask block sparsity (torchvision reference flags)",
        add_help=add_help,
        formatter_class=cli.HelpFormatter,
    )
    cli.add_data_args(parser)
    cli.add_model_args(parser)

    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", default=90, type=int, metavar="N", help="total number of epochs to run")
    group.add_argument("--opt", default="sgd", type=str.lower, choices=OPTIMIZERS, help="optimizer")
    group.add_argument("--lr", default=0.1, type=float, help="initial learning rate")
    group.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum (sgd, rmsprop)")
    group.add_argument(
        "--wd", "--weight-decay", default=1e-4, type=float, metavar="W", dest="weight_decay", help="weight decay"
    )
    group.add_argument(
        "--norm-weight-decay", default=None, type=float, help="weight decay of normalization layers (default: --wd)"
    )
    group.add_argument("--bias-weight-decay", default=None, type=float, help="weight decay of biases (default: --wd)")
    group.add_argument(
        "--transformer-embedding-decay",
        default=None,
        type=float,
        help="weight decay of class token, position embedding and relative position bias (default: --wd)",
    )
    group.add_argument("--label-smoothing", default=0.0, type=float, help="label smoothing of the loss")
    group.add_argument("--mixup-alpha", default=0.0, type=float, help="MixUp alpha (0 turns MixUp off)")
    group.add_argument("--cutmix-alpha", default=0.0, type=float, help="CutMix alpha (0 turns CutMix off)")
    group.add_argument(
        "--lr-scheduler", default="steplr", type=str.lower, choices=LR_SCHEDULERS, help="learning-rate schedule"
    )
    group.add_argument("--lr-warmup-epochs", default=0, type=int, help="epochs of learning-rate warmup")
    group.add_argument("--lr-warmup-method", default="constant", choices=("constant", "linear"), help="warmup")
    group.add_argument("--lr-warmup-decay", default=0.01, type=float, help="warmup starts at lr times this")
    group.add_argument("--lr-step-size", default=30, type=int, help="steplr: epochs between decays")
    group.add_argument("--lr-gamma", default=0.1, type=float, help="steplr / exponentiallr: decay factor")
    group.add_argument("--lr-min", default=0.0, type=float, help="cosineannealinglr: final learning rate")
    group.add_argument("--clip-grad-norm", default=None, type=float, help="clip gradients to this norm (default: off)")
    group.add_argument(
        "--accumulation-steps",
        default=1,
        type=int,
        metavar="N",
        help="accumulate gradients over N batches per optimizer step (effective batch: N x batch size x processes)",
    )
    group.add_argument("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on CPU")

    group = parser.add_argument_group("augmentation")
    group.add_argument("--train-crop-size", default=224, type=int, help="random-resized-crop size for training")
    group.add_argument(
        "--auto-augment", default=None, choices=presets.AUTO_AUGMENT_POLICIES, help="auto-augment policy"
    )
    group.add_argument("--ra-magnitude", default=9, type=int, help="magnitude of RandAugment (ra)")
    group.add_argument("--augmix-severity", default=3, type=int, help="severity of AugMix")
    group.add_argument("--random-erase", default=0.0, type=float, help="random erasing probability")
    group.add_argument("--ra-sampler", action="store_true", help="repeated augmentation sampler")
    # Not in torchvision's script, whose values these defaults keep: small images such as the demo's digits
    # lose their content under 8% crops, and mirrored digits are other digits.
    group.add_argument(
        "--train-crop-scale",
        default=[0.08, 1.0],
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="area fraction range of the random-resized crop",
    )
    group.add_argument("--hflip-prob", default=0.5, type=float, help="probability of a horizontal flip")
    group.add_argument("--ra-reps", default=3, type=int, help="repetitions of each image with --ra-sampler")

    group = parser.add_argument_group("model averaging and normalization")
    group.add_argument("--model-ema", action="store_true", help="also track and evaluate an EMA of the weights")
    group.add_argument(
        "--model-ema-steps", default=32, type=int, help="optimizer steps between EMA updates"
    )
    group.add_argument(
        "--model-ema-decay", default=0.99998, type=float, help="EMA decay (adjusted for batch size and steps)"
    )
    group.add_argument("--sync-bn", action="store_true", help="synchronize BatchNorm statistics across processes")

    group = parser.add_argument_group("run control")
    group.add_argument("--print-freq", default=10, type=int, help="steps between progress log lines")
    group.add_argument("--output-dir", default=".", type=str, help="folder for checkpoint.pth and model_<epoch>.pth")
    group.add_argument(
        "--resume", default="", type=str,
        help="checkpoint to continue from, or 'auto' for the newest in --output-dir (default: none, a fresh start)"
    )
    group.add_argument(
        "--start-over",
        action="store_true",
        help="delete the checkpoints of an earlier run in --output-dir and train from scratch (default: off, such a "
        "folder is refused)",
    )
    group.add_argument(
        "--keep-last",
        default=None,
        type=int,
        metavar="K",
        help="keep only the newest K model_<epoch>.pth files; checkpoint.pth is always written, 0 keeps none "
        "(default: all, as torchvision)",
    )
    group.add_argument("--start-epoch", default=0, type=int, metavar="N", help="first epoch (set by --resume)")
    group.add_argument("--test-only", action="store_true", help="only evaluate the model (e.g. with --resume)")
    group.add_argument(
        "--use-deterministic-algorithms", action="store_true", help="force deterministic algorithms (slower)"
    )
    group.add_argument("--seed", default=0, type=int, help="seed for initialisation, shuffling and augmentation")

    cli.add_distributed_args(parser)
    cli.add_supermask_args(parser)

    group = parser.add_argument_group("sparsifying a dense model (start from --weights or --weights-path)")
    group.add_argument(
        "--sparsity-warmup-epochs",
        default=0,
        type=int,
        help="raise every layer's sparsity from 0 to its target over this many epochs, per step (default: 0, no ramp)",
    )
    group.add_argument(
        "--sparsity-schedule",
        default="cubic",
        choices=supermask.SCHEDULES,
        help="shape of the ramp: constant, linear, or cubic as in Zhu and Gupta 2017 (default: cubic)",
    )
    group.add_argument(
        "--distill", action="store_true", help="distill from the dense starting model, frozen (default: off)"
    )
    group.add_argument(
        "--distill-alpha", default=0.5, type=float, help="weight of the distillation term in the loss (default: 0.5)"
    )
    group.add_argument(
        "--distill-temperature", default=2.0, type=float, help="softmax temperature of distillation (default: 2.0)"
    )
    return parser


def interrupted_message():
    """What Ctrl-C leaves behind; checkpoints are written atomically, so whatever is on disk is complete."""
    if not last_checkpoint:
        return "Interrupted before the first checkpoint of this run was written; there is nothing to resume"
    path, output_dir = last_checkpoint["path"], last_checkpoint["output_dir"]
    # --resume auto looks in --output-dir: a run resumed from a file elsewhere has nothing there before its first save.
    in_output_dir = bool(output_dir) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(output_dir)
    resume = "auto" if in_output_dir else path
    return (f"Interrupted; {path} holds epoch {last_checkpoint['epoch']}: continue with --resume {resume} (and the "
            f"same flags)")


if __name__ == "__main__":
    cli.run(main, get_args_parser(), interrupted=interrupted_message)
