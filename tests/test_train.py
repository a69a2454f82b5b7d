"""train.py as a user runs it: checkpoints, exact resume, torchrun, and clean errors on bad input.

Training runs are subprocesses, as a user starts them. The bad-input cases run train.py's command line
in this process (helpers.run_in_process), because each of them fails within a second and a fresh interpreter
would spend seconds importing torch.
"""
import argparse
import os
import random
import re
import shutil
import signal
import time

import pytest
import torch
import torch.nn.functional as F

import distillation
from test_models import local_resnet18_weights  # noqa: F401 (a fixture)
from helpers import (assert_ok, flip_byte_in_tensor_data, free_port, run_in_process, run_script, start_script,
                     straight_and_resumed_runs, the_error_line, write_image_folder)

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

    import checkpoints

    state = load(os.path.join(one_epoch[0], "checkpoint.pth"))["rng_states"][0]
    checkpoints.set_rng_state(state)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    checkpoints.set_rng_state(state)
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
    import cli
    import data
    import evaluation
    import supermask

    checkpoint = load(path)
    args = argparse.Namespace(**checkpoint["args"])
    dataset, eval_sampler = data.load_val_data(args)
    model = cli.build_model(args, num_classes=len(dataset.classes), image_size=args.val_crop_size)
    supermask.apply_supermask(model, **cli.supermask_kwargs(args))
    supermask.load_supermask_state_dict(model, checkpoint["model"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=eval_sampler)
    acc1, acc5, _, _ = evaluation.evaluate(model, loader, device=torch.device("cpu"), num_classes=len(dataset.classes))
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


def _unknown_weights(data, tmp_path):
    return ["--data-path", data, "--model", "resnet18", "--weights", "Bogus.X"], \
        "--weights Bogus.X: there is no weights enum Bogus; resnet18's weights are ResNet18_Weights.IMAGENET1K_V1"


def _missing_resume(data, tmp_path):
    return ["--data-path", data, "--resume", str(tmp_path / "gone.pth")], "gone.pth does not exist"


def _sparsity_out_of_range(data, tmp_path):
    return ["--data-path", data, "--sparsity-linear", "1.5"], "--sparsity-linear"


def _output_dir_through_a_file(data, tmp_path):
    (tmp_path / "afile.txt").write_text("notes")
    return ["--data-path", data, "--output-dir", str(tmp_path / "afile.txt" / "sub")], \
        "afile.txt is a file, not a folder"


def _output_dir_is_a_file(data, tmp_path):
    (tmp_path / "afile.txt").write_text("notes")
    return ["--data-path", data, "--output-dir", str(tmp_path / "afile.txt")], "afile.txt is a file, not a folder"


def _batch_size_zero(data, tmp_path):
    return ["--data-path", data, "-b", "0"], "--batch-size must be at least 1, got 0"


def _negative_lr(data, tmp_path):
    return ["--data-path", data, "--lr", "-0.1"], "--lr -0.1 is negative"


def _negative_epochs(data, tmp_path):
    return ["--data-path", data, "--epochs", "-3"], "--epochs -3 is negative"


def _negative_keep_last(data, tmp_path):
    return ["--data-path", data, "--keep-last", "-1"], "--keep-last -1 is negative"


def _data_path_is_a_file(data, tmp_path):
    (tmp_path / "afile.txt").write_text("notes")
    return ["--data-path", str(tmp_path / "afile.txt")], "afile.txt is a file, not a folder"


def _weights_path_is_a_folder(data, tmp_path):
    return ["--data-path", data, "--weights-path", str(tmp_path)], "is a folder; pass a checkpoint file in it"


def _resume_a_folder(data, tmp_path):
    return ["--data-path", data, "--resume", str(tmp_path)], "is a folder; pass a checkpoint file in it"


def _compact_file(tmp_path):
    import checkpoints

    path = str(tmp_path / "compact.pth")
    checkpoints.save_checkpoint({"format": checkpoints.COMPACT_FORMAT, "version": 1, "blocksize": 16, "dense": {}, "sparse": {},
                           "architecture": {"model": "vit_tiny", "num_classes": 3, "image_size": 16}}, path)
    return path


def _resume_from_a_compact_file(data, tmp_path):
    return ["--data-path", data, "--resume", _compact_file(tmp_path)], "is a compact inference file"


def _weights_path_a_compact_file(data, tmp_path):
    return ["--data-path", data, "--weights-path", _compact_file(tmp_path)], \
        "is a compact inference file (evaluate.py --save-compact) and cannot be trained further"


def _resume_from_a_state_dict(data, tmp_path):
    import checkpoints

    checkpoints.save_checkpoint({"head.weight": torch.zeros(3, 3)}, str(tmp_path / "weights.pth"))
    return ["--data-path", data, "--resume", str(tmp_path / "weights.pth")], \
        "is not a train.py checkpoint (it has no 'model' and 'epoch' entries); to start a new run from its weights"


def _text_file_as_checkpoint(data, tmp_path):
    (tmp_path / "afile.txt").write_text("hello world\n")
    return ["--data-path", data, "--resume", str(tmp_path / "afile.txt")], "afile.txt is not a PyTorch checkpoint"


def _random_bytes_as_checkpoint(data, tmp_path):
    (tmp_path / "random.pth").write_bytes(b"\x80\x02" + bytes(random.Random(0).randrange(256) for _ in range(2000)))
    return ["--data-path", data, "--resume", str(tmp_path / "random.pth")], "cannot load checkpoint"


BAD_INPUTS = [_missing_data, _empty_data, _missing_split, _unknown_model, _unknown_weights, _corrupt_image, _missing_resume,
              _sparsity_out_of_range, _output_dir_through_a_file, _output_dir_is_a_file, _batch_size_zero,
              _negative_lr, _negative_epochs, _negative_keep_last, _data_path_is_a_file, _weights_path_is_a_folder,
              _resume_a_folder, _resume_from_a_compact_file, _weights_path_a_compact_file, _resume_from_a_state_dict,
              _text_file_as_checkpoint, _random_bytes_as_checkpoint]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_exits_2_with_one_error_line(case, data, tmp_path):
    flags, expected = case(data, tmp_path)
    # The case's flags come last: later flags win.
    result = run_in_process("train.py", [*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "out"), *flags])
    stdout, stderr = result.stdout, result.stderr
    error_line = the_error_line(result)
    assert expected in error_line, stderr
    assert "Traceback" not in stderr and "weights_only" not in stderr, stderr  # never advise full unpickling
    if case is not _corrupt_image:  # an unreadable image is only found when training reads it
        assert "Start training" not in stdout, "the error came after the work had started"


