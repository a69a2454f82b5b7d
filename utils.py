"""Shared plumbing for train.py and evaluate.py: flags, distributed setup, data, models, metrics, checkpoints."""
import argparse
import contextlib
import ctypes
import hashlib
import os
import platform
import random
import re
import signal
import sys
import tempfile
import threading
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

import models
import presets
import sampler
import supermask


# ---------------------------------------------------------------- user errors


class InputError(ValueError):
    """A mistake in the user's flags or files; CLIs report it as one line with exit status 2, no traceback."""


def user_error_message(error):
    """The one-line message of an InputError, also when it was raised in a data loader worker.

    A worker's exception reaches the main process re-raised with the worker's whole traceback as its message;
    the original message is that traceback's last line, after the exception's name.
    """
    message = str(error).strip()
    if "Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(f"{InputError.__name__}: ", 1)[-1]
    return message


# ---------------------------------------------------------------- flags shared by train.py and evaluate.py


def add_data_args(parser):
    """Add the data set and preprocessing flags (torchvision's names and defaults)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path",
        default="/datasets01/imagenet_full_size/061417/",
        type=str,
        help="data set root holding train/ and val/ ImageFolder trees",
    )
    group.add_argument(
        "-b", "--batch-size", default=32, type=int, help="images per process; the total batch is processes x this"
    )
    group.add_argument("-j", "--workers", default=16, type=int, metavar="N", help="data loading worker processes")
    group.add_argument(
        "--cache-dataset",
        action="store_true",
        help="cache the list of image files in ~/.torch/vision/datasets/imagefolder to skip the directory scan",
    )
    group.add_argument(
        "--interpolation", default="bilinear", type=str, help="resize interpolation: bilinear, bicubic or nearest"
    )
    group.add_argument("--val-resize-size", default=256, type=int, help="resize size for evaluation")
    group.add_argument("--val-crop-size", default=224, type=int, help="center-crop size for evaluation")
    group.add_argument(
        "--backend", default="PIL", type=str.lower, choices=presets.BACKENDS, help="image backend: PIL or tensor"
    )
    group.add_argument("--use-v2", action="store_true", help="use torchvision.transforms.v2 for preprocessing")


def add_model_args(parser, *, device="cuda"):
    """Add the model and device flags (torchvision's names and defaults; `device` for --device's)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default="resnet18", type=str, help="torchvision classification model name, or vit_tiny"
    )
    group.add_argument(
        "--weights",
        default=None,
        type=str,
        help="torchvision pretrained weights enum, e.g. ResNet50_Weights.IMAGENET1K_V2",
    )
    group.add_argument("--device", default=device, type=str, help=f"device: cuda or cpu (default: {device})")


def add_distributed_args(parser):
    """Add the multi-process flags (torchvision's names and defaults)."""
    group = parser.add_argument_group("distributed")
    group.add_argument("--world-size", default=1, type=int, help="number of processes (set by torchrun / SLURM)")
    group.add_argument("--dist-url", default="env://", type=str, help="URL used to set up the process group")


def _fraction(text):
    """argparse type: a sparsity in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{text!r} is outside [0, 1)")
    return value


_fraction.__name__ = "sparsity in [0, 1)"


def _positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is below 1")
    return value


_positive_int.__name__ = "integer >= 1"


# The Supermask settings a checkpoint of this project stores in its args (train.py saves vars(args)), with the
# defaults of their flags: evaluate.py and --resume take an omitted one from the checkpoint.
SUPERMASK_DEFAULTS = {
    "sparsity_linear": 0.0, "sp_linear_tile_size": 1,
    "sparsity_conv1x1": 0.0, "sp_conv1x1_tile_size": 1,
    "sparsity_conv": 0.0, "sp_conv_tile_size": 1,
    "sparsity_attention": 0.0, "sp_attention_tile_size": 1,
    "skip_last_layer_sparsity": False, "skip_first_transformer_sparsity": False,
}
_GIVEN = "_given_supermask_flags"  # the namespace entry listing the Supermask flags on the command line


class _StoreGiven(argparse.Action):
    """argparse's "store", also noting that the flag was given (a checkpoint fills only the omitted ones)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, _GIVEN, (*getattr(namespace, _GIVEN, ()), self.dest))


class _StoreTrueGiven(_StoreGiven):
    """argparse's "store_true", also noting that the flag was given."""

    def __init__(self, option_strings, dest, default=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, True, option_string)


