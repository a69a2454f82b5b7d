"""train.py as a user runs it: checkpoints, exact resume, torchrun, and clean errors on bad input.

Training runs are subprocesses, as a user starts them. The bad-input cases run train.py's command line
in this process (runpy, as `python train.py` does), because each of them fails within a second and a
fresh interpreter would spend four importing torch.
"""
import argparse
import os
import random
import re
import runpy
import shutil
import sys

import pytest
import torch

from helpers import ROOT, flip_byte_in_tensor_data, free_port, run_script, straight_and_resumed_runs, write_image_folder

# vit_tiny on 16x16 crops of a 3-class, 24-image data set: a few steps per epoch.
TINY = [
    "--model", "vit_tiny", "--device", "cpu", "-b", "8", "-j", "0",
    "--train-crop-size", "16", "--val-crop-size", "16", "--val-resize-size", "16",
    "--opt", "adamw", "--lr", "1e-3", "--print-freq", "1",
]
SPARSE = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "8"]
# Every source of randomness a resumed run must replay: shuffling, crops, flips, auto-augment, random
# erasing, mixup/cutmix, the EMA and the learning-rate schedule.
RANDOM_EVERYTHING = [
    "--auto-augment", "ta_wide", "--random-erase", "0.5", "--mixup-alpha", "0.2",
    "--cutmix-alpha", "1.0", "--label-smoothing", "0.1", "--model-ema", "--model-ema-steps", "1",
    "--lr-scheduler", "steplr", "--lr-step-size", "1", "--lr-gamma", "0.5", "--use-deterministic-algorithms",
]


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def accuracy_lines(stdout, prefix):
    return re.findall(rf"^{prefix} +Acc@1 ([\d.]+)  Acc@5 ([\d.]+)$", stdout, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory):
    """A finished one-epoch run with Supermask and EMA, started with --resume auto: (output dir, result)."""
    out = str(tmp_path_factory.mktemp("one_epoch"))
    result = run_script(
        ["train.py", "--data-path", data, *TINY, *SPARSE, "--epochs", "1", "--model-ema", "--resume", "auto",
         "--output-dir", out]
    )
    assert_ok(result)
    return out, result