def without_stored_args(path, out):
    """A copy of checkpoint `path` without its stored args, as a checkpoint of unknown settings is."""
    import checkpoints

    checkpoint = checkpoints.load_checkpoint(path)
    del checkpoint["args"]
    checkpoints.save_checkpoint(checkpoint, out)
    return out


def test_checkpoint_of_another_tile_size_exits_2_naming_the_layer(one_epoch, data, tmp_path):
    # Without stored args only the scores' shapes tell the tile size.
    checkpoint = without_stored_args(os.path.join(one_epoch[0], "checkpoint.pth"), str(tmp_path / "no_args.pth"))
    flags = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "4", "--test-only", "--resume", checkpoint]
    result = run_in_process("train.py", ["--data-path", data, *TINY, *flags])
    status, stderr = result.returncode, result.stderr
    assert status == 2, stderr
    assert "scores of layer" in stderr and "tile size 8 would fit" in stderr, stderr


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
def test_torchvision_flag_combinations_train_and_checkpoint(flags, one_epoch, data, tmp_path):
    # In this process to save an interpreter start per combination.
    out = str(tmp_path / "out")
    weights = os.path.join(one_epoch[0], "checkpoint.pth")
    flags = [weights if flag == "ONE_EPOCH_CHECKPOINT" else flag for flag in flags]
    result = run_in_process("train.py", ["--data-path", data, *TINY, *SPARSE, *flags, "--epochs", "2",
                                         "--output-dir", out])
    assert_ok(result)
    stdout = result.stdout
    assert accuracy_lines(stdout, "Epoch 1"), stdout
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 1


def test_help_states_each_default_once():
    import train

    help_text = " ".join(train.get_args_parser().format_help().split())  # unwrap argparse's line breaks
    assert "(default: 0) (default: 0.0)" not in help_text
    assert help_text.count("(default: cubic)") == 1  # --sparsity-schedule, whose help states it
    assert "(default: 90)" in help_text  # --epochs, whose help does not: the formatter adds it


##### Silent wrong results: corrupt files, contradicting flags, requests that cannot do anything #####


