"""Pictures of the masks: each sparsified layer's tile mask drawn to scale, one square per tile.

Rows are output features and columns input features, as in the weight matrix. In a Linear pair with only
elementwise modules between (a transformer MLP), the hidden features are the first layer's rows and the
second's columns; a hidden block that either layer drops entirely is unused by both, and the picture shades it
grey in both, since the block-sparse MLP skips it.

matplotlib is optional: the functions here import it when called and say how to install it otherwise.
"""

import itertools
import math
import re
import textwrap
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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


@dataclass
class LayerMask:
    """One sparse layer: its name, its tile mask (2-D bool, True = kept) and its weight's shape."""
    name: str
    mask: torch.Tensor
    shape: Tuple[int, ...]


@torch.no_grad()
def layer_masks(model, tile_size=None) -> List[LayerMask]:
    """A LayerMask for every masked or block-sparse layer of the model, in module order.

    Supermask layers use their own tiles. Frozen layers (plain Linear/Conv2d, or a nn.MultiheadAttention's
    in_proj_weight) are cut into `tile_size` tiles and count when some tile is all zero. Block-sparse
    layers (anything with a `tile_mask()` method) report their own blocks. Conv masks are shown as
    (out tiles, in tiles x kernel tiles).
    """
    layers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, SUPERMASK_LAYERS):
            grid = tile_mask(module.scores.detach(), module.num_pruned).bool()
        elif hasattr(module, "tile_mask") and callable(module.tile_mask):
            grid = module.tile_mask()
            if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                weight = torch.empty(module.out_features, module.in_features, device="meta")
        elif isinstance(module, nn.MultiheadAttention) and tile_size and module._qkv_same_embed_dim:
            weight = module.in_proj_weight
            grid = _zero_tile_grid(weight, tile_size)
            name = f"{name}.in_proj_weight"
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and tile_size:
            grid = _zero_tile_grid(weight, tile_size)
        else:
            continue
        if grid.all():
            continue  # a dense layer has nothing to show
        layers.append(LayerMask(name, grid.reshape(grid.shape[0], -1).cpu(), tuple(weight.shape)))
    return layers


def tile_masks(model, tile_size=None):
    """{layer name: 2-D bool tile mask (True = kept)} for every masked or block-sparse layer of the model."""
    return {layer.name: layer.mask for layer in layer_masks(model, tile_size)}


def _zero_tile_grid(weight, tile_size):
    return tiled(weight, tile_size).ne(0).any(dim=within_tile_dims(weight))


def linear_pairs(model, names) -> List[Tuple[str, str]]:
    """(first, second) for each nn.Sequential run: a layer in `names`, parameter-free modules, a layer in `names`."""
    pairs = []
    for fqn, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{fqn}." if fqn else ""
        children = list(seq.named_children())
        for i, (first, _) in enumerate(children):
            j = i + 1
            while j < len(children) and next(children[j][1].parameters(), None) is None:
                j += 1
            if prefix + first in names and j > i + 1 and j < len(children) and prefix + children[j][0] in names:
                pairs.append((prefix + first, prefix + children[j][0]))
    return pairs


# ####### Drawing ########

# Colours of the four kinds of tile: pruned, kept, and the same two in a hidden block a Linear pair leaves unused.
PRUNED, KEPT, PRUNED_UNUSED, KEPT_UNUSED = range(4)
COLOURS = ("white", "0.05", "0.88", "0.55")
DPI = 120
# Inches around each panel: title above, tick labels and axis labels left and below, a gap right.
LABEL_W, LABEL_H, GAP_W, MIN_PANEL_W = 0.5, 0.4, 0.25, 1.1
# A mask shorter than this is centred in this much height: room for its axis label beside it, below its title.
MIN_IMAGE_H = 0.55
TITLE_CHAR_W, TITLE_LINE_H = 0.06, 0.13  # inches per character and per line of a 7-point title, with a margin


def _short(name, width=1000):
    """The block and the layer of a module name: encoder.layers.encoder_layer_0.mlp.0 -> encoder_layer_0.mlp.0.

    Longer than `width` characters, it is two lines, the block and the layer.
    """
    match = re.match(r"(.*?\d+)\.(.+)", name)
    if not match:
        return name
    block, layer = match.group(1).split(".")[-1], match.group(2)
    return f"{block}.{layer}" if len(block) + len(layer) < width else f"{block}.\n{layer}"


def _block(name):
    match = re.match(r"(.*?\d+)\.", name)
    return match.group(1) if match else ""


