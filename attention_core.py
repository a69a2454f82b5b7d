"""The attention core, ``softmax(q @ k.T * scale) @ v``, on the fastest correct path for the CPU it runs on.

``ProjectedAttention`` runs one of ``CORES`` for inference (no mask, no dropout, no attention weights asked for):

- ``"sdpa"``: ``F.scaled_dot_product_attention``, torch's choice of backend (its flash kernel on CPU);
- ``"plain"``: ``baddbmm -> softmax -> bmm``, the whole (B * H, L, L) score tensor at once;
- ``"fused"``: ``torch.ops.superblock.attention_core`` (``csrc/attention_core.cpp``, built with the other kernels by
  ``blocksparse_fused``): one (image, head) per work item, scores a tile of queries at a time in cache, on ATen's
  brgemm micro-kernels (AMX or AVX-512), float32 or bfloat16, bitwise identical at any thread count. It writes its
  output as (B, L, H, D), which the output projection reads as (B, L, E) with no copy (as SDPA's flash output);
- ``"fused-fp32"``: the same kernel with bfloat16 inputs widened to float32 for its products (float32 inputs: the
  same as "fused"), which some CPUs without AMX run faster than their bfloat16 micro-kernels;
- ``"fused-avx512bf16"``: the same kernel with its bfloat16 products on our own AVX-512 BF16 micro-kernel instead of
  oneDNN's (CPUs with avx512_bf16, head sizes a multiple of 16);
- ``"fused-amx"``: the same kernel with its bfloat16 products on our own AMX tile kernel (``csrc/amx_tiles.h``, the
  block-sparse ops' too; CPUs with AMX, head sizes a multiple of 32).

``choose(...)`` times them at conversion on the model's shape and dtype (``blocksparse.apply_bsr`` calls it), the
fused ones at each of ``QUERY_TILES``, and keeps the fastest; the fused kernel competes only after it matched
``reference`` here.
"""

import functools
import math
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import blocksparse_fused

CORES = ("sdpa", "plain", "fused", "fused-fp32", "fused-avx512bf16", "fused-amx")
# Each fused core's products for bfloat16 inputs (the op's ``products``); float32 inputs take float32 products.
PRODUCTS = {"fused": "onednn", "fused-fp32": "float32", "fused-avx512bf16": "avx512_bf16", "fused-amx": "amx"}
# The head sizes our own kernels take: a multiple of this.
HEAD_MULTIPLE = {"avx512_bf16": 16, "amx": 32}

# apply_bsr times the cores on this many tokens when the model does not say its sequence length (a 224-pixel
# ViT-B/16 image is 197 tokens), and on enough images to give every thread several (image, head) items.
SAMPLE_TOKENS = 197
SAMPLE_ITEMS = 24

# The fused kernel's queries per tile, whose scores (tile x keys floats) stay in cache: which is fastest depends on the
# CPU's caches and the shape, so choose() tries each. QUERY_TILE serves a core set by hand.
QUERY_TILES = (32, 64, 128)
QUERY_TILE = 64

_state: Dict[str, object] = {"choices": {}}


##### The reference and the fused op #####


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """The fused kernel's computation in pure PyTorch: (B, H, L, D) inputs -> (B, L, H, D), in q's dtype.

    Scores and softmax in float32 (float64 for float64 inputs); the probabilities rounded to the inputs' dtype
    before the product with v, as SDPA's math backend does.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale
    probabilities = scores.softmax(dim=-1).to(q.dtype).to(compute)
    return (probabilities @ v.to(compute)).to(q.dtype).transpose(1, 2)


def fused_unavailable_reason(dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None when the fused kernel takes this dtype and head size here; otherwise why not."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the fused attention kernel takes float32 or bfloat16, not {dtype}"
    if dtype == torch.bfloat16 and head_dim % 2:
        return f"the fused attention kernel needs an even head size in bfloat16, not {head_dim}"
    if not blocksparse_fused.available():
        return f"the C++ extension is unavailable ({blocksparse_fused.unavailable_reason()})"
    _register_fake()
    if not _matches_reference(dtype, head_dim):
        return (f"the fused attention kernel failed its check against the reference in {dtype} (head size "
                f"{head_dim}) on this CPU")
    return None


@torch.no_grad()
def _matches_reference(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the fused kernel runs and matches ``reference`` here (checked once per dtype and head size): its
    bfloat16 products are oneDNN's micro-kernels, which differ by CPU (AMX, AVX-512 BF16) or may refuse a shape."""
    checked = _state.setdefault("checked", {})
    if (dtype, head_dim) not in checked:
        q, k, v = sample(2, 3, 77, head_dim, dtype, torch.Generator().manual_seed(0))
        expected = reference(q, k, v).float()
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        matches = True
        for core in fused_cores(dtype, head_dim):
            try:
                got = fused(q, k, v, products=PRODUCTS[core]).float()
            except RuntimeError:  # a shape the micro-kernels refuse here
                matches = False
                break
            matches &= bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()))
        checked[dtype, head_dim] = matches
        if not checked[dtype, head_dim]:
            warnings.warn(f"the fused attention kernel failed its check against the reference in {dtype} (head size "
                          f"{head_dim}) on this CPU; attention keeps torch's cores", stacklevel=3)
    return checked[dtype, head_dim]