def test_flipped_byte_in_a_checkpoint_exits_2_as_corrupt(one_epoch, data, tmp_path):
    corrupt = flip_byte_in_tensor_data(os.path.join(one_epoch[0], "checkpoint.pth"), str(tmp_path / "corrupt.pth"))
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--test-only", "--resume", corrupt])
    status, stderr = result.returncode, result.stderr
    assert status == 2, stderr
    assert f"{corrupt} is corrupt: its checksum does not match; re-copy or re-create it" in stderr, stderr
    assert "Traceback" not in stderr


def test_checksum_covers_the_stored_args_too(one_epoch, tmp_path):
    import checkpoints
    import utils

    checkpoint = load(os.path.join(one_epoch[0], "checkpoint.pth"))  # with its "sha256" entry
    checkpoint["args"]["sparsity_linear"] = 0.9
    torch.save(checkpoint, tmp_path / "edited.pth")
    with pytest.raises(utils.InputError, match="is corrupt"):
        checkpoints.load_checkpoint(str(tmp_path / "edited.pth"))


def test_resume_with_contradicting_sparsity_exits_2_naming_the_flag_and_both_values(one_epoch, data):
    checkpoint = os.path.join(one_epoch[0], "checkpoint.pth")
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--sparsity-linear", "0.9", "--epochs", "2",
                                         "--resume", checkpoint])
    stderr = result.stderr
    error_line = the_error_line(result)
    assert (f"--sparsity-linear 0.9 contradicts --resume {checkpoint}, which was trained with --sparsity-linear 0.5"
            in error_line), stderr


def test_resume_without_sparsity_flags_takes_them_from_the_checkpoint(one_epoch, data):
    out, result = one_epoch
    run = run_in_process("train.py", ["--data-path", data, *TINY, "--model-ema", "--test-only", "--resume",
                                      os.path.join(out, "checkpoint.pth")])
    assert_ok(run)
    stdout = run.stdout
    assert re.search(r"mlp\.0 +SupermaskLinear +512x128 +8 +0\.500", stdout), stdout
    assert accuracy_lines(stdout, "Test") == accuracy_lines(result.stdout, "Epoch 0")


def test_weights_path_starts_a_new_run_with_new_sparsity_settings(one_epoch, data, tmp_path):
    out = str(tmp_path / "finetune")
    run = run_in_process("train.py", ["--data-path", data, *TINY, "--sparsity-linear", "0.75",
                                      "--sp-linear-tile-size", "8", "--epochs", "1", "--weights-path",
                                      os.path.join(one_epoch[0], "checkpoint.pth"), "--output-dir", out])
    assert_ok(run)
    assert load(os.path.join(out, "checkpoint.pth"))["args"]["sparsity_linear"] == 0.75
    assert re.search(r"mlp\.0 +SupermaskLinear +512x128 +8 +0\.750", run.stdout)


IMPOSSIBLE = {
    "no_epochs": (["--epochs", "0"], "--epochs 0 trains nothing"),
    "tile_size_leaving_one_tile_per_layer": (
        ["--epochs", "1", "--sparsity-linear", "0.9", "--sp-linear-tile-size", "1024"],
        "--sp-linear-tile-size 1024 leaves every Linear layer too few tiles to prune any at --sparsity-linear 0.9, "
        "so the model would stay dense; the largest tile size that prunes is 255"),
}


@pytest.mark.parametrize("flags,expected", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_impossible_request_exits_2_with_one_error_line(flags, expected, data, tmp_path):
    result = run_in_process("train.py", ["--data-path", data, *TINY, *flags, "--output-dir", str(tmp_path)])
    assert expected in the_error_line(result), result.stderr


##### Earlier runs, interrupted runs and torn files #####


def test_fresh_run_into_a_used_output_dir_is_refused_and_leaves_it_untouched(one_epoch, data):
    out = one_epoch[0]
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    result = run_in_process("train.py",
        ["--data-path", data, *TINY, *SPARSE, "--epochs", "1", "--output-dir", out])
    stdout, stderr = result.stdout, result.stderr
    error_line = the_error_line(result)
    assert f"--output-dir {out} already holds a run (checkpoint.pth, model_0.pth); continue it with --resume auto, " \
           f"pass --start-over" in error_line, stderr
    assert "Start training" not in stdout
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before


def test_start_over_removes_the_earlier_runs_checkpoints(one_epoch, data, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(one_epoch[0], out)
    shutil.copy(os.path.join(out, "model_0.pth"), os.path.join(out, "model_7.pth"))  # a later epoch of the old run
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = run_in_process("train.py", ["--data-path", data, *TINY, *SPARSE, "--epochs", "1", "--output-dir", out,
                                    "--start-over"])
    assert_ok(result)
    stdout = result.stdout
    assert "removed the earlier run's 3 checkpoint file(s)" in stdout, stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "model_0.pth", "notes.txt"]  # nothing else of the user's
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 0


def test_start_over_with_resume_exits_2(data, tmp_path):
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--epochs", "1", "--output-dir", str(tmp_path),
                                         "--start-over", "--resume", "auto"])
    status, stderr = result.returncode, result.stderr
    assert status == 2 and "pass one of them" in stderr, stderr


