"""evaluate.py as a user runs it, on a checkpoint written by train.py: online, offline and block-sparse
accuracy agree, torchrun counts every image once, original-format checkpoints load safely, bad input exits 2.
"""
import argparse
import json
import os
import re

import pytest
import torch

import blocksparse_int8
from test_models import local_resnet18_weights  # noqa: F401 (a fixture)
from helpers import (assert_ok, flip_byte_in_tensor_data, free_port, run_in_process, run_script, the_error_line,
                     write_image_folder)

SIZE = ["--val-crop-size", "16", "--val-resize-size", "16"]
MODEL = ["--model", "vit_tiny", "--device", "cpu", "-j", "0", *SIZE]
SPARSE = ["--sparsity-linear", "0.75", "--sp-linear-tile-size", "16"]


def error_line(stderr):
    """The one error line of a refused run (the pointer to --help follows it)."""
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def accuracy(stdout):
    lines = re.findall(r"^Acc@1 ([\d.]+) Acc@5 ([\d.]+)$", stdout, flags=re.MULTILINE)
    assert len(lines) == 1, f"expected one accuracy line:\n{stdout}"
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 4 classes so that top-5 is not trivially 100%; 5 validation images per class.
    return write_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=10,
                              val_per_class=5)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """A one-epoch Supermask run with EMA, trained by train.py."""
    out = str(tmp_path_factory.mktemp("trained"))
    result = run_script(["train.py", "--data-path", data, *MODEL, *SPARSE, "-b", "8", "--train-crop-size", "16",
                         "--epochs", "2", "--opt", "adamw", "--lr", "3e-3", "--model-ema", "--model-ema-steps", "1",
                         "--output-dir", out])
    assert_ok(result)
    return os.path.join(out, "checkpoint.pth"), result.stdout


def evaluate(data, weights, *flags, launcher=None):
    """Run evaluate.py on `weights`: in this process, or under `launcher` (torchrun's flags) in new ones."""
    argv = ["--data-path", data, *MODEL, *SPARSE, "-b", "4", "--weights-path", weights, *flags]
    result = run_script([*launcher, "evaluate.py", *argv]) if launcher else run_in_process("evaluate.py", argv)
    assert_ok(result)
    return result


def test_online_offline_and_bsr_accuracy_agree(data, checkpoint, tmp_path):
    path, train_stdout = checkpoint
    online = evaluate(data, path)
    offline = evaluate(data, path, "--sparsify-weights")
    json_path = str(tmp_path / "bsr.json")
    bsr = evaluate(data, path, "--bsr", "16", "--output-json", json_path)  # --bsr implies --sparsify-weights
    # The last epoch's accuracy printed by train.py is the same model's.
    last_epoch = re.findall(r"^Epoch 1 +Acc@1 ([\d.]+) +Acc@5 ([\d.]+)$", train_stdout, flags=re.MULTILINE)
    assert accuracy(online.stdout) == accuracy(offline.stdout) == accuracy(bsr.stdout) == last_epoch[0]
    result = json.load(open(json_path))
    assert result["mode"] == "bsr"
    assert any(name.endswith("mlp.0") for name in result["bsr_converted"]), result["bsr_converted"]
    assert "BlockSparseLinear" in bsr.stdout


def test_json_output_has_accuracy_timing_and_configuration(data, checkpoint, tmp_path):
    json_path = str(tmp_path / "result.json")
    result = evaluate(data, checkpoint[0], "--sparsify-weights", "--dtype", "bfloat16", "--output-json", json_path)
    saved = json.load(open(json_path))
    acc1, acc5 = accuracy(result.stdout)
    assert f"{saved['acc1']:.3f}" == acc1 and f"{saved['acc5']:.3f}" == acc5
    assert saved["images"] == 20 and saved["timed_batches"] == 4  # 5 batches of 4, the first is warm-up
    assert saved["batch_time_ms"] > 0 and saved["images_per_s"] > 0 and saved["peak_memory_mb"] > 0
    config = saved["config"]
    assert config["model"] == "vit_tiny" and config["dtype"] == "bfloat16" and config["device"] == "cpu"
    assert config["torch"] == torch.__version__ and config["threads"] >= 1
    assert config["flags"]["sparsity_linear"] == 0.75 and config["flags"]["sparsify_weights"] is True
    assert "Model time per batch" in result.stdout and "images/s" in result.stdout


