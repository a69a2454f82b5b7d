"""Compact checkpoints: only the kept blocks are stored, and the model comes back exactly."""
import pytest
import torch
from torch import nn

import blocksparse
import blocksparse_fused
import checkpoints
import compact
import models
from blocksparse_mlp import BlockSparseMLP
from helpers import flip_byte_in_tensor_data
from supermask import apply_supermask, sparsify_offline

ARCH = dict(model="vit_tiny", num_classes=10, image_size=32)


def block_sparse_vit(attention_sparsity, kernel="bmm"):
    """vit_tiny, 90% of its MLP blocks (and optionally attention blocks) pruned at random, block-sparse."""
    torch.manual_seed(0)
    model = models.build_model("vit_tiny", num_classes=10, image_size=32)
    nn.init.normal_(model.heads.head.weight, std=0.1)
    apply_supermask(model, linear_sparsity=0.9, linear_sp_tilesize=16, skip_last_layer_sparsity=True,
                    attention_sparsity=attention_sparsity, attention_sp_tilesize=16)
    sparsify_offline(model).eval()
    blocksparse.apply_bsr(model, 16, kernel=kernel)
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


