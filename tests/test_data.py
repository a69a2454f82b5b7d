"""data.py: image folders, the cached file listing, the validation set the flags describe, clear errors."""
import argparse
import os
import shutil

import pytest

import data
import utils
from helpers import write_image_folder


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the listing cache lives under ~/.torch
    return write_image_folder(str(tmp_path / "images"), classes=2, train_per_class=3, val_per_class=2, size=8)


def test_image_folder_reads_classes_and_rgb_images(folder):
    dataset = data.image_folder(os.path.join(folder, "train"), transform=None)
    assert dataset.classes == ["class_0", "class_1"] and len(dataset) == 6
    image, label = dataset[5]
    assert image.mode == "RGB" and image.size == (8, 8) and label == 1


def test_cached_listing_is_used_instead_of_a_directory_scan(folder):
    train = os.path.join(folder, "train")
    scanned = data.image_folder(train, transform=None, cache=True)
    cached = data.image_folder(train, transform=None, cache=True)
    assert type(cached) is not type(scanned), "the second call scanned the folder again"
    assert cached.samples == scanned.samples and cached.classes == scanned.classes


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new_class"])
def test_cached_listing_is_rebuilt_when_the_folder_changed(change, folder, capsys):
    train = os.path.join(folder, "train")
    first = data.image_folder(train, transform=None, cache=True)
    image = os.path.join(train, "class_0", "0.png")
    if change == "add":
        shutil.copy(image, os.path.join(train, "class_1", "new.png"))
    elif change == "remove":
        os.remove(image)
    elif change == "rename":
        os.rename(image, os.path.join(train, "class_0", "renamed.png"))
    else:
        os.makedirs(os.path.join(train, "class_2"))
        shutil.copy(image, os.path.join(train, "class_2", "0.png"))
    rebuilt = data.image_folder(train, transform=None, cache=True)
    assert "is out of date: files were added, removed or renamed since; scanning the folder again" in \
        capsys.readouterr().err
    scanned = data.image_folder(train, transform=None)
    assert rebuilt.samples == scanned.samples != first.samples and rebuilt.classes == scanned.classes
    again = data.image_folder(train, transform=None, cache=True)  # the rebuilt cache serves the new listing
    assert type(again) is not type(scanned) and again.samples == scanned.samples
    assert capsys.readouterr().err == ""


def test_corrupt_cache_file_is_rebuilt_with_one_notice(folder, capsys):
    train = os.path.join(folder, "train")
    scanned = data.image_folder(train, transform=None, cache=True)
    with open(data._listing_cache_path(train), "wb") as f:
        f.write(b"\x80\x02 not a listing")
    rebuilt = data.image_folder(train, transform=None, cache=True)
    err = capsys.readouterr().err
    assert rebuilt.samples == scanned.samples
    assert err.count("\n") == 1 and "cannot be read; scanning the folder again" in err, err
    assert "weights_only" not in err
    assert type(data.image_folder(train, transform=None, cache=True)) is not type(scanned)


def test_unreadable_image_is_an_input_error_naming_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(utils.InputError, match=f"cannot read image {broken}"):
        data.load_image(str(broken))


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("no_val", "has no val/ folder"),
    ("a_file", "is a file, not a folder"),
])
def test_bad_data_path_is_an_input_error_that_says_what_to_pass(layout, message, tmp_path):
    path = tmp_path / "data"
    if layout == "no_val":
        (path / "train").mkdir(parents=True)
    elif layout == "a_file":
        path.write_text("")
    with pytest.raises(utils.InputError, match=message):
        data.check_data_path(str(path))


def test_empty_class_folder_is_an_input_error_saying_where_images_go(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(utils.InputError, match="put each class's images in"):
        data.image_folder(str(tmp_path / "val"), transform=None)


def test_val_data_is_preprocessed_to_the_crop_size_and_sampled_once(folder):
    args = argparse.Namespace(data_path=folder, weights=None, val_crop_size=6, val_resize_size=8,
                              interpolation="bilinear", backend="pil", use_v2=False, cache_dataset=False)
    dataset, sampler = data.load_val_data(args)
    assert dataset[0][0].shape == (3, 6, 6)
    assert sorted(sampler) == list(range(len(dataset))) == list(range(4))


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_pretrained_weights_are_evaluated_with_their_preprocessing_in_any_of_torchvisions_spellings(weights):
    args = argparse.Namespace(model="resnet18", weights=weights, test_only=True)
    transform = data.eval_transform(args)
    assert transform.crop_size == [224] and transform.resize_size == [256]


def test_unknown_weights_for_evaluation_name_the_models_weights():
    args = argparse.Namespace(model="resnet18", weights="Bogus.X", test_only=True)
    with pytest.raises(utils.InputError, match="--weights Bogus.X: there is no weights enum Bogus; resnet18's weights"):
        data.eval_transform(args)
