import sys

import pytest
import torch
from PIL import Image

from plots import LayerMask, layer_masks, linear_pairs, mask_figure, plot_masks, require_matplotlib, tile_masks
from supermask import apply_supermask, sparsify_offline
from helpers import tiny_vit

pytest.importorskip("matplotlib", reason="matplotlib is an optional dependency (requirements-dev.txt)")


def sparse_vit():
    torch.manual_seed(0)
    model = tiny_vit()
    apply_supermask(model, linear_sparsity=0.75, linear_sp_tilesize=8, attention_sparsity=0.5,
                    attention_sp_tilesize=8, skip_last_layer_sparsity=True)
    return model


def test_tile_masks_of_frozen_model_equal_the_supermask_tiles():
    model = sparse_vit()
    online = tile_masks(model)
    frozen = tile_masks(sparsify_offline(model), tile_size=8)
    assert set(frozen) == {name.replace("self_attention.in_proj", "self_attention.in_proj_weight") for name in online}
    for name, mask in online.items():
        frozen_name = name.replace("self_attention.in_proj", "self_attention.in_proj_weight")
        assert torch.equal(frozen[frozen_name], mask), name
    assert 0.7 < 1 - online["encoder.layers.encoder_layer_0.mlp.0"].float().mean() < 0.8


def test_plot_masks_writes_a_png_of_sensible_size(tmp_path):
    path = plot_masks(sparse_vit(), tmp_path / "masks.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 400 <= width <= 3000 and 300 <= height <= 3000
        # Not a blank canvas: the kept tiles are drawn dark.
        assert image.convert("L").getextrema()[0] < 50


def mask_panels(fig):
    """The axes of a mask figure that draw a mask (the figure's other artists are text and the legend)."""
    return [ax for ax in fig.axes if ax.images]


def random_mask(rows, columns, keep, generator):
    mask = torch.zeros(rows * columns, dtype=torch.bool)
    mask[torch.randperm(rows * columns, generator=generator)[: round(keep * rows * columns)]] = True
    return mask.reshape(rows, columns)


def vit_b_16_masks(blocks=12):
    """vit_b_16's sparse layers in 16x16 tiles: attention at 50%, the MLP at 90%; and the MLP pairs."""
    generator = torch.Generator().manual_seed(0)
    layers, pairs = [], []
    for block in range(blocks):
        prefix = f"encoder.layers.encoder_layer_{block}."
        layers += [LayerMask(prefix + "self_attention.in_proj", random_mask(144, 48, 0.5, generator), (2304, 768)),
                   LayerMask(prefix + "self_attention.out_proj", random_mask(48, 48, 0.5, generator), (768, 768)),
                   LayerMask(prefix + "mlp.0", random_mask(192, 48, 0.1, generator), (3072, 768)),
                   LayerMask(prefix + "mlp.3", random_mask(48, 192, 0.1, generator), (768, 3072))]
        pairs.append((prefix + "mlp.0", prefix + "mlp.3"))
    return layers, pairs


def test_each_panel_labels_its_axes_and_draws_square_tiles():
    layers = layer_masks(sparse_vit())
    panels = mask_panels(mask_figure(layers))
    assert len(panels) == len(layers)
    width, height = panels[0].figure.get_size_inches()
    for ax, layer in zip(panels, layers):
        assert ax.get_xlabel() == "input features", ax.get_title()
        assert ax.get_ylabel().replace("\n", " ") == "output features", ax.get_title()
        assert ax.get_aspect() == 1.0, f"{ax.get_title()}: tiles stretched (aspect {ax.get_aspect()})"
        # The panel's box itself has the mask's proportions, so each tile is as wide as it is tall.
        box = ax.get_position()
        rows, columns = layer.mask.shape
        assert box.width * width / columns == pytest.approx(box.height * height / rows, rel=1e-6), ax.get_title()


def test_each_title_names_the_layer_its_shape_and_kept_fraction():
    layers = layer_masks(sparse_vit())
    for ax, layer in zip(mask_panels(mask_figure(layers)), layers):
        title = ax.get_title()
        kept, total = int(layer.mask.sum()), layer.mask.numel()
        assert layer.name.split(".")[-1] in title and layer.name.split(".")[-3].split("_")[-1] in title, title
        assert "x".join(map(str, layer.shape)) in title, title
        assert f"kept {kept}/{total} tiles ({100 * kept / total:.0f}%)" in title, title


def test_mlp_pair_greys_the_hidden_blocks_either_layer_drops():
    first = torch.tensor([[1, 1], [0, 0], [1, 1], [1, 1]], dtype=torch.bool)  # hidden block 1: empty row
    second = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)  # hidden block 3: empty column
    layers = [LayerMask("blocks.0.mlp.0", first, (64, 32)), LayerMask("blocks.0.mlp.3", second, (32, 64))]
    fig = mask_figure(layers, [("blocks.0.mlp.0", "blocks.0.mlp.3")])
    drawn = [ax.images[0].get_array() for ax in mask_panels(fig)]
    # 0 pruned, 1 kept; 2 and 3 the same in a hidden block the pair does not use.
    assert drawn[0].tolist() == [[1, 1], [2, 2], [1, 1], [3, 3]]
    assert drawn[1].tolist() == [[1, 3, 0, 2], [0, 3, 1, 2]]
    caption = " ".join(text.get_text() for text in fig.texts).replace("\n", " ")
    assert "2 of 4 hidden blocks" in caption, caption
    assert "Layers keep 50% to 75% of their tiles" in caption, caption


def test_linear_pairs_finds_the_vit_mlp_pairs():
    model = sparse_vit()
    pairs = linear_pairs(model, set(tile_masks(model)))
    assert ("encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp.3") in pairs
    assert len(pairs) == len(model.encoder.layers)


def test_vit_b_16_sized_masks_draw_every_tile_without_overlapping_panels():
    layers, pairs = vit_b_16_masks()
    fig = mask_figure(layers, pairs)
    width, height = fig.get_size_inches()
    assert width <= 21 and height <= 21, f"{width:.1f}x{height:.1f} inches"
    panels = mask_panels(fig)
    assert len(panels) == 48
    assert min(ax.get_position().width * width * fig.dpi / layer.mask.shape[1]
               for ax, layer in zip(panels, layers)) >= 0.99, "tiles under a pixel"
    # Titles, tick labels and axis labels of one panel stay clear of every other panel's.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in panels]
    for ax in panels:
        assert not ax.yaxis.label.get_window_extent(renderer).overlaps(ax.title.get_window_extent(renderer)), \
            f"{ax.get_title()!r}: its axis label runs into its title"
    for i, box in enumerate(boxes):
        for j in range(i):
            assert not box.overlaps(boxes[j]), f"{panels[i].get_title()!r} overlaps {panels[j].get_title()!r}"


def test_plot_of_dense_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no sparse layers"):
        plot_masks(tiny_vit(), tmp_path / "masks.png", tile_size=8)


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        require_matplotlib()
