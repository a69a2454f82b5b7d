#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md ("CUDA"), as one script for a lent GPU machine (no installs:
# it uses the machine's own torch with CUDA and Triton). Writes to ${OUT:-/tmp/gpu}; about 6 minutes on an H100.
# Usage: PY=python benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> "$out/gpu.txt"

# Exactness of the Triton kernel at real shapes (vit_b_16 MLP, 197 and 1576 tokens), every dtype.
$PY - > "$out/exactness.txt" 2>&1 <<'PYEOF'
import torch
from torch import nn
import blocksparse
torch.manual_seed(0)
for blocksize in (32, 64):
    for shape in ((768, 3072), (3072, 768)):
        linear = nn.Linear(*shape).cuda().requires_grad_(False)
        keep = torch.rand(shape[1] // blocksize, shape[0] // blocksize, device="cuda") >= 0.9
        linear.weight.mul_(keep.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1))
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
            layer = blocksparse.BlockSparseLinear.from_dense(linear.to(dtype), blocksize, kernel="triton")
            for tokens in (197, 1576, 256 * 197):
                x = torch.randn(tokens, shape[0], device="cuda", dtype=dtype)
                ref = nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
                err = (layer(x).float() - ref).abs().max().item() / ref.abs().max().item()
                print(f"block {blocksize} {shape} {dtype} tokens {tokens}: rel err {err:.2e} {'ok' if err < tol else 'FAIL'}")
PYEOF

for tile in 64 32; do
  $PY benchmark.py --device cuda --model vit_b_16 --batch-size 256 --dtype bfloat16 --sparsity-linear 0.9 \
    --sp-linear-tile-size $tile --kernels auto --compile both --iters 10 --warmup 3 \
    --output-json "$out/vit_b_16_tile$tile.json" > "$out/vit_b_16_tile$tile.txt" 2>&1
  $PY benchmark.py --device cuda --layer 768x3072 --tokens 50432 --dtype bfloat16 --sparsity-linear 0.9 \
    --sp-linear-tile-size $tile --kernels auto --iters 20 --warmup 3 > "$out/layer_tile$tile.txt" 2>&1
done
$PY benchmark.py --device cuda --model vit_b_16 --batch-size 256 --dtype bfloat16 --sparsity-linear 0.9 \
  --sp-linear-tile-size 64 --sparsity-attention 0.9 --sp-attention-tile-size 64 --kernels auto --compile both \
  --iters 10 --warmup 3 > "$out/vit_b_16_attention_tile64.txt" 2>&1
tail -n 20 "$out"/*.txt
