"""cli.py: the one __main__ of the scripts, and the library's independence from it."""
import argparse
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
    assert capsys.readouterr().err.strip().splitlines()[-1] == "script.py: error: --fail x is wrong; pass another"


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