def add_supermask_args(parser):
    """Add the Supermask flags of the original SuperBlock plus --weights-path."""
    group = parser.add_argument_group("Supermask (learned block sparsity)")
    parser.set_defaults(**{_GIVEN: ()})  # so that a parsed namespace tells "none given" from "not parsed"
    # (flag suffix, what the sparsity flag prunes, what the tile-size flag's masks belong to)
    for kind, pruned, masks in (
        ("linear", "each Linear weight's tiles", "Linear"),
        ("conv1x1", "each 1x1 Conv2d weight's tiles", "1x1 Conv2d"),
        ("conv", "each other Conv2d weight's tiles", "other Conv2d"),
        ("attention", "the tiles in every attention q/k/v and output projection", "attention"),
    ):
        group.add_argument(f"--sparsity-{kind}", default=SUPERMASK_DEFAULTS[f"sparsity_{kind}"], type=_fraction,
                           action=_StoreGiven, help=f"fraction of {pruned} masked off (default: 0; with a "
                           f"checkpoint of this project, evaluate.py and --resume take its value)")
        group.add_argument(f"--sp-{kind}-tile-size", default=SUPERMASK_DEFAULTS[f"sp_{kind}_tile_size"],
                           type=_positive_int, action=_StoreGiven,
                           help=f"tile (block) side for {masks} masks (default: 1; or the checkpoint's, as above)")
    group.add_argument(
        "--score-init",
        default="auto",
        choices=("auto", "kaiming", "magnitude"),
        help="mask scores: kaiming (random), magnitude (each tile's L2 norm: keep the largest tiles first); "
        "auto is magnitude when starting from dense weights, else kaiming (default: auto)",
    )
    group.add_argument(
        "--skip-last-layer-sparsity", action=_StoreTrueGiven,
        help="keep the classifier (last layer) dense (default: off; or the checkpoint's, as above)",
    )
    group.add_argument(
        "--skip-first-transformer-sparsity",
        action=_StoreTrueGiven,
        help="keep the first transformer block dense (ViT; default: off; or the checkpoint's, as above)",
    )
    group.add_argument(
        "--weights-path",
        default=None,
        type=str,
        help="start from this checkpoint's model weights (this project's or the original SuperBlock's; default: none)",
    )


def _setting_text(name, value):
    flag = "--" + name.replace("_", "-")
    return f"{flag} {'on' if value else 'off'}" if isinstance(value, bool) else f"{flag} {value}"


def resolve_supermask_args(args, checkpoint, *, source, fix):
    """Fill the Supermask flags left out from the args a checkpoint of this project stores; refuse contradictions.

    `checkpoint` is a loaded checkpoint or None; only the dict args train.py writes count (the original
    SuperBlock's Namespace args do not). A given flag whose value differs from the stored one is an InputError
    naming both, ending with `fix`. A namespace the parser did not make has no record of the flags given: there
    a value other than the flag's default counts as given.
    """
    given = vars(args).pop(_GIVEN, None)  # popped: train.py stores vars(args) in its checkpoints
    stored = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict):
        return
    for name, default in SUPERMASK_DEFAULTS.items():
        if stored.get(name) is None:  # a checkpoint from before the flag existed
            continue
        value = getattr(args, name, default)
        was_given = name in given if given is not None else value != default
        if was_given and value != stored[name]:
            raise InputError(f"{_setting_text(name, value)} contradicts {source}, which was trained with "
                             f"{_setting_text(name, stored[name])}; {fix}")
        setattr(args, name, stored[name])


# What each kind of supermask.unprunable_kinds is, for its error message.
_KIND_LAYERS = {"linear": "Linear", "conv1x1": "1x1 Conv2d", "conv": "Conv2d", "attention": "attention projection"}


