import sys

import pytest
import torch
from PIL import Image

from plots import plot_masks, require_matplotlib, tile_masks
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


def test_plot_of_dense_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no sparse layers"):
        plot_masks(tiny_vit(), tmp_path / "masks.png", tile_size=8)


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        require_matplotlib()