def _torn(path, tmp_path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _flipped(path, tmp_path):
    flip_byte_in_tensor_data(path, str(tmp_path / "flipped.pth"))
    shutil.move(str(tmp_path / "flipped.pth"), path)


@pytest.mark.parametrize("damage", [_torn, _flipped], ids=["torn", "checksum_mismatch"])
def test_resume_auto_falls_back_to_the_newest_checkpoint_that_loads(damage, one_epoch, data, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(one_epoch[0], out)
    damage(os.path.join(out, "checkpoint.pth"), tmp_path)
    (tmp_path / "run" / "checkpoint.pth.k3j2x_a.tmp").write_bytes(b"half a checkpoint")  # a killed write's
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--test-only", "--resume", "auto",
                                         "--output-dir", out])
    assert_ok(result)
    stdout, stderr = result.stdout, result.stderr
    assert f"Notice: resuming from {os.path.join(out, 'model_0.pth')}, the newest checkpoint that loads; skipped: " \
           in stderr, stderr
    assert "Resumed from" in stdout and "model_0.pth (epoch 0)" in stdout, stdout
    assert "checkpoint.pth.k3j2x_a.tmp" not in os.listdir(out), "the stale temporary file was left behind"
    assert "Removed 1 temporary file(s)" in stdout


def test_resume_auto_with_no_checkpoint_that_loads_exits_2_naming_each(one_epoch, data, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(one_epoch[0], out)
    for name in ("checkpoint.pth", "model_0.pth"):
        _torn(os.path.join(out, name), tmp_path)
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--epochs", "2", "--resume", "auto",
                                         "--output-dir", out])
    stderr = result.stderr
    error_line = the_error_line(result)
    assert "found no checkpoint in" in error_line, stderr
    assert "checkpoint.pth: the file is truncated or damaged" in error_line, stderr
    assert "model_0.pth: the file is truncated or damaged" in error_line, stderr


def test_ctrl_c_says_which_epoch_the_checkpoint_holds_and_exits_130(data, tmp_path):
    out = str(tmp_path / "run")
    process = start_script(["train.py", "--data-path", data, *TINY, "--epochs", "500", "--output-dir", out])
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "checkpoint.pth")) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C on a terminal: the whole process group
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    epoch = load(os.path.join(out, "checkpoint.pth"))["epoch"]
    assert f"Interrupted; {os.path.join(out, 'checkpoint.pth')} holds epoch {epoch}: continue with --resume auto" \
           in stderr, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("folder, expected", [("run", "--resume auto"), ("elsewhere", "--resume {path}")])
def test_ctrl_c_hint_resumes_from_where_the_checkpoint_is(folder, expected, tmp_path, monkeypatch):
    import train

    path = str(tmp_path / folder / "model_3.pth")
    monkeypatch.setattr(train, "last_checkpoint", dict(path=path, epoch=3, output_dir=str(tmp_path / "run")))
    message = train.interrupted_message()
    assert message.startswith(f"Interrupted; {path} holds epoch 3: continue with {expected.format(path=path)} "), message


##### Newcomer friction: the settings line, the demo's disk use #####


def test_log_lists_the_settings_that_differ_from_the_defaults(one_epoch):
    stdout = one_epoch[1].stdout
    assert "Namespace(" not in stdout
    settings = stdout.split("Settings (flags not at their defaults; --help lists all):\n", 1)[1].split("\nCreating")[0]
    lines = [line.strip() for line in settings.splitlines()]
    assert {"--model vit_tiny", "--sparsity-linear 0.5", "--sp-linear-tile-size 8", "--model-ema",
            "--resume auto", "--epochs 1"} <= set(lines), settings
    assert not any(line.startswith(("--hflip-prob", "--backend", "--seed")) for line in lines), settings