def apply_supermask_flags(model, args, *, score_init="kaiming"):
    """supermask.apply_supermask with the flags' settings, refusing a tile size that leaves a kind nothing to prune.

    That is an InputError: every layer of the kind would stay dense while the run claims its sparsity.
    """
    # The layers' "lowering the sparsity" warnings wait until the settings are known to be usable: a refused
    # request is then one error line, not one warning per layer shape before it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            supermask.apply_supermask(model, **supermask_kwargs(args, score_init=score_init))
        except ValueError as e:
            raise InputError(str(e)) from None
    for kind, (tile_size, sparsity, largest) in supermask.unprunable_kinds(model).items():
        fix = (f"the largest tile size that prunes is {largest}" if largest else
               f"no tile size prunes at this sparsity; raise --sparsity-{kind}")
        raise InputError(f"--sp-{kind}-tile-size {tile_size} leaves every {_KIND_LAYERS[kind]} layer too few tiles "
                         f"to prune any at --sparsity-{kind} {sparsity}, so the model would stay dense; {fix}")
    # Once each, as Python's default filter shows them (the layers of one shape all warn alike).
    for text, category, filename, lineno in dict.fromkeys(
            (str(w.message), w.category, w.filename, w.lineno) for w in caught):
        warnings.warn_explicit(text, category, filename, lineno)
    return model


def supermask_kwargs(args, *, score_init="kaiming"):
    """The keyword arguments of supermask.apply_supermask that the Supermask flags ask for."""
    return dict(
        attention_sparsity=args.sparsity_attention,
        attention_sp_tilesize=args.sp_attention_tile_size,
        score_init=score_init,
        linear_sparsity=args.sparsity_linear,
        linear_sp_tilesize=args.sp_linear_tile_size,
        conv1x1_sparsity=args.sparsity_conv1x1,
        conv1x1_sp_tilesize=args.sp_conv1x1_tile_size,
        conv_sparsity=args.sparsity_conv,
        conv_sp_tilesize=args.sp_conv_tile_size,
        skip_last_layer_sparsity=args.skip_last_layer_sparsity,
        skip_first_transformer_sparsity=args.skip_first_transformer_sparsity,
    )


# ---------------------------------------------------------------- distributed


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


def init_distributed_mode(args):
    """Join a process group when launched by torchrun or SLURM; set args.distributed, rank, gpu, world_size.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; under SLURM the rank is SLURM_PROCID and --world-size and
    --dist-url come from the command line. NCCL is used on CUDA, Gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.distributed = False
        args.rank = 0
        args.gpu = 0
        return
    args.distributed = True
    use_cuda = args.device.startswith("cuda")
    if use_cuda:
        check_device(args.device)
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank)
    dist.barrier()


def check_device(device):
    """Raise InputError when the requested device does not exist on this machine."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} requested but CUDA is not available; pass --device cpu")


def process_device(args):
    """The torch.device this process computes on (its own GPU under torchrun)."""
    check_device(args.device)
    if args.device.startswith("cuda") and getattr(args, "distributed", False):
        return torch.device("cuda", args.gpu)
    return torch.device(args.device)


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



# ---------------------------------------------------------------- output paths


def _make_folder(folder, flag, value):
    """Create `folder` (and its parents) for the output `flag value`; a path through a file is an InputError."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = folder
        while blocker and not os.path.exists(blocker):  # the part of the path that exists but is a file
            blocker = os.path.dirname(blocker)
        raise InputError(f"{flag} {value}: {blocker or folder} is a file, not a folder; pick another path") from None
    except OSError as e:
        raise InputError(f"{flag} {value}: cannot create folder {folder} ({e.strerror}); pick another path") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {value}: folder {folder} is not writable; pick another path")


def prepare_output_dir(folder, flag="--output-dir"):
    """Create the output folder before any work, so a bad path fails at once rather than after the first epoch."""
    _make_folder(folder, flag, folder)


def prepare_output_file(path, flag):
    """Check that `path` can be written (creating its folder), before the work whose result it will hold."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; pass a file name, e.g. {os.path.join(path, 'out')}")
    _make_folder(os.path.dirname(os.path.abspath(path)), flag, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} exists and is not writable; pick another path")


def changed_settings(args, parser):
    """The flags whose values differ from the parser's defaults, as `--flag value` lines (for the run's log).

    Entries the parser does not define (rank, gpu, distributed, ...) are left out.
    """
    defaults = vars(parser.parse_args([]))  # as parsed: a string default passes through the flag's type
    lines = []
    for action in parser._actions:
        if not action.option_strings or action.dest not in defaults or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == defaults[action.dest]:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))  # --wd, as torchvision's recipes
        if isinstance(value, bool):
            lines.append(flag if value else f"{flag} off")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{flag} {' '.join(str(v) for v in value)}")
        else:
            lines.append(f"{flag} {value}")
    return lines