# Without workers augmentation draws from the main process's generators (restored from the checkpoint); with
# workers it draws from worker seeds (derived from seed and epoch).
@pytest.fixture(scope="module", params=["0", "1"], ids=["no_workers", "one_worker"])
def resume_runs(request, data, tmp_path_factory):
    """Two epochs in one run, and the same run resumed by --resume auto from its epoch-0 checkpoint.

    An interrupted run leaves exactly model_0.pth behind (checkpoints are atomic), so copying that file into
    an empty folder is the state a run stopped during its second epoch leaves. Returns (straight dir,
    resumed dir, results).
    """
    common = ["train.py", "--data-path", data, *TINY, *SPARSE, *RANDOM_EVERYTHING, "--epochs", "2", "-j", request.param]
    return straight_and_resumed_runs(common, tmp_path_factory)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_cli_in_process(argv, monkeypatch, capsys):
    """Run `python train.py ARGV` in this process, expecting it to exit; returns (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def test_one_epoch_writes_checkpoints_that_load_with_weights_only(one_epoch):
    out, result = one_epoch
    for name in ("checkpoint.pth", "model_0.pth"):
        checkpoint = load(os.path.join(out, name))
        assert {"model", "optimizer", "lr_scheduler", "scaler", "model_ema", "epoch", "args", "rng_states"} <= set(
            checkpoint
        )
        assert checkpoint["epoch"] == 0
        assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["sparsity_linear"] == 0.5
        keys = list(checkpoint["model"])
        assert any(k.endswith(".scores") for k in keys), "the checkpoint holds no Supermask scores"
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys), "the model was saved wrapped"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")], "a temporary checkpoint file was left behind"
    assert accuracy_lines(result.stdout, "Epoch 0"), result.stdout
    assert accuracy_lines(result.stdout, "Epoch 0  EMA"), result.stdout
    assert "SupermaskLinear" in result.stdout, "the sparsity report was not printed"


def test_checkpoint_rng_states_restore_every_generator(one_epoch):
    import numpy as np

    import utils

    state = load(os.path.join(one_epoch[0], "checkpoint.pth"))["rng_states"][0]
    utils.set_rng_state(state)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    utils.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_resume_auto_starts_fresh_in_an_empty_output_dir(one_epoch):
    stdout = one_epoch[1].stdout
    assert "Resumed from" not in stdout
    assert accuracy_lines(stdout, "Epoch 0"), stdout


def test_resume_auto_continues_from_the_latest_checkpoint(resume_runs):
    resumed = resume_runs[2]["resumed"].stdout
    assert "Resumed from" in resumed and "model_0.pth" in resumed, resumed
    assert not accuracy_lines(resumed, "Epoch 0"), "the resumed run repeated epoch 0"
    assert accuracy_lines(resumed, "Epoch 1"), resumed


def test_resumed_training_matches_uninterrupted_training_bitwise(resume_runs):
    straight, resumed, runs = resume_runs
    a = load(os.path.join(straight, "checkpoint.pth"))
    b = load(os.path.join(resumed, "checkpoint.pth"))
    assert a["epoch"] == b["epoch"] == 1
    for part in ("model", "model_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resuming"
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name} differs"
    assert accuracy_lines(runs["straight"].stdout, "Epoch 1") == accuracy_lines(runs["resumed"].stdout, "Epoch 1")


def test_test_only_evaluates_the_checkpoint_given_to_resume(one_epoch, data):
    out, result = one_epoch
    checkpoint = os.path.join(out, "checkpoint.pth")
    test = run_script(
        ["train.py", "--data-path", data, *TINY, *SPARSE, "--model-ema", "--test-only", "--resume", checkpoint]
    )
    assert_ok(test)
    assert accuracy_lines(test.stdout, "Test") == accuracy_lines(result.stdout, "Epoch 0")
    assert accuracy_lines(test.stdout, "Test  EMA") == accuracy_lines(result.stdout, "Epoch 0  EMA")


def evaluate_checkpoint(path):
    """Acc@1 and Acc@5 of a checkpoint's model on its validation set, in this single process."""
    import evaluate
    import supermask
    import utils

    checkpoint = load(path)
    args = argparse.Namespace(**checkpoint["args"])
    dataset, eval_sampler = utils.load_val_data(args)
    model = utils.build_model(args, num_classes=len(dataset.classes), image_size=args.val_crop_size)
    supermask.apply_supermask(model, **utils.supermask_kwargs(args))
    supermask.load_supermask_state_dict(model, checkpoint["model"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=eval_sampler)
    acc1, acc5, _ = evaluate.evaluate(model, loader, device=torch.device("cpu"), num_classes=len(dataset.classes))
    return acc1, acc5


def test_torchrun_two_processes_train_and_evaluate_every_sample_once(data, tmp_path):
    # 9 validation images on 2 processes in batches of 2: shards of 5 and 4, no padding.
    out = str(tmp_path / "ddp")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    ddp = run_script([*launcher, "train.py", "--data-path", data, *TINY, *SPARSE, "-b", "2", "--epochs", "1",
                      "--output-dir", out])
    assert_ok(ddp)
    lines = accuracy_lines(ddp.stdout, "Epoch 0")
    assert len(lines) == 1, f"expected one accuracy line (rank 0 only):\n{ddp.stdout}"
    # The 2-process accuracy is the single-process accuracy of the same weights, to the printed digit.
    checkpoint = os.path.join(out, "checkpoint.pth")
    assert lines[0] == tuple(f"{acc:.3f}" for acc in evaluate_checkpoint(checkpoint))
    assert len(load(checkpoint)["rng_states"]) == 2, "the checkpoint lacks one process's random state"


def _corrupt_image(data, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(data, broken)
    with open(os.path.join(broken, "train", "class_1", "3.png"), "wb") as f:
        f.write(b"not a png")
    return ["--data-path", broken, "-j", "1"], "3.png"


def _missing_split(data, tmp_path):
    partial = str(tmp_path / "partial")
    shutil.copytree(os.path.join(data, "train"), os.path.join(partial, "train"))
    return ["--data-path", partial], "no val/ folder"


def _empty_data(data, tmp_path):
    return ["--data-path", str(tmp_path)], "no train/ folder"


def _missing_data(data, tmp_path):
    return ["--data-path", str(tmp_path / "nowhere")], "does not exist"


def _unknown_model(data, tmp_path):
    return ["--data-path", data, "--model", "vit_tinyy"], "did you mean vit_tiny"


def _missing_resume(data, tmp_path):
    return ["--data-path", data, "--resume", str(tmp_path / "gone.pth")], "gone.pth does not exist"


def _sparsity_out_of_range(data, tmp_path):
    return ["--data-path", data, "--sparsity-linear", "1.5"], "--sparsity-linear"


BAD_INPUTS = [_missing_data, _empty_data, _missing_split, _unknown_model, _corrupt_image, _missing_resume,
              _sparsity_out_of_range]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_exits_2_with_one_error_line(case, data, tmp_path, monkeypatch, capsys):
    flags, expected = case(data, tmp_path)
    status, stderr = run_cli_in_process(
        [*TINY, *flags, "--epochs", "1", "--output-dir", str(tmp_path / "out")], monkeypatch, capsys
    )
    assert status == 2, stderr
    error_lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], stderr


def without_stored_args(path, out):
    """A copy of checkpoint `path` without its stored args, as a checkpoint of unknown settings is."""
    import utils

    checkpoint = utils.load_checkpoint(path)
    del checkpoint["args"]
    utils.save_checkpoint(checkpoint, out)
    return out


def test_checkpoint_of_another_tile_size_exits_2_naming_the_layer(one_epoch, data, tmp_path, monkeypatch, capsys):
    # Without stored args only the scores' shapes tell the tile size.
    checkpoint = without_stored_args(os.path.join(one_epoch[0], "checkpoint.pth"), str(tmp_path / "no_args.pth"))
    flags = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "4", "--test-only", "--resume", checkpoint]
    status, stderr = run_cli_in_process(["--data-path", data, *TINY, *flags], monkeypatch, capsys)
    assert status == 2, stderr
    assert "scores of layer" in stderr and "tile size 8 would fit" in stderr, stderr


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import utils

    path = str(tmp_path / "checkpoint.pth")
    utils.save_checkpoint({"epoch": 0}, path)

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint({"epoch": 1}, path)
    monkeypatch.undo()
    assert utils.load_checkpoint(path) == {"epoch": 0}
    assert os.listdir(tmp_path) == ["checkpoint.pth"], "the temporary file was left behind"


