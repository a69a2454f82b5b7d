# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Subprocess-heavy tests oversubscribe two cores; one thread per process keeps them from stalling.
export OMP_NUM_THREADS ?= 1

.PHONY: test test-slow demo bench-peers clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The whole suite; tests marked slow are skipped (run them with `make test-slow`).
test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q --runslow tests

# The README's first command: make a small real data set (scikit-learn's digits), train a tiny ViT with 90%
# of its encoder MLP weights masked in 16x16 tiles on CPU, then evaluate it block-sparse, save the compact model
# and draw its masks (TRAINING.md logs the run).
# The digits are 8x8 at heart, so 16x16 crops lose nothing and cost a quarter of 32x32; mild crops and no flips
# because a mirrored or mostly cropped-away digit is another digit or none. --keep-last 1: the evaluation reads
# checkpoint.pth; 30 model_<epoch>.pth files would take 440 MB.
DEMO_MODEL := --model vit_tiny --device cpu --sparsity-linear 0.9 --sp-linear-tile-size 16 --skip-last-layer-sparsity \
	--train-crop-size 16 --val-resize-size 16 --val-crop-size 16 -b 32 -j 1
DEMO_EVAL := --model vit_tiny --device cpu --sparsity-linear 0.9 --sp-linear-tile-size 16 --skip-last-layer-sparsity \
	--val-resize-size 16 --val-crop-size 16 -b 64 -j 1
DEMO_TRAIN := --epochs 30 --opt adamw --lr 2e-3 --wd 0.05 --label-smoothing 0.1 \
	--lr-scheduler cosineannealinglr --lr-warmup-epochs 2 --lr-warmup-method linear \
	--train-crop-scale 0.8 1 --hflip-prob 0 --print-freq 20 --keep-last 1

demo: $(VENV)/.installed
	test -d demo/data/train || $(PY) sample_data.py demo/data
	rm -rf demo/output
	$(PY) train.py --data-path demo/data $(DEMO_MODEL) $(DEMO_TRAIN) --output-dir demo/output
	$(PY) evaluate.py --data-path demo/data $(DEMO_EVAL) --weights-path demo/output/checkpoint.pth \
		--bsr 16 --save-compact demo/output/compact.pth --plot-masks demo/output/masks.png

# The runtimes a deploying user would otherwise pick (ONNX Runtime, OpenVINO with NNCF, torch.compile), timed
# against SuperBlock by benchmarks/peers.py; flags through ARGS, e.g. make bench-peers ARGS="--image-size 32 --iters 2".
# Their packages go into .venv only here, never for the tests. The benchmark runs on torch's thread count, not the
# OMP_NUM_THREADS=1 set above for the tests (choose one with ARGS="--threads N").
$(VENV)/.bench-installed: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

bench-peers: $(VENV)/.bench-installed
	env -u OMP_NUM_THREADS $(PY) benchmarks/peers.py $(ARGS)

clean:
	rm -rf $(VENV) demo
