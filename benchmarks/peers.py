"""Dense vit_b_16 in the runtimes a deploying user would otherwise pick, against SuperBlock's block-sparse model.

    python benchmarks/peers.py [--batch-size 8] [--blocksize 64] [--sparsity 0.9] [--attention] [--iters 5]
    make bench-peers  # installs requirements-bench.txt into .venv first

One process, one set of weights (vit_b_16 with a random head; 90% of the BxB blocks of every encoder MLP Linear
zeroed at random, with --attention those of the attention projections too) and one input for every variant:
torch eager and torch.compile, ONNX Runtime (float32 and dynamic int8), OpenVINO (float32, bfloat16 and NNCF int8)
and SuperBlock (blocksparse.apply_bsr). The dense runtimes get the same pruned weights; they just don't skip the
zeros. Every runtime runs on torch's thread count. Rounds are interleaved (benchmark.time_forwards), and each row
gives the median and range of its timed calls, its time over SuperBlock's fastest correct variant and over OpenVINO
int8, and its output's relative L2 difference from torch float32 with the check against its precision's tolerance.
A variant whose package is missing or whose build fails is a row saying why; the others still run.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib
import importlib.metadata
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import blocksparse  # noqa: E402
import cli  # noqa: E402
import utils  # noqa: E402

# Each name ends in the precision it computes in, which picks its tolerance.
VARIANTS = ["torch-float32", "torch-bfloat16", "torch-compile-bfloat16", "onnxruntime-float32", "onnxruntime-int8",
            "openvino-float32", "openvino-bfloat16", "openvino-int8", "superblock-float32", "superblock-bfloat16",
            "superblock-int8"]
# Allowed relative L2 difference, ||y - y32|| / ||y32||, from torch float32's output.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "int8": 0.15}
PEER_PACKAGES = ["onnx", "onnxscript", "onnxruntime", "openvino", "nncf"]
INSTALL_HINT = "pip install -r requirements-bench.txt (or make bench-peers)"
CALIBRATION_BATCHES = 3  # random batches NNCF calibrates OpenVINO int8 on


def get_args_parser(add_help=True):
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("-b", "--batch-size", default=8, type=int, help="images per forward (default: 8)")
    parser.add_argument("--image-size", default=224, type=int,
                        help="input height and width, a multiple of 16; 32 makes a quick smoke run (default: 224)")
    parser.add_argument("--blocksize", default=64, type=int, help="edge of the pruned blocks (default: 64)")
    parser.add_argument("--sparsity", default=0.9, type=float,
                        help="fraction of blocks zeroed per layer (default: 0.9)")
    parser.add_argument("--attention", action="store_true",
                        help="prune the attention projections too, not only the MLPs (default: off)")
    parser.add_argument("--iters", default=5, type=int, help="timed rounds (default: 5)")
    parser.add_argument("--warmup", default=1, type=int, help="untimed rounds first, at least 1 (default: 1)")
    parser.add_argument("--threads", default=None, type=int,
                        help="torch.set_num_threads, also given to every runtime (default: torch's choice)")
    parser.add_argument("--only", default=None, type=str,
                        help=f"comma-separated variants to run (default: all: {', '.join(VARIANTS)})")
    parser.add_argument("--seed", default=0, type=int, help="seed for weights, masks and input (default: 0)")
    return parser


##### Weights #####


def prunable_weights(model, attention=False):
    """{name: weight} of the Linears inside the model's MLPs, and with `attention` of its attention projections."""
    weights = {}
    for fqn, module in model.named_modules():
        if isinstance(module, torchvision.ops.MLP):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    weights[f"{fqn}.{name}.weight"] = child.weight
        elif attention and isinstance(module, nn.MultiheadAttention):
            weights[f"{fqn}.in_proj_weight"] = module.in_proj_weight
            weights[f"{fqn}.out_proj.weight"] = module.out_proj.weight
    return weights


