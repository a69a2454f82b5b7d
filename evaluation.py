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
    """Top-1/top-5 accuracy (percent) over every validation image exactly once, and the timed batches.

    The timed batches are (seconds, images) pairs: the model's forward only (no data loading), synchronised with
    the device, skipping the first `warmup` batches; a last batch may hold fewer images than the others. With
    timed=False nothing waits for the device and no times are taken.
    """
    model.eval()
    topk = (1, min(5, num_classes))
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # correct@1, correct@5, images
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
        counts += torch.stack([correct1, correct5, torch.tensor(target.shape[0], device=device)])
    counts = utils.all_reduce_sum(counts).tolist()
    expected = len(data_loader.dataset)
    assert counts[2] == expected, f"evaluated {counts[2]} images but the validation set has {expected}"
    return 100.0 * counts[0] / counts[2], 100.0 * counts[1] / counts[2], times


def peak_memory_mb(device):
    """Peak memory of this process: allocated on the GPU, or resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