def test_keep_last_keeps_the_newest_epoch_files_and_resume_auto_continues(data, tmp_path):
    out = str(tmp_path / "run")
    flags = ["--data-path", data, *TINY, "--output-dir", out, "--keep-last", "2"]
    assert_ok(run_in_process("train.py", [*flags, "--epochs", "3"]))
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "model_1.pth", "model_2.pth"]
    result = run_in_process("train.py", [*flags, "--epochs", "4", "--resume", "auto"])
    assert_ok(result)
    stdout = result.stdout
    assert "checkpoint.pth (epoch 2)" in stdout, stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "model_2.pth", "model_3.pth"]
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 3


def test_keep_last_0_writes_only_checkpoint_pth(data, tmp_path):
    out = str(tmp_path / "run")
    assert_ok(run_in_process("train.py", ["--data-path", data, *TINY, "--output-dir", out, "--keep-last", "0", "--epochs", "2"]))
    assert os.listdir(out) == ["checkpoint.pth"]


##### Sparsifying a dense model: magnitude score init, the sparsity ramp, distillation #####

FROM_DENSE_SPARSE = ["--sparsity-linear", "0.8", "--sp-linear-tile-size", "8", "--skip-last-layer-sparsity"]
RAMP = ["--sparsity-warmup-epochs", "2", "--sparsity-schedule", "cubic"]


