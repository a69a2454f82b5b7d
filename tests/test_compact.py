"""Compact checkpoints: only the kept blocks are stored, and the model comes back exactly."""
import pytest
import torch
from torch import nn

import blocksparse
import blocksparse_fused
import blocksparse_int8
import blocksparse_int8_reference as int8_reference
import checkpoints
import compact
import models
from blocksparse_int8 import Int8BlockSparseLinear
from blocksparse_mlp import BlockSparseMLP
from blocksparse_reference import pack_blocks
from helpers import flip_byte_in_tensor_data, tiny_vit
from supermask import apply_supermask, sparsify_offline

ARCH = dict(model="vit_tiny", num_classes=10, image_size=32)


def block_sparse_vit(attention_sparsity, kernel="bmm", quantize=None):
    """vit_tiny, 90% of its MLP blocks (and optionally attention blocks) pruned at random, block-sparse."""
    torch.manual_seed(0)
    model = models.build_model("vit_tiny", num_classes=10, image_size=32)
    nn.init.normal_(model.heads.head.weight, std=0.1)
    apply_supermask(model, linear_sparsity=0.9, linear_sp_tilesize=16, skip_last_layer_sparsity=True,
                    attention_sparsity=attention_sparsity, attention_sp_tilesize=16)
    sparsify_offline(model).eval()
    blocksparse.apply_bsr(model, 16, kernel=kernel, quantize=quantize)
    return model


# "fused" (where the extension runs) turns each MLP pair into one BlockSparseMLP: the file must still name the
# dense model's Linears.
@pytest.mark.parametrize("kernel", ["bmm"] + (["fused"] if blocksparse_fused.available() else []))
@pytest.mark.parametrize("attention_sparsity", [0.0, 0.9])
def test_compact_round_trip_gives_the_same_logits(attention_sparsity, kernel, tmp_path):
    model = block_sparse_vit(attention_sparsity, kernel)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    path = str(tmp_path / "compact.pth")
    compact.save_compact(model, path, architecture=ARCH, blocksize=16)
    plain = models.build_model("vit_tiny", num_classes=10, image_size=32)
    linears = {name for name, m in plain.named_modules() if isinstance(m, nn.Linear)}
    stored = set(checkpoints.load_checkpoint(path)["sparse"])
    assert {name for name in stored if not name.endswith("in_proj")} <= linears, stored
    loaded = compact.load_compact(path, kernel=kernel)
    converted = blocksparse.block_sparse_layers(loaded)
    assert set(converted) == stored and len(converted) == (24 if attention_sparsity else 12)
    fused = [m for m in loaded.modules() if isinstance(m, BlockSparseMLP)]
    assert len(fused) == (6 if kernel == "fused" else 0)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_converted_and_loaded_models_are_in_eval_mode_and_convert_again(tmp_path):
    model = block_sparse_vit(0.9, "fused" if blocksparse_fused.available() else "bmm")
    path = str(tmp_path / "compact.pth")
    compact.save_compact(model, path, architecture=ARCH, blocksize=16)
    loaded = compact.load_compact(path, kernel="bmm")
    for which, m in (("converted", model), ("loaded", loaded)):
        training = [name for name, module in m.named_modules() if module.training]
        assert not training, f"the {which} model has modules in training mode: {training}"
        blocksparse.apply_bsr(m, 16, kernel="bmm")  # nothing left to convert, and no refusal


def test_compact_file_holds_only_kept_blocks_and_no_training_state(tmp_path):
    model = block_sparse_vit(0.9)
    path = str(tmp_path / "compact.pth")
    sizes = compact.save_compact(model, path, architecture=ARCH, blocksize=16)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"format", "version", "architecture", "blocksize", "dense", "sparse", "sha256"}
    assert not any("scores" in k for k in saved["dense"])
    # vit_tiny: 6 blocks x (in_proj 384x128 + out_proj 128x128 + 2 MLP 512x128) = 1,179,648 prunable weights, of
    # which the masks keep about 10% of the blocks; apply_bsr stores no more (fewer where an MLP's hidden block is
    # unused), and everything else (~85k weights) stays dense.
    kept = sum(layer["values"].numel() for layer in saved["sparse"].values())
    assert 0.03 < kept / 1_179_648 <= 0.11
    assert sizes["bytes"] < 0.25 * sizes["dense_bytes"], sizes
    plain = models.build_model("vit_tiny", num_classes=10, image_size=32)
    assert sizes["dense_bytes"] == sum(t.numel() * t.element_size() for t in plain.state_dict().values())