def _title(layer):
    """Three lines: the layer, its weight's shape, the tiles it keeps."""
    kept, total = int(layer.mask.sum()), layer.mask.numel()
    shape = "x".join(str(size) for size in layer.shape)
    return f"{_short(layer.name, width=26)}\n{shape} weights\nkept {kept}/{total} tiles ({100 * kept / total:.0f}%)"


def _unused_hidden(layers, pairs):
    """({layer name: (unused per tile-row, per tile-column)}, [(first, second, unused, hidden blocks)]) of the pairs."""
    by_name = {layer.name: layer.mask for layer in layers}
    marks, counts = {}, []
    for first, second in pairs:
        rows, columns = by_name[first], by_name[second]
        if rows.shape[0] != columns.shape[1]:
            continue  # tiles of another size in the two layers: no common hidden block to mark
        unused = ~rows.any(dim=1) | ~columns.any(dim=0)
        marks[first] = (unused, torch.zeros(rows.shape[1], dtype=torch.bool))
        marks[second] = (torch.zeros(columns.shape[0], dtype=torch.bool), unused)
        counts.append((first, second, int(unused.sum()), unused.numel()))
    return marks, counts


def _panel_image(mask, marks):
    image = mask.long().clone()
    if marks is not None:
        rows, columns = marks
        band = rows[:, None] | columns[None, :]
        image[band] += PRUNED_UNUSED
    return image.numpy()