FLAG_COMBINATIONS = {
    "sgd_nesterov_steplr_ra_sampler_v2": [
        "--opt", "sgd_nesterov", "--lr", "0.01", "--lr-scheduler", "steplr", "--lr-step-size", "1", "--ra-sampler",
        "--ra-reps", "2", "--use-v2", "--backend", "tensor", "--auto-augment", "ra", "--clip-grad-norm", "1",
        "--weights-path", "ONE_EPOCH_CHECKPOINT",
    ],
    "rmsprop_exponentiallr_constant_warmup_accumulation": [
        "--opt", "rmsprop", "--lr-scheduler", "exponentiallr", "--lr-warmup-epochs", "1",
        "--accumulation-steps", "2", "--norm-weight-decay", "0", "--bias-weight-decay", "0",
        "--transformer-embedding-decay", "0", "--auto-augment", "augmix", "--amp",
    ],
    "adamw_cosine_linear_warmup_ema_mixup": [
        "--lr-scheduler", "cosineannealinglr", "--lr-warmup-epochs", "1", "--lr-warmup-method", "linear",
        "--model-ema", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--auto-augment", "imagenet",
        "--interpolation", "bicubic", "--skip-last-layer-sparsity", "--skip-first-transformer-sparsity",
    ],
}


@pytest.mark.parametrize("flags", FLAG_COMBINATIONS.values(), ids=FLAG_COMBINATIONS.keys())
def test_torchvision_flag_combinations_train_and_checkpoint(flags, one_epoch, data, tmp_path, monkeypatch, capsys):
    # In this process (runpy) to save an interpreter start per combination.
    out = str(tmp_path / "out")
    weights = os.path.join(one_epoch[0], "checkpoint.pth")
    flags = [weights if flag == "ONE_EPOCH_CHECKPOINT" else flag for flag in flags]
    argv = ["train.py", "--data-path", data, *TINY, *SPARSE, *flags, "--epochs", "2", "--output-dir", out]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    assert accuracy_lines(stdout, "Epoch 1"), stdout
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 1


def test_help_states_each_default_once():
    import train

    help_text = " ".join(train.get_args_parser().format_help().split())  # unwrap argparse's line breaks
    assert "(default: 0) (default: 0.0)" not in help_text
    assert help_text.count("(default: cubic)") == 1  # --sparsity-schedule, whose help states it
    assert "(default: 90)" in help_text  # --epochs, whose help does not: the formatter adds it