@pytest.fixture(scope="module")
def dense_checkpoint(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dense"))
    assert_ok(run_script(["train.py", "--data-path", data, *TINY, "--epochs", "1", "--output-dir", out]))
    return os.path.join(out, "checkpoint.pth")


@pytest.fixture(scope="module")
def ramp_runs(data, dense_checkpoint, tmp_path_factory):
    """From the dense checkpoint with ramp and distillation: 3 epochs straight, and resumed after epoch 0."""
    common = ["train.py", "--data-path", data, *TINY, *FROM_DENSE_SPARSE, *RAMP, "--distill", "--weights-path", dense_checkpoint,
              "--epochs", "3", "--use-deterministic-algorithms"]
    return straight_and_resumed_runs(common, tmp_path_factory)


def test_starting_from_dense_weights_uses_magnitude_scores(ramp_runs, dense_checkpoint):
    _, _, runs = ramp_runs
    assert "Mask scores: magnitude initialisation (from the dense starting weights)" in runs["straight"].stdout


def test_scratch_run_uses_kaiming_scores(data, tmp_path):
    result = run_script(["train.py", "--data-path", data, *TINY, *FROM_DENSE_SPARSE, "--epochs", "1", "--test-only"])
    assert_ok(result)
    assert "Mask scores: kaiming initialisation" in result.stdout


def test_resume_mid_ramp_continues_exactly(ramp_runs):
    straight, resumed, _ = ramp_runs
    a, b = load(os.path.join(straight, "checkpoint.pth")), load(os.path.join(resumed, "checkpoint.pth"))
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs after resuming mid-ramp"


def test_ramp_follows_the_schedule_and_reaches_the_target_at_its_end(ramp_runs):
    from supermask import sparsity_schedule

    _, _, runs = ramp_runs
    logged = [float(v) for v in re.findall(r"^Epoch \d+  train loss .*mask sparsity ([\d.]+)$", runs["straight"].stdout,
                                           flags=re.MULTILINE)]
    steps = 3  # 24 images in batches of 8: a ramp of 2 epochs is 6 steps
    # The ramp's last step (epoch 1's last) trains at the target: epoch 0 ends at step 3 of 6, epoch 1 at 6 of 6.
    expected = [0.8 * sparsity_schedule("cubic", (epoch + 1) * steps, 2 * steps) for epoch in range(2)] + [0.8]
    assert expected[1] == 0.8
    assert logged == pytest.approx(expected, abs=1e-3), runs["straight"].stdout


def test_ramp_fraction_reaches_the_target_at_the_ramps_last_step():
    import train

    args = argparse.Namespace(sparsity_schedule="linear")
    assert [train.ramp_fraction(args, step, 4) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_checkpoint_inside_the_ramp_evaluates_at_the_sparsity_training_logged(ramp_runs, data):
    straight, _, runs = ramp_runs
    # 3 steps per epoch, a 6-step cubic ramp: epoch 0 ends at 1 - (1 - 3/6) ** 3 of the targets, then the targets.
    fractions = [load(os.path.join(straight, f"model_{epoch}.pth"))["sparsity_fraction"] for epoch in range(3)]
    assert fractions == pytest.approx([0.875, 1.0, 1.0]), fractions
    logged = accuracy_lines(runs["straight"].stdout, "Epoch 0")
    model_0 = os.path.join(straight, "model_0.pth")
    evaluated = run_in_process("evaluate.py", ["--data-path", data, "--device", "cpu", "-j", "0", "-b", "8",
                                               "--weights-path", model_0])
    assert_ok(evaluated)
    assert "Traceback" not in evaluated.stderr
    said = [line for line in evaluated.stdout.splitlines() if line.startswith("Sparsity:")]
    assert len(said) == 1 and "its masks at 0.875 of the target sparsities" in said[0], evaluated.stdout
    assert re.findall(r"^Acc@1 ([\d.]+) Acc@5 ([\d.]+)$", evaluated.stdout, flags=re.MULTILINE) == logged
    tested = run_in_process("train.py", ["--data-path", data, *TINY, "--epochs", "3", "--test-only", "--resume",
                                         model_0])
    assert_ok(tested)
    said = [line for line in tested.stdout.splitlines() if line.startswith("Sparsity:")]
    assert len(said) == 1 and "its masks at 0.875 of the target sparsities" in said[0], tested.stdout
    assert accuracy_lines(tested.stdout, "Test") == logged


def test_teacher_is_frozen_and_out_of_checkpoints(ramp_runs, data, tmp_path):
    straight, _, _ = ramp_runs
    with_teacher = load(os.path.join(straight, "checkpoint.pth"))
    assert not any("teacher" in key for key in with_teacher["model"])
    out = str(tmp_path / "no_distill")
    assert_ok(run_script(["train.py", "--data-path", data, *TINY, *FROM_DENSE_SPARSE, "--epochs", "1", "--output-dir", out]))
    without = load(os.path.join(out, "checkpoint.pth"))
    # Same model entries and the same optimizer state size: the teacher adds neither.
    assert set(with_teacher["model"]) == set(without["model"])
    assert len(with_teacher["optimizer"]["state"]) == len(without["optimizer"]["state"])


def test_frozen_teacher_takes_no_gradient_and_does_not_change():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    teacher = distillation.frozen_teacher(model)
    before = teacher[0].weight.clone()
    x = torch.randn(5, 4)
    with torch.no_grad():
        soft = teacher(x)
    loss = distillation.distillation_loss(model(x), soft, torch.tensor(0.0), alpha=1.0, temperature=2.0)
    loss.backward()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert teacher[0].weight.grad is None and torch.equal(teacher[0].weight, before)


def test_distillation_loss_mixes_hard_and_soft_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    hard = torch.tensor(1.25)
    assert distillation.distillation_loss(student, teacher, hard, alpha=0.0, temperature=3.0) == hard
    assert distillation.distillation_loss(teacher, teacher, hard, alpha=1.0, temperature=3.0).abs() < 1e-6
    t = 3.0
    kl = (F.softmax(teacher / t, -1) * (F.log_softmax(teacher / t, -1) - F.log_softmax(student / t, -1))).sum(-1).mean()
    got = distillation.distillation_loss(student, teacher, hard, alpha=0.25, temperature=t)
    torch.testing.assert_close(got, 0.75 * hard + 0.25 * t * t * kl)


def test_distill_without_dense_start_exits_2(data, tmp_path):
    result = run_in_process("train.py",
        ["--data-path", data, *TINY, *FROM_DENSE_SPARSE, "--distill", "--epochs", "1", "--output-dir", str(tmp_path)])
    status, stderr = result.returncode, result.stderr
    assert status == 2 and "--distill learns from the dense model" in stderr, stderr


def test_ramp_longer_than_training_exits_2(data, tmp_path):
    result = run_in_process("train.py",
        ["--data-path", data, *TINY, *FROM_DENSE_SPARSE, "--sparsity-warmup-epochs", "5", "--epochs", "2"])
    status, stderr = result.returncode, result.stderr
    assert status == 2 and "--sparsity-warmup-epochs 5" in stderr, stderr


##### Issue 22: lost work and tracebacks where one line belongs #####


def test_full_disk_while_checkpointing_is_one_line_naming_the_file_and_what_was_kept(data, tmp_path, monkeypatch):
    from test_checkpoints import save_into_a_full_disk

    real_save = torch.save

    def save_until_epoch_1(obj, f, *args, **kwargs):
        if os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}")).startswith("model_1.pth."):
            return save_into_a_full_disk(obj, f)
        return real_save(obj, f, *args, **kwargs)

    out = str(tmp_path / "run")
    monkeypatch.setattr(torch, "save", save_until_epoch_1)
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--epochs", "2", "--output-dir", out])
    monkeypatch.undo()
    stderr = result.stderr
    error_line = the_error_line(result)
    assert (f"no space left on the device to write {os.path.join(out, 'model_1.pth')}; no earlier "
            f"{os.path.join(out, 'model_1.pth')} existed (epoch 1); {out} keeps checkpoint.pth, model_0.pth; free "
            f"some space and continue with --resume auto") in error_line, stderr
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "model_0.pth"]
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 0