def test_throughput_counts_the_images_actually_timed(data, checkpoint, tmp_path):
    # 20 images in batches of 19: the warm-up takes the full batch, the one timed batch holds a single image.
    json_path = str(tmp_path / "result.json")
    result = evaluate(data, checkpoint[0], "-b", "19", "--output-json", json_path)
    saved = json.load(open(json_path))
    assert saved["timed_batches"] == 1 and saved["timed_images"] == 1, saved
    assert saved["images_per_s"] == pytest.approx(1000 / saved["batch_time_ms"], rel=1e-6), saved
    assert "median of 1 timed batches, 1 images" in result.stdout, result.stdout


class _FirstImageNaN(torch.utils.data.Dataset):
    """A validation set whose first image's input holds a NaN after preprocessing."""

    def __init__(self, dataset):
        self.dataset, self.classes = dataset, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        if index == 0:
            image = image.clone()
            image[0, 0, 0] = float("nan")
        return image, target


def test_accuracy_from_non_finite_inputs_says_how_many_images_held_them(data, checkpoint, tmp_path, monkeypatch):
    import data as data_module

    load_val_data = data_module.load_val_data
    monkeypatch.setattr(data_module, "load_val_data",
                        lambda args: (_FirstImageNaN(load_val_data(args)[0]), load_val_data(args)[1]))
    json_path = str(tmp_path / "result.json")
    result = evaluate(data, checkpoint[0], "--bsr", "16", "--output-json", json_path)
    said = [line for line in result.stdout.splitlines() if line.startswith("Non-finite input:")]
    assert said == ["Non-finite input: 1 of 20 images hold inf or NaN after preprocessing; the accuracy counts their "
                    "predictions as the model gave them (block-sparse kernels skip pruned blocks, so a NaN there need "
                    "not reach the output)"], result.stdout
    assert "Traceback" not in result.stderr
    assert json.load(open(json_path))["nonfinite_images"] == 1
    monkeypatch.setattr(data_module, "load_val_data", load_val_data)
    clean = evaluate(data, checkpoint[0], "--output-json", json_path)
    assert "Non-finite" not in clean.stdout and json.load(open(json_path))["nonfinite_images"] == 0


def test_ctrl_c_is_one_line_and_exit_130(data, checkpoint, monkeypatch):
    import evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C arrives in the middle of the evaluation loop

    monkeypatch.setattr(evaluation, "evaluate", interrupted)
    result = run_in_process("evaluate.py", ["--data-path", data, *MODEL, *SPARSE, "-b", "4", "--weights-path",
                                            checkpoint[0]])
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr
    assert result.stderr.strip() == "Interrupted; the evaluation did not finish and wrote no results", result.stderr


def test_two_processes_print_the_accuracy_of_one(data, checkpoint):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    two = evaluate(data, checkpoint[0], "-b", "3", launcher=launcher)  # 20 images: shards of 10, no padding
    one = evaluate(data, checkpoint[0], "-b", "3")
    assert accuracy(two.stdout) == accuracy(one.stdout)


def test_ema_weights_are_evaluated_with_model_ema(data, checkpoint):
    path, train_stdout = checkpoint
    ema = evaluate(data, path, "--model-ema")
    last_ema = re.findall(r"^Epoch 1 +EMA Acc@1 ([\d.]+) +Acc@5 ([\d.]+)$", train_stdout, flags=re.MULTILINE)
    assert last_ema, train_stdout
    assert accuracy(ema.stdout) == last_ema[0]