def test_truncated_and_newer_files_are_clear_errors(tmp_path):
    path = tmp_path / "compact.pth"
    compact.save_compact(block_sparse_vit(0.0), str(path), architecture=ARCH, blocksize=16)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        compact.load_compact(str(truncated))
    newer = checkpoints.load_checkpoint(str(path))
    newer["version"] = compact.COMPACT_VERSION + 1
    checkpoints.save_checkpoint(newer, str(tmp_path / "newer.pth"))
    with pytest.raises(ValueError, match="newer than this SuperBlock reads"):
        compact.load_compact(str(tmp_path / "newer.pth"))
    with pytest.raises(ValueError, match="not a compact SuperBlock checkpoint"):
        torch.save({"model": {}}, tmp_path / "plain.pth")
        compact.load_compact(str(tmp_path / "plain.pth"))


def _drop(key):
    def edit(checkpoint):
        del checkpoint[key]
    return edit


def _layer_entry(key, value):
    def edit(checkpoint):
        next(iter(checkpoint["sparse"].values()))[key] = value
    return edit


def _weights_of_another_model(checkpoint):
    checkpoint["dense"]["encoder.ln.weight"] = torch.ones(7)


@pytest.mark.parametrize("edit,message", [
    (_drop("blocksize"), "'blocksize' must be a positive integer"),
    (_drop("architecture"), "'architecture' must hold model, num_classes and image_size"),
    (lambda c: c.update(sparse=[1, 2]), "'sparse' must map layer names"),
    (lambda c: c.update(dense={"x": 3}), "'dense' must map names to tensors"),
    (_layer_entry("shape", "512x128"), "is not two multiples of the block size"),
    (_layer_entry("crow", torch.zeros(3, dtype=torch.int32)), "its blocks and indices do not fit"),
    (_layer_entry("col", torch.full((1,), 99, dtype=torch.int32)), "its blocks and indices do not fit"),
    (_weights_of_another_model, "its weights do not fit a vit_tiny"),
    (lambda c: c["architecture"].update(model="no_such_net"), "its architecture cannot be built"),
], ids=["no_blocksize", "no_architecture", "sparse_not_a_dict", "dense_not_tensors", "bad_shape", "bad_crow",
        "bad_col", "wrong_weights", "unknown_model"])
