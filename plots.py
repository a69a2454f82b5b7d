"""Pictures of the masks: each sparsified layer's tile mask as a small heat map, and sparsity per layer.

matplotlib is optional: the functions here import it when called and say how to install it otherwise.
"""

import re

import torch
import torch.nn as nn

from supermask import SUPERMASK_LAYERS, tile_mask, tiled, within_tile_dims


def require_matplotlib():
    """Import matplotlib with a non-interactive backend, or raise ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: `pip install matplotlib` "
                          "(or `.venv/bin/pip install -r requirements-dev.txt`)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def tile_masks(model, tile_size=None):
    """{layer name: 2-D bool tile mask (True = kept)} for every masked or block-sparse layer of the model.

    Supermask layers use their own tiles. Frozen layers (plain Linear/Conv2d, or a nn.MultiheadAttention's
    in_proj_weight) are cut into `tile_size` tiles and count when some tile is all zero. Block-sparse
    layers (anything with a `tile_mask()` method) report their own blocks. Conv masks are shown as
    (out tiles, in tiles x kernel tiles).
    """
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, SUPERMASK_LAYERS):
            grid = tile_mask(module.scores.detach(), module.num_pruned).bool()
        elif hasattr(module, "tile_mask") and callable(module.tile_mask):
            grid = module.tile_mask()
        elif isinstance(module, nn.MultiheadAttention) and tile_size and module._qkv_same_embed_dim:
            grid = _zero_tile_grid(module.in_proj_weight, tile_size)
            name = f"{name}.in_proj_weight"
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and tile_size:
            grid = _zero_tile_grid(module.weight, tile_size)
        else:
            continue
        if grid.all():
            continue  # a dense layer has nothing to show
        masks[name] = grid.reshape(grid.shape[0], -1).cpu()
    return masks


def _zero_tile_grid(weight, tile_size):
    return tiled(weight, tile_size).ne(0).any(dim=within_tile_dims(weight))


def _block_and_layer(name):
    """Split a layer name into its block (row of the figure) and its place in the block (column)."""
    match = re.match(r"(.*?\d+)\.(.+)", name)
    return (match.group(1), match.group(2)) if match else ("", name)


def plot_masks(model, path, tile_size=None, title=None):
    """Write a PNG: one heat map per sparsified layer (kept tiles dark), by block and layer, and a bar chart."""
    plt = require_matplotlib()
    masks = tile_masks(model, tile_size)
    if not masks:
        raise ValueError("the model has no sparse layers to plot: sparsify it first (or pass the tile size "
                         "of a frozen model)")
    rows, columns = [], []
    for name in masks:
        block, layer = _block_and_layer(name)
        rows += [block] if block not in rows else []
        columns += [layer] if layer not in columns else []
    cell = 1.6
    fig = plt.figure(figsize=(max(6.0, cell * len(columns) + 1), cell * len(rows) + 3.2), dpi=100)
    grid = fig.add_gridspec(len(rows) + 2, len(columns), height_ratios=[1] * len(rows) + [0.15, 1.6])
    for name, mask in masks.items():
        block, layer = _block_and_layer(name)
        ax = fig.add_subplot(grid[rows.index(block), columns.index(layer)])
        ax.imshow(mask.float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        sparsity = 1 - mask.float().mean().item()
        ax.set_title(f"{layer}\n{100 * sparsity:.0f}% pruned", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(block.split(".")[-1], fontsize=6)
    bars = fig.add_subplot(grid[-1, :])
    names = list(masks)
    bars.bar(range(len(names)), [100 * (1 - m.float().mean().item()) for m in masks.values()], color="0.3")
    bars.set_ylabel("% tiles pruned", fontsize=8)
    bars.set_ylim(0, 100)
    bars.set_xticks(range(len(names)))
    bars.set_xticklabels([".".join(n.split(".")[-3:]) for n in names], rotation=90, fontsize=5)
    fig.suptitle(title or "Tile masks (dark = kept)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

