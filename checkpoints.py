"""Checkpoints: atomic writes, checksums verified on load, the files of a run, and the random generators' state."""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import signal
import sys
import tempfile
import threading

import numpy as np
import torch

from utils import InputError, is_main_process


CHECKSUM_KEY = "sha256"  # the digest's entry beside the checkpoint's own
_unchecked_notified = set()  # the paths whose "no checksum" notice was printed


def checkpoint_digest(state):
    """SHA-256 of a checkpoint's content: each tensor's place, dtype, shape and bytes, and the plain values.

    The walk is in a fixed order (dict keys sorted), so the same content gives the same digest in any process;
    tensor bytes are hashed in one call per tensor, so a checkpoint hashes at memory speed.
    """
    digest = hashlib.sha256()
    _update_digest(digest, "", state)
    return digest.hexdigest()


def _update_digest(digest, place, value):
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{place}=tensor:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the raw bytes of any dtype, numpy's buffer, no copy
    elif isinstance(value, dict):
        digest.update(f"{place}=dict:{len(value)};".encode())
        for key in sorted(value, key=repr):
            _update_digest(digest, f"{place}/{key!r}", value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{place}={type(value).__name__}:{len(value)};".encode())
        for index, item in enumerate(value):
            _update_digest(digest, f"{place}[{index}]", item)
    elif isinstance(value, argparse.Namespace):
        _update_digest(digest, f"{place}.namespace", vars(value))
    elif isinstance(value, (set, frozenset)):
        # A set's order, and so its repr, changes with string hash seeds.
        _update_digest(digest, f"{place}.set", sorted(value, key=repr))
    else:  # numbers, strings, None, dtypes: their repr round-trips through pickle
        digest.update(f"{place}={type(value).__name__}:{value!r};".encode())


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt.

    A KeyboardInterrupt inside torch.save makes its zip writer fail on exit with a RuntimeError that replaces
    the interrupt (a traceback and exit 1), or abort the process; deferred, the write completes first. Only the
    main thread can set signal handlers, and a handler set by someone else (or a nested block) is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def with_checksum(state):
    """`state` (a dict) with its checkpoint_digest under CHECKSUM_KEY, as save_checkpoint writes it."""
    if not isinstance(state, dict):
        return state
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    state[CHECKSUM_KEY] = checkpoint_digest(state)
    return state


def save_checkpoint(state, path, *, checksum=True):
    """torch.save `state` to `path` atomically: a crash or Ctrl-C leaves the previous file intact.

    A dict `state` is saved with its checkpoint_digest under CHECKSUM_KEY (unless checksum=False), which
    load_checkpoint verifies. The data goes to a temporary file in the same folder (same file system, so the
    rename is atomic), which is flushed to disk and then renamed over `path`.
    """
    if checksum:
        state = with_checksum(state)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode torch.save on a path would (0666 less the umask).
        os.fchmod(fd, 0o666 & ~_current_umask())
        with deferred_interrupt(), os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp_path, path)
    except BaseException as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if _is_disk_full(e):
            kept = f"the earlier {path} is unchanged" if os.path.exists(path) else f"no earlier {path} existed"
            raise DiskFullError(f"no space left on the device to write {path}; {kept}", path=path) from None
        raise


class DiskFullError(InputError):
    """A checkpoint write failed because its file system is full (or over quota); `path` is the file not written."""

    def __init__(self, message, *, path):
        super().__init__(message)
        self.path = path


def _is_disk_full(error):
    """True when `error`, or an error it arose from, is ENOSPC or EDQUOT.

    torch.save's zip writer reports a short write as a RuntimeError ("unexpected pos ..."), raised while the
    OSError of the failed write is being handled, so that OSError is its __context__.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _current_umask():
    """The process's umask (read by setting it, as POSIX offers no getter, and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path):
    """Load a checkpoint with torch.load(weights_only=True) and verify its checksum; bad files are InputErrors.

    torch.load reads most flipped bytes without complaint, hence the digest save_checkpoint stores; it is
    removed from the returned dict. Files without one (written before it existed, or by other tools) load with
    a notice. The original SuperBlock stored its args as an argparse.Namespace, which is allowed here too.
    """
    if os.path.isdir(path):
        raise InputError(f"checkpoint {path} is a folder, not a file; pass a checkpoint file in it, e.g. "
                         f"{os.path.join(path, 'checkpoint.pth')}")
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} does not exist; check the path (or use --resume auto)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise InputError(_unloadable_message(path, e)) from None
    if isinstance(checkpoint, dict) and CHECKSUM_KEY in checkpoint:
        if checkpoint.pop(CHECKSUM_KEY) != checkpoint_digest(checkpoint):
            raise InputError(f"checkpoint {path} is corrupt: its checksum does not match; re-copy or re-create it")
    elif path not in _unchecked_notified and is_main_process():
        _unchecked_notified.add(path)
        print(f"Notice: {path} has no checksum (written by an older SuperBlock or another tool), so corruption "
              f"in it cannot be detected", file=sys.stderr, flush=True)
    return checkpoint


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format
_PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later: torch.save's legacy format, or a plain pickle


