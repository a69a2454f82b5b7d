"""Shared test helpers: a tiny synthetic ImageFolder, running the CLI scripts as a user does, small models."""
import contextlib
import copy
import io
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import numpy as np
import torch
import torchvision
from torch import nn

from supermask import SupermaskLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image_folder(root, *, classes=3, train_per_class=8, val_per_class=3, size=16, seed=0):
    """Write root/train/<class>/*.png and root/val/<class>/*.png: each class a bright square at its own place."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
                offset = c * size // (classes + 1)
                img[offset : offset + size // 3, offset : offset + size // 3] = 255
                Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    return root


def at_one_and_two_threads(fn):
    """(fn() with torch at one thread, fn() at two): results that must not depend on the thread count."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        return one, fn()
    finally:
        torch.set_num_threads(threads)


def free_port():
    """A TCP port that nothing listens on right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(args, *, timeout=180):
    """Run `python <args>` from the repository root with one thread per process; returns CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_in_process(script, argv):
    """Run `python SCRIPT ARGV` in this process (its __main__ block), as run_script does in a new one.

    Seconds faster than run_script: no new interpreter importing torch. Returns a CompletedProcess whose
    returncode is the exit status (0 when the script returns). Warnings are ignored, as run_script does.
    """
    out, err, saved_argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess([script, *argv], status, out.getvalue(), err.getvalue())


def start_script(args):
    """Start `python <args>` as run_script does, in a session of its own (so that a test can signal its whole
    process group, as Ctrl-C on a terminal does), with Ctrl-C's default action even where the tests run as a
    background job (a shell starts those with SIGINT ignored, which children inherit); returns the Popen."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def straight_and_resumed_runs(common, tmp_path_factory):
    """Run `python COMMON` to the end, and again resumed (--resume auto) from the first run's model_0.pth.

    An interrupted run leaves exactly model_0.pth behind (checkpoints are atomic), so copying that file into an
    empty folder is the state a run stopped after its first epoch leaves. Returns (straight dir, resumed dir,
    {"straight": result, "resumed": result}); both runs must succeed.
    """
    straight = str(tmp_path_factory.mktemp("straight"))
    resumed = str(tmp_path_factory.mktemp("resumed"))
    runs = {"straight": run_script([*common, "--output-dir", straight])}
    assert_ok(runs["straight"])
    shutil.copy(os.path.join(straight, "model_0.pth"), resumed)
    runs["resumed"] = run_script([*common, "--output-dir", resumed, "--resume", "auto"])
    assert_ok(runs["resumed"])
    return straight, resumed, runs


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def the_error_line(result):
    """The one "error:" line of a script that refused its input: exit status 2, that line, and no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def flip_byte_in_tensor_data(path, out):
    """Copy the torch.save file `path` to `out` with one bit flipped in the middle of its largest tensor's bytes.

    torch.save writes a zip archive with one stored (uncompressed) record per tensor storage; the flipped byte
    is found through the record's local header, so it lies in tensor data, not in the archive's bookkeeping.
    """
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(open(path, "rb").read())
    name_length, extra_length = struct.unpack("<HH", data[largest.header_offset + 26 : largest.header_offset + 30])
    offset = largest.header_offset + 30 + name_length + extra_length + largest.file_size // 2
    data[offset] ^= 0x10
    with open(out, "wb") as f:
        f.write(data)
    return out


##### Small models for the library's tests #####


def tiny_vit(num_classes=10):
    """A small torchvision ViT with a random head (torchvision zero-initialises it, which hides bugs)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def tiny_deit(depth):
    """timm's DeiT-Tiny at 32 pixels with ``depth`` blocks, 5 classes and a random head, frozen in eval mode; and the
    converted copy ``apply_bsr(kernel="fused")`` makes of it, with its BsrResult."""
    import blocksparse
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5, depth=depth)
    nn.init.normal_(model.head.weight, std=0.5)
    model.eval().requires_grad_(False)
    converted = copy.deepcopy(model)
    return model, converted, blocksparse.apply_bsr(converted, 16, min_sparsity=0.0, kernel="fused")


def tiny_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7)


@torch.no_grad()
def assert_every_mask_acts(model, x):
    """Push each Supermask layer's highest-scoring tile below every other: the output must change. Returns names."""
    reference = model(x)
    checked = []
    for name, layer in model.named_modules():
        if not isinstance(layer, SupermaskLinear):
            continue
        flat = layer.scores.view(-1)
        top = flat.argmax()
        saved = flat[top].clone()
        flat[top] = flat.min() - 1
        changed = model(x)
        flat[top] = saved
        assert not torch.allclose(changed, reference), f"mask of {name} does not act on the output"
        checked.append(name)
    torch.testing.assert_close(model(x), reference)
    return checked
