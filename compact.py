"""Compact checkpoints: the deployable block-sparse model, kept blocks and their indices only.

``save_compact`` writes it from a model converted by ``blocksparse.apply_bsr``; ``load_compact`` rebuilds the
ready-to-run block-sparse model. The file loads with ``torch.load(weights_only=True)``.

The file is a dict: ``format``, ``version``, ``architecture`` (what ``models.build_model`` needs), ``blocksize``,
``dense`` (every other tensor by its dense model's name) and ``sparse``: per block-sparse layer, by the name of the
Linear it replaced, ``shape`` (out, in), ``values`` (kept blocks, (kept, in, out): each block transposed), ``crow``,
``col`` and ``bias``. Version 2 adds int8 (W8A8) layers, whose entries hold their int8 blocks as they are, plus
``quantize: "int8"``, ``weight_scale`` (float32, one per output channel) and their own ``blocksize`` (a dense int8
layer may use larger blocks than the file's). A file without int8 layers is written as version 1, which older
SuperBlocks read.
"""

import os
from typing import Tuple

import torch
from torch import nn

import blocksparse
import checkpoints
import models
import utils
from attention import ProjectedAttention
from blocksparse_int8 import Int8BlockSparseLinear
from blocksparse_int8_reference import dequantize_weight
from blocksparse_reference import expand_blocks, pack_blocks

COMPACT_FORMAT = checkpoints.COMPACT_FORMAT
COMPACT_VERSION = 2  # the newest version this code reads and writes
INT8_VERSION = 2  # the first version with int8 layers


def _attention_key(fqn: str, model: nn.Module) -> str:
    """The plain nn.MultiheadAttention name of a ProjectedAttention entry (X.in_proj.weight -> X.in_proj_weight)."""
    owner, _, leaf = fqn.rpartition(".")
    layer, _, projection = owner.rpartition(".")
    if projection == "in_proj" and isinstance(model.get_submodule(layer) if layer else model, ProjectedAttention):
        return f"{layer}.in_proj_{leaf}" if layer else f"in_proj_{leaf}"
    return fqn


@torch.no_grad()
def save_compact(model: nn.Module, path: str, *, architecture: dict, blocksize: int) -> dict:
    """Write the deployable model: kept blocks and their indices for block-sparse layers, dense tensors otherwise.

    ``architecture`` holds what rebuilds the dense model (``model``, ``num_classes``, ``image_size``: the
    arguments of ``models.build_model``). No scores, no optimizer state; loads with
    ``torch.load(weights_only=True)``. Returns the file's size and that of the same model stored dense.
    """
    sparse, sparse_prefixes = {}, []
    # By the dense model's names (a fused MLP's two layers under the two Linears it replaced).
    for fqn, module in blocksparse.block_sparse_layers(model).items():
        if isinstance(module, Int8BlockSparseLinear):
            values, crow, col = module.block_values, module.block_crow, module.block_col
        else:
            values, crow, col = pack_blocks(module.dense_weight(), module.blocksize)
        sparse[fqn] = {"shape": [module.out_features, module.in_features], "values": values.cpu(),
                       "crow": crow.cpu(), "col": col.cpu(), "bias": None if module.bias is None else module.bias.cpu()}
        if isinstance(module, Int8BlockSparseLinear):
            sparse[fqn].update(quantize="int8", weight_scale=module.weight_scale.cpu(), blocksize=module.blocksize)
        sparse_prefixes.append(fqn + ".")
    dense = {_attention_key(k, model): v.cpu() for k, v in model.state_dict().items()
             if not k.startswith(tuple(sparse_prefixes))}
    # The oldest version that holds the content, so that a file without int8 layers stays readable by older code.
    version = INT8_VERSION if quantization({"sparse": sparse}) else 1
    checkpoints.save_checkpoint({"format": COMPACT_FORMAT, "version": version, "architecture": dict(architecture),
                                 "blocksize": blocksize, "dense": dense, "sparse": sparse}, path)
    # The same model stored dense: int8 layers count at the size of the model's other floats (float32 or less).
    float_size = next((t.element_size() for t in dense.values() if t.is_floating_point()), 4)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.values()) + sum(
        (layer["shape"][0] * layer["shape"][1] + (0 if layer["bias"] is None else layer["bias"].numel()))
        * (float_size if "quantize" in layer else layer["values"].element_size()) for layer in sparse.values())
    return {"bytes": os.path.getsize(path), "dense_bytes": dense_bytes}


def is_compact(checkpoint) -> bool:
    """True for a dict written by save_compact."""
    return checkpoints.is_compact_file(checkpoint)


def quantization(checkpoint: dict):
    """``"int8"`` for a compact checkpoint holding int8 (W8A8) layers, else None."""
    layers = checkpoint.get("sparse")
    quantized = isinstance(layers, dict) and any(isinstance(layer, dict) and "quantize" in layer
                                                 for layer in layers.values())
    return "int8" if quantized else None


