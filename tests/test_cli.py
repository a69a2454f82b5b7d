"""cli.py: the one __main__ of the scripts, and the library's independence from it."""
import argparse
import re
import subprocess
import sys

import pytest
import torch

import cli
import utils
from helpers import ROOT


def parser():
    parser = argparse.ArgumentParser(prog="script.py")
    parser.add_argument("--fail", default=None)
    return parser


def test_run_returns_what_main_returns():
    assert cli.run(lambda args: ("ran", args.fail), parser(), ["--fail", "no"]) == ("ran", "no")


def test_input_error_exits_2_with_its_one_line(capsys):
    def main(args):
        raise utils.InputError(f"--fail {args.fail} is wrong; pass another")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser(), ["--fail", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["script.py: error: --fail x is wrong; pass another",
                                                            "Try 'script.py --help' for the flags."]


def test_a_malformed_flag_is_its_error_and_a_pointer_to_help_not_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda args: None, parser(), ["--no-such-flag"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["script.py: error: unrecognized arguments: --no-such-flag",
                                                            "Try 'script.py --help' for the flags."]


@pytest.mark.parametrize("model,size,expected", [
    ("vit_tiny", 18, "--train-crop-size 18 is not a multiple of vit_tiny's patch size 4; pass 16 or 20"),
    ("vit_b_16", 30, "--train-crop-size 30 is not a multiple of vit_b_16's patch size 16; pass 16 or 32"),
    ("vit_h_14", 10, "--train-crop-size 10 is not a multiple of vit_h_14's patch size 14; pass 14"),
    ("vit_tiny", 16, None), ("vit_b_32", 224, None), ("resnet18", 18, None),
])
def test_vit_image_size_must_be_a_multiple_of_its_patch_size(model, size, expected):
    if expected is None:
        cli.check_image_size(model, size, "--train-crop-size")
        return
    with pytest.raises(utils.InputError) as error:
        cli.check_image_size(model, size, "--train-crop-size")
    assert str(error.value) == expected


def flag_helps(parser):
    """Each flag's entry in the parser's help, on one line ("--flag METAVAR help text")."""
    entries = re.split(r"\n  (?=-)", parser.format_help().split("\noptions:", 1)[1])[1:]
    return [" ".join(entry.split("\n\n")[0].split()) for entry in entries]


def test_help_states_each_default_once():
    import benchmark
    import evaluate
    import train

    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    cli.add_data_args(parser)
    cli.add_model_args(parser)
    cli.add_supermask_args(parser)
    for script_parser in (train.get_args_parser(), evaluate.get_args_parser(), benchmark.get_args_parser(), parser):
        for entry in flag_helps(script_parser):
            if entry.startswith("-h, --help"):
                continue
            assert entry.count("default:") == 1, entry  # each states its default, once
            assert "(default: False)" not in entry and "(default: None)" not in entry, entry
            assert "(default: )" not in entry and "(None:" not in entry, entry


def test_help_says_when_the_dataset_cache_is_reused_and_what_weights_take():
    helps = {entry.split()[0]: entry for entry in flag_helps(__import__("train").get_args_parser())}
    assert "reused while the folder tree is unchanged" in helps["--cache-dataset"], helps["--cache-dataset"]
    assert "DEFAULT" in helps["--weights"] and "replaces their classifier" in helps["--weights"], helps["--weights"]


def test_device_defaults_to_cuda_where_it_exists_else_the_cpu():
    parser = argparse.ArgumentParser()
    cli.add_model_args(parser)
    assert parser.parse_args([]).device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_ctrl_c_prints_the_scripts_message_and_exits_130(capsys):
    def main(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser(), [], interrupted=lambda: "Interrupted; nothing lost")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "Interrupted; nothing lost"


def test_ctrl_c_without_a_message_stays_a_keyboard_interrupt():
    def main(args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.run(main, parser(), [])


def test_other_errors_are_not_hidden():
    def main(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(main, parser(), [])


def test_error_raised_in_a_data_loader_worker_keeps_its_own_line():
    # A worker's exception reaches the main process with the worker's traceback as its message.
    wrapped = utils.InputError("Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                               "call last):\n  File ...\nutils.InputError: cannot read image x.png; delete it")
    assert cli.user_error_message(wrapped) == "cannot read image x.png; delete it"


def test_autocast_is_bfloat16_on_the_cpu_and_nothing_when_off():
    cpu = torch.device("cpu")
    with cli.autocast(True, cpu)():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with cli.autocast(False, cpu)():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_the_library_imports_no_script_and_no_command_line_layer():
    code = ("import sys, supermask, blocksparse, attention, compact, models, checkpoints, evaluation; "
            "print(sorted(m for m in ('train', 'evaluate', 'benchmark', 'cli', 'data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_train_refuses_a_vit_crop_off_the_patch_grid_before_any_work(tmp_path):
    argv = ["train.py", "--model", "vit_tiny", "--device", "cpu", "--train-crop-size", "18", "--val-crop-size", "18",
            "--data-path", str(tmp_path / "no-data"), "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["train.py: error: --train-crop-size 18 is not a multiple of vit_tiny's patch size 4; pass 16 "
                      "or 20"], proc.stderr
    assert not (tmp_path / "out").exists(), "work started before the refusal"