def test_resume_with_another_optimizer_exits_2_before_training(one_epoch, data):
    checkpoint = os.path.join(one_epoch[0], "checkpoint.pth")  # trained with --opt adamw
    result = run_in_process("train.py", ["--data-path", data, *TINY, *SPARSE, "--opt", "sgd", "--epochs", "2",
                                         "--resume", checkpoint])
    stdout, stderr = result.stdout, result.stderr
    error_line = the_error_line(result)
    assert (f"--opt sgd differs from the optimizer {checkpoint} was trained with (--opt adamw)" in error_line
            and "resume with --opt adamw" in error_line), stderr
    assert "Traceback" not in stderr and "Start training" not in stdout, stderr


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(one_epoch, data):
    out = one_epoch[0]  # trained its one epoch
    result = run_in_process("train.py", ["--data-path", data, *TINY, *SPARSE, "--epochs", "1", "--resume", "auto",
                                         "--output-dir", out])
    stdout, stderr = result.stdout, result.stderr
    error_line = the_error_line(result)
    assert (f"--resume {os.path.join(out, 'checkpoint.pth')} holds epoch 0, and --epochs 1 ends with epoch 0: there "
            f"is nothing left to train; pass --epochs 2 or more" in error_line), stderr
    assert "Traceback" not in stderr and "Training time" not in stdout, stderr


HOLD_LOCK = "import sys, time, checkpoints; checkpoints.lock_output_dir(sys.argv[1]); print('locked', flush=True); " \
            "time.sleep(300)"


def test_second_run_into_a_locked_output_dir_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    holder = start_script(["-c", HOLD_LOCK, out])  # a run in progress, as train.py locks its folder
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        for extra in ([], ["--resume", "auto"], ["--start-over"]):
            result = run_in_process("train.py", ["--data-path", data, *TINY, "--epochs", "1", "--output-dir", out,
                                                 *extra])
            stdout, stderr = result.stdout, result.stderr
            error_line = the_error_line(result)
            assert f"--output-dir {out} is in use by another train.py run that is still going" in error_line
            assert "Traceback" not in stderr and "Start training" not in stdout, stderr
            assert os.listdir(out) == [], "the refused run wrote into the folder"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # as kill -9: no clean-up runs
        holder.communicate()
    assert_ok(run_in_process("train.py", ["--data-path", data, *TINY, "--epochs", "1", "--output-dir", out]))
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "model_0.pth"]


def test_batchnorm_model_trains_past_a_last_batch_of_one_image(data, tmp_path):
    # 24 training images in batches of 23: the last batch holds one image, which BatchNorm cannot train on.
    out = str(tmp_path / "run")
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--model", "resnet18", "-b", "23",
                                         "--epochs", "1", "--output-dir", out])
    assert_ok(result)
    assert ("Notice: each process's 24 training images in batches of 23 leave a last batch of 1 image, which "
            "BatchNorm cannot train on; it is left out of each epoch") in result.stdout, result.stdout
    assert "Epoch 0 [1/1]" in result.stdout, result.stdout
    assert accuracy_lines(result.stdout, "Epoch 0"), result.stdout
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 0


def test_pretrained_weights_fine_tune_on_another_class_count_with_a_new_head(local_resnet18_weights, data, tmp_path):
    out = str(tmp_path / "run")
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--model", "resnet18", "--weights",
                                         "ResNet18_Weights.IMAGENET1K_V1", "--epochs", "1", "--output-dir", out])
    assert_ok(result)
    notices = [line for line in result.stdout.splitlines() if line.startswith("Notice: ResNet18_Weights")]
    assert notices == ["Notice: ResNet18_Weights.IMAGENET1K_V1 classifies 1000 classes and the data 3: fc newly "
                       "initialised for 3 classes, the rest pretrained"], result.stdout
    state = load(os.path.join(out, "checkpoint.pth"))["model"]
    assert state["fc.weight"].shape == (3, 512)