def test_malformed_compact_files_are_one_clear_value_error(edit, message, tmp_path):
    path = tmp_path / "compact.pth"
    compact.save_compact(block_sparse_vit(0.0), str(path), architecture=ARCH, blocksize=16)
    checkpoint = checkpoints.load_checkpoint(str(path))
    edit(checkpoint)
    checkpoints.save_checkpoint(checkpoint, str(tmp_path / "bad.pth"))  # a valid checksum over malformed content
    with pytest.raises(ValueError, match="malformed compact checkpoint") as caught:
        compact.load_compact(str(tmp_path / "bad.pth"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_compact_model_reports_its_dense_layers_as_stored_dense(tmp_path):
    path = str(tmp_path / "compact.pth")
    compact.save_compact(block_sparse_vit(0.0), path, architecture=ARCH, blocksize=16)
    _, result = compact.model_from_compact(checkpoints.load_checkpoint(path))
    reasons = dict(result.left_dense)
    assert reasons["heads.head"] == "stored dense in the compact file"
    assert "excluded by filter_fn" not in str(result)


def test_sparsity_report_lists_block_sparse_layers():
    from supermask import sparsity_report

    rows = {row.name: row for row in sparsity_report(block_sparse_vit(0.9)).rows}
    row = rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert row.kind == "BlockSparseLinear" and row.weight_shape == (384, 128) and row.tile_size == 16
    assert 0.85 < row.actual_sparsity < 0.95
    assert rows["encoder.layers.encoder_layer_0.mlp.0"].kind == "BlockSparseLinear"


def test_sparsity_report_lists_int8_layers_by_their_dense_names():
    from supermask import sparsity_report

    rows = {row.name: row for row in sparsity_report(block_sparse_vit(0.0, quantize="int8")).rows}
    mlp = rows["encoder.layers.encoder_layer_0.mlp.3"]
    assert mlp.kind == "Int8BlockSparseLinear" and "int8/bmm" in mlp.note and 0.85 < mlp.actual_sparsity < 0.95
    projection = rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert projection.kind == "Int8BlockSparseLinear" and projection.actual_sparsity == 0.0


def test_flipped_byte_in_a_compact_file_is_refused_as_corrupt(tmp_path):
    path = str(tmp_path / "compact.pth")
    compact.save_compact(block_sparse_vit(0.9), path, architecture=ARCH, blocksize=16)
    corrupt = flip_byte_in_tensor_data(path, str(tmp_path / "corrupt.pth"))
    with pytest.raises(ValueError, match=r"corrupt\.pth is corrupt: its checksum does not match; re-copy or re-create"):
        compact.load_compact(corrupt)
    compact.load_compact(path)  # the intact file still loads


def test_compact_file_without_checksum_loads_with_a_notice(tmp_path, capsys):
    model = block_sparse_vit(0.0)
    path = str(tmp_path / "compact.pth")
    compact.save_compact(model, path, architecture=ARCH, blocksize=16)
    # A file as written before compact files carried a checksum.
    old = torch.load(path, weights_only=True)
    del old["sha256"]
    torch.save(old, tmp_path / "old.pth")
    loaded = compact.load_compact(str(tmp_path / "old.pth"))
    assert "has no checksum" in capsys.readouterr().err
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)




def test_version_1_file_written_by_old_code_loads(tmp_path):
    model = block_sparse_vit(0.9)
    # As the code before int8 layers wrote it: float blocks only, no quantize, weight_scale or per-layer blocksize.
    sparse, prefixes = {}, []
    for fqn, module in blocksparse.block_sparse_layers(model).items():
        values, crow, col = pack_blocks(module.dense_weight(), module.blocksize)
        sparse[fqn] = {"shape": [module.out_features, module.in_features], "values": values, "crow": crow, "col": col,
                       "bias": module.bias}
        prefixes.append(fqn + ".")
    dense = {compact._attention_key(k, model): v for k, v in model.state_dict().items()
             if not k.startswith(tuple(prefixes))}
    path = str(tmp_path / "v1.pth")
    checkpoints.save_checkpoint({"format": compact.COMPACT_FORMAT, "version": 1, "architecture": ARCH,
                                 "blocksize": 16, "dense": dense, "sparse": sparse}, path)
    loaded = compact.load_compact(path, kernel="bmm")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


##### int8 (W8A8) layers #####

INT8_KERNELS = ["bmm"] + (["fused"] if blocksparse_int8.unavailable_reason(16) is None else [])


def test_quantizing_dequantized_weights_gives_the_same_int8_weights_and_scales():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape, scale in (((64, 32), 1.0), ((96, 48), 1e-3), ((16, 128), 30.0)):
            weight = (torch.randn(shape) * scale).to(dtype)
            weight[3] = 0  # a row of zeros has scale 1
            weight_q, weight_scale = int8_reference.quantize_weight(weight)
            # A bfloat16 model's dense weights are rounded to bfloat16 when it loads.
            dequantized = int8_reference.dequantize_weight(weight_q, weight_scale).to(dtype)
            again_q, again_scale = int8_reference.quantize_weight(dequantized)
            assert torch.equal(again_q, weight_q) and torch.equal(again_scale, weight_scale), (shape, dtype)


def int8_tiny_vit(kernel, case, dtype=torch.float32):
    """tests/helpers.tiny_vit in int8 in blocks of 16. Its layers are 0% block-sparse, below apply_bsr's min_sparsity:
    dense int8 layers, which apply_bsr packs in blocks of 32 (an MLP pair's in the pair's 16, so that it can fuse).
    "sparse_mlp" prunes half the MLP blocks, "half_attention" half of each in_proj's (its out_proj stays dense int8)."""
    model = tiny_vit()
    if case == "sparse_mlp":
        apply_supermask(model, linear_sparsity=0.5, linear_sp_tilesize=16, skip_last_layer_sparsity=True)
        sparsify_offline(model)
    if case == "half_attention":
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.MultiheadAttention):
                    module.in_proj_weight[:48] = 0  # 6 of its 12 blocks
    model.eval().to(dtype)
    blocksparse.apply_bsr(model, 16, kernel=kernel, quantize="int8")
    return model


def int8_layers(model):
    return {fqn: m for fqn, m in blocksparse.block_sparse_layers(model).items()
            if isinstance(m, Int8BlockSparseLinear)}