def test_original_superblock_checkpoint_loads_with_weights_only(data, checkpoint, tmp_path):
    """The original saved args as an argparse.Namespace, DDP's module. prefix and shift/scale per layer."""
    ours = torch.load(checkpoint[0], weights_only=True)
    state = {}
    for key, value in ours["model"].items():
        state[f"module.{key}"] = value
        if key.endswith(".scores"):
            layer = key[: -len(".scores")]
            state[f"module.{layer}.shift"] = torch.zeros(1)
            state[f"module.{layer}.scale"] = torch.ones(1)
    original = str(tmp_path / "model_299.pth")
    torch.save({"model": state, "args": argparse.Namespace(model="vit_tiny", sparsity_linear=0.75), "epoch": 299},
               original)
    run = evaluate(data, original)
    assert accuracy(run.stdout) == accuracy(evaluate(data, checkpoint[0]).stdout)
    assert "has no checksum" in run.stderr, "a file without a checksum loaded without a notice"


def test_compact_checkpoint_runs_without_sparsity_flags_at_the_same_accuracy(data, checkpoint, tmp_path):
    compact = str(tmp_path / "compact.pth")
    saved = evaluate(data, checkpoint[0], "--bsr", "16", "--save-compact", compact)
    assert re.search(r"Compact checkpoint .*: [\d.]+ MiB, [\d.]+% of the dense weights", saved.stdout), saved.stdout
    # No --sparsity-* flags: the file knows its model and blocks.
    rerun = run_in_process("evaluate.py", ["--data-path", data, "--device", "cpu", "-j", "0", *SIZE, "-b", "4",
                                           "--weights-path", compact])
    assert_ok(rerun)
    assert accuracy(rerun.stdout) == accuracy(saved.stdout)
    assert "BlockSparseLinear" in rerun.stdout


@pytest.fixture(scope="module")
def compact_file(data, checkpoint, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("compact") / "compact.pth")
    evaluate(data, checkpoint[0], "--bsr", "16", "--save-compact", path)
    return path


@pytest.fixture(scope="module")
def int8_compact_file(data, checkpoint, tmp_path_factory):
    """A compact int8 file, written with the int8 kernels' pure-PyTorch reference (no instruction set needed)."""
    path = str(tmp_path_factory.mktemp("compact") / "int8.pth")
    evaluate(data, checkpoint[0], "--bsr", "16", "--quantize", "int8", "--bsr-kernel", "bmm", "--save-compact", path)
    return path


def _malformed(compact_file, tmp_path):
    import checkpoints

    broken = {k: v for k, v in checkpoints.load_checkpoint(compact_file).items() if k != "architecture"}
    checkpoints.save_checkpoint(broken, str(tmp_path / "broken.pth"))
    return str(tmp_path / "broken.pth"), [], "malformed compact checkpoint: 'architecture' must hold"


@pytest.mark.parametrize("case", [
    lambda path, tmp: (path, ["--sparsity-linear", "0.5"], "--sparsity-linear does not apply to compact checkpoint"),
    lambda path, tmp: (path, ["--skip-last-layer-sparsity"], "--skip-last-layer-sparsity does not apply"),
    lambda path, tmp: (path, ["--bsr", "8"], "--bsr 8 contradicts compact checkpoint"),
    lambda path, tmp: (path, ["--bsr", "16", "--quantize", "int8"], "--quantize does not apply to compact checkpoint "
                                                                    f"{path}, which says itself whether its layers "
                                                                    f"are int8 (they are not); drop the flag"),
    lambda path, tmp: (path, ["--val-crop-size", "24"], "for 16-pixel images, not --val-crop-size 24; pass "
                                                        "--val-crop-size 16"),
    _malformed,
], ids=["sparsity_flag", "skip_flag", "other_block_size", "quantize", "other_image_size", "malformed"])
def test_compact_file_refuses_flags_it_would_ignore_and_malformed_content(case, data, compact_file, tmp_path):
    path, flags, expected = case(compact_file, tmp_path)
    result = run_in_process("evaluate.py", ["--data-path", data, "--device", "cpu", "-j", "0", *SIZE, "-b", "4",
                                            "--weights-path", path, *flags])
    assert expected in the_error_line(result), result.stderr


##### int8 (W8A8) #####

INT8_KERNELS = blocksparse_int8.unavailable_reason(16) is None


