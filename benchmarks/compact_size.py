"""Size of a compact checkpoint against the dense state_dict: vit_b_16, random masks at tile 32 (RESULTS.md).

    python benchmarks/compact_size.py [--quantize int8] [--dtype bfloat16]

With ``--quantize int8`` every Linear but the classifier is stored in int8 (apply_bsr's pure-PyTorch int8 kernel,
so that no layer measures faster in float and stays so, and any CPU can write it). ``--dtype bfloat16`` converts the
model in bfloat16, so the tensors stored float (classifier, patch embedding, LayerNorms) are bfloat16; the dense
file it is compared with is the float32 state_dict either way.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import blocksparse  # noqa: E402
import checkpoints  # noqa: E402
import compact  # noqa: E402
import models  # noqa: E402
from supermask import apply_supermask, sparsify_offline  # noqa: E402

parser = argparse.ArgumentParser(description="compact checkpoint size of vit_b_16 at 90% sparsity")
parser.add_argument("--quantize", default="none", choices=("none", "int8"),
                    help="store the layers in int8 (W8A8) instead of the model's float32 (default: none)")
parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the dtype the model is converted and stored in (default: float32)")
args = parser.parse_args()
quantize, kernel = (None, "auto") if args.quantize == "none" else (args.quantize, "bmm")

torch.manual_seed(0)
folder = tempfile.TemporaryDirectory()  # the dense file is 330 MiB: removed when the script ends
dense_path, compact_path = os.path.join(folder.name, "dense.pth"), os.path.join(folder.name, "compact.pth")
for attention in (0.0, 0.9):
    model = models.build_model("vit_b_16", num_classes=1000, image_size=224)
    apply_supermask(model, linear_sparsity=0.9, linear_sp_tilesize=32, skip_last_layer_sparsity=True,
                    attention_sparsity=attention, attention_sp_tilesize=32)
    sparsify_offline(model.eval())
    torch.save(model.state_dict(), dense_path)
    model.to(getattr(torch, args.dtype))
    blocksparse.apply_bsr(model, 32, kernel=kernel, quantize=quantize)
    sizes = compact.save_compact(model, compact_path, blocksize=32,
                                 architecture=dict(model="vit_b_16", num_classes=1000, image_size=224))
    saved = checkpoints.load_checkpoint(compact_path)
    sparse = sum(t.nbytes for layer in saved["sparse"].values() for t in layer.values() if isinstance(t, torch.Tensor))
    other = sum(t.nbytes for t in saved["dense"].values())
    dense = os.path.getsize(dense_path)
    print(f"{args.quantize}, {args.dtype}, attention sparsity {attention}: compact {sizes['bytes'] / 2**20:.1f} MiB (layers stored "
          f"sparse {sparse / 2**20:.1f} MiB, other tensors {other / 2**20:.1f} MiB), dense state_dict "
          f"{dense / 2**20:.1f} MiB: {100 * sizes['bytes'] / dense:.1f}%")
