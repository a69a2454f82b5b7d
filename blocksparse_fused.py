"""The fused block-sparse CPU kernels: the C++ extension of csrc/, built on first use, and its float ops.

``torch.ops.superblock.fused_bsr_linear`` (``fused_linear`` here) computes ``x @ W.T + bias`` for a 2-D float32,
bfloat16 or float16 ``x`` from W's kept blocks only, with ATen's brgemm micro-kernels (oneDNN's AVX-512/AMX kernels)
reading the input in place. ``torch.ops.superblock.fused_bsr_mlp`` (``fused_mlp``) computes a whole
Linear -> activation -> Linear pair per tile of tokens, its hidden activations kept in cache. Shape-only fakes are
registered beside them, so ``torch.compile(fullgraph=True)`` keeps each as one node and ``torch.export`` can export a
model that uses them.

The extension (``csrc/fused_bsr_linear.cpp``, the int8 ops of ``csrc/int8_bsr_linear.cpp``, which
``blocksparse_int8`` wraps, and the attention core of ``csrc/attention_core.cpp``, which ``attention_core`` wraps) is compiled once per source, torch version and CPU (the build is cached under torch's extension
folder, ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``), so later processes load it at once. With
``SUPERBLOCK_NO_EXTENSION=1`` in the environment, or where no compiler works, ``unavailable_reason()`` says why and
block-sparse layers fall back to the pure-PyTorch kernels of ``blocksparse_reference`` (one warning says so).
"""

import functools
import hashlib
import logging
import os
import sys
import time
import warnings
from typing import Callable, Dict, Hashable, Optional

import torch

# One extension: the float kernels here, the int8 ones that blocksparse_int8.py wraps and the attention core that
# attention_core.py wraps (compiled side by side).
SOURCES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", name)
                for name in ("fused_bsr_linear.cpp", "int8_bsr_linear.cpp", "attention_core.cpp", "layer_norm.cpp"))
# The headers they include: the build's name covers them, so a change to one rebuilds the extension too.
HEADERS = tuple(os.path.join(os.path.dirname(SOURCES[0]), name)
                for name in ("block_index.h", "avx512_float.h", "amx_tiles.h"))
DISABLE_VARIABLE = "SUPERBLOCK_NO_EXTENSION"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_loaded = {}  # "reason": None once built and loaded, else why not


