"""The evaluation loop of train.py and evaluate.py: accuracy over every validation image once, and model times."""
import contextlib
import resource
import sys
import time

import torch
from tqdm import tqdm

import utils


@torch.inference_mode()
def evaluate(model, data_loader, *, device, num_classes, dtype=torch.float32, autocast=contextlib.nullcontext,
             warmup=1, desc="Test", timed=True):
    """Top-1/top-5 accuracy (percent) over every validation image exactly once, the timed batches, and the number
    of images whose input holds inf or NaN.

    The timed batches are (seconds, images) pairs: the model's forward only (no data loading), synchronised with
    the device, skipping the first `warmup` batches; a last batch may hold fewer images than the others. With
    timed=False nothing waits for the device and no times are taken. Non-finite inputs are counted on the device
    and read once at the end: block-sparse kernels never read pruned blocks, so such an image's prediction may
    look finite (README's API section), and an accuracy that counts it should say so.
    """
    model.eval()
    topk = (1, min(5, num_classes))
    counts = torch.zeros(4, dtype=torch.int64, device=device)  # correct@1, correct@5, images, non-finite images
    times = []
    show_bar = utils.is_main_process() and sys.stderr.isatty()
    for i, (images, target) in enumerate(tqdm(data_loader, desc=desc, disable=not show_bar, leave=False)):
        images = images.to(device, dtype=dtype, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if timed:
            utils.synchronize(device)
            start = time.perf_counter()
        with autocast():
            output = model(images)
        if timed:
            utils.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start, images.shape[0]))
        correct1, correct5 = utils.correct_topk(output, target, topk=topk)
        nonfinite = (~torch.isfinite(images.flatten(1)).all(dim=1)).sum()
        counts += torch.stack([correct1, correct5, torch.tensor(target.shape[0], device=device), nonfinite])
    counts = utils.all_reduce_sum(counts).tolist()
    expected = len(data_loader.dataset)
    assert counts[2] == expected, f"evaluated {counts[2]} images but the validation set has {expected}"
    return 100.0 * counts[0] / counts[2], 100.0 * counts[1] / counts[2], times, counts[3]


def nonfinite_note(nonfinite, images):
    """The line saying that `nonfinite` of the `images` evaluated held inf or NaN in their input, or None if none did."""
    if not nonfinite:
        return None
    return (f"Non-finite input: {nonfinite} of {images} images hold inf or NaN after preprocessing; the accuracy "
            f"counts their predictions as the model gave them (block-sparse kernels skip pruned blocks, so a NaN "
            f"there need not reach the output)")


##### Checkpoints saved inside a sparsity ramp #####


# The checkpoint entry holding the fraction of the target sparsities the masks applied when it was saved (below 1
# inside train.py's sparsity ramp, 1 after it). Checkpoints written before train.py stored it lack it; there
# ramp_note says which sparsity is used.
RAMP_FRACTION_KEY = "sparsity_fraction"


def ramp_fraction(checkpoint):
    """The fraction of the target sparsities a checkpoint's masks applied when it was saved, or None if it does not say."""
    value = checkpoint.get(RAMP_FRACTION_KEY) if isinstance(checkpoint, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    return None


def ramp_note(checkpoint, path):
    """A line saying which sparsity a checkpoint saved during train.py's sparsity ramp is evaluated at, or None.

    train.py raises every layer's sparsity over --sparsity-warmup-epochs per step, reaching the target at the ramp's
    last step. A checkpoint that records the fraction of the targets its masks applied is evaluated there, as
    training evaluated it. One that does not (written before train.py stored the fraction; then the ramp reached
    the target only at the first step after it, so its last epoch was below the target too) cannot be: it is
    evaluated at the targets, the sparsity of every checkpoint after the ramp.
    """
    fraction = ramp_fraction(checkpoint)
    if fraction is not None:
        return None if fraction == 1.0 else (
            f"Sparsity: {path} was saved inside its sparsity ramp, its masks at {fraction:.3f} of the target "
            f"sparsities; evaluated there, as training evaluated it")
    stored = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict) or not isinstance(checkpoint.get("epoch"), int):
        return None
    ramp_epochs = stored.get("sparsity_warmup_epochs") or 0
    if checkpoint["epoch"] >= ramp_epochs or stored.get("sparsity_schedule") == "constant":
        return None
    return (f"Sparsity: {path} was saved after epoch {checkpoint['epoch']} of its {ramp_epochs}-epoch sparsity ramp "
            f"(--sparsity-warmup-epochs {ramp_epochs}), when training's masks were still below their targets; the "
            f"checkpoint does not record how far the ramp had come, so it is evaluated at the target sparsities "
            f"(those of the run's checkpoints after the ramp), and its accuracy differs from the one training logged "
            f"for that epoch")


def peak_memory_mb(device):
    """Peak memory of this process: allocated on the GPU, or resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
