"""Shared plumbing, as torchvision's references keep it: user errors, ranks and devices, logging, seeds, metrics."""
import ctypes
import os
import platform
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


class InputError(ValueError):
    """A mistake in the user's flags or files; the scripts report it as one line with exit status 2, no traceback."""


##### Processes and devices #####


def is_dist_avail_and_initialized():
    """True inside a process group (torchrun / SLURM)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    """Number of processes; 1 without a process group."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    """True on rank 0, the process that prints and writes checkpoints."""
    return get_rank() == 0


def check_device(device):
    """Raise InputError when the requested device does not exist on this machine."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} requested but CUDA is not available; pass --device cpu")


def synchronize(device):
    """Wait for the device's queued work (CUDA); a no-op on the CPU, whose ops finish before they return."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


##### Memory, logging #####


# glibc's mallopt parameters, and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of handing it back to the kernel
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the reusable heap


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse; True if it applied.

    By default glibc returns large freed blocks to the kernel, and the next forward pass page-faults them
    back in: on CPU a vit_b_16 forward then spends a large part of its time in the kernel (benchmarks/
    RESULTS.md, "Allocator": block-sparse inference lost a fifth of its speed to it). The same as running
    with MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432; settings the user made through
    those variables win. Does nothing (False) where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def all_reduce_sum(tensor):
    """Sum `tensor` over all processes in place (no-op in a single process); returns it."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def log(*values):
    """Print on rank 0 only, flushed, without breaking a tqdm bar."""
    if is_main_process():
        from tqdm import tqdm

        tqdm.write(" ".join(str(v) for v in values), file=sys.stdout)
        sys.stdout.flush()


##### Seeds #####


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*keys):
    """A 63-bit seed mixed from integers (e.g. seed, epoch, rank): distinct keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


##### Training pieces and metrics #####


def set_weight_decay(model, weight_decay, *, norm_weight_decay=None, custom_keys_weight_decay=None):
    """Optimizer parameter groups: norm layers' and named parameters' weight decay can differ from the rest.

    custom_keys_weight_decay is a list of (name suffix, weight decay); a parameter whose name ends with a
    suffix gets that decay.
    """
    norm_classes = (
        nn.modules.batchnorm._BatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.LocalResponseNorm,
    )
    custom_keys = list(custom_keys_weight_decay or [])
    groups = {"other": []}
    decays = {"other": weight_decay}
    if norm_weight_decay is not None:
        groups["norm"] = []
        decays["norm"] = norm_weight_decay
    for key, decay in custom_keys:
        groups[key] = []
        decays[key] = decay

    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            key = next((k for k, _ in custom_keys if full_name.endswith(k)), None)
            if key is None and norm_weight_decay is not None and isinstance(module, norm_classes):
                key = "norm"
            groups[key or "other"].append(p)
    return [{"params": groups[k], "weight_decay": decays[k]} for k in groups if groups[k]]


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of a model's parameters and buffers: ema = decay * ema + (1 - decay) * new."""

    def __init__(self, model, *, decay, device):
        super().__init__(
            model, device=device, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
        )


def correct_topk(output, target, *, topk=(1,)):
    """Per k in topk, the number of samples whose target is among the k highest logits (a tensor, no sync).

    Soft (mixup / cutmix) targets count by their largest entry.
    """
    if target.ndim == 2:
        target = target.argmax(dim=1)
    maxk = max(topk)
    top = output.topk(maxk, dim=1).indices  # (B, maxk)
    hits = top == target[:, None]
    return [hits[:, :k].any(dim=1).sum() for k in topk]