@torch.no_grad()
def prune_blocks_(weight, blocksize, sparsity, generator):
    """Zero round(sparsity * blocks) of the weight's blocksize x blocksize blocks, chosen at random; in place."""
    rows, cols = weight.shape
    if rows % blocksize or cols % blocksize:
        raise ValueError(f"block size {blocksize} does not divide a {rows}x{cols} weight; pick a divisor of both")
    nblocks = (rows // blocksize) * (cols // blocksize)
    keep = torch.ones(nblocks, dtype=weight.dtype)
    keep[torch.randperm(nblocks, generator=generator)[:round(sparsity * nblocks)]] = 0
    keep = keep.view(rows // blocksize, cols // blocksize)
    weight.mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))


def pruned_vit_b_16(*, image_size, blocksize, sparsity, attention, seed):
    """vit_b_16 in eval mode with a random head and random blocks of its prunable weights zeroed."""
    torch.manual_seed(seed)
    model = torchvision.models.vit_b_16(image_size=image_size)
    # torchvision zero-initialises the head: every variant would output zeros and "match".
    nn.init.normal_(model.heads.head.weight, std=0.02)
    nn.init.normal_(model.heads.head.bias)
    generator = torch.Generator().manual_seed(seed)
    for weight in prunable_weights(model, attention).values():
        prune_blocks_(weight, blocksize, sparsity, generator)
    return model.eval().requires_grad_(False)


##### Variants #####


class Skip(Exception):
    """A variant that cannot run here; its message is the row's one-line reason."""


def import_peer(name):
    """The peer package `name`, or Skip saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Skip(f"{e}: {INSTALL_HINT}") from None


def peer_version(name):
    """The installed version of a peer package, or 'not installed'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclasses.dataclass