OUT_OF_RANGE = {
    "workers": (["-j", "-1"], "--workers must be at least 0, got -1"),
    "crop_size": (["--train-crop-size", "0"], "--train-crop-size must be at least 1, got 0"),
    "label_smoothing": (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1), got 1.5"),
    "mixup_alpha": (["--mixup-alpha", "-0.2"], "--mixup-alpha must be at least 0, got -0.2"),
    "warmup_decay": (["--lr-warmup-decay", "0"], "--lr-warmup-decay must be in (0, 1], got 0.0"),
    "lr_step_size": (["--lr-step-size", "0"], "--lr-step-size must be at least 1, got 0"),
    "lr_gamma": (["--lr-gamma", "0"], "--lr-gamma must be above 0, got 0.0"),
    "clip_grad_norm": (["--clip-grad-norm", "-1"], "--clip-grad-norm must be above 0, got -1.0"),
    "augmix_severity": (["--augmix-severity", "11"], "--augmix-severity must be in [1, 10], got 11"),
    "hflip_prob": (["--hflip-prob", "2"], "--hflip-prob must be in [0, 1], got 2.0"),
    "ema_decay": (["--model-ema-decay", "1"], "--model-ema-decay must be in [0, 1), got 1.0"),
    "print_freq": (["--print-freq", "0"], "--print-freq must be at least 1, got 0"),
    "seed": (["--seed", "-1"], "--seed must be at least 0, got -1"),
    "nan_lr": (["--lr", "nan"], "--lr must be a finite number, got nan"),
    "nan_random_erase": (["--random-erase", "nan"], "--random-erase must be in [0, 1], got nan"),
    "crop_scale": (["--train-crop-scale", "0.5", "0.2"], "--train-crop-scale 0.5 0.2 must be two area fractions"),
}


@pytest.mark.parametrize("flags,expected", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_numeric_flag_outside_its_range_exits_2_before_any_work(flags, expected, data, tmp_path):
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--epochs", "1", *flags,
                                         "--output-dir", str(tmp_path / "out")])
    stdout, stderr = result.stdout, result.stderr
    error_line = the_error_line(result)
    assert expected in error_line, stderr
    assert "Traceback" not in stderr and "Settings" not in stdout, stderr
    assert not os.path.exists(tmp_path / "out"), "the output folder was created before the check"


def test_test_only_with_pretrained_weights_of_another_class_count_exits_2(local_resnet18_weights, data):
    result = run_in_process("train.py", ["--data-path", data, *TINY, "--model", "resnet18", "--weights",
                                         "ResNet18_Weights.IMAGENET1K_V1", "--test-only"])
    status, stderr = result.returncode, result.stderr
    assert status == 2, stderr
    assert ("--test-only evaluates --weights ResNet18_Weights.IMAGENET1K_V1 as they are, but they classify 1000 "
            f"classes and {data} has 3; fine-tune them first") in stderr, stderr
    assert "Traceback" not in stderr


def test_resuming_into_the_folder_of_a_running_run_is_refused_until_it_is_killed(data, tmp_path):
    out = str(tmp_path / "run")
    flags = ["--data-path", data, *TINY, "--output-dir", out]
    running = start_script(["train.py", *flags, "--epochs", "500"])
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "checkpoint.pth")) and time.time() < deadline:
            time.sleep(0.05)
        second = run_in_process("train.py", [*flags, "--epochs", "500", "--resume", "auto"])
        assert second.returncode == 2, second.stderr
        assert f"--output-dir {out} is in use by another train.py run that is still going" in second.stderr
        assert "Traceback" not in second.stderr and "Resumed from" not in second.stdout, second.stderr
    finally:
        os.killpg(running.pid, signal.SIGKILL)  # kill -9: the lock must not outlive the run
        running.communicate()
    epoch = load(os.path.join(out, "checkpoint.pth"))["epoch"]
    resumed = run_in_process("train.py", [*flags, "--epochs", str(epoch + 2), "--resume", "auto"])
    assert_ok(resumed)
    assert "Resumed from" in resumed.stdout
