#!/usr/bin/env bash
# The accuracy runs behind benchmarks/RESULTS.md ("Accuracy on the demo data"): vit_tiny on the digits, dense
# (the demo's recipe, and a better dense recipe standing for a pretrained model), sparse from scratch with the
# demo's recipe, sparse from the dense model with a third of the epochs, and with attention sparsity.
# Usage: benchmarks/accuracy_runs.sh OUT_DIR [CPU]   (about 80 minutes on one core; CPU pins it with taskset)
set -euo pipefail
out=${1:?usage: benchmarks/accuracy_runs.sh OUT_DIR [CPU]}
pin=${2:+taskset -c $2}
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
test -d demo/data/train || $PY sample_data.py demo/data

BASE="--data-path demo/data --model vit_tiny --device cpu --train-crop-size 16 --val-resize-size 16 --val-crop-size 16
  -b 32 -j 1 --opt adamw --wd 0.05 --label-smoothing 0.1 --lr-scheduler cosineannealinglr --lr-warmup-method linear
  --train-crop-scale 0.8 1 --hflip-prob 0 --print-freq 1000 --skip-last-layer-sparsity"
FULL="--epochs 30 --lr 2e-3 --lr-warmup-epochs 2"    # the demo's budget
THIRD="--epochs 10 --lr 1e-3 --lr-warmup-epochs 1"   # a third of it, from the dense model
# The dense starting models stand for a pretrained model, so their cost is not counted: the demo's recipe at half
# the learning rate (at 2e-3 dense training is unstable and ends at 93.9%, below every sparse run), for 30
# epochs (97.2%) and for 60 (98.3%, as good as the best sparse run).
DENSE="--epochs 30 --lr 1e-3 --lr-warmup-epochs 2"
DENSE_LONG="--epochs 60 --lr 1e-3 --lr-warmup-epochs 2"

run() {  # name, flags...
  local name=$1; shift
  if [ -f "$out/$name/done" ]; then return; fi
  mkdir -p "$out/$name"
  echo "== $name: train.py $*" | tee "$out/$name/command"
  local start=$SECONDS
  $pin $PY train.py $BASE "$@" --output-dir "$out/$name" > "$out/$name/log" 2>&1
  echo "$((SECONDS - start)) s" > "$out/$name/done"
  grep -E "^Epoch [0-9]+  Acc@1" "$out/$name/log" | tail -1
}

run dense_demo $FULL
run dense $DENSE
run dense_e60 $DENSE_LONG
for s in 0.8 0.9 0.95 0.98; do
  run "scratch_$s" $FULL --sparsity-linear $s --sp-linear-tile-size 16
done
for start in dense dense_e60; do  # runs from "dense" are named dense_start_*, from "dense_e60" e60_start_*
  prefix=${start#dense}; prefix=${prefix#_}; prefix=${prefix:-dense}
  for s in 0.8 0.9 0.95 0.98; do
    from_dense="--sparsity-linear $s --sp-linear-tile-size 16 --weights-path $out/$start/checkpoint.pth"
    run "${prefix}_start_$s" $THIRD $from_dense
    run "${prefix}_start_ramp_$s" $THIRD $from_dense --sparsity-warmup-epochs 3 --sparsity-schedule cubic
    run "${prefix}_start_ramp_distill_$s" $THIRD $from_dense --sparsity-warmup-epochs 3 --sparsity-schedule cubic --distill
  done
done
# Seed spread at 0.9 and 0.95: seeds 1 and 2 (the runs above are seed 0) from scratch and from the 98.33% model.
for seed in 1 2; do
  for s in 0.95 0.9; do
    from_dense="--sparsity-linear $s --sp-linear-tile-size 16 --weights-path $out/dense_e60/checkpoint.pth --seed $seed"
    run "scratch_${s}_seed$seed" $FULL --sparsity-linear $s --sp-linear-tile-size 16 --seed $seed
    run "e60_start_${s}_seed$seed" $THIRD $from_dense
    run "e60_start_ramp_distill_${s}_seed$seed" $THIRD $from_dense --sparsity-warmup-epochs 3 --sparsity-schedule cubic --distill
  done
done
# Reference for the budget comparison: from scratch with a third of the epochs.
run scratch_third_0.9 $THIRD --sparsity-linear 0.9 --sp-linear-tile-size 16
run attention_0.9 $FULL --sparsity-linear 0.9 --sp-linear-tile-size 16 --sparsity-attention 0.9 --sp-attention-tile-size 16
run attention_0.8 $FULL --sparsity-linear 0.8 --sp-linear-tile-size 16 --sparsity-attention 0.8 --sp-attention-tile-size 16

echo "name  final Acc@1  Acc@5  seconds"
for d in "$out"/*/; do
  [ -f "$d/command" ] || continue  # not one of these runs
  name=$(basename "$d")
  line=$(grep -E "^Epoch [0-9]+  Acc@1" "$d/log" | tail -1 || true)
  echo "$name  ${line#*Acc@1 }  $(cat "$d/done" 2>/dev/null)"
done