def _cpu_flags() -> bytes:
    """This CPU's feature flags: the build uses -march=native, so a build is only reused on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return os.uname().machine.encode()


def _build_name() -> str:
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            digest.update(f.read())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_flags())
    return f"superblock_fused_{digest.hexdigest()[:16]}"


def _will_compile(cpp_extension, name: str) -> bool:
    try:
        folder = cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # a private helper of torch's: where it is gone or changed, no notice rather than no kernel
        return False
    return not os.path.exists(os.path.join(folder, f"{name}.so"))


def _build() -> None:
    # cpp_extension logs a CUDA_HOME notice on import that has nothing to do with a CPU build.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        name = _build_name()
        # cpp_extension compiles when its build folder holds no library of this name, and loads it otherwise; the
        # compile takes seconds in silence, so say so (once: later processes load the cached library).
        if _will_compile(cpp_extension, name):
            print("Building the fused block-sparse CPU kernel (csrc/, once per source, torch version and CPU; about "
                  "10 s)...", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name, sources=list(SOURCES), is_python_module=False, verbose=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
        )
    finally:
        logger.setLevel(level)

    @torch.library.register_fake("superblock::fused_bsr_linear")
    def _(x, values, row_offsets, cols, bias, out_features, tile_tokens, products):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("superblock::fused_bsr_mlp")
    def _(x, values1, row_offsets1, cols1, bias1, values2, row_offsets2, cols2, bias2, out_features, activation,
          tile_tokens, products):
        return x.new_empty(x.shape[0], out_features)


def unavailable_reason() -> Optional[str]:
    """None when the fused kernel runs here; otherwise why not (and the first call warns once)."""
    if "reason" not in _loaded:
        reason = None
        if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
            reason = f"{DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]} is set"
        else:
            start = time.perf_counter()
            try:
                _build()
            except Exception as e:  # no compiler, no headers, a failed link: all mean the same to a user
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                errors = [line for line in lines if "error" in line] or lines or [type(e).__name__]
                reason = f"building the C++ extension (csrc/) failed: {errors[0]}"
            _loaded["build_seconds"] = time.perf_counter() - start
        _loaded["reason"] = reason
        if reason is not None:
            warnings.warn(f"the fused block-sparse CPU kernel is unavailable: {reason}; block-sparse layers run the "
                          f"slower pure-PyTorch kernels instead", stacklevel=2)
    return _loaded["reason"]


def available() -> bool:
    """True when the fused kernel is built and loaded (building it on the first call)."""
    return unavailable_reason() is None


def build_seconds() -> Optional[float]:
    """Seconds the first ``available()`` call spent building or loading the extension in this process."""
    return _loaded.get("build_seconds")


def require() -> None:
    """Raise RuntimeError, saying why and how to fix it, when the fused kernel cannot run here."""
    _raise_if_unavailable("kernel='fused' needs the C++ extension, which is unavailable",
                          "or use kernel='auto', which falls back to the pure-PyTorch kernels")


def require_for_pickled_model() -> None:
    """Load the kernels for a converted model that was pickled (``torch.save(model)``) and is being unpickled, perhaps
    in a fresh process or on another CPU; raise RuntimeError, saying why and what to do, where they cannot run."""
    _raise_if_unavailable("this pickled model runs SuperBlock's C++ kernels, which cannot run here",
                          "or convert the model here instead (compact.load_compact, or apply_bsr on its weights)")


def _raise_if_unavailable(what: str, otherwise: str) -> None:
    reason = unavailable_reason()
    if reason is not None:
        fix = (f"unset {DISABLE_VARIABLE}" if reason.startswith(DISABLE_VARIABLE)
               else "install g++ and ninja (torch.utils.cpp_extension builds it)")
        raise RuntimeError(f"{what}: {reason}; {fix}, {otherwise}")


def pack(values: torch.Tensor) -> torch.Tensor:
    """Kept blocks (kept, in, out), each a transposed weight block, in the layout the kernel reads for their dtype."""
    if values.dtype == torch.float32:
        return values.contiguous()
    exact = _packed_layout_is_exact(values.dtype, values.shape[-1])
    return torch.ops.superblock.fused_pack_blocks(values.contiguous(), exact)


@torch.no_grad()
def _packed_layout_is_exact(dtype: torch.dtype, blocksize: int) -> bool:
    """Whether the micro-kernel's pair-interleaved layout gives exact products here (checked once per dtype and size).

    That path (oneDNN's bfloat16/float16 micro-kernels, AMX or AVX-512) depends on the CPU; a CPU where it is wrong
    or refuses the shape gets the plain layout, which ATen computes with its generic GEMM: slower, never wrong.
    """
    key = (dtype, blocksize)
    if key not in _loaded.setdefault("exact", {}):
        exact = _products_are_exact(dtype, blocksize, ("blocks", "gather"))
        if not exact:
            warnings.warn(f"the fused kernel's packed layout is refused or gives wrong products for {dtype} blocks of "
                          f"{blocksize} on this CPU; using the plain layout (slower)", stacklevel=3)
        _loaded["exact"][key] = exact
    return _loaded["exact"][key]


def _products_are_exact(dtype: torch.dtype, blocksize: int, kinds) -> bool:
    """Whether the pair-interleaved layout is accepted here and each of ``kinds`` of products computes two block-rows
    (blocks (0, 0) and (0, 1), then (1, 1)) of 37 tokens within bfloat16's rounding of the float64 product."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, blocksize, blocksize, generator=gen).to(dtype)
    try:
        packed = torch.ops.superblock.fused_pack_blocks(values, True)
    except RuntimeError:  # oneDNN's packing refuses this block size here (AMX, blocks of 8)
        return False
    if packed.dim() != 4:  # the micro-kernel does not run here: the plain layout, nothing to check
        return True
    x = torch.randn(37, 2 * blocksize, generator=gen).to(dtype)
    crow, col = torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32)
    xd, vd = x.double(), values.double()
    expected = torch.cat([xd[:, :blocksize] @ vd[0] + xd[:, blocksize:] @ vd[1], xd[:, blocksize:] @ vd[2]], 1)
    for products in kinds:
        for tile in (16, 64):  # items of 16 tokens, and one of 37 (AMX: two tiles of 16 rows, then 5)
            try:
                y = fused_linear(x, packed, crow, col, None, 2 * blocksize, tile, products).double()
            except RuntimeError:  # a shape the micro-kernel refuses on this CPU
                return False
            if not torch.allclose(y, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()):
                return False
    return True