@pytest.mark.skipif(not INT8_KERNELS, reason="the int8 kernels cannot run on this CPU")
def test_int8_evaluation_writes_a_compact_int8_file_that_evaluates_without_flags(data, checkpoint, tmp_path):
    compact, json_path = str(tmp_path / "int8.pth"), str(tmp_path / "int8.json")
    # kernel fused: every layer int8 (auto keeps the faster of int8 and float per layer, which can vary by run).
    saved = evaluate(data, checkpoint[0], "--bsr", "16", "--quantize", "int8", "--bsr-kernel", "fused",
                     "--save-compact", compact, "--output-json", json_path)
    assert re.search(r"mlp\.0 +kernel=int8/(amx|vnni)", saved.stdout), saved.stdout
    assert ", bsr-int8, float32)" in saved.stdout
    result = json.load(open(json_path))
    assert result["mode"] == "bsr-int8" and result["quantize"] == "int8"
    rerun = run_in_process("evaluate.py", ["--data-path", data, "--device", "cpu", "-j", "0", *SIZE, "-b", "4",
                                           "--weights-path", compact, "--bsr-kernel", "fused"])
    assert_ok(rerun)
    assert f"Compact checkpoint {compact}: vit_tiny, 16x16 blocks, int8 (W8A8) layers" in rerun.stdout
    assert ", bsr-int8, float32)" in rerun.stdout
    assert accuracy(rerun.stdout) == accuracy(saved.stdout), "the compact file holds the same int8 weights"


def test_int8_compact_file_refuses_quantize_flags(data, int8_compact_file):
    for value in ("int8", "none"):
        result = run_in_process("evaluate.py", ["--data-path", data, "--device", "cpu", "-j", "0", *SIZE, "-b", "4",
                                                "--weights-path", int8_compact_file, "--quantize", value])
        assert result.returncode == 2, result.stderr
        assert error_line(result.stderr) == (
            f"evaluate.py: error: --quantize does not apply to compact checkpoint {int8_compact_file}, which says "
            f"itself whether its layers are int8 (they are); drop the flag")


def test_int8_compact_file_runs_its_reference_kernel_anywhere(data, int8_compact_file, monkeypatch):
    monkeypatch.setenv("SUPERBLOCK_HIDE_ISA", "amx,vnni")
    argv = ["--data-path", data, "--device", "cpu", "-j", "0", *SIZE, "-b", "4", "--weights-path", int8_compact_file]
    hidden = run_in_process("evaluate.py", argv)
    assert hidden.returncode == 2 and "Traceback" not in hidden.stderr, hidden.stderr
    last = error_line(hidden.stderr)
    assert last.startswith(f"evaluate.py: error: compact checkpoint {int8_compact_file} (int8 layers) needs the int8 "
                           f"CPU kernels, which cannot run here: they need AMX (amx_int8) or AVX-512 VNNI"), last
    assert last.endswith("; pass --bsr-kernel bmm for the pure-PyTorch reference (slow)"), last
    reference = run_in_process("evaluate.py", [*argv, "--bsr-kernel", "bmm"])
    assert_ok(reference)
    assert re.search(r"mlp\.0 +kernel=int8/bmm", reference.stdout), reference.stdout


def test_quantize_on_a_cpu_without_the_int8_kernels_is_one_line_naming_the_instruction_set(data, checkpoint,
                                                                                            monkeypatch):
    monkeypatch.setenv("SUPERBLOCK_HIDE_ISA", "amx,vnni")  # as on a CPU without them
    result = run_script(["evaluate.py", "--data-path", data, *MODEL, *SPARSE, "-b", "4", "--weights-path",
                         checkpoint[0], "--bsr", "16", "--quantize", "int8"])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = error_line(result.stderr)
    assert last.startswith("evaluate.py: error: --quantize int8 needs the int8 CPU kernels, which cannot run here: "
                           "they need AMX (amx_int8) or AVX-512 VNNI (avx512_vnni);"), last
    assert "AVX-512 VNNI (avx512_vnni)" in last.partition("; ")[2], "the line names what the CPU lacks or hides"
    assert last.endswith("; pass --bsr-kernel bmm for the pure-PyTorch reference (slow), or drop --quantize"), last


