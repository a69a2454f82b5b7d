"""Image folders for the scripts: the validation set the flags describe, and images read with clear errors."""
import hashlib
import os
import sys

import torch
import torchvision
from torchvision.transforms import InterpolationMode

import checkpoints
import models
import presets
import sampler
import utils
from utils import InputError


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


def _folder_stamps(folder, subfolders):
    """{subfolder: modification time in ns} of `folder`'s subfolders (relative paths; "." is the folder itself).

    A folder's modification time changes whenever a file or folder in it is created, deleted or renamed, so
    equal stamps mean an equal file list. The cache holds only the list; the images are read afresh every epoch,
    so a file's own size and time do not matter to it. None when one of the folders is gone.
    """
    try:
        return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in subfolders}
    except OSError:
        return None


def _cached_listing(folder, cache_path):
    """The listing cached for `folder` if it still describes the folder, else None (with a notice why)."""
    if not os.path.exists(cache_path):
        return None
    try:
        listing = torch.load(cache_path, weights_only=True)
        stamps = listing["stamps"]  # a KeyError for the listings of earlier versions, which had no stamps
        if not {"classes", "class_to_idx", "samples"} <= set(listing):
            raise KeyError("classes, class_to_idx or samples")
    except Exception:  # a torn, foreign or older-format file: the scan rebuilds it
        reason = "cannot be read"
    else:
        if _folder_stamps(folder, stamps) == stamps:
            return listing
        reason = "is out of date: files were added, removed or renamed since"
    if utils.is_main_process():
        print(f"Notice: the cached file list of {folder} ({cache_path}) {reason}; scanning the folder again",
              file=sys.stderr, flush=True)
    return None


def image_folder(folder, transform, *, cache=False):
    """An ImageFolder over `folder`; problems with the tree are InputErrors that say how to fix it.

    With cache=True the file list is kept in ~/.torch/vision/datasets/imagefolder and reused while the
    folder's tree is unchanged (folder modification times, see _folder_stamps); otherwise the folder is scanned.
    """
    if not os.path.isdir(folder):
        raise InputError(f"{folder} does not exist; --data-path must hold train/ and val/ ImageFolder trees")
    cache_path = _listing_cache_path(folder)
    if cache:
        # Only the file listing is cached (plain lists), not the transforms, so flags still apply.
        listing = _cached_listing(folder, cache_path)
        if listing is not None:
            return _ListedImageFolder(folder, listing, transform=transform, loader=load_image)
        # Stamped before the scan: a file added during it changes a stamp, so the next run scans again.
        subfolders = [os.path.relpath(root, folder) for root, _, _ in os.walk(folder, followlinks=True)]
        stamps = _folder_stamps(folder, subfolders)
    try:
        dataset = torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image)
    except FileNotFoundError as e:
        raise InputError(f"{e}; put each class's images in {folder}/<class name>/") from None
    if cache and stamps is not None and utils.is_main_process():
        listing = {"classes": dataset.classes, "class_to_idx": dataset.class_to_idx, "samples": dataset.samples,
                   "stamps": stamps}
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        # No checksum: a cache read by torch.load, and hashing ImageNet's 1.28M names one by one takes seconds.
        checkpoints.save_checkpoint(listing, cache_path, checksum=False)
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
    # timm's weights name no preprocessing of torchvision's kind: the flags' preset (timm's models take the same).
    if args.weights and getattr(args, "test_only", False) and not models.is_timm(getattr(args, "model", None)):
        # As torchvision's reference: pretrained weights are evaluated with the preprocessing they were trained for.
        try:
            if getattr(args, "model", None):  # the model's own spellings too: DEFAULT, IMAGENET1K_V1
                return models.resolve_weights(args.model, args.weights).transforms(antialias=True)
            return torchvision.models.get_weight(args.weights).transforms(antialias=True)
        except (ValueError, KeyError, AttributeError) as e:
            raise InputError(f"--weights {args.weights}: {e}") from None
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
    return dataset, sampler.DistributedEvalSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank())
