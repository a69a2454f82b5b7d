"""Write a small real data set as an ImageFolder tree: scikit-learn's handwritten digits, 32x32 RGB PNGs.

The digits (1,797 grey 8x8 images, 10 classes) ship inside scikit-learn, so nothing is downloaded. Each image is
upscaled to 32x32 and saved to OUT/train/<digit>/ or OUT/val/<digit>/, split 80/20 per class by a fixed seed.

Example:
    python sample_data.py demo/data
"""
import argparse
import os
import sys

import numpy as np

SPLIT_SEED = 0
VAL_FRACTION = 0.2
IMAGE_SIZE = 32


def load_digits():
    """The digits as (images uint8 (N, 8, 8), labels (N,)); exits with a clear message without scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        sys.exit("sample_data.py needs scikit-learn for its bundled digits: pip install scikit-learn")
    digits = sklearn_load_digits()
    # Pixel values run 0..16; stretch them to the full 0..255 range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target


def split_indices(labels, *, val_fraction, seed):
    """Per class, a seeded shuffle of that class's indices, the first val_fraction of them going to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * val_fraction))
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)


def write_split(out_dir, split, indices, images, labels):
    """Save images[indices] as OUT/split/<label>/<index>.png, upscaled with bicubic resampling, as RGB."""
    from PIL import Image

    for i in indices:
        folder = os.path.join(out_dir, split, str(labels[i]))
        os.makedirs(folder, exist_ok=True)
        img = Image.fromarray(images[i]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).convert("RGB")
        img.save(os.path.join(folder, f"{i:04d}.png"))


def main(args):
    images, labels = load_digits()
    train, val = split_indices(labels, val_fraction=VAL_FRACTION, seed=SPLIT_SEED)
    write_split(args.out, "train", train, images, labels)
    write_split(args.out, "val", val, images, labels)
    print(f"Wrote {len(train)} train and {len(val)} val images of 10 digits to {args.out}/train and {args.out}/val")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        description="Write scikit-learn's digits as a 32x32 RGB ImageFolder data set (train/ and val/)",
        add_help=add_help,
    )
    parser.add_argument("out", help="output folder; train/ and val/ are created inside it")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