##### Bad input: one line, exit status 2 (run in this process: each fails within a second) #####


def _missing_weights(checkpoint, tmp_path):
    return ["--weights-path", str(tmp_path / "gone.pth")], "gone.pth does not exist"


def _truncated_checkpoint(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(checkpoint, "rb").read()[:5000])
    return ["--weights-path", str(truncated)], "cannot load checkpoint"


def _another_model(checkpoint, tmp_path):
    other = tmp_path / "resnet.pth"
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), other)
    return ["--weights-path", str(other)], "does not fit --model vit_tiny"


def _without_stored_args(checkpoint, tmp_path):
    """A copy of the checkpoint without its stored args: only the flags tell its settings."""
    import checkpoints

    state = checkpoints.load_checkpoint(checkpoint)
    del state["args"]
    checkpoints.save_checkpoint(state, str(tmp_path / "no_args.pth"))
    return str(tmp_path / "no_args.pth")


def _other_tile_size(checkpoint, tmp_path):
    return ["--weights-path", _without_stored_args(checkpoint, tmp_path), "--sp-linear-tile-size", "8"], \
        "tile size 16 would fit"


def _dense_flags_for_sparse_checkpoint(checkpoint, tmp_path):
    return ["--weights-path", _without_stored_args(checkpoint, tmp_path), "--sparsity-linear", "0"], "mask for layer"


