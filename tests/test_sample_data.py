"""sample_data.py: the demo's data set, scikit-learn's digits as an ImageFolder."""
import numpy as np
from PIL import Image

import sample_data


def test_digits_split_is_80_20_per_class_and_fixed():
    labels = np.repeat(np.arange(10), 50)
    train, val = sample_data.split_indices(labels, val_fraction=0.2, seed=0)
    assert sorted(train + val) == list(range(500)) and len(val) == 100
    assert all(np.sum(labels[val] == c) == 10 for c in range(10))
    assert (train, val) == sample_data.split_indices(labels, val_fraction=0.2, seed=0)


def test_sample_data_writes_32x32_rgb_image_folder(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(2), 10)
    monkeypatch.setattr(sample_data, "load_digits", lambda: (images, labels))
    sample_data.main(sample_data.get_args_parser().parse_args([str(tmp_path)]))
    train = sorted(tmp_path.glob("train/*/*.png"))
    val = sorted(tmp_path.glob("val/*/*.png"))
    assert len(train) == 16 and len(val) == 4
    with Image.open(train[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