def _caption(layers, counts):
    """The lines above the panels: how to read them, and what they show."""
    tiles = {(layer.shape[0] // layer.mask.shape[0], layer.shape[-1] // layer.mask.shape[1]) for layer in layers}
    if len(tiles) == 1 and all(len(layer.shape) == 2 for layer in layers):
        height, width = next(iter(tiles))
        tile = f"each square is a {height}x{width} tile of weights"
    else:
        tile = "each square is one tile of weights (of each layer's tile size)"
    lines = [f"Tile masks of {len(layers)} sparse layers, drawn to scale: {tile}, black = kept, white = pruned; "
             "rows are output features, columns input features."]
    kept = [100 * layer.mask.float().mean().item() for layer in layers]
    if max(kept) - min(kept) < 0.5:
        lines.append(f"Every layer keeps {kept[0]:.0f}% of its tiles.")
    else:
        lines.append(f"Layers keep {min(kept):.0f}% to {max(kept):.0f}% of their tiles (each title says how many).")
    if counts:
        unused = sum(count for _, _, count, _ in counts)
        total = sum(total for _, _, _, total in counts)
        first, second = (_short(name).split(".", 1)[-1] for name in counts[0][:2])
        lines.append(
            f"In each MLP pair {first} -> {second} the hidden features are {first}'s rows and {second}'s columns. "
            f"A hidden block that {first} drops entirely (an empty row) or {second} drops entirely (an empty "
            f"column) is unused by both layers (grey), so the pair keeps whole hidden rows and columns: "
            f"{total - unused} of {total} hidden blocks here, the only ones the block-sparse MLP computes.")
    return lines


def _arrange(panels, max_width):
    """Positions (left, top, in inches from the top left) for panels of (width, height, block), and the size.

    Panels go left to right; a block starts a new line only when it does not fit in the rest of this one.
    """
    positions, x, y, line_height = [], 0.0, 0.0, 0.0
    for i, (width, height, block) in enumerate(panels):
        needed = width
        if i == 0 or panels[i - 1][2] != block:  # a block starts: its panels, if they fit on one line at all
            run = sum(w for w, _, _ in itertools.takewhile(lambda panel: panel[2] == block, panels[i:]))
            needed = run if run <= max_width else width
        if x > 0 and x + needed > max_width:
            x, y, line_height = 0.0, y + line_height, 0.0
        positions.append((x, y))
        x += width
        line_height = max(line_height, height)
    width = max(left + w for (left, _), (w, _, _) in zip(positions, panels))
    return positions, width, y + line_height


def mask_figure(layers: Sequence[LayerMask], pairs: Sequence[Tuple[str, str]] = (), title: Optional[str] = None):
    """A matplotlib Figure of the masks: one panel per layer, one square per tile, titled with name, shape, kept."""
    require_matplotlib()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not layers:
        raise ValueError("the model has no sparse layers to plot: sparsify it first (or pass the tile size "
                         "of a frozen model)")
    marks, counts = _unused_hidden(layers, pairs)
    # Inches per tile: the largest mask about 1.7 inches across, no tile under a pixel nor over 0.12 inches.
    largest = max(max(layer.mask.shape) for layer in layers)
    scale = min(0.12, max(1.7 / largest, 1 / DPI))
    titles = [_title(layer) for layer in layers]
    title_h = TITLE_LINE_H * max(text.count("\n") + 1 for text in titles) + 0.1
    # (width, height, block) of each panel in inches: wide enough for its title, to scale below it.
    panels = [(LABEL_W + max(MIN_PANEL_W, layer.mask.shape[1] * scale, TITLE_CHAR_W * max(map(len, text.split("\n"))))
               + GAP_W, title_h + max(MIN_IMAGE_H, layer.mask.shape[0] * scale) + LABEL_H, _block(layer.name))
              for layer, text in zip(layers, titles)]
    # The line width, between 7 and 20 inches, that makes the picture closest to 4:3 (landscape).
    widest = max(width for width, _, _ in panels)
    layouts = [_arrange(panels, max(widest, 7 + 0.25 * step)) for step in range(53)]
    positions, width, height = min(layouts, key=lambda layout: abs(math.log(layout[1] / layout[2] / 1.33)))
    caption = _caption(layers, counts)
    wrap = max(60, int(width * 15))  # characters per caption line at its font size
    caption_lines = [part for line in caption for part in textwrap.wrap(line, wrap)]
    header = 0.5 + 0.17 * len(caption_lines) + 0.35
    fig = Figure(figsize=(width + 0.2, height + header), dpi=DPI)
    fig_w, fig_h = fig.get_size_inches()
    fig.suptitle(title or "Tile masks", x=0.1 / fig_w, y=1 - 0.15 / fig_h, ha="left", va="top", fontsize=11)
    fig.text(0.1 / fig_w, 1 - 0.5 / fig_h, "\n".join(caption_lines), ha="left", va="top", fontsize=8,
             linespacing=1.4)
    legend = [Patch(facecolor=COLOURS[KEPT], edgecolor="0.5", label="kept"),
              Patch(facecolor=COLOURS[PRUNED], edgecolor="0.5", label="pruned")]
    if counts:
        legend += [Patch(facecolor=COLOURS[KEPT_UNUSED], edgecolor="0.5", label="kept, hidden block unused"),
                   Patch(facecolor=COLOURS[PRUNED_UNUSED], edgecolor="0.5", label="pruned, hidden block unused")]
    fig.legend(handles=legend, loc="upper left", ncol=len(legend), fontsize=7, frameon=False,
               bbox_to_anchor=(0.1 / fig_w, 1 - (header - 0.3) / fig_h), handlelength=1.2)
    colours, norm = ListedColormap(COLOURS), BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], len(COLOURS))
    for layer, text, (left, top), (panel_w, _, _) in zip(layers, titles, positions, panels):
        rows, columns = layer.mask.shape
        image_w, image_h = columns * scale, rows * scale
        image_left = left + 0.1 + LABEL_W + (panel_w - LABEL_W - GAP_W - image_w) / 2
        below_title = (max(MIN_IMAGE_H, image_h) - image_h) / 2
        image_top = header + top + title_h + below_title
        ax = fig.add_axes([image_left / fig_w, 1 - (image_top + image_h) / fig_h, image_w / fig_w, image_h / fig_h])
        ax.imshow(_panel_image(layer.mask, marks.get(layer.name)), cmap=colours, norm=norm,
                  interpolation="nearest", aspect="equal")
        ax.set_title(text, fontsize=7, y=1 + below_title / image_h)
        out_features, in_features = layer.shape[0], math.prod(layer.shape[1:])
        # Ticks at both ends, feature 0 and the last; a tiny mask has room for the last only.
        ax.set_xticks(*([[-0.5, columns - 0.5], ["0", str(in_features)]] if image_w > 0.3
                        else [[columns - 0.5], [str(in_features)]]), fontsize=6)
        ax.set_yticks(*([[-0.5, rows - 0.5], ["0", str(out_features)]] if image_h > 0.25
                        else [[rows - 0.5], [str(out_features)]]), fontsize=6)
        ax.tick_params(length=2, pad=1)
        ax.set_xlabel("input features", fontsize=7, labelpad=1)
        # A short panel's label is two lines, so that it does not reach into the title above.
        ax.set_ylabel("output features" if image_h > 0.9 else "output\nfeatures", fontsize=7, labelpad=1)
    return fig


def plot_masks(model, path, tile_size=None, title=None):
    """Write a PNG of the model's tile masks (see mask_figure); returns the path."""
    layers = layer_masks(model, tile_size)
    fig = mask_figure(layers, linear_pairs(model, {layer.name for layer in layers}), title=title)
    fig.savefig(path)
    return path
