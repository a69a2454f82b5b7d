"""Compact checkpoints: the deployable block-sparse model, kept blocks and their indices only.

``save_compact`` writes it from a model converted by ``blocksparse.apply_bsr``; ``load_compact`` rebuilds the
ready-to-run block-sparse model. The file loads with ``torch.load(weights_only=True)``.
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
from blocksparse_reference import expand_blocks, pack_blocks

COMPACT_FORMAT = checkpoints.COMPACT_FORMAT
COMPACT_VERSION = 1


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
        values, crow, col = pack_blocks(module.dense_weight(), module.blocksize)
        sparse[fqn] = {"shape": [module.out_features, module.in_features], "values": values.cpu(),
                       "crow": crow.cpu(), "col": col.cpu(), "bias": None if module.bias is None else module.bias.cpu()}
        sparse_prefixes.append(fqn + ".")
    dense = {_attention_key(k, model): v.cpu() for k, v in model.state_dict().items()
             if not k.startswith(tuple(sparse_prefixes))}
    checkpoints.save_checkpoint({"format": COMPACT_FORMAT, "version": COMPACT_VERSION, "architecture": dict(architecture),
                           "blocksize": blocksize, "dense": dense, "sparse": sparse}, path)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.values()) + sum(
        (layer["shape"][0] * layer["shape"][1] + (0 if layer["bias"] is None else layer["bias"].numel()))
        * layer["values"].element_size() for layer in sparse.values())
    return {"bytes": os.path.getsize(path), "dense_bytes": dense_bytes}


def is_compact(checkpoint) -> bool:
    """True for a dict written by save_compact."""
    return checkpoints.is_compact_file(checkpoint)


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
    blocksize = checkpoint["blocksize"]
    for fqn, layer in checkpoint["sparse"].items():
        need(isinstance(layer, dict) and all(k in layer for k in ("shape", "values", "crow", "col", "bias")),
             f"sparse layer {fqn!r} must hold shape, values, crow, col and bias")
        shape, values, crow, col = layer["shape"], layer["values"], layer["crow"], layer["col"]
        need(isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) for v in shape)
             and shape[0] % blocksize == 0 and shape[1] % blocksize == 0,
             f"sparse layer {fqn!r}: shape {shape} is not two multiples of the block size {blocksize}")
        need(all(isinstance(t, torch.Tensor) for t in (values, crow, col)) and values.dim() == 3
             and tuple(values.shape[1:]) == (blocksize, blocksize) and crow.numel() == shape[0] // blocksize + 1
             and col.numel() == values.shape[0] and int(crow[-1]) == values.shape[0]
             and bool((crow.diff() >= 0).all()) and bool(((col >= 0) & (col < shape[1] // blocksize)).all()),
             f"sparse layer {fqn!r}: its blocks and indices do not fit its shape {shape[0]}x{shape[1]}")


@torch.no_grad()
def model_from_compact(checkpoint: dict, *, kernel: str = "auto", device=None) -> Tuple[nn.Module, "blocksparse.BsrResult"]:
    """Rebuild the block-sparse model a compact checkpoint (already loaded) describes; returns (model, BsrResult).

    Raises ValueError, with the reason, for a file that is newer than this code or malformed.
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
    sparse_layers = set(checkpoint["sparse"])
    result = blocksparse.apply_bsr(model, checkpoint["blocksize"], min_sparsity=0.0, kernel=kernel,
                                   filter_fn=lambda module, fqn: fqn in sparse_layers)
    # Every other layer was stored dense: say so rather than blame a filter the user never passed.
    result.left_dense = [(name, "stored dense in the compact file" if reason == "excluded by filter_fn" else reason)
                         for name, reason in result.left_dense]
    return model, result


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
