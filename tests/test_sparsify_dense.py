"""Sparsifying a dense model with train.py: magnitude score init, the sparsity ramp, distillation."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import distillation
from helpers import run_script, straight_and_resumed_runs
from test_train import TINY, assert_ok, data, load, run_cli_in_process  # noqa: F401 (data: a fixture)

SPARSE = ["--sparsity-linear", "0.8", "--sp-linear-tile-size", "8", "--skip-last-layer-sparsity"]
RAMP = ["--sparsity-warmup-epochs", "2", "--sparsity-schedule", "cubic"]


@pytest.fixture(scope="module")
def dense_checkpoint(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dense"))
    assert_ok(run_script(["train.py", "--data-path", data, *TINY, "--epochs", "1", "--output-dir", out]))
    return os.path.join(out, "checkpoint.pth")


@pytest.fixture(scope="module")
def ramp_runs(data, dense_checkpoint, tmp_path_factory):
    """From the dense checkpoint with ramp and distillation: 3 epochs straight, and resumed after epoch 0."""
    common = ["train.py", "--data-path", data, *TINY, *SPARSE, *RAMP, "--distill", "--weights-path", dense_checkpoint,
              "--epochs", "3", "--use-deterministic-algorithms"]
    return straight_and_resumed_runs(common, tmp_path_factory)


def test_starting_from_dense_weights_uses_magnitude_scores(ramp_runs, dense_checkpoint):
    _, _, runs = ramp_runs
    assert "Mask scores: magnitude initialisation (from the dense starting weights)" in runs["straight"].stdout


def test_scratch_run_uses_kaiming_scores(data, tmp_path):
    result = run_script(["train.py", "--data-path", data, *TINY, *SPARSE, "--epochs", "1", "--test-only"])
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
    expected = [0.8 * sparsity_schedule("cubic", (epoch + 1) * steps - 1, 2 * steps) for epoch in range(2)] + [0.8]
    assert logged == pytest.approx(expected, abs=1e-3), runs["straight"].stdout


def test_teacher_is_frozen_and_out_of_checkpoints(ramp_runs, data, tmp_path):
    straight, _, _ = ramp_runs
    with_teacher = load(os.path.join(straight, "checkpoint.pth"))
    assert not any("teacher" in key for key in with_teacher["model"])
    out = str(tmp_path / "no_distill")
    assert_ok(run_script(["train.py", "--data-path", data, *TINY, *SPARSE, "--epochs", "1", "--output-dir", out]))
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


def test_distill_without_dense_start_exits_2(data, tmp_path, monkeypatch, capsys):
    status, stderr = run_cli_in_process(
        ["--data-path", data, *TINY, *SPARSE, "--distill", "--epochs", "1", "--output-dir", str(tmp_path)],
        monkeypatch, capsys)
    assert status == 2 and "--distill learns from the dense model" in stderr, stderr


def test_ramp_longer_than_training_exits_2(data, tmp_path, monkeypatch, capsys):
    status, stderr = run_cli_in_process(
        ["--data-path", data, *TINY, *SPARSE, "--sparsity-warmup-epochs", "5", "--epochs", "2"], monkeypatch, capsys)
    assert status == 2 and "--sparsity-warmup-epochs 5" in stderr, stderr
