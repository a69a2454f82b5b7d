"""checkpoints.py: atomic writes, checksums, and Ctrl-C during a write."""
import os
import signal

import pytest
import torch

import checkpoints


def test_checksum_is_the_same_for_the_same_content_and_changes_with_any_value():
    state = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": {"lr": 0.1, "steps": [1, 2]},
             "flag": torch.tensor(True)}
    reordered = {"flag": state["flag"].clone(), "a": {"steps": [1, 2], "lr": 0.1}, "b": state["b"].clone()}
    assert checkpoints.checkpoint_digest(state) == checkpoints.checkpoint_digest(reordered)
    changed_value = {**state, "b": state["b"].clone().index_fill_(1, torch.tensor([2]), 7.0)}
    changed_shape = {**state, "b": state["b"].reshape(3, 2)}
    changed_dtype = {**state, "b": state["b"].view(torch.float16)}
    changed_plain = {**state, "a": {"lr": 0.2, "steps": [1, 2]}}
    digests = {checkpoints.checkpoint_digest(s) for s in (state, changed_value, changed_shape, changed_dtype, changed_plain)}
    assert len(digests) == 5, "a change in a value, shape, dtype or plain entry left the checksum unchanged"


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    checkpoints.save_checkpoint({"epoch": 0}, path)

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint({"epoch": 1}, path)
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path) == {"epoch": 0}
    assert os.listdir(tmp_path) == ["checkpoint.pth"], "the temporary file was left behind"


def test_checkpoint_without_checksum_loads_with_a_notice(tmp_path, capsys):
    torch.save({"epoch": 3}, tmp_path / "old.pth")  # as written before checkpoints carried a checksum
    assert checkpoints.load_checkpoint(str(tmp_path / "old.pth")) == {"epoch": 3}
    assert "has no checksum" in capsys.readouterr().err


def test_ctrl_c_during_a_checkpoint_write_waits_for_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    real_save = torch.save

    def save_interrupted_midway(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the file is being written
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_interrupted_midway)
    # Ctrl-C as on a terminal, also where the tests run as a background job (started with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save_checkpoint({"epoch": 4, "w": torch.ones(3)}, path)
        monkeypatch.undo()
        assert checkpoints.load_checkpoint(path)["epoch"] == 4, "the interrupt cut the checkpoint short"
        assert os.listdir(tmp_path) == ["checkpoint.pth"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # save_checkpoint put it back
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_file_mode_follows_the_umask_as_torch_save_does(umask, tmp_path):
    previous = os.umask(umask)
    try:
        checkpoints.save_checkpoint({"epoch": 0}, str(tmp_path / "checkpoint.pth"))
        torch.save({"epoch": 0}, str(tmp_path / "plain.pth"))
    finally:
        os.umask(previous)
    mode = os.stat(tmp_path / "checkpoint.pth").st_mode & 0o777
    assert mode == 0o666 & ~umask == os.stat(tmp_path / "plain.pth").st_mode & 0o777, oct(mode)


def save_into_a_full_disk(obj, f, *args, **kwargs):
    """What torch.save does when the disk fills: the write's OSError, then the zip writer's RuntimeError."""
    import errno

    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_full_disk_is_one_input_error_naming_the_file_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    checkpoints.save_checkpoint({"epoch": 0}, path)
    monkeypatch.setattr(torch, "save", save_into_a_full_disk)
    with pytest.raises(checkpoints.DiskFullError) as caught:
        checkpoints.save_checkpoint({"epoch": 1}, path)
    monkeypatch.undo()
    assert str(caught.value) == f"no space left on the device to write {path}; the earlier {path} is unchanged"
    assert checkpoints.load_checkpoint(path) == {"epoch": 0}
    assert os.listdir(tmp_path) == ["checkpoint.pth"], "the temporary file was left behind"


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="something else"):
        checkpoints.save_checkpoint({"epoch": 1}, str(tmp_path / "checkpoint.pth"))