def product_kinds(dtype: torch.dtype, blocksize: int) -> tuple:
    """How the fused ops can run their products for ``dtype`` blocks of ``blocksize`` on this CPU (``products``):
    "blocks" (one brgemm per kept block), "gather" (a row's input columns copied into one panel, one brgemm) and,
    for bfloat16 blocks of a multiple of 32 where the CPU has AMX, "amx" (our own tile kernel, csrc/amx_tiles.h),
    once it computed a check product right (else one warning, and oneDNN's kernels alone)."""
    kinds = ("blocks", "gather")
    if (blocksize % 32 == 0 and "amx" in torch.ops.superblock.fused_products(dtype)
            and _packed_layout_is_exact(dtype, blocksize)):
        key = (dtype, blocksize)
        checked = _loaded.setdefault("amx_exact", {})
        if key not in checked:
            checked[key] = _products_are_exact(dtype, blocksize, ("amx",))
            if not checked[key]:
                warnings.warn(f"our AMX kernel gave wrong products for {dtype} blocks of {blocksize} on this CPU; "
                              f"the fused kernel keeps oneDNN's micro-kernels", stacklevel=2)
        if checked[key]:
            kinds += ("amx",)
    return kinds


def valid_products(products: str, dtype: torch.dtype, blocksize: int) -> str:
    """``products`` where the fused ops can run it for ``dtype`` blocks of ``blocksize`` here, else "blocks" (a layer
    measured as "amx" in bfloat16 and then moved to another dtype)."""
    return products if products in product_kinds(dtype, blocksize) else "blocks"


def fused_linear(x, values, row_offsets, cols, bias, out_features: int, tile_tokens: int,
                 products: str = "blocks") -> torch.Tensor:
    """``x (n, in) @ W.T + bias`` from W's packed blocks: the op, (n, out) in x's dtype.

    ``tile_tokens`` tokens make one work item; ``products`` is one of ``product_kinds``.
    """
    return torch.ops.superblock.fused_bsr_linear(x, values, row_offsets, cols, bias, out_features, tile_tokens,
                                                 products)


def fused_mlp(x, first, second, out_features: int, activation: str, tile_tokens: int,
              products: str = "blocks") -> torch.Tensor:
    """``second(act(first(x)))`` for a 2-D ``x``, computed per tile of ``tile_tokens`` tokens in one op.

    ``first`` and ``second`` are each ``(packed values, row_offsets, cols, bias)`` of a block-sparse Linear, with the
    same block size; ``activation`` is one of ``MLP_ACTIVATIONS``. Only the hidden blocks that ``second`` reads are
    computed.
    """
    return torch.ops.superblock.fused_bsr_mlp(x, *first, *second, out_features, activation, tile_tokens, products)


MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "identity")

# "auto" on CPU times the candidates on this many tokens (a 224-pixel ViT-B/16 image is 197).
AUTO_SAMPLE_TOKENS = 256

# Token tiles tried at conversion, each with every kind of products (product_kinds): the fastest on this CPU,
# dtype and layer is kept.
TILE_CANDIDATES = (32, 64, 128, 256)


def median_seconds_each(fns: Dict[Hashable, Callable[[], object]], repeats: int = 5) -> Dict[Hashable, float]:
    """Median wall time of each of ``fns`` after one warm-up call each, timed in interleaved rounds (one call of each
    per round): a VM's speed drifts, and a drift during the measurement then weighs on every candidate alike."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: sorted(t)[len(t) // 2] for key, t in times.items()}


def median_seconds(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` after one warm-up call."""
    return median_seconds_each({"fn": fn}, repeats)["fn"]


def fastest_setting(run, tokens: int, variants):
    """((tile_tokens, variant), seconds): the fastest of ``run(tile_tokens, variant)`` over ``TILE_CANDIDATES`` and
    ``variants`` (the float ops' ``product_kinds``, or the int8 ops' instruction sets), timed on ``tokens`` tokens in
    interleaved rounds."""
    timings = _setting_timings(run, tokens, variants, {})
    best = min(timings, key=timings.get)
    return best, timings[best]


def fastest_setting_against(run, tokens: int, variants, baseline):
    """(``fastest_setting``'s pair, seconds of ``baseline()``), the baseline timed in the same interleaved rounds:
    measured apart, a drift of a VM's speed between the two measurements could decide which of them is kept."""
    timings = _setting_timings(run, tokens, variants, {"baseline": baseline})
    baseline_seconds = timings.pop("baseline")
    best = min(timings, key=timings.get)
    return (best, timings[best]), baseline_seconds


def _setting_timings(run, tokens: int, variants, others):
    """Median seconds of ``run`` at each setting, and of each of ``others`` ({name: fn}), in interleaved rounds."""
    # Bigger tiles than twice the sample only repeat the last measurement.
    tiles = [tile for i, tile in enumerate(TILE_CANDIDATES) if i == 0 or tile <= 2 * tokens]
    fns = {(tile, variant): functools.partial(run, tile, variant) for tile in tiles for variant in variants}
    return median_seconds_each({**fns, **others})