def _sparsity_contradicting_the_checkpoint(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--sparsity-linear", "0.5"], \
        f"--sparsity-linear 0.5 contradicts --weights-path {checkpoint}, which was trained with --sparsity-linear 0.75"


def _tile_size_contradicting_the_checkpoint(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--sp-linear-tile-size", "8"], \
        "--sp-linear-tile-size 8 contradicts"


def _skip_flag_contradicting_the_checkpoint(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--skip-last-layer-sparsity"], \
        "--skip-last-layer-sparsity on contradicts"


def _flipped_byte(checkpoint, tmp_path):
    corrupt = flip_byte_in_tensor_data(checkpoint, str(tmp_path / "corrupt.pth"))
    return ["--weights-path", corrupt], f"{corrupt} is corrupt: its checksum does not match; re-copy or re-create it"


def _bsr_without_weights(checkpoint, tmp_path):
    return ["--bsr", "16"], "no weights to evaluate: pass --weights-path"


def _tile_size_leaving_one_tile_per_layer(checkpoint, tmp_path):
    return ["--weights-path", _without_stored_args(checkpoint, tmp_path), "--sp-linear-tile-size", "1024"], \
        "--sp-linear-tile-size 1024 leaves every Linear layer too few tiles to prune any"


def _block_size_dividing_no_layer(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--bsr", "48"], "--bsr 48 converted no layer"


def _model_ema_without_weights(checkpoint, tmp_path):
    return ["--model-ema"], "--model-ema"


def _save_compact_without_bsr(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--save-compact", str(tmp_path / "c.pth")], "--save-compact"


def _another_image_size(checkpoint, tmp_path):
    return ["--weights-path", _without_stored_args(checkpoint, tmp_path), "--val-crop-size", "24"], \
        "was it written for another image size?"


def _image_size_contradicting_the_checkpoint(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--val-crop-size", "24"], \
        "--val-crop-size 24 contradicts --weights-path"


def _image_size_off_the_patch_grid(checkpoint, tmp_path):
    return ["--weights-path", _without_stored_args(checkpoint, tmp_path), "--val-crop-size", "18"], \
        "--val-crop-size 18 is not a multiple of vit_tiny's patch size 4; pass 16 or 20"


def _model_contradicting_the_checkpoint(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--model", "vit_b_16"], \
        "--model vit_b_16 contradicts --weights-path"


def _compact_of_a_newer_format(checkpoint, tmp_path):
    import compact

    newer = tmp_path / "newer.pth"
    torch.save({"format": compact.COMPACT_FORMAT, "version": compact.COMPACT_VERSION + 1,
                "architecture": {"model": "vit_tiny", "num_classes": 4, "image_size": 16}, "blocksize": 16,
                "dense": {}, "sparse": {}}, newer)
    return ["--weights-path", str(newer)], "newer than this SuperBlock reads"


def _unknown_bsr_kernel(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--bsr", "16", "--bsr-kernel", "bmm_t"], "invalid choice: 'bmm_t'"


def _quantize_without_bsr(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--quantize", "int8"], "--quantize int8 quantizes the layers --bsr converts"


def _quantize_with_blocks_of_8(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--bsr", "8", "--quantize", "int8"], \
        "--quantize int8 takes --bsr a multiple of 16 (the int8 kernels' blocks), not 8"


def _quantize_with_the_torch_kernel(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--bsr", "16", "--quantize", "int8", "--bsr-kernel", "torch"], \
        "--quantize int8 runs with --bsr-kernel auto, fused, bmm, not torch, or drop --quantize"


def _unknown_quantize(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--bsr", "16", "--quantize", "int4"], "invalid choice: 'int4'"


def _a_file(tmp_path):
    (tmp_path / "afile.txt").write_text("notes")
    return str(tmp_path / "afile.txt")


def _output_json_through_a_file(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--output-json", os.path.join(_a_file(tmp_path), "x", "r.json")], \
        "afile.txt is a file, not a folder"


def _save_compact_through_a_file(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--bsr", "16", "--save-compact",
            os.path.join(_a_file(tmp_path), "c.pth")], "afile.txt is a file, not a folder"


def _plot_masks_through_a_file(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--plot-masks", os.path.join(_a_file(tmp_path), "m.png")], \
        "afile.txt is a file, not a folder"


def _output_json_is_a_folder(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--output-json", str(tmp_path)], "is a folder; pass a file name"


def _weights_path_is_a_folder(checkpoint, tmp_path):
    return ["--weights-path", str(tmp_path)], "is a folder; pass a checkpoint file in it"


def _text_file_as_weights(checkpoint, tmp_path):
    return ["--weights-path", _a_file(tmp_path)], "afile.txt is not a PyTorch checkpoint"


def _random_bytes_as_weights(checkpoint, tmp_path):
    (tmp_path / "random.pth").write_bytes(bytes(range(7, 256)) * 12)  # torch advises weights_only=False here
    return ["--weights-path", str(tmp_path / "random.pth")], "random.pth is not a PyTorch checkpoint"


def _pickle_of_other_objects(checkpoint, tmp_path):
    import datetime

    torch.save({"trained": datetime.date(2026, 1, 1)}, tmp_path / "objects.pth")
    return ["--weights-path", str(tmp_path / "objects.pth")], "holds Python objects other than tensors"


def _data_path_is_a_file(checkpoint, tmp_path):
    return ["--weights-path", checkpoint, "--data-path", _a_file(tmp_path)], "afile.txt is a file, not a folder"


BAD_INPUTS = [_output_json_through_a_file, _save_compact_through_a_file, _plot_masks_through_a_file,
              _output_json_is_a_folder, _weights_path_is_a_folder, _text_file_as_weights, _random_bytes_as_weights,
              _pickle_of_other_objects, _data_path_is_a_file, _unknown_bsr_kernel, _save_compact_without_bsr, _compact_of_a_newer_format, _another_image_size, _missing_weights, _truncated_checkpoint, _another_model, _other_tile_size,
              _dense_flags_for_sparse_checkpoint, _block_size_dividing_no_layer, _model_ema_without_weights,
              _sparsity_contradicting_the_checkpoint, _tile_size_contradicting_the_checkpoint,
              _skip_flag_contradicting_the_checkpoint, _flipped_byte, _bsr_without_weights,
              _tile_size_leaving_one_tile_per_layer, _quantize_without_bsr, _quantize_with_blocks_of_8,
              _quantize_with_the_torch_kernel, _unknown_quantize, _image_size_contradicting_the_checkpoint,
              _image_size_off_the_patch_grid, _model_contradicting_the_checkpoint]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_exits_2_with_one_error_line(case, data, checkpoint, tmp_path):
    flags, expected = case(checkpoint[0], tmp_path)
    argv = ["--data-path", data, *MODEL, *SPARSE, "-b", "4"]
    # Later flags win: the case's flags override the defaults above.
    result = run_in_process("evaluate.py", [*argv, *flags])
    stdout, stderr = result.stdout, result.stderr
    error_line = the_error_line(result)
    assert expected in error_line, stderr
    assert "usage:" not in stderr, "the error drowns in the usage"
    assert "Traceback" not in stderr and "weights_only" not in stderr, stderr  # never advise full unpickling
    assert "Acc@1" not in stdout, "the error came after the evaluation"
    assert torch.is_grad_enabled(), "evaluate.py switched autograd off for the whole process"


def test_pretrained_weights_of_another_class_count_exit_2_before_building_a_new_head(local_resnet18_weights, data):
    result = run_in_process("evaluate.py", ["--data-path", data, "--model", "resnet18", "--device", "cpu", "-j", "0",
                                            *SIZE, "--weights", "ResNet18_Weights.IMAGENET1K_V1"])
    status, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert status == 2, stderr
    assert error_line(stderr).endswith(
        f"--weights ResNet18_Weights.IMAGENET1K_V1 classify 1000 classes and {data} has 4; evaluating them would "
        "measure an untrained classifier: fine-tune them first (train.py --weights ResNet18_Weights.IMAGENET1K_V1), "
        "then evaluate that checkpoint with --weights-path"), stderr
    assert "Traceback" not in stderr and "Notice:" not in stdout and "Acc@1" not in stdout, stdout


def test_checkpoint_of_this_project_evaluates_without_sparsity_flags(data, checkpoint, tmp_path):
    json_path = str(tmp_path / "result.json")
    # No --sparsity-* flags: the checkpoint's stored args hold them.
    bare = run_in_process("evaluate.py", ["--data-path", data, *MODEL, "-b", "4", "--weights-path", checkpoint[0],
                                          "--output-json", json_path])
    assert_ok(bare)
    assert accuracy(bare.stdout) == accuracy(evaluate(data, checkpoint[0]).stdout)
    flags = json.load(open(json_path))["config"]["flags"]
    assert (flags["sparsity_linear"], flags["sp_linear_tile_size"]) == (0.75, 16), flags


def test_model_and_image_size_come_from_the_checkpoint_when_left_out(data, checkpoint):
    # No --model, --val-crop-size or --val-resize-size: the checkpoint's stored args hold them.
    bare = run_in_process("evaluate.py", ["--data-path", data, "--device", "cpu", "-j", "0", "-b", "4",
                                          "--weights-path", checkpoint[0]])
    assert_ok(bare)
    assert accuracy(bare.stdout) == accuracy(evaluate(data, checkpoint[0]).stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default on a machine without CUDA")
def test_device_defaults_to_the_cpu_without_cuda_and_says_so(data, checkpoint):
    run = run_in_process("evaluate.py", ["--data-path", data, *[f for f in MODEL if f not in ("--device", "cpu")],
                                         "-b", "4", "--weights-path", checkpoint[0]])
    assert_ok(run)
    assert run.stdout.splitlines()[0] == "Device: cpu (no CUDA device found; --device picks another)", run.stdout


def test_checkpoint_from_inside_a_sparsity_ramp_says_which_sparsity_it_is_evaluated_at(data, checkpoint, tmp_path):
    import checkpoints

    state = checkpoints.load_checkpoint(checkpoint[0])
    state["epoch"] = 0
    state["args"] = {**state["args"], "sparsity_warmup_epochs": 2, "sparsity_schedule": "cubic"}
    del state["sparsity_fraction"]  # as train.py wrote checkpoints before it stored the fraction
    mid_ramp = str(tmp_path / "model_0.pth")
    checkpoints.save_checkpoint(state, mid_ramp)
    json_path = str(tmp_path / "result.json")
    run = evaluate(data, mid_ramp, "--output-json", json_path)
    said = [line for line in run.stdout.splitlines() if line.startswith("Sparsity:")]
    assert len(said) == 1 and "after epoch 0 of its 2-epoch sparsity ramp" in said[0], run.stdout
    assert "evaluated at the target sparsities" in said[0], said
    assert json.load(open(json_path))["sparsity_note"] == said[0]
    after_ramp = run_in_process("evaluate.py", ["--data-path", data, *MODEL, "-b", "4", "--weights-path",
                                                checkpoint[0]])
    assert "Sparsity:" not in after_ramp.stdout, "a checkpoint after the ramp (or without one) needs no note"


def test_checkpoint_recording_its_ramp_fraction_is_evaluated_at_that_sparsity(data, checkpoint, tmp_path):
    import checkpoints

    state = checkpoints.load_checkpoint(checkpoint[0])
    state["epoch"] = 0
    state["args"] = {**state["args"], "sparsity_warmup_epochs": 2, "sparsity_schedule": "cubic"}
    state["sparsity_fraction"] = 0.5
    mid_ramp = str(tmp_path / "model_0.pth")
    checkpoints.save_checkpoint(state, mid_ramp)
    run = evaluate(data, mid_ramp)
    said = [line for line in run.stdout.splitlines() if line.startswith("Sparsity:")]
    assert len(said) == 1 and "its masks at 0.500 of the target sparsities; evaluated there" in said[0], run.stdout
    # Half of the target 0.75: the MLP Linears (512x128, 128 tiles of 16x16) keep 80 of their 128 tiles.
    assert re.search(r"mlp\.0 +\S+ +512x128 .*0\.375", run.stdout), run.stdout
    # At 0.375 no MLP Linear reaches apply_bsr's min_sparsity 0.5: --bsr says so, not that the block size is wrong.
    refused = run_in_process("evaluate.py", ["--data-path", data, *MODEL, "-b", "4", "--weights-path", mid_ramp,
                                             "--bsr", "16"])
    assert refused.returncode == 2 and "no layer is sparse enough" in error_line(refused.stderr), refused.stderr


def test_attention_sparsity_end_to_end_through_train_and_evaluate(data, tmp_path):
    flags = [*SPARSE, "--sparsity-attention", "0.75", "--sp-attention-tile-size", "16"]
    out = str(tmp_path / "attention")
    trained = run_script(["train.py", "--data-path", data, *MODEL, *flags, "-b", "8", "--train-crop-size", "16",
                          "--epochs", "1", "--output-dir", out])
    assert_ok(trained)
    assert re.search(r"self_attention\.in_proj +SupermaskLinear +384x128 +16 +0\.750", trained.stdout), trained.stdout
    weights = os.path.join(out, "checkpoint.pth")
    online = run_in_process("evaluate.py", ["--data-path", data, *MODEL, *flags, "-b", "4", "--weights-path", weights])
    bsr = run_in_process("evaluate.py", ["--data-path", data, *MODEL, *flags, "-b", "4", "--weights-path", weights,
                                         "--bsr", "16"])
    assert_ok(online)
    assert_ok(bsr)
    assert accuracy(online.stdout) == accuracy(bsr.stdout)
    assert re.search(r"self_attention\.in_proj +kernel=", bsr.stdout) and re.search(
        r"self_attention\.out_proj +kernel=", bsr.stdout), bsr.stdout


def test_bsr_kernel_choices_are_blocksparse_kernels():
    import blocksparse
    import evaluate

    assert evaluate.BSR_KERNELS == blocksparse.KERNELS


def test_outputs_into_missing_folders_are_created(data, checkpoint, tmp_path):
    new = tmp_path / "new"
    run = evaluate(data, checkpoint[0], "--bsr", "16", "--output-json", str(new / "x" / "r.json"),
                   "--save-compact", str(new / "y" / "c.pth"), "--plot-masks", str(new / "z" / "m.png"))
    assert json.load(open(new / "x" / "r.json"))["acc1"] == float(accuracy(run.stdout)[0])
    assert (new / "y" / "c.pth").stat().st_size > 0 and (new / "z" / "m.png").stat().st_size > 0
