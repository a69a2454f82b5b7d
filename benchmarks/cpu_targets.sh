#!/usr/bin/env bash
# The CPU measurements behind the int8 and attention-core targets (benchmarks/RESULTS.md: "int8 (W8A8) block-sparse
# inference", "The attention core", "Residual adds and LayerNorms folded"), as one script for whichever CPU a session
# gets, the AMD EPYC above all (both issues define their targets there). Three runs of each whole-model command, one
# process each, medians of 15 interleaved rounds (with 5, a VM's drift decided some comparisons); nothing else may run
# meanwhile. Writes one file per command to ${OUT:-/tmp/cpu_targets}; about 40 minutes on 2 cores, the peers (which
# need `make bench-peers` once) included. Ends with benchmarks/targets.py's table: every target, the ratio each run
# measured, and whether every run met it.
# Usage: benchmarks/cpu_targets.sh [--no-peers]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${OUT:-/tmp/cpu_targets}
mkdir -p "$out"
{ lscpu | grep -E 'Model name|Flags' | cut -c1-400; $PY -c "import torch; print('torch', torch.__version__, torch.get_num_threads(), 'threads')"; } \
  > "$out/machine.txt"

vit="benchmark.py --model vit_b_16 --batch-size 8 --sparsity-linear 0.9 --sp-linear-tile-size 64 --device cpu"
attention="--sparsity-attention 0.9 --sp-attention-tile-size 64"
for run in 1 2 3; do
  for dtype in bfloat16 float32; do
    $PY $vit --dtype $dtype --baselines dense,bsr-sdpa,bsr-unfolded --iters 15 --warmup 1 > "$out/vit_mlp_${dtype}_$run.txt" 2>&1
    $PY $vit --dtype $dtype $attention --baselines dense,bsr-sdpa,bsr-unfolded --iters 15 --warmup 1 \
      > "$out/vit_attention_${dtype}_$run.txt" 2>&1
  done
  $PY $vit --dtype bfloat16 --baselines dense --quantize int8 --iters 15 --warmup 1 > "$out/vit_mlp_int8_$run.txt" 2>&1
  $PY $vit --dtype bfloat16 $attention --baselines dense --quantize int8 --iters 15 --warmup 1 \
    > "$out/vit_attention_int8_$run.txt" 2>&1
  for tile in 64 32; do
    $PY benchmark.py --layer 768x3072x768 --tokens 1576 --sparsity-linear 0.9 --sp-linear-tile-size $tile \
      --kernels auto --quantize int8 --device cpu --dtype bfloat16 --iters 15 --warmup 3 > "$out/pair_b${tile}_$run.txt" 2>&1
  done
  $PY benchmark.py --layer 768x2304 --tokens 1576 --sparsity-linear 0 --sp-linear-tile-size 64 --kernels auto \
    --quantize int8 --device cpu --dtype bfloat16 --iters 15 --warmup 3 > "$out/dense_qkv_$run.txt" 2>&1
done
$PY benchmarks/attention_core.py > "$out/attention_core.txt" 2>&1
for variant in bf16 int8 float32; do
  for core in sdpa auto; do
    $PY benchmarks/profile_model.py --variant $variant --attention --core $core > "$out/profile_${variant}_$core.txt" 2>&1
  done
done
if [ "${1:-}" != "--no-peers" ]; then
  make bench-peers > "$out/peers_mlp.txt" 2>&1
  make bench-peers ARGS="--attention" > "$out/peers_attention.txt" 2>&1
fi
grep -H -E '^(dense|bsr|int8)[^ ]* ' "$out"/vit_*.txt "$out"/pair_*.txt "$out"/dense_qkv_*.txt \
  | awk '{print $1, $2, $3}' > "$out/summary.txt"
$PY benchmarks/targets.py "$out" | tee "$out/targets.txt"
echo "wrote $out (summary.txt: variant and median ms per file; targets.txt: each target's ratio per run)"