def _unloadable_message(path, error):
    """Why torch.load(weights_only=True) could not read `path`, in words that fit the file.

    torch's own messages can mislead here: a text file gives a bare KeyError number, and random bytes or a
    pickle of other objects get advice to retry with weights_only=False, i.e. to run whatever code the file holds.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    unsafe = "Weights only load failed" in str(error)  # torch's message for globals it does not allow
    objects = (f"cannot load checkpoint {path}: it holds Python objects other than tensors and plain values, which "
               f"are not unpickled because that can run arbitrary code")
    if head.startswith(_ZIP_MAGIC):
        if unsafe:
            return f"{objects}; save its tensors (a state_dict) with torch.save instead"
        detail = str(error).strip().split(". ")[0] or type(error).__name__
        return f"cannot load checkpoint {path}: the file is truncated or damaged ({detail}); re-copy or re-create it"
    if head.startswith(_PICKLE_MAGIC):
        if unsafe:  # a pickle of other objects, or bytes that only look like one
            return f"{objects} (or it is not a PyTorch checkpoint at all)"
        return f"cannot load checkpoint {path}: the file is truncated or damaged; re-copy or re-create it"
    return (f"{path} is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle); pass a .pth file "
            f"written by train.py or torch.save")


_EPOCH_FILE = re.compile(r"model_(\d+)\.pth")
# save_checkpoint's temporary files (mkstemp: "<name>." + random + ".tmp"), left behind by a killed write.
_TMP_FILE = re.compile(r"(checkpoint|model_\d+)\.pth\..+\.tmp")


def epoch_files(output_dir):
    """{epoch: path} of the model_<epoch>.pth files in output_dir."""
    if not output_dir or not os.path.isdir(output_dir):
        return {}
    matches = (_EPOCH_FILE.fullmatch(name) for name in os.listdir(output_dir))
    return {int(m.group(1)): os.path.join(output_dir, m.group(0)) for m in matches if m}


def checkpoint_files(output_dir):
    """The checkpoints train.py wrote in output_dir, newest first: checkpoint.pth, then model_<epoch>.pth down."""
    files = [os.path.join(output_dir, "checkpoint.pth")] if output_dir else []
    files = [path for path in files if os.path.isfile(path)]
    return files + [path for _, path in sorted(epoch_files(output_dir).items(), reverse=True)]


def remove_stale_temporary_files(output_dir):
    """Delete the temporary files of checkpoint writes that were killed before their rename; returns their names."""
    removed = []
    for name in sorted(os.listdir(output_dir)) if output_dir and os.path.isdir(output_dir) else ():
        if _TMP_FILE.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):  # another process of the same run removed it first
                os.remove(os.path.join(output_dir, name))
            removed.append(name)
    return removed


_held_locks = {}  # folder -> the open descriptor whose flock keeps other runs out of it


def lock_output_dir(output_dir):
    """Lock `output_dir` for this process's lifetime, so that no second run writes its checkpoints there.

    The lock is an exclusive flock on the folder itself (no lock file to delete or to find stale): the kernel
    releases it when the process ends in any way, kill -9 included. A folder another process holds is an
    InputError; a file system without flock (some network ones) is only noted, as the lock is a guard, not a need.
    """
    key = os.path.realpath(output_dir)
    if key in _held_locks:
        return
    fd = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise InputError(f"--output-dir {output_dir} is in use by another train.py run that is still going; "
                             f"wait for it to end, or pick another folder") from None
        if is_main_process():
            print(f"Notice: cannot lock --output-dir {output_dir} ({e.strerror}), so another run writing there at "
                  f"the same time would not be stopped", file=sys.stderr, flush=True)
        return
    _held_locks[key] = fd


def release_output_dir_locks():
    """Release the folders lock_output_dir locked (process exit does this too; tests run scripts in-process)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])


def load_latest_checkpoint(output_dir):
    """(path, checkpoint) of the newest checkpoint in output_dir that loads, or (None, None) when there is none.

    A torn or corrupt checkpoint.pth (a failed copy, a full disk) does not end the run while an intact
    model_<epoch>.pth sits beside it: each file that does not load is reported and the next older one tried.
    When none loads, that is an InputError naming each file and why.
    """
    failures = []
    for path in checkpoint_files(output_dir):
        try:
            checkpoint = load_checkpoint(path)
        except InputError as e:
            failures.append(str(e))
            continue
        if failures and is_main_process():
            print(f"Notice: resuming from {path}, the newest checkpoint that loads; skipped: {'; '.join(failures)}",
                  file=sys.stderr, flush=True)
        return path, checkpoint
    if failures:
        raise InputError(f"--resume auto found no checkpoint in {output_dir} that loads: {'; '.join(failures)}; "
                         f"re-copy one, or pass --start-over to train from scratch there")
    return None, None

# The format tag of compact files, defined here (compact.py reads it from here): importing compact imports
# blocksparse, a second at every start of train.py and evaluate.py.
COMPACT_FORMAT = "superblock-compact"


def is_compact_file(checkpoint):
    """True for a compact inference file (evaluate.py --save-compact), which holds no training state."""
    return isinstance(checkpoint, dict) and checkpoint.get("format") == COMPACT_FORMAT


def model_state_dict(checkpoint):
    """The model weights inside a checkpoint: its "model" entry, or the checkpoint itself when it is a state_dict."""
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        return checkpoint["model"]
    return checkpoint


##### Random generators, saved with a checkpoint #####


def get_rng_state():
    """This process's generator states as plain types and tensors, so torch.load(weights_only=True) reads them."""
    np_state = np.random.get_state(legacy=False)
    python_version, python_internal, python_gauss = random.getstate()
    state = {
        "python": [python_version, list(python_internal), python_gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state):
    """Restore generator states saved by get_rng_state."""
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