def _register_fake() -> None:
    if _state.get("fake"):
        return

    @torch.library.register_fake("superblock::attention_core")
    def _(q, k, v, scale, query_tile, products):
        batch, heads, queries, dim = q.shape
        return q.new_empty(batch, queries, heads, dim)

    _state["fake"] = True


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
          query_tile: int = QUERY_TILE, products: str = "onednn") -> torch.Tensor:
    """The fused op: q (B, H, Lq, D), k and v (B, H, Lk, D), unit stride along D -> (B, Lq, H, D); ``products``
    (one of ``PRODUCTS``' values) says how bfloat16 inputs are multiplied."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.superblock.attention_core(q, k, v, scale, query_tile, products)


def fused_cores(dtype: torch.dtype, head_dim: int) -> Tuple[str, ...]:
    """The fused cores that run here for this dtype and head size (after ``fused_unavailable_reason`` says None):
    one for float32, whose products are float32 whatever the core; for bfloat16 each kind of products the CPU has."""
    if dtype == torch.float32:
        return ("fused",)
    available = _products_here()
    return tuple(core for core, products in PRODUCTS.items()
                 if products in available and head_dim % HEAD_MULTIPLE.get(products, 1) == 0)


def _products_here() -> Tuple[str, ...]:
    """The kinds of bfloat16 products the op takes on this CPU (asked once per process)."""
    if "products" not in _state:
        _state["products"] = tuple(torch.ops.superblock.attention_core_products())
    return _state["products"]


def settled(core: str, head_dim: int) -> str:
    """``core`` where this process and CPU can run it, else the fused core on oneDNN's products: for a module that
    was unpickled (``torch.save(model)``), perhaps on a CPU without the instruction sets its core was measured with.
    Loads the op (raising RuntimeError, with the reason, where it cannot) and checks the kernel against the reference
    for this head size now, not at the first call, which may be under torch.compile or torch.export."""
    if core not in PRODUCTS:
        return core
    blocksparse_fused.require_for_pickled_model()
    for dtype in (torch.float32, torch.bfloat16):
        fused_unavailable_reason(dtype, head_dim)
    return core if PRODUCTS[core] in _products_here() else "fused"


##### Running a core, and choosing one #####


def fused_runs(q: torch.Tensor) -> bool:
    """Whether these queries may take the fused kernel (on the CPU, no autograd); ``_fused_ready`` says whether it
    takes their dtype and head size."""
    return q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad)


def run(core: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_tile: int = QUERY_TILE) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for (B, H, L, D) inputs with no mask, as (B, L, H * D); ``query_tile`` is the fused
    cores' queries per tile."""
    batch, heads, queries, dim = q.shape
    if core in PRODUCTS and fused_runs(q) and _fused_ready(q.dtype, dim):
        products = PRODUCTS[core] if q.dtype == torch.bfloat16 else "float32"
        if dim % HEAD_MULTIPLE.get(products, 1):
            products = "onednn"  # a head size our kernels do not take
        return fused(q, k, v, query_tile=query_tile, products=products).view(batch, queries, heads * dim)
    if core == "plain":
        flat = lambda t: t.reshape(batch * heads, t.shape[2], dim)  # noqa: E731
        scores = torch.baddbmm(q.new_empty(()), flat(q), flat(k).transpose(1, 2), beta=0.0, alpha=dim ** -0.5)
        out = torch.bmm(scores.softmax(dim=-1), flat(v)).view(batch, heads, queries, dim)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, queries, heads * dim)


def _fused_ready(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the fused kernel is loaded and passed its check for this dtype and head size: a dictionary lookup once
    ``fused_unavailable_reason`` has run (apply_bsr runs it), else that first call (a core set by hand)."""
    checked = _state.get("checked", {}).get((dtype, head_dim))
    return checked if checked is not None else fused_unavailable_reason(dtype, head_dim) is None


def sample(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
           generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, L, D) as ProjectedAttention makes them: views into one (B, L, 3 * H * D) projection."""
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(dtype)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


@torch.no_grad()
def choose(heads: int, head_dim: int, dtype: torch.dtype,
           tokens: int = SAMPLE_TOKENS) -> Tuple[str, int, Dict[str, float]]:
    """(core, query tile, seconds per core): the fastest of ``CORES`` for this shape and dtype here, the fused ones at
    their fastest of ``QUERY_TILES`` (the tile returned is ``QUERY_TILE`` for the others); measured once per process.

    The fused kernel competes only where it runs and matched ``reference`` here (``fused_unavailable_reason``).
    """
    key = (heads, head_dim, dtype, tokens)
    if key not in _state["choices"]:
        batch = max(1, math.ceil(SAMPLE_ITEMS / heads))
        q, k, v = sample(batch, heads, tokens, head_dim, dtype, torch.Generator().manual_seed(0))
        candidates = ["sdpa", "plain"]
        if fused_unavailable_reason(dtype, head_dim) is None:
            candidates += fused_cores(dtype, head_dim)
        timings = blocksparse_fused.median_seconds_each({
            (core, tile): functools.partial(run, core, q, k, v, tile)
            for core in candidates for tile in (QUERY_TILES if core in PRODUCTS else (QUERY_TILE,))})
        seconds, tiles = {}, {}
        for (core, tile), elapsed in timings.items():
            if core not in seconds or elapsed < seconds[core]:
                seconds[core], tiles[core] = elapsed, tile
        best = min(seconds, key=seconds.get)
        _state["choices"][key] = (best, tiles[best], seconds)
    return _state["choices"][key]
