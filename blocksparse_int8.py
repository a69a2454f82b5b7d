"""int8 (W8A8) block-sparse Linear layers for CPUs: ``Int8BlockSparseLinear`` and the loader of the int8 ops.

``blocksparse.apply_bsr(model, blocksize, quantize="int8")`` builds these layers. Each keeps its weight's nonzero
``blocksize`` blocks in int8 (one scale per output channel) and computes ``x @ W.T + bias`` with activations quantized
per token inside the op, integer products and a float epilogue (the scheme: ``blocksparse_int8_reference``). A layer
with every block kept is a dense int8 layer. The output has the input's dtype (float32 or bfloat16; other float
dtypes compute in float32). A token holding inf or NaN gives a row of NaN, as ``nn.Linear`` does.

Kernels (``kernel=``): ``"fused"``, the C++ ops of ``csrc/int8_bsr_linear.cpp`` (built with the float kernels by
``blocksparse_fused``), on AMX (our tile kernel, ``csrc/amx_tiles.h``, for blocks of a multiple of 32, else ATen's
brgemm; self-checked against the reference at first use) or AVX-512 VNNI (our own micro-kernel), whichever measures
faster per layer; ``"bmm"``, the pure-PyTorch reference, slow, on any CPU.
``SUPERBLOCK_HIDE_ISA=amx`` (or ``amx,vnni``) in the environment hides instruction sets from the int8 ops, to try
what a CPU without them does (``amx`` hides our AMX tile kernel from the float ops and the attention core too);
``avx512`` in it hides AVX-512 from the float kernels' elementwise code (the fused MLP's activation,
``residual_norm``'s LayerNorm), which then run their portable loops (read once per process).
"""

import os
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

import blocksparse_fused
import blocksparse_int8_reference as int8_reference
import blocksparse_reference as reference

HIDE_VARIABLE = "SUPERBLOCK_HIDE_ISA"
KERNELS = ("fused", "bmm")
ISAS = ("amx", "vnni")  # the int8 ops' instruction sets, by their C++ names
INSTRUCTION_SETS = {"amx": "AMX (amx_int8)", "vnni": "AVX-512 VNNI (avx512_vnni)"}
ELEMENTWISE_ISA = "avx512"  # what SUPERBLOCK_HIDE_ISA names to hide AVX-512 from the float kernels' elementwise code

_state: Dict[str, object] = {}


##### The ops and the instruction sets they run on #####


def _register_fakes() -> None:
    if _state.get("fakes"):
        return

    @torch.library.register_fake("superblock::int8_bsr_linear")
    def _(x, blocks, row_offsets, cols, weight_scale, compensation, bias, out_features, tile_tokens, isa):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("superblock::int8_bsr_mlp")
    def _(x, blocks1, row_offsets1, cols1, weight_scale1, compensation1, bias1, blocks2, row_offsets2, cols2,
          weight_scale2, compensation2, bias2, out_features, activation, tile_tokens, isa):
        return x.new_empty(x.shape[0], out_features)

    _state["fakes"] = True