def check_compact(checkpoint: dict) -> None:
    """Raise ValueError for a compact checkpoint newer than this code, or naming its first entry that is missing or
    of the wrong kind."""
    if checkpoint.get("version", 0) > COMPACT_VERSION:
        raise ValueError(f"compact checkpoint format version {checkpoint['version']} is newer than this SuperBlock "
                         f"reads ({COMPACT_VERSION}); update SuperBlock")

    def need(ok, what):
        if not ok:
            raise ValueError(f"malformed compact checkpoint: {what}; re-create it with evaluate.py --save-compact")

    arch = checkpoint.get("architecture")
    need(isinstance(arch, dict) and all(k in arch for k in ("model", "num_classes", "image_size")),
         "'architecture' must hold model, num_classes and image_size")
    need(isinstance(checkpoint.get("blocksize"), int) and checkpoint["blocksize"] > 0,
         "'blocksize' must be a positive integer")
    need(isinstance(checkpoint.get("dense"), dict)
         and all(isinstance(t, torch.Tensor) for t in checkpoint["dense"].values()),
         "'dense' must map names to tensors")
    need(isinstance(checkpoint.get("sparse"), dict), "'sparse' must map layer names to their blocks")
    for fqn, layer in checkpoint["sparse"].items():
        need(isinstance(layer, dict) and all(k in layer for k in ("shape", "values", "crow", "col", "bias")),
             f"sparse layer {fqn!r} must hold shape, values, crow, col and bias")
        shape, values, crow, col = layer["shape"], layer["values"], layer["crow"], layer["col"]
        blocksize = checkpoint["blocksize"]
        if "quantize" in layer:
            need(layer["quantize"] == "int8", f"sparse layer {fqn!r}: unknown quantize {layer['quantize']!r}; "
                                              f"this SuperBlock reads 'int8'")
            blocksize = layer.get("blocksize")
            need(isinstance(blocksize, int) and blocksize > 0 and blocksize % 16 == 0,
                 f"sparse layer {fqn!r}: an int8 layer's 'blocksize' must be a positive multiple of 16")
        need(isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) for v in shape)
             and shape[0] % blocksize == 0 and shape[1] % blocksize == 0,
             f"sparse layer {fqn!r}: shape {shape} is not two multiples of the block size {blocksize}")
        need(all(isinstance(t, torch.Tensor) for t in (values, crow, col)) and values.dim() == 3
             and tuple(values.shape[1:]) == (blocksize, blocksize) and crow.numel() == shape[0] // blocksize + 1
             and col.numel() == values.shape[0] and int(crow[-1]) == values.shape[0]
             and bool((crow.diff() >= 0).all()) and bool(((col >= 0) & (col < shape[1] // blocksize)).all()),
             f"sparse layer {fqn!r}: its blocks and indices do not fit its shape {shape[0]}x{shape[1]}")
        if "quantize" not in layer:
            need(values.is_floating_point(), f"sparse layer {fqn!r}: its values are {values.dtype}, not floats "
                                             f"(an int8 layer says quantize: 'int8')")
            continue
        scale = layer.get("weight_scale")
        need(values.dtype == torch.int8, f"sparse layer {fqn!r}: an int8 layer's values are {values.dtype}, not int8")
        need(isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and tuple(scale.shape) == (shape[0],)
             and bool((scale > 0).all() and scale.isfinite().all()),
             f"sparse layer {fqn!r}: an int8 layer's 'weight_scale' must be {shape[0]} positive float32 values, one "
             f"per output channel")
    need(quantization(checkpoint) is None or checkpoint["blocksize"] % 16 == 0,
         "a file with int8 layers must have a 'blocksize' that is a multiple of 16")


@torch.no_grad()
def model_from_compact(checkpoint: dict, *, kernel: str = "auto", device=None) -> Tuple[nn.Module, "blocksparse.BsrResult"]:
    """Rebuild the block-sparse model a compact checkpoint (already loaded) describes; returns (model, BsrResult).

    The dense model is built with every stored weight (int8 layers dequantized: quantized again, also after
    rounding to bfloat16, they give back the same int8 weights and scales), then ``blocksparse.apply_bsr`` converts
    the stored layers again with ``kernel``, the int8 ones with ``quantize="int8"`` (so the int8 kernels must run
    here, or pass ``kernel="bmm"``). With ``kernel="auto"`` a layer measured faster in float here runs so, with the
    dequantized weight. Raises ValueError, with the reason, for a file that is newer than this code or malformed.
    """
    check_compact(checkpoint)
    arch = checkpoint["architecture"]
    try:
        model = models.build_model(arch["model"], num_classes=arch["num_classes"], image_size=arch["image_size"])
    except ValueError as e:
        raise ValueError(f"malformed compact checkpoint: its architecture cannot be built: {e}") from None
    state = dict(checkpoint["dense"])
    floats = [t for t in state.values() if t.is_floating_point()]
    model.to(dtype=floats[0].dtype if floats else torch.float32)
    for fqn, layer in checkpoint["sparse"].items():
        weight = expand_blocks(layer["values"], layer["crow"], layer["col"], tuple(layer["shape"]))
        if "quantize" in layer:
            weight = dequantize_weight(weight, layer["weight_scale"])
        owner, _, projection = fqn.rpartition(".")
        if projection == "in_proj" and isinstance(_submodule_or_none(model, owner), nn.MultiheadAttention):
            state[f"{owner}.in_proj_weight"], bias_key = weight, f"{owner}.in_proj_bias"
        else:
            state[f"{fqn}.weight"], bias_key = weight, f"{fqn}.bias"
        if layer["bias"] is not None:
            state[bias_key] = layer["bias"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0].rstrip(":. ")
        raise ValueError(f"malformed compact checkpoint: its weights do not fit a {arch['model']} ({first}); "
                         f"re-create it with evaluate.py --save-compact") from None
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, _convert_stored_layers(model, checkpoint, kernel)


def _convert_stored_layers(model: nn.Module, checkpoint: dict, kernel: str) -> "blocksparse.BsrResult":
    """apply_bsr on the layers the file stores sparse, each as it was converted: float, int8, or dense int8."""
    blocksize, layers = checkpoint["blocksize"], checkpoint["sparse"]
    int8 = {fqn for fqn, layer in layers.items() if "quantize" in layer}
    # apply_bsr packs an int8 layer that meets min_sparsity in the file's blocks, and one that does not (a dense
    # int8 layer) in the largest of INT8_DENSE_BLOCKS that divides its shape. The layers stored in other blocks than
    # the file's are converted by a second call in which no layer meets min_sparsity, at the same block size, so
    # that an MLP pair's hidden units keep the order they were saved in (apply_bsr sorts them by kept blocks).
    dense_int8 = {fqn for fqn in int8 if layers[fqn]["blocksize"] != blocksize}
    first = set(layers) - dense_int8
    result = blocksparse.apply_bsr(model, blocksize, min_sparsity=0.0, kernel=kernel, filter_fn=_named(first),
                                   quantize="int8" if first & int8 else None, quantize_filter_fn=_named(first & int8))
    if dense_int8:
        _plain_projections(model, dense_int8)
        second = blocksparse.apply_bsr(model, blocksize, min_sparsity=1.0, kernel=kernel, filter_fn=_named(dense_int8),
                                       quantize="int8", quantize_filter_fn=_named(dense_int8))
        # The second call's reasons for its own layers (float measured faster: "...; <why>"); the first's for others.
        why_float = {name: why.rpartition("; ")[2] for name, why in second.left_dense if name in dense_int8}
        converted = {name for name, _, _ in second.converted}
        result.converted += second.converted
        result.left_dense = [(name, f"stored as dense int8, {why_float[name]}" if name in why_float else why)
                             for name, why in result.left_dense if name not in converted]
        result.mlp_pairs += second.mlp_pairs
        result.fused_mlps += second.fused_mlps
    # Every other layer was stored dense: say so rather than blame a filter the user never passed.
    result.left_dense = [(name, "stored dense in the compact file" if why == blocksparse.EXCLUDED else why)
                         for name, why in result.left_dense]
    return result


def _named(names):
    return lambda module, fqn: fqn in names


@torch.no_grad()
def _plain_projections(model: nn.Module, names) -> None:
    """Make each ProjectedAttention's out_proj that ``names`` lists a plain nn.Linear.

    It is still the Linear subclass of the nn.MultiheadAttention it came from. Within one apply_bsr call the
    projections are converted with their attention module; once the first call has made that a ProjectedAttention,
    the second converts plain nn.Linear layers only.
    """
    for fqn in names:
        owner, _, leaf = fqn.rpartition(".")
        module = _submodule_or_none(model, fqn)
        if (leaf == "out_proj" and isinstance(_submodule_or_none(model, owner), ProjectedAttention)
                and isinstance(module, nn.Linear) and type(module) is not nn.Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.weight.device, dtype=module.weight.dtype)
            plain.load_state_dict(module.state_dict())
            setattr(model.get_submodule(owner), leaf, plain.eval().requires_grad_(False))


def _submodule_or_none(model: nn.Module, fqn: str):
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def load_compact(path: str, *, kernel: str = "auto", device=None) -> nn.Module:
    """The ready-to-run block-sparse model saved by save_compact (ValueError when the file is not one)."""
    try:
        checkpoint = checkpoints.load_checkpoint(path)
    except utils.InputError as e:
        raise ValueError(str(e)) from None
    if not is_compact(checkpoint):
        raise ValueError(f"{path} is not a compact SuperBlock checkpoint (write one with evaluate.py --save-compact)")
    return model_from_compact(checkpoint, kernel=kernel, device=device)[0]