# ----- silent wrong results: corrupt files, contradicting flags, requests that cannot do anything -----


def test_flipped_byte_in_a_checkpoint_exits_2_as_corrupt(one_epoch, data, tmp_path, monkeypatch, capsys):
    corrupt = flip_byte_in_tensor_data(os.path.join(one_epoch[0], "checkpoint.pth"), str(tmp_path / "corrupt.pth"))
    status, stderr = run_cli_in_process(["--data-path", data, *TINY, "--test-only", "--resume", corrupt],
                                        monkeypatch, capsys)
    assert status == 2, stderr
    assert f"{corrupt} is corrupt: its checksum does not match; re-copy or re-create it" in stderr, stderr
    assert "Traceback" not in stderr


def test_checksum_covers_the_stored_args_too(one_epoch, tmp_path):
    import utils

    checkpoint = load(os.path.join(one_epoch[0], "checkpoint.pth"))  # with its "sha256" entry
    checkpoint["args"]["sparsity_linear"] = 0.9
    torch.save(checkpoint, tmp_path / "edited.pth")
    with pytest.raises(utils.InputError, match="is corrupt"):
        utils.load_checkpoint(str(tmp_path / "edited.pth"))


def test_checkpoint_without_checksum_loads_with_a_notice(tmp_path, capsys):
    import utils

    torch.save({"epoch": 3}, tmp_path / "old.pth")  # as written before checkpoints carried a checksum
    assert utils.load_checkpoint(str(tmp_path / "old.pth")) == {"epoch": 3}
    assert "has no checksum" in capsys.readouterr().err


def test_resume_with_contradicting_sparsity_exits_2_naming_the_flag_and_both_values(one_epoch, data, monkeypatch,
                                                                                    capsys):
    checkpoint = os.path.join(one_epoch[0], "checkpoint.pth")
    status, stderr = run_cli_in_process(["--data-path", data, *TINY, "--sparsity-linear", "0.9", "--epochs", "2",
                                         "--resume", checkpoint], monkeypatch, capsys)
    assert status == 2, stderr
    error_lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, stderr
    assert (f"--sparsity-linear 0.9 contradicts --resume {checkpoint}, which was trained with --sparsity-linear 0.5"
            in error_lines[0]), stderr


def test_resume_without_sparsity_flags_takes_them_from_the_checkpoint(one_epoch, data, monkeypatch, capsys):
    out, result = one_epoch
    argv = ["train.py", "--data-path", data, *TINY, "--model-ema", "--test-only", "--resume",
            os.path.join(out, "checkpoint.pth")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    assert re.search(r"mlp\.0 +SupermaskLinear +512x128 +8 +0\.500", stdout), stdout
    assert accuracy_lines(stdout, "Test") == accuracy_lines(result.stdout, "Epoch 0")


def test_weights_path_starts_a_new_run_with_new_sparsity_settings(one_epoch, data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "finetune")
    argv = ["train.py", "--data-path", data, *TINY, "--sparsity-linear", "0.75", "--sp-linear-tile-size", "8",
            "--epochs", "1", "--weights-path", os.path.join(one_epoch[0], "checkpoint.pth"), "--output-dir", out]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    assert load(os.path.join(out, "checkpoint.pth"))["args"]["sparsity_linear"] == 0.75
    assert re.search(r"mlp\.0 +SupermaskLinear +512x128 +8 +0\.750", capsys.readouterr().out)


IMPOSSIBLE = {
    "no_epochs": (["--epochs", "0"], "--epochs 0 trains nothing"),
    "tile_size_leaving_one_tile_per_layer": (
        ["--epochs", "1", "--sparsity-linear", "0.9", "--sp-linear-tile-size", "1024"],
        "--sp-linear-tile-size 1024 leaves every Linear layer too few tiles to prune any at --sparsity-linear 0.9, "
        "so the model would stay dense; the largest tile size that prunes is 255"),
}


@pytest.mark.parametrize("flags,expected", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_impossible_request_exits_2_with_one_error_line(flags, expected, data, tmp_path, monkeypatch, capsys):
    status, stderr = run_cli_in_process(["--data-path", data, *TINY, *flags, "--output-dir", str(tmp_path)],
                                        monkeypatch, capsys)
    assert status == 2, stderr
    error_lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], stderr