def hidden_isas() -> Tuple[str, ...]:
    """The instruction sets ``SUPERBLOCK_HIDE_ISA`` hides (comma-separated names among ``ISAS``)."""
    names = [n.strip() for n in os.environ.get(HIDE_VARIABLE, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in ISAS + (ELEMENTWISE_ISA,)]
    if unknown:
        raise ValueError(f"{HIDE_VARIABLE}={os.environ[HIDE_VARIABLE]}: unknown {', '.join(unknown)}; "
                         f"name some of {', '.join(ISAS + (ELEMENTWISE_ISA,))}")
    return tuple(names)


def isas(blocksize: int) -> Tuple[str, ...]:
    """The instruction sets the int8 ops run for blocks of ``blocksize`` here: "amx" (once it matched the reference
    here, at first use) and "vnni", where the CPU has them and ``SUPERBLOCK_HIDE_ISA`` does not hide them."""
    if not blocksparse_fused.available() or blocksize % 16 != 0:
        return ()
    _register_fakes()
    found = [isa for isa in torch.ops.superblock.int8_isas() if isa not in hidden_isas()]
    if "amx" in found and not _amx_is_exact(blocksize):
        found.remove("amx")
    return tuple(found)


@torch.no_grad()
def _amx_is_exact(blocksize: int) -> bool:
    """Whether the int8 ops' AMX path (our tile kernel; ATen's brgemm for blocks of 16) gives the reference's results
    for blocks of ``blocksize`` (checked once, with items of 16 tokens and one of 37: two row tiles, then a partial
    one)."""
    checked = _state.setdefault("amx_exact", {})
    if blocksize not in checked:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(3 * blocksize, 2 * blocksize, generator=gen)
        weight[blocksize:2 * blocksize, :blocksize] = 0  # a row with one block, a row with two adjacent blocks
        weight[2 * blocksize:] = 0  # and an empty row
        layer = nn.Linear(2 * blocksize, 3 * blocksize)
        layer.weight.data = weight
        x = torch.randn(37, 2 * blocksize, generator=gen)
        values, crow, col, weight_q, scale, bias = _quantize(layer, blocksize)
        operands = (int8_reference.vnni_layout(values), crow, col, scale, int8_reference.compensation(weight_q), bias)
        expected = int8_reference.int8_linear(x, weight_q, scale, bias)
        try:
            exact = all(torch.equal(int8_linear(x, operands, 3 * blocksize, tile, "amx"), expected)
                        for tile in (16, 64))
        except RuntimeError:  # a shape oneDNN refuses here
            exact = False
        if not exact:
            warnings.warn(f"the int8 kernel's AMX path gave wrong results for blocks of {blocksize} on this CPU; "
                          f"using AVX-512 VNNI instead", stacklevel=3)
        checked[blocksize] = exact
    return checked[blocksize]


def unavailable_reason(blocksize: int) -> Optional[str]:
    """None when the int8 ops run here for blocks of ``blocksize``; otherwise why not."""
    if blocksize % 16 != 0:
        return f"the int8 kernels take blocks of a multiple of 16, not {blocksize}"
    if not blocksparse_fused.available():
        return f"the C++ extension is unavailable ({blocksparse_fused.unavailable_reason()})"
    if isas(blocksize):
        return None
    present, hidden = torch.ops.superblock.int8_isas(), hidden_isas()
    lacking = [INSTRUCTION_SETS[isa] for isa in ISAS if isa not in present]
    why = f"they need {' or '.join(INSTRUCTION_SETS.values())}"
    if lacking:
        why += f"; this CPU lacks {' and '.join(lacking)}"
    if any(isa in present for isa in hidden):
        why += f"; {HIDE_VARIABLE} hides {' and '.join(INSTRUCTION_SETS[isa] for isa in hidden if isa in present)}"
    if "amx" in present and "amx" not in hidden:
        why += "; AMX failed its check against the reference"
    return why


def require(blocksize: int) -> None:
    """Raise RuntimeError, saying why, when the int8 ops cannot run here."""
    reason = unavailable_reason(blocksize)
    if reason is not None:
        raise RuntimeError(f"quantize='int8' needs the int8 CPU kernels, which cannot run here: {reason}; pass "
                           f"kernel='bmm' for the pure-PyTorch reference (slow), or leave quantize off")


def int8_linear(x, operands, out_features: int, tile_tokens: int, isa: str) -> torch.Tensor:
    """W8A8 ``x (n, in) @ W.T + bias`` from W's packed int8 blocks (``Int8BlockSparseLinear.fused_operands``)."""
    return torch.ops.superblock.int8_bsr_linear(x, *operands, out_features, tile_tokens, isa)


def int8_mlp(x, first, second, out_features: int, activation: str, tile_tokens: int, isa: str) -> torch.Tensor:
    """``second(act(first(x)))`` in W8A8 per tile of ``tile_tokens`` tokens, the hidden activations in cache."""
    return torch.ops.superblock.int8_bsr_mlp(x, *first, *second, out_features, activation, tile_tokens, isa)


def _quantize(linear: nn.Linear, blocksize: int):
    """(int8 blocks (kept, in, out), crow, col, int8 weight, float32 scales, float32 bias) of a float Linear."""
    weight_q, scale = int8_reference.quantize_weight(linear.weight)
    values, crow, col = reference.pack_blocks(weight_q, blocksize)
    bias = None if linear.bias is None else linear.bias.detach().float()
    return values, crow, col, weight_q, scale, bias


##### The module #####


def _repack_after_load(module: "Int8BlockSparseLinear", incompatible_keys) -> None:
    module._repack()  # a function, not a lambda: a converted model must pickle

_measured: Dict[tuple, Tuple[Tuple[int, str], float]] = {}  # one measurement per distinct layer


class Int8BlockSparseLinear(reference.FrozenBlockLayer):
    """A frozen Linear in W8A8: its nonzero ``blocksize`` blocks in int8, a float32 scale per output channel and a
    float32 bias; build with ``from_dense``. With every block kept it is a dense int8 layer."""

    def __init__(self, in_features: int, out_features: int, blocksize: int, kernel: str, kept_blocks: int):
        super().__init__(in_features, out_features, blocksize, kernel, kept_blocks)
        self.isa: Optional[str] = None  # "fused": "amx" or "vnni", measured at conversion
        self.seconds: Optional[float] = None  # "fused": its fastest setting's time on the conversion's sample
        self.measured_dtype = torch.float32  # "fused": the input dtype it was timed with (the model's)
        self.register_load_state_dict_post_hook(_repack_after_load)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear, blocksize: int, kernel: str = "fused") -> "Int8BlockSparseLinear":
        """Quantize ``linear`` (its all-zero blocks dropped) for ``kernel`` ("fused" measures its fastest token tile
        and instruction set here); raises ValueError, or RuntimeError where the int8 ops cannot run."""
        if kernel not in KERNELS:
            raise ValueError(f"int8 layers run kernel 'fused' or 'bmm' (the reference), not {kernel!r}")
        out_features, in_features = linear.weight.shape
        if not (blocksize > 0 and out_features % blocksize == 0 and in_features % blocksize == 0):
            raise ValueError(f"blocksize {blocksize} does not divide the weight shape {out_features}x{in_features}")
        if kernel == "fused":
            require(blocksize)
        values, crow, col, _, scale, bias = _quantize(linear, blocksize)
        module = cls(in_features, out_features, blocksize, kernel, col.numel()).train(linear.training)
        module.register_buffer("block_values", values)  # int8 (kept, in, out): each block transposed
        module.register_buffer("block_crow", crow)
        module.register_buffer("block_col", col)
        module.register_buffer("weight_scale", scale)
        module.register_buffer("bias", bias)
        module._repack()
        if kernel == "fused":
            dtype = linear.weight.dtype if linear.weight.dtype in (torch.float32, torch.bfloat16) else torch.float32
            module.measured_dtype = dtype
            (module.tile_tokens, module.isa), module.seconds = module._fastest_setting(dtype)
        return module

    def _fastest_setting(self, dtype: torch.dtype):
        """((tile_tokens, isa), seconds) of this layer on ``AUTO_SAMPLE_TOKENS`` tokens of ``dtype``."""
        key = (self.in_features, self.out_features, self.blocksize, self.kept_blocks, dtype, torch.get_num_threads(),
               isas(self.blocksize))
        if key not in _measured:
            x = torch.randn(blocksparse_fused.AUTO_SAMPLE_TOKENS, self.in_features, dtype=dtype)
            operands = self.fused_operands()
            _measured[key] = blocksparse_fused.fastest_setting(
                lambda tile, isa: int8_linear(x, operands, self.out_features, tile, isa), x.shape[0],
                variants=isas(self.blocksize))
        return _measured[key]

    def _apply(self, fn, recurse=True):
        # A dtype cast of the model (.to(torch.bfloat16)) leaves the scales and bias in float32: the layer computes
        # in its input's dtype anyway, and rounding them would change every result. Device moves apply.
        before = {name: b for name, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, buffer in before.items():
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = buffer.to(self._buffers[name].device)
        self._repack()
        return self

    def _repack(self) -> None:
        """Derive the ops' layout and the +128 compensation (not saved in state_dict) from ``block_values``."""
        if "block_values" not in self._buffers:  # not built yet
            return
        self.register_buffer("packed_values", int8_reference.vnni_layout(self.block_values), persistent=False)
        self.register_buffer("compensation", int8_reference.compensation(self.dense_quantized()), persistent=False)

    def settle_on_this_cpu(self) -> None:
        # Another CPU may lack the instruction set measured at conversion: measure again among those it has.
        if self.kernel == "fused":
            blocksparse_fused.require_for_pickled_model()
            require(self.blocksize)
            if self.isa not in isas(self.blocksize):
                (self.tile_tokens, self.isa), self.seconds = self._fastest_setting(self.measured_dtype)

    def fused_operands(self) -> tuple:
        """(packed blocks, row offsets, columns, weight scales, compensation, bias): what the int8 ops read."""
        return self.packed_values, self.block_crow, self.block_col, self.weight_scale, self.compensation, self.bias

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the ops compute an input of ``dtype`` in: float32 or bfloat16 as given, anything else float32."""
        return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.check_input(input)
        x = input.reshape(-1, self.in_features)
        x = x.to(self.compute_dtype(x.dtype))
        if self.kernel == "fused":
            y = int8_linear(x, self.fused_operands(), self.out_features, self.tile_tokens, self.isa)
        else:
            y = int8_reference.int8_linear(x, self.dense_quantized(), self.weight_scale, self.bias)
        return y.to(input.dtype).reshape(*input.shape[:-1], self.out_features)

    def dense_quantized(self) -> torch.Tensor:
        """The int8 weight (out, in), zeros where blocks are not stored."""
        return reference.expand_blocks(self.block_values, self.block_crow, self.block_col,
                                       (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with: its int8 weight times the channel scales."""
        return int8_reference.dequantize_weight(self.dense_quantized(), self.weight_scale)

    def tile_mask(self) -> torch.Tensor:
        """Bool (out/blocksize, in/blocksize): True where a block is stored (for pictures of the mask)."""
        rows, cols = self.out_features // self.blocksize, self.in_features // self.blocksize
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        counts = self.block_crow.diff().long().cpu()
        mask[torch.repeat_interleave(torch.arange(rows), counts), self.block_col.long().cpu()] = True
        return mask

    def setting_repr(self) -> str:
        return f", tile_tokens={self.tile_tokens}, isa={self.isa!r}" if self.tile_tokens is not None else ""