class Setup:
    """What every variant is built from: the pruned float32 model, the input, the thread count, a scratch folder."""

    model: nn.Module
    x: torch.Tensor
    threads: int
    blocksize: int
    workdir: str
    seed: int = 0

    @functools.cached_property
    def onnx_path(self):
        """The float32 model exported to ONNX (once, for both ONNX Runtime variants)."""
        import_peer("onnx")
        path = os.path.join(self.workdir, "vit_b_16.onnx")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                torch.onnx.export(self.model, (self.x,), path, input_names=["x"], output_names=["y"], dynamo=True)
        except Exception as e:  # the torch.export-based exporter (onnxscript); the TorchScript one may still work
            print(f"torch.onnx.export(dynamo=True) failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                  f"using the TorchScript exporter")
            torch.onnx.export(self.model, (self.x,), path, input_names=["x"], output_names=["y"], dynamo=False)
        return path

    @functools.cached_property
    def openvino_model(self):
        """The float32 model converted to OpenVINO (once, for all OpenVINO variants)."""
        ov = import_peer("openvino")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convert_model traces with torch.jit, which warns it is deprecated
            return ov.convert_model(self.model, example_input=self.x)


def build_torch(name, setup):
    """torch eager float32 or bfloat16, or torch.compile (freezing) bfloat16: (fn, note)."""
    dtype = torch.bfloat16 if name.endswith("bfloat16") else torch.float32
    model = setup.model if dtype == torch.float32 else copy.deepcopy(setup.model).to(dtype)
    x = setup.x.to(dtype)  # converted once, outside the timed call
    if "compile" not in name:
        return (lambda _x: model(x)), ""
    compiled = torch.compile(model)
    start = time.perf_counter()
    # Freezing folds the weights into the graph as constants, as for deployment; it applies when compiling,
    # which is the first call.
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        compiled(x)
    return (lambda _x: compiled(x)), f"compiled with freezing in {time.perf_counter() - start:.0f} s"


def build_onnxruntime(name, setup):
    """ONNX Runtime on the exported float32 model, or on it quantized with quantize_dynamic (QInt8 weights)."""
    import_peer("onnx")
    ort = import_peer("onnxruntime")
    path, note = setup.onnx_path, ""
    if name.endswith("int8"):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # The pre-processing (shape inference, graph optimisation) ONNX Runtime asks for before quantizing.
        prepared = os.path.join(setup.workdir, "vit_b_16_prepared.onnx")
        quant_pre_process(path, prepared, save_as_external_data=True)
        path = os.path.join(setup.workdir, "vit_b_16_int8.onnx")
        quantize_dynamic(prepared, path, weight_type=QuantType.QInt8)
        note = "quant_pre_process, then quantize_dynamic with QInt8 weights"
    options = ort.SessionOptions()
    options.intra_op_num_threads = setup.threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": setup.x.numpy()}  # converted once, outside the timed call
    return (lambda _x: session.run(None, feed)[0]), note


def build_openvino(name, setup):
    """OpenVINO float32, bfloat16 (INFERENCE_PRECISION_HINT) or NNCF post-training int8, on the latency hint."""
    ov = import_peer("openvino")
    model, note = setup.openvino_model, ""
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": setup.threads}
    if name.endswith("float32"):
        config["INFERENCE_PRECISION_HINT"] = "f32"  # on a CPU with bf16, OpenVINO's default is bf16
    elif name.endswith("bfloat16"):
        config["INFERENCE_PRECISION_HINT"] = "bf16"
    else:
        nncf = import_peer("nncf")
        gen = torch.Generator().manual_seed(setup.seed + 1)
        batches = [torch.randn(setup.x.shape, generator=gen).numpy() for _ in range(CALIBRATION_BATCHES)]
        with contextlib.redirect_stdout(io.StringIO()):  # progress bars
            model = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(batches))
        note = f"NNCF on {len(batches)} random batches, "
    compiled = ov.Core().compile_model(model, "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if name.endswith("bfloat16") and precision != "bf16":
        note = f"this CPU has no bf16: OpenVINO ran {precision}"
    elif name.endswith("int8"):
        note += f"the rest in {precision}"  # OpenVINO's default: bf16 where the CPU has it
    request = compiled.create_infer_request()
    feed = {0: setup.x.numpy()}  # converted once, outside the timed call
    return (lambda _x: request.infer(feed, share_inputs=True)[0].copy()), note


def build_superblock(name, setup):
    """The pruned model with blocksparse.apply_bsr (kernel auto): float32, bfloat16, or int8 weights. The int8
    model keeps the rest (attention's core, LayerNorm, the head) in bfloat16 where the CPU has it, as OpenVINO's
    int8 does."""
    low = name.endswith("bfloat16") or (name.endswith("int8") and "bf16" in cpu_features())
    dtype = torch.bfloat16 if low else torch.float32
    model = copy.deepcopy(setup.model).to(dtype)
    x = setup.x.to(dtype)
    if name.endswith("int8"):
        try:
            result = blocksparse.apply_bsr(model, blocksize=setup.blocksize, quantize="int8")
        except TypeError as e:
            if "quantize" in str(e):
                raise Skip("SuperBlock int8 not available in this checkout") from None
            raise
    else:
        result = blocksparse.apply_bsr(model, blocksize=setup.blocksize)
    note = (f"{benchmark._kernel_counts(model)}, {len(result.left_dense)} Linear left dense, "
            f"{benchmark.attention_cores_label(result)}")
    if name.endswith("int8"):
        note += f", the rest in {'bf16' if low else 'float32'}"
    return (lambda _x: model(x)), note


BUILDERS = {"torch": build_torch, "onnxruntime": build_onnxruntime, "openvino": build_openvino,
            "superblock": build_superblock}


def build(name, setup):
    """(fn, note) for the variant `name`, fn taking the float32 input; (None, reason) where it cannot run."""
    try:
        return BUILDERS[name.partition("-")[0]](name, setup)
    except Skip as e:
        return None, f"skipped: {e}"
    except Exception as e:  # one broken peer must not end the run
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"failed: {type(e).__name__}: {message[:200]}"


##### Main #####


def cpu_features():
    """The CPU's bfloat16 and int8 instructions (from /proc/cpuinfo), which decide what the low precisions gain."""
    wanted = ["avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + " ".join(wanted)


def relative_l2(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out = torch.as_tensor(out).double()
    return ((out - ref.double()).norm() / ref.double().norm()).item()


def _record(fn, seconds, x):
    """fn(x), appending the call's seconds to `seconds`."""
    start = time.perf_counter()
    out = fn(x)
    seconds.append(time.perf_counter() - start)
    return out


def main(args):
    """Build every variant, time them in interleaved rounds, print the machine line and the table; returns the rows."""
    only = VARIANTS if args.only is None else [v for v in args.only.split(",") if v]
    unknown = [v for v in only if v not in VARIANTS]
    if unknown or not only:
        raise utils.InputError(f"--only: unknown {', '.join(unknown) or 'empty list'}; "
                               f"choose from {', '.join(VARIANTS)}")
    for flag, value in [("--batch-size", args.batch_size), ("--iters", args.iters), ("--warmup", args.warmup),
                        ("--blocksize", args.blocksize)]:
        if value < 1:
            raise utils.InputError(f"{flag} {value} must be at least 1")
    if args.image_size < 16 or args.image_size % 16:
        raise utils.InputError(f"--image-size {args.image_size} must be a multiple of vit_b_16's patch size 16")
    if not 0.0 <= args.sparsity <= 1.0:
        raise utils.InputError(f"--sparsity {args.sparsity} must be in [0, 1]")
    if args.threads is not None:
        if args.threads < 1:
            raise utils.InputError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    utils.keep_freed_memory()
    threads = torch.get_num_threads()
    peers = ", ".join(f"{name} {peer_version(name)}" for name in PEER_PACKAGES)
    print(f"{benchmark.cpu_model()} ({cpu_features()}), torch {torch.__version__}, {threads} threads, {peers}")
    try:
        model = pruned_vit_b_16(image_size=args.image_size, blocksize=args.blocksize, sparsity=args.sparsity,
                                attention=args.attention, seed=args.seed)
    except ValueError as e:
        raise utils.InputError(f"--blocksize {args.blocksize}: {e}") from None
    pruned = "MLP and attention" if args.attention else "MLP"
    print(f"vit_b_16, batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.sparsity:.0%} of the "
          f"{args.blocksize}x{args.blocksize} blocks of every {pruned} Linear zeroed, median of {args.iters} "
          f"interleaved rounds after {args.warmup} warm-up")
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                    generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        reference = model(x)  # torch float32: what every variant is checked against

    rows, fns, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        setup = Setup(model=model, x=x, threads=threads, blocksize=args.blocksize, workdir=workdir, seed=args.seed)
        for name in only:
            print(f"building {name}", flush=True)
            fn, note = build(name, setup)
            rows[name] = {"variant": name, "note": note}
            if fn is not None:
                seconds[name] = []
                fns[name] = functools.partial(_record, fn, seconds[name])
    # time_forwards interleaves the rounds and reverses every other; the wrappers keep every call's seconds,
    # of which the last --iters are the timed ones.
    _, _, outs = benchmark.time_forwards(fns, x, warmup=args.warmup, iters=args.iters, device=torch.device("cpu"))
    medians = {name: statistics.median(s[-args.iters:]) for name, s in seconds.items()}
    for name in fns:
        diff, allowed = relative_l2(outs[name], reference), TOLERANCE[name.rpartition("-")[2]]
        rows[name].update({"median ms": medians[name] * 1e3,
                           "min-max ms": f"{min(seconds[name][-args.iters:]) * 1e3:.0f}-"
                                         f"{max(seconds[name][-args.iters:]) * 1e3:.0f}",
                           "rel L2 diff": diff, "tolerance": allowed, "ok": diff <= allowed})
    correct = [n for n in medians if n.startswith("superblock") and rows[n]["ok"]]
    best = min(correct, key=medians.get, default=None)
    for name in medians:
        if best:
            rows[name]["vs SuperBlock best"] = f"{medians[name] / medians[best]:.2f}x"
        if "openvino-int8" in medians:
            rows[name]["vs OpenVINO int8"] = f"{medians[name] / medians['openvino-int8']:.2f}x"
    keys = ["variant", "median ms", "min-max ms", "vs SuperBlock best", "vs OpenVINO int8", "rel L2 diff",
            "tolerance", "ok", "note"]
    table = [{k: row.get(k) for k in keys} for row in rows.values()]
    print(benchmark.format_rows(table))
    print(f"vs columns: this variant's median time over theirs, above 1 is slower (SuperBlock's best: "
          f"{best or 'no SuperBlock variant ran within tolerance'})")
    return list(rows.values())


if __name__ == "__main__":
    cli.run(main, get_args_parser())