# ---------------------------------------------------------------- randomness


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*keys):
    """A 63-bit seed mixed from integers (e.g. seed, epoch, rank): distinct keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def get_rng_state():
    """This process's generator states as plain types and tensors, so torch.load(weights_only=True) reads them."""
    np_state = np.random.get_state(legacy=False)
    python_version, python_internal, python_gauss = random.getstate()
    state = {
        "python": [python_version, list(python_internal), python_gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state):
    """Restore generator states saved by get_rng_state."""
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- data


def load_image(path):
    """Read an image file as RGB PIL image; an unreadable file is an InputError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read image {path} ({e}); delete or replace the file") from None


class _ListedImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder built from a saved file listing instead of a directory scan (for --cache-dataset)."""

    def __init__(self, root, listing, **kwargs):
        self._listing = listing
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        return list(self._listing["classes"]), dict(self._listing["class_to_idx"])

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return [(path, int(target)) for path, target in self._listing["samples"]]


def _listing_cache_path(folder):
    digest = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]
    return os.path.expanduser(os.path.join("~", ".torch", "vision", "datasets", "imagefolder", digest + ".pt"))


def image_folder(folder, transform, *, cache=False):
    """An ImageFolder over `folder`; problems with the tree are InputErrors that say how to fix it."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder} does not exist; --data-path must hold train/ and val/ ImageFolder trees")
    cache_path = _listing_cache_path(folder)
    if cache and os.path.exists(cache_path):
        # Only the file listing is cached (plain lists), not the transforms, so flags still apply.
        listing = torch.load(cache_path, weights_only=True)
        return _ListedImageFolder(folder, listing, transform=transform, loader=load_image)
    try:
        dataset = torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image)
    except FileNotFoundError as e:
        raise InputError(f"{e}; put each class's images in {folder}/<class name>/") from None
    if cache and is_main_process():
        listing = {"classes": dataset.classes, "class_to_idx": dataset.class_to_idx, "samples": dataset.samples}
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        # No checksum: a cache read by torch.load, and hashing ImageNet's 1.28M names one by one takes seconds.
        save_checkpoint(listing, cache_path, checksum=False)
    return dataset


def check_data_path(data_path):
    """Raise InputError unless data_path holds train/ and val/ folders."""
    if not data_path:
        raise InputError("--data-path is empty; pass the folder that holds train/ and val/")
    if os.path.exists(data_path) and not os.path.isdir(data_path):
        raise InputError(f"--data-path {data_path} is a file, not a folder; pass the folder that holds train/ and val/")
    if not os.path.isdir(data_path):
        raise InputError(
            f"--data-path {data_path} does not exist; pass the folder that holds train/ and val/ "
            "(`python sample_data.py DIR` writes a small one)"
        )
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_path, split)):
            raise InputError(
                f"--data-path {data_path} has no {split}/ folder; it must hold train/ and val/ ImageFolder trees"
            )


def eval_transform(args):
    """The evaluation preprocessing the flags ask for."""
    if args.weights and getattr(args, "test_only", False):
        # As torchvision's reference: pretrained weights are evaluated with the preprocessing they were trained for.
        try:
            return torchvision.models.get_weight(args.weights).transforms(antialias=True)
        except (ValueError, KeyError, AttributeError) as e:
            raise InputError(f"--weights {args.weights} is unknown ({e}); see the model's docs for its weights") from None
    return presets.ClassificationPresetEval(
        crop_size=args.val_crop_size,
        resize_size=args.val_resize_size,
        interpolation=InterpolationMode(args.interpolation),
        backend=args.backend,
        use_v2=args.use_v2,
    )


def load_val_data(args):
    """The validation ImageFolder (data_path/val) and a sampler that visits each image once over all processes."""
    check_data_path(args.data_path)
    dataset = image_folder(os.path.join(args.data_path, "val"), eval_transform(args), cache=args.cache_dataset)
    return dataset, sampler.DistributedEvalSampler(dataset, num_replicas=get_world_size(), rank=get_rank())


def check_interpolation(name):
    """Raise InputError for an interpolation name torchvision does not know."""
    choices = [mode.value for mode in InterpolationMode]
    if name not in choices:
        raise InputError(f"--interpolation {name} is unknown; use one of {', '.join(choices)}")


# ---------------------------------------------------------------- models (models.py), as the flags name them


def check_model_name(name):
    """Raise InputError unless `name` is a model --model accepts (models.check_model_name)."""
    try:
        models.check_model_name(name)
    except ValueError as e:
        raise InputError(f"--model {e}") from None


def build_model(args, *, num_classes, image_size):
    """The dense model named by --model (with --weights if given); ViTs are built for `image_size` inputs."""
    check_model_name(args.model)
    if args.model == "vit_tiny" and args.weights:
        raise InputError("vit_tiny has no pretrained weights; drop --weights")
    try:
        return models.build_model(args.model, weights=args.weights, num_classes=num_classes, image_size=image_size)
    except ValueError as e:
        raise InputError(f"--weights: {e}") from None


# ---------------------------------------------------------------- training pieces


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


# ---------------------------------------------------------------- checkpoints


CHECKSUM_KEY = "sha256"  # the digest's entry beside the checkpoint's own
_unchecked_notified = set()  # the paths whose "no checksum" notice was printed


def checkpoint_digest(state):
    """SHA-256 of a checkpoint's content: each tensor's place, dtype, shape and bytes, and the plain values.

    The walk is in a fixed order (dict keys sorted), so the same content gives the same digest in any process;
    tensor bytes are hashed in one call per tensor, so a checkpoint hashes at memory speed.
    """
    digest = hashlib.sha256()
    _update_digest(digest, "", state)
    return digest.hexdigest()


def _update_digest(digest, place, value):
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{place}=tensor:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the raw bytes of any dtype, numpy's buffer, no copy
    elif isinstance(value, dict):
        digest.update(f"{place}=dict:{len(value)};".encode())
        for key in sorted(value, key=repr):
            _update_digest(digest, f"{place}/{key!r}", value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{place}={type(value).__name__}:{len(value)};".encode())
        for index, item in enumerate(value):
            _update_digest(digest, f"{place}[{index}]", item)
    elif isinstance(value, argparse.Namespace):
        _update_digest(digest, f"{place}.namespace", vars(value))
    elif isinstance(value, (set, frozenset)):
        # A set's order, and so its repr, changes with string hash seeds.
        _update_digest(digest, f"{place}.set", sorted(value, key=repr))
    else:  # numbers, strings, None, dtypes: their repr round-trips through pickle
        digest.update(f"{place}={type(value).__name__}:{value!r};".encode())


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt.

    A KeyboardInterrupt inside torch.save makes its zip writer fail on exit with a RuntimeError that replaces
    the interrupt (a traceback and exit 1), or abort the process; deferred, the write completes first. Only the
    main thread can set signal handlers, and a handler set by someone else (or a nested block) is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def with_checksum(state):
    """`state` (a dict) with its checkpoint_digest under CHECKSUM_KEY, as save_checkpoint writes it."""
    if not isinstance(state, dict):
        return state
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    state[CHECKSUM_KEY] = checkpoint_digest(state)
    return state


def save_checkpoint(state, path, *, checksum=True):
    """torch.save `state` to `path` atomically: a crash or Ctrl-C leaves the previous file intact.

    A dict `state` is saved with its checkpoint_digest under CHECKSUM_KEY (unless checksum=False), which
    load_checkpoint verifies. The data goes to a temporary file in the same folder (same file system, so the
    rename is atomic), which is flushed to disk and then renamed over `path`.
    """
    if checksum:
        state = with_checksum(state)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with deferred_interrupt(), os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint(path):
    """Load a checkpoint with torch.load(weights_only=True) and verify its checksum; bad files are InputErrors.

    torch.load reads most flipped bytes without complaint, hence the digest save_checkpoint stores; it is
    removed from the returned dict. Files without one (written before it existed, or by other tools) load with
    a notice. The original SuperBlock stored its args as an argparse.Namespace, which is allowed here too.
    """
    if os.path.isdir(path):
        raise InputError(f"checkpoint {path} is a folder, not a file; pass a checkpoint file in it, e.g. "
                         f"{os.path.join(path, 'checkpoint.pth')}")
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} does not exist; check the path (or use --resume auto)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise InputError(_unloadable_message(path, e)) from None
    if isinstance(checkpoint, dict) and CHECKSUM_KEY in checkpoint:
        if checkpoint.pop(CHECKSUM_KEY) != checkpoint_digest(checkpoint):
            raise InputError(f"checkpoint {path} is corrupt: its checksum does not match; re-copy or re-create it")
    elif path not in _unchecked_notified and is_main_process():
        _unchecked_notified.add(path)
        print(f"Notice: {path} has no checksum (written by an older SuperBlock or another tool), so corruption "
              f"in it cannot be detected", file=sys.stderr, flush=True)
    return checkpoint


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format
_PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later: torch.save's legacy format, or a plain pickle


def _unloadable_message(path, error):
    """Why torch.load(weights_only=True) could not read `path`, in words that fit the file.

    torch's own messages can mislead here: a text file gives a bare KeyError number, and random bytes or a
    pickle of other objects get advice to retry with weights_only=False, i.e. to run whatever code the file holds.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    unsafe = "Weights only load failed" in str(error)  # torch's message for globals it does not allow
    objects = (f"cannot load checkpoint {path}: it holds Python objects other than tensors and plain values, which "
               f"are not unpickled because that can run arbitrary code")
    if head.startswith(_ZIP_MAGIC):
        if unsafe:
            return f"{objects}; save its tensors (a state_dict) with torch.save instead"
        detail = str(error).strip().split(". ")[0] or type(error).__name__
        return f"cannot load checkpoint {path}: the file is truncated or damaged ({detail}); re-copy or re-create it"
    if head.startswith(_PICKLE_MAGIC):
        if unsafe:  # a pickle of other objects, or bytes that only look like one
            return f"{objects} (or it is not a PyTorch checkpoint at all)"
        return f"cannot load checkpoint {path}: the file is truncated or damaged; re-copy or re-create it"
    return (f"{path} is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle); pass a .pth file "
            f"written by train.py or torch.save")


