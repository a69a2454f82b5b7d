"""The command-line layer of train.py, evaluate.py and benchmark.py: one __main__, flag groups, output paths.

Each script's `main(args)` checks its own flags and raises utils.InputError for a mistake; `run` turns that into
one line (and a pointer to --help) with exit status 2, as it does argparse's errors for a malformed flag.
"""
import argparse
import contextlib
import os
import sys
import warnings

import torch
import torch.distributed
from torchvision.transforms import InterpolationMode

import models
import presets
import supermask
import utils
from utils import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


##### One __main__ #####


def run(main, parser, argv=None, *, interrupted=None):
    """Parse `argv` (the command line when None), call main(args) and return its result.

    An InputError ends the process with its one-line message and exit status 2, as a malformed flag does (without
    argparse's usage); warnings print as one line each, on rank 0 only. With `interrupted` (a function
    returning the message to print), Ctrl-C prints it on rank 0 and exits with 130, the shell's code for SIGINT.
    """
    # A mistake is its one line and where to look for the flags, not the whole usage first (51 lines for train.py).
    parser.error = lambda message: exit_with_error(parser, message)
    try:
        with warnings.catch_warnings():  # restores the warning settings for a caller in the same process
            _quiet_warnings()
            return main(parser.parse_args(argv))
    except InputError as e:
        exit_with_error(parser, user_error_message(e))
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        if utils.is_main_process():
            print(interrupted(), file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()


def exit_with_error(parser, message):
    """Print `prog: error: message` and a pointer to --help, then exit with status 2 (argparse's for a bad flag)."""
    parser.exit(2, f"{parser.prog}: error: {message}\nTry '{parser.prog} --help' for the flags.\n")


def _quiet_warnings():
    """Warnings as one line each, without their source line, and only from the first process under torchrun."""
    if os.environ.get("RANK", "0") != "0":  # every rank would repeat rank 0's warnings
        warnings.simplefilter("ignore")

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show


def user_error_message(error):
    """The one-line message of an InputError, also when it was raised in a data loader worker.

    A worker's exception reaches the main process re-raised with the worker's whole traceback as its message;
    the original message is that traceback's last line, after the exception's name.
    """
    message = str(error).strip()
    if "Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(f"{InputError.__name__}: ", 1)[-1]
    return message


def autocast(amp, device):
    """A function returning the forward's autocast context: float16 on CUDA, bfloat16 on the CPU, or none."""
    if not amp:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


##### Processes and devices, as the flags ask #####


def init_distributed_mode(args):
    """Join a process group when launched by torchrun or SLURM; set args.distributed, rank, gpu, world_size.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; under SLURM the rank is SLURM_PROCID and --world-size and
    --dist-url come from the command line. NCCL is used on CUDA, Gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.distributed = False
        args.rank = 0
        args.gpu = 0
        _log_device(args)
        return
    args.distributed = True
    use_cuda = args.device.startswith("cuda")
    if use_cuda:
        utils.check_device(args.device)
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if use_cuda else "gloo"
    torch.distributed.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                                         rank=args.rank)
    torch.distributed.barrier()
    _log_device(args)


def _log_device(args):
    """Say which device the run computes on (among its first lines): --device defaults to what the machine has."""
    where = "a CUDA device exists" if torch.cuda.is_available() else "no CUDA device found"
    utils.log(f"Device: {args.device} ({where}; --device picks another)")


def process_device(args):
    """The torch.device this process computes on (its own GPU under torchrun)."""
    utils.check_device(args.device)
    if args.device.startswith("cuda") and getattr(args, "distributed", False):
        return torch.device("cuda", args.gpu)
    return torch.device(args.device)


##### Flag groups #####


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help ("off" for a switch, "none" when unset), unless the help states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        default = action.default
        shown = "off" if default is False else "none" if default is None else \
            " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def add_data_args(parser, *, sizes_from_checkpoint=False):
    """Add the data set and preprocessing flags (torchvision's names and defaults).

    With sizes_from_checkpoint (evaluate.py) the evaluation sizes default to None: the script takes them from the
    checkpoint it evaluates, else torchvision's 256 and 224.
    """
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path",
        default="/datasets01/imagenet_full_size/061417/",
        type=str,
        help="data set root holding train/ and val/ ImageFolder trees",
    )
    group.add_argument(
        "-b", "--batch-size", default=32, type=int, help="images per process; the total batch is processes x this"
    )
    group.add_argument("-j", "--workers", default=16, type=int, metavar="N", help="data loading worker processes")
    group.add_argument(
        "--cache-dataset",
        action="store_true",
        help="cache the list of image files in ~/.torch/vision/datasets/imagefolder to skip the directory scan; "
        "the list is reused while the folder tree is unchanged (files added, removed or renamed: scanned again)",
    )
    group.add_argument(
        "--interpolation", default="bilinear", choices=[mode.value for mode in InterpolationMode],
        help="resize interpolation",
    )
    for flag, what, default in (("--val-resize-size", "resize size", 256), ("--val-crop-size", "center-crop size", 224)):
        if sizes_from_checkpoint:
            group.add_argument(flag, default=None, type=int, help=f"{what} for evaluation (default: the checkpoint's "
                               f"{flag}, else {default})")
        else:
            group.add_argument(flag, default=default, type=int, help=f"{what} for evaluation")
    group.add_argument(
        "--backend", default="PIL", type=str.lower, choices=presets.BACKENDS, help="image backend: PIL or tensor"
    )
    group.add_argument("--use-v2", action="store_true", help="use torchvision.transforms.v2 for preprocessing")


def default_device():
    """CUDA where a CUDA device exists, the CPU otherwise (--device's default)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(parser, *, model="resnet18", model_help=""):
    """Add the model and device flags (torchvision's names and defaults; `model` for --model's, with `model_help`
    saying more about it)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=model, type=str,
        help=f"torchvision classification model name, vit_tiny, or timm/NAME for timm's (pip install timm)"
             f"{model_help}",
    )
    group.add_argument(
        "--weights",
        default=None,
        type=str,
        help="torchvision pretrained weights: ResNet50_Weights.IMAGENET1K_V2, IMAGENET1K_V2, or DEFAULT for the "
        "model's recommended ones; on data with another class count train.py replaces their classifier by a newly "
        "initialised one (evaluate.py and --test-only refuse them there); for timm/NAME timm's pretrained weights: "
        "DEFAULT, a tag (fb_in1k) or a local weights file",
    )
    group.add_argument("--device", default=default_device(), type=str,
                       help=f"device: cuda or cpu (default: cuda where a CUDA device exists, else cpu; here "
                            f"{default_device()})")


def add_distributed_args(parser):
    """Add the multi-process flags (torchvision's names and defaults)."""
    group = parser.add_argument_group("distributed")
    group.add_argument("--world-size", default=1, type=int, help="number of processes (set by torchrun / SLURM)")
    group.add_argument("--dist-url", default="env://", type=str, help="URL used to set up the process group")


def _fraction(text):
    """argparse type: a sparsity in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{text!r} is outside [0, 1)")
    return value


_fraction.__name__ = "sparsity in [0, 1)"


def _positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is below 1")
    return value


_positive_int.__name__ = "integer >= 1"


# The Supermask settings a checkpoint of this project stores in its args (train.py saves vars(args)), with the
# defaults of their flags: evaluate.py and --resume take an omitted one from the checkpoint.
SUPERMASK_DEFAULTS = {
    "sparsity_linear": 0.0, "sp_linear_tile_size": 1,
    "sparsity_conv1x1": 0.0, "sp_conv1x1_tile_size": 1,
    "sparsity_conv": 0.0, "sp_conv_tile_size": 1,
    "sparsity_attention": 0.0, "sp_attention_tile_size": 1,
    "skip_last_layer_sparsity": False, "skip_first_transformer_sparsity": False,
}
_GIVEN = "_given_supermask_flags"  # the namespace entry listing the Supermask flags on the command line


class _StoreGiven(argparse.Action):
    """argparse's "store", also noting that the flag was given (a checkpoint fills only the omitted ones)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, _GIVEN, (*getattr(namespace, _GIVEN, ()), self.dest))


class _StoreTrueGiven(_StoreGiven):
    """argparse's "store_true", also noting that the flag was given."""

    def __init__(self, option_strings, dest, default=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, True, option_string)


def add_supermask_args(parser):
    """Add the Supermask flags of the original SuperBlock plus --weights-path."""
    group = parser.add_argument_group("Supermask (learned block sparsity)")
    parser.set_defaults(**{_GIVEN: ()})  # so that a parsed namespace tells "none given" from "not parsed"
    # (flag suffix, what the sparsity flag prunes, what the tile-size flag's masks belong to)
    for kind, pruned, masks in (
        ("linear", "each Linear weight's tiles", "Linear"),
        ("conv1x1", "each 1x1 Conv2d weight's tiles", "1x1 Conv2d"),
        ("conv", "each other Conv2d weight's tiles", "other Conv2d"),
        ("attention", "the tiles in every attention q/k/v and output projection", "attention"),
    ):
        group.add_argument(f"--sparsity-{kind}", default=SUPERMASK_DEFAULTS[f"sparsity_{kind}"], type=_fraction,
                           action=_StoreGiven, help=f"fraction of {pruned} masked off (default: 0; with a "
                           f"checkpoint of this project, evaluate.py and --resume take its value)")
        group.add_argument(f"--sp-{kind}-tile-size", default=SUPERMASK_DEFAULTS[f"sp_{kind}_tile_size"],
                           type=_positive_int, action=_StoreGiven,
                           help=f"tile (block) side for {masks} masks (default: 1; or the checkpoint's, as above)")
    group.add_argument(
        "--score-init",
        default="auto",
        choices=("auto", "kaiming", "magnitude"),
        help="mask scores: kaiming (random), magnitude (each tile's L2 norm: keep the largest tiles first); "
        "auto is magnitude when starting from dense weights, else kaiming (default: auto)",
    )
    group.add_argument(
        "--skip-last-layer-sparsity", action=_StoreTrueGiven,
        help="keep the classifier (last layer) dense (default: off; or the checkpoint's, as above)",
    )
    group.add_argument(
        "--skip-first-transformer-sparsity",
        action=_StoreTrueGiven,
        help="keep the first transformer block dense, in a ViT (default: off; or the checkpoint's, as above)",
    )
    group.add_argument(
        "--weights-path",
        default=None,
        type=str,
        help="start from this checkpoint's model weights, this project's or the original SuperBlock's (default: none)",
    )


def check_weights_path(path):
    """Raise InputError unless --weights-path is empty or names a file (checked before any work)."""
    if path and os.path.isdir(path):
        raise InputError(f"--weights-path {path} is a folder; pass a checkpoint file in it, e.g. "
                         f"{os.path.join(path, 'checkpoint.pth')}")
    if path and not os.path.isfile(path):
        raise InputError(f"--weights-path {path} does not exist; pass a checkpoint file")


def _flag(name):
    """The command-line spelling of an args entry: sp_linear_tile_size -> --sp-linear-tile-size."""
    return "--" + name.replace("_", "-")


def given_supermask_flags(args):
    """The Supermask flags given on the command line, as "--flag" names in the order given (none for a namespace
    the parser did not make, or once resolve_supermask_args has read them)."""
    return [_flag(name) for name in dict.fromkeys(getattr(args, _GIVEN, ()))]


def _setting_text(name, value):
    flag = _flag(name)
    return f"{flag} {'on' if value else 'off'}" if isinstance(value, bool) else f"{flag} {value}"


def resolve_supermask_args(args, checkpoint, *, source, fix):
    """Fill the Supermask flags left out from the args a checkpoint of this project stores; refuse contradictions.

    `checkpoint` is a loaded checkpoint or None; only the dict args train.py writes count (the original
    SuperBlock's Namespace args do not). A given flag whose value differs from the stored one is an InputError
    naming both, ending with `fix`. A namespace the parser did not make has no record of the flags given: there
    a value other than the flag's default counts as given.
    """
    given = vars(args).pop(_GIVEN, None)  # popped: train.py stores vars(args) in its checkpoints
    stored = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict):
        return
    for name, default in SUPERMASK_DEFAULTS.items():
        if stored.get(name) is None:  # a checkpoint from before the flag existed
            continue
        value = getattr(args, name, default)
        was_given = name in given if given is not None else value != default
        if was_given and value != stored[name]:
            raise InputError(f"{_setting_text(name, value)} contradicts {source}, which was trained with "
                             f"{_setting_text(name, stored[name])}; {fix}")
        setattr(args, name, stored[name])


# What each kind of supermask.unprunable_kinds is, for its error message.
_KIND_LAYERS = {"linear": "Linear", "conv1x1": "1x1 Conv2d", "conv": "Conv2d", "attention": "attention projection"}


def apply_supermask_flags(model, args, *, score_init="kaiming"):
    """supermask.apply_supermask with the flags' settings, refusing a tile size that leaves a kind nothing to prune.

    That is an InputError: every layer of the kind would stay dense while the run claims its sparsity.
    """
    # The layers' "lowering the sparsity" warnings wait until the settings are known to be usable: a refused
    # request is then one error line, not one warning per layer shape before it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            supermask.apply_supermask(model, **supermask_kwargs(args, score_init=score_init))
        except ValueError as e:
            raise InputError(str(e)) from None
    for kind, (tile_size, sparsity, largest) in supermask.unprunable_kinds(model).items():
        fix = (f"the largest tile size that prunes is {largest}" if largest else
               f"no tile size prunes at this sparsity; raise --sparsity-{kind}")
        raise InputError(f"--sp-{kind}-tile-size {tile_size} leaves every {_KIND_LAYERS[kind]} layer too few tiles "
                         f"to prune any at --sparsity-{kind} {sparsity}, so the model would stay dense; {fix}")
    # Once each, as Python's default filter shows them (the layers of one shape all warn alike).
    for text, category, filename, lineno in dict.fromkeys(
            (str(w.message), w.category, w.filename, w.lineno) for w in caught):
        warnings.warn_explicit(text, category, filename, lineno)
    return model


def supermask_kwargs(args, *, score_init="kaiming"):
    """The keyword arguments of supermask.apply_supermask that the Supermask flags ask for."""
    # --sparsity-KIND and --sp-KIND-tile-size are apply_supermask's KIND_sparsity and KIND_sp_tilesize.
    kwargs = {"score_init": score_init, "skip_last_layer_sparsity": args.skip_last_layer_sparsity,
              "skip_first_transformer_sparsity": args.skip_first_transformer_sparsity}
    for kind in _KIND_LAYERS:
        kwargs[f"{kind}_sparsity"] = getattr(args, f"sparsity_{kind}")
        kwargs[f"{kind}_sp_tilesize"] = getattr(args, f"sp_{kind}_tile_size")
    return kwargs


##### Models and preprocessing, as the flags name them #####


def check_model_name(name):
    """Raise InputError unless `name` is a model --model accepts (models.check_model_name)."""
    try:
        models.check_model_name(name)
    except ValueError as e:
        raise InputError(f"--model {e}") from None


def vit_patch_size(name):
    """The patch side of the ViT `name`: vit_tiny's 4, the number ending a torchvision ViT's name (vit_b_16), a timm
    model's patch embedding's (None for a timm model without one)."""
    if models.is_timm(name):
        return models.timm_patch_size(name)
    return 4 if name == "vit_tiny" else int(name.rsplit("_", 1)[-1])


def check_image_size(model, size, flag):
    """Raise InputError when `size` (given by `flag`) is not a multiple of the ViT `model`'s patch size.

    torchvision's VisionTransformer would only refuse it at the first forward, with an AssertionError.
    """
    patch = vit_patch_size(model) if models.is_vit(model) else None
    if not patch or size < 1 or size % patch == 0:
        return
    options = [n for n in (size // patch * patch, (size // patch + 1) * patch) if n > 0]
    raise InputError(f"{flag} {size} is not a multiple of {model}'s patch size {patch}; pass "
                     f"{' or '.join(map(str, options))}")


def build_model(args, *, num_classes, image_size):
    """The dense model named by --model (with --weights if given); ViTs are built for `image_size` inputs."""
    check_model_name(args.model)
    if args.model == "vit_tiny" and args.weights:
        raise InputError("vit_tiny has no pretrained weights; drop --weights")
    try:
        return models.build_model(args.model, weights=args.weights, num_classes=num_classes, image_size=image_size)
    except ValueError as e:
        raise InputError(f"--weights: {e}") from None


##### Output paths, the run's settings #####


def _make_folder(folder, flag, value):
    """Create `folder` (and its parents) for the output `flag value`; a path through a file is an InputError."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = folder
        while blocker and not os.path.exists(blocker):  # the part of the path that exists but is a file
            blocker = os.path.dirname(blocker)
        raise InputError(f"{flag} {value}: {blocker or folder} is a file, not a folder; pick another path") from None
    except OSError as e:
        raise InputError(f"{flag} {value}: cannot create folder {folder} ({e.strerror}); pick another path") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {value}: folder {folder} is not writable; pick another path")


def prepare_output_dir(folder, flag="--output-dir"):
    """Create the output folder before any work, so a bad path fails at once rather than after the first epoch."""
    _make_folder(folder, flag, folder)


def prepare_output_file(path, flag):
    """Check that `path` can be written (creating its folder), before the work whose result it will hold."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; pass a file name, e.g. {os.path.join(path, 'out')}")
    _make_folder(os.path.dirname(os.path.abspath(path)), flag, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} exists and is not writable; pick another path")


def changed_settings(args, parser):
    """The flags whose values differ from the parser's defaults, as `--flag value` lines (for the run's log).

    Entries the parser does not define (rank, gpu, distributed, ...) are left out.
    """
    defaults = vars(parser.parse_args([]))  # as parsed: a string default passes through the flag's type
    lines = []
    for action in parser._actions:
        if not action.option_strings or action.dest not in defaults or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == defaults[action.dest]:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))  # --wd, as torchvision's recipes
        if isinstance(value, bool):
            lines.append(flag if value else f"{flag} off")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{flag} {' '.join(str(v) for v in value)}")
        else:
            lines.append(f"{flag} {value}")
    return lines