TINY_ARCH = dict(model="tiny_vit", num_classes=10, image_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("case", ["sparse_mlp", "dense_int8", "half_attention"])
def test_int8_compact_round_trip_gives_the_same_outputs_and_int8_weights(case, kernel, dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "build_model", lambda name, **kwargs: tiny_vit(kwargs["num_classes"]))
    model = int8_tiny_vit(kernel, case, dtype)
    saved = int8_layers(model)
    assert len(saved) == 8, "every Linear but the head runs int8"
    assert {layer.blocksize for layer in saved.values()} == {16, 32}
    path = str(tmp_path / "int8.pth")
    compact.save_compact(model, path, architecture=TINY_ARCH, blocksize=16)
    stored = checkpoints.load_checkpoint(path)
    assert stored["version"] == 2 and compact.quantization(stored) == "int8"
    loaded = compact.load_compact(path, kernel=kernel)
    restored = int8_layers(loaded)
    assert set(restored) == set(saved)
    for fqn, layer in saved.items():
        again = restored[fqn]
        assert again.blocksize == layer.blocksize, fqn
        for name in ("block_values", "block_crow", "block_col", "weight_scale", "bias"):
            assert torch.equal(getattr(again, name), getattr(layer, name)), f"{fqn}.{name}"
    fused = [m for m in model.modules() if isinstance(m, BlockSparseMLP)]
    assert len([m for m in loaded.modules() if isinstance(m, BlockSparseMLP)]) == len(fused)
    assert len(fused) == (2 if kernel == "fused" else 0)
    x = torch.randn(3, 3, 16, 16, dtype=dtype)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_int8_compact_file_stores_int8_blocks_a_quarter_of_float32_ones(tmp_path):
    sizes, files = {}, {}
    for quantize in (None, "int8"):
        path = str(tmp_path / f"{quantize}.pth")
        sizes[quantize] = compact.save_compact(block_sparse_vit(0.9, quantize=quantize), path, architecture=ARCH,
                                               blocksize=16)
        files[quantize] = checkpoints.load_checkpoint(path)
    assert files[None]["version"] == 1, "a file without int8 layers stays readable by older code"
    assert files["int8"]["version"] == 2 and compact.quantization(files[None]) is None
    values = {q: sum(layer["values"].nbytes for layer in f["sparse"].values()) for q, f in files.items()}
    int8_layers = [layer for layer in files["int8"]["sparse"].values() if "quantize" in layer]
    assert len(int8_layers) == 24 and all(layer["values"].dtype == torch.int8 for layer in int8_layers)
    assert values["int8"] == values[None] / 4
    # Besides the blocks, an int8 layer stores what a float one does (indices, bias) and a float32 scale per channel.
    sparse_bytes = {q: sum(t.nbytes for layer in f["sparse"].values() for t in layer.values()
                           if isinstance(t, torch.Tensor)) for q, f in files.items()}
    scale_bytes = sum(4 * layer["shape"][0] for layer in int8_layers)
    assert sparse_bytes["int8"] - values["int8"] == sparse_bytes[None] - values[None] + scale_bytes
    assert sizes["int8"]["dense_bytes"] == sizes[None]["dense_bytes"], "the dense model is float32 in both"


def _int8_entry(key, value):
    def edit(checkpoint):
        layer = next(layer for layer in checkpoint["sparse"].values() if "quantize" in layer)
        layer[key] = value(layer) if callable(value) else value
    return edit


def _int8_values_in_a_float_entry(checkpoint):
    layer = next(layer for layer in checkpoint["sparse"].values() if layer.get("blocksize") == checkpoint["blocksize"])
    del layer["quantize"]


@pytest.mark.parametrize("edit,message", [
    (_int8_entry("values", lambda layer: layer["values"].float()), "an int8 layer's values are torch.float32"),
    (_int8_entry("weight_scale", lambda layer: layer["weight_scale"][:-1]), "'weight_scale' must be"),
    (_int8_entry("weight_scale", lambda layer: layer["weight_scale"].double()), "'weight_scale' must be"),
    (_int8_entry("weight_scale", None), "'weight_scale' must be"),
    (_int8_entry("weight_scale", lambda layer: layer["weight_scale"] * 0), "'weight_scale' must be"),
    (_int8_entry("quantize", "int4"), "unknown quantize 'int4'"),
    (_int8_entry("blocksize", 8), "'blocksize' must be a positive multiple of 16"),
    (_int8_entry("blocksize", 32), "its blocks and indices do not fit"),
    (_int8_values_in_a_float_entry, "its values are torch.int8, not floats"),
    (lambda checkpoint: checkpoint.update(blocksize=8), "must have a 'blocksize' that is a multiple of 16"),
], ids=["float_values", "short_scale", "float64_scale", "no_scale", "zero_scale", "unknown_quantize", "blocksize_8",
        "other_blocksize", "int8_without_quantize",
        "file_blocksize_8"])
def test_corrupt_int8_entries_are_one_clear_value_error(edit, message, tmp_path):
    path = tmp_path / "int8.pth"
    compact.save_compact(block_sparse_vit(0.0, quantize="int8"), str(path), architecture=ARCH, blocksize=16)
    checkpoint = checkpoints.load_checkpoint(str(path))
    edit(checkpoint)
    checkpoints.save_checkpoint(checkpoint, str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="malformed compact checkpoint") as caught:
        compact.load_compact(str(tmp_path / "bad.pth"), kernel="bmm")
    assert message in str(caught.value) and "\n" not in str(caught.value)