_EPOCH_FILE = re.compile(r"model_(\d+)\.pth")
# save_checkpoint's temporary files (mkstemp: "<name>." + random + ".tmp"), left behind by a killed write.
_TMP_FILE = re.compile(r"(checkpoint|model_\d+)\.pth\..+\.tmp")


def epoch_files(output_dir):
    """{epoch: path} of the model_<epoch>.pth files in output_dir."""
    if not output_dir or not os.path.isdir(output_dir):
        return {}
    matches = (_EPOCH_FILE.fullmatch(name) for name in os.listdir(output_dir))
    return {int(m.group(1)): os.path.join(output_dir, m.group(0)) for m in matches if m}


def checkpoint_files(output_dir):
    """The checkpoints train.py wrote in output_dir, newest first: checkpoint.pth, then model_<epoch>.pth down."""
    files = [os.path.join(output_dir, "checkpoint.pth")] if output_dir else []
    files = [path for path in files if os.path.isfile(path)]
    return files + [path for _, path in sorted(epoch_files(output_dir).items(), reverse=True)]


def remove_stale_temporary_files(output_dir):
    """Delete the temporary files of checkpoint writes that were killed before their rename; returns their names."""
    removed = []
    for name in sorted(os.listdir(output_dir)) if output_dir and os.path.isdir(output_dir) else ():
        if _TMP_FILE.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):  # another process of the same run removed it first
                os.remove(os.path.join(output_dir, name))
            removed.append(name)
    return removed


