# dat-ds: `make demo` trains and evaluates the default job; `make test` runs the test suite.
# Both set everything up first (a venv, the package, the Fashion-MNIST files).

VENV    ?= .venv
PY      := $(VENV)/bin/python
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# CPU ranks are processes: one thread each keeps 2 ranks from oversubscribing 2 cores.
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
# DeepSpeed JIT-builds a small shared-memory op on first use: cache it with this checkout's venv
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
NGPU    := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# without GPUs the launcher counts NUMA nodes, not devices: ask for 2 CPU ranks explicitly
LAUNCH  := $(if $(filter 0,$(NGPU)),--num_gpus 2,)
PYTEST  := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup data demo test test-slow bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

data:
	@if [ -f $(FMNIST) ] || [ -n "$$DAT_DS_SKIP_APT" ]; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is not installed and apt-get needs root: the loader will try a torchvision" \
		"download, or pass --data-dir to a folder with the four IDX files"; fi

demo: setup data
	rm -rf runs/demo
	$(VENV)/bin/deepspeed $(LAUNCH) recipes/fashion_mnist_dat.py \
		--deepspeed_config ds_configs/fashion_mnist_demo.json --backbone test_resnet --stem native \
		--train-limit 20000 --eval-limit 1000 --epochs 2 --output-dir runs/demo

test: setup data
	$(VENV)/bin/ruff check dat_ds recipes bench tests
	$(PYTEST) -m "not slow"

test-slow: setup data
	$(PYTEST) -m slow

# hours on 2 CPU cores (the large-batch study ~3.5 h and its equal-epoch curve ~4 h more, resumable:
# finished runs are kept);
# the link benchmark needs root (without it, its table says so)
bench: setup data
	$(PY) bench/step_cost.py --repeats 3
	$(PY) bench/engine_overhead.py
	$(PY) bench/compress_bench.py
	$(PY) bench/link_bench.py
	$(PY) bench/accuracy.py
	$(PY) bench/semisup.py
	$(PY) bench/transfer.py
	$(PY) bench/loader_bench.py
	$(PY) bench/fault_bench.py
	$(PY) bench/large_batch.py --at-lamb --max-minutes 120
	$(PY) bench/large_batch.py --at-lamb --part curve conadv curve-aa table --max-minutes 240
	$(PY) bench/report.py

# on a CUDA machine, in two calls of about 5 to 8 min each on one GPU (each call's --budget-s gates
# its own sections; the second keeps the first's with --merge): step costs against a bare loop, the
# guard, codecs, nccl, fused LAMB, then the compiled anchor and the batch sweep -> bench/results/gpu.json
gpu-check: setup
	$(PY) bench/gpu_check.py --sections throughput guard codec powersgd nccl lamb memory
	$(PY) bench/gpu_check.py --merge --sections tuned sweep memory
	$(PY) bench/report.py

clean:
	rm -rf runs build *.egg-info