def load_latest_checkpoint(output_dir):
    """(path, checkpoint) of the newest checkpoint in output_dir that loads, or (None, None) when there is none.

    A torn or corrupt checkpoint.pth (a failed copy, a full disk) does not end the run while an intact
    model_<epoch>.pth sits beside it: each file that does not load is reported and the next older one tried.
    When none loads, that is an InputError naming each file and why.
    """
    failures = []
    for path in checkpoint_files(output_dir):
        try:
            checkpoint = load_checkpoint(path)
        except InputError as e:
            failures.append(str(e))
            continue
        if failures and is_main_process():
            print(f"Notice: resuming from {path}, the newest checkpoint that loads; skipped: {'; '.join(failures)}",
                  file=sys.stderr, flush=True)
        return path, checkpoint
    if failures:
        raise InputError(f"--resume auto found no checkpoint in {output_dir} that loads: {'; '.join(failures)}; "
                         f"re-copy one, or pass --start-over to train from scratch there")
    return None, None

# The format tag of compact files, defined here (compact.py reads it from here): importing compact imports
# blocksparse, a second at every start of train.py and evaluate.py.
COMPACT_FORMAT = "superblock-compact"


def is_compact_file(checkpoint):
    """True for a compact inference file (evaluate.py --save-compact), which holds no training state."""
    return isinstance(checkpoint, dict) and checkpoint.get("format") == COMPACT_FORMAT


def model_state_dict(checkpoint):
    """The model weights inside a checkpoint: its "model" entry, or the checkpoint itself when it is a state_dict."""
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        return checkpoint["model"]
    return checkpoint
