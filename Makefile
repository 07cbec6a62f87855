# Set-up, the built-in demo run, and the tests. `make demo` and `make test` work on a fresh
# machine: each creates .venv and installs the project into it first.
PYTHON ?= python3
# Install the torch build you want before the project (CPU here; a CUDA build on a cluster).
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench mini claims-mini clean cluster-up cluster-down gpu-check gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dali,deepspeed,slurm,dev]"
	touch $@

# Again: the data set is already there (the generator says so) and the finished run says so.
demo: setup
	$(BIN)/bnonly data fake-cifar10 runs/data/fake-cifar10
	$(BIN)/bnonly train configs/demo.yaml
	@echo "next: source $(VENV)/bin/activate   (puts bnonly, tensorboard and the project's python on PATH)"

# ARGS: pytest's own arguments, e.g. make test ARGS="tests/test_config.py -k override"
ARGS ?=
test: setup
	$(BIN)/python -m pytest -q $(ARGS)

bench: setup
	$(BIN)/bnonly bench configs/cifar10_resnet110.yaml train.device=cpu --steps 5 --warmup 2

mini: setup      # the paper's pipeline scaled down: a 24-run grid on generated data, then its tables and figures
	$(BIN)/bnonly data fake-cifar10 runs/data/fake-cifar10
	$(BIN)/python launchers/sweep.py configs/sweeps/mini.yaml --wait
	$(BIN)/bnonly analyze configs/sweeps/mini.yaml --out analysis/mini

claims-mini: setup   # the claims pipeline at a tiny scale on generated data: it exercises the code; its verdicts mean nothing
	$(BIN)/bnonly data fake-cifar10 runs/data/fake-cifar10
	$(BIN)/python launchers/sweep.py configs/sweeps/claims-mini.yaml --wait
	$(BIN)/bnonly analyze configs/sweeps/claims-mini.yaml --claims --out analysis/claims-mini
	if [ -f analysis/claims-mini/claims_missing.yaml ]; then $(BIN)/python launchers/sweep.py analysis/claims-mini/claims_missing.yaml --dry-run; fi

clean:
	rm -rf runs/demo_cifar10_resnet20_bn runs/data/fake-cifar10

# On a GPU node, with the Python that has torch (no venv, no network): the cuda tests, the
# benchmarks and DALI in at most 8 minutes; WHEELS: folder of wheels for what is missing, built
# for this node's Python (docs/gpu.md); OUT: the folder that gets the results, at most 8 files
# and no subfolder (report.md, report.json, cuda-tests.xml, logs.tar.gz, the bench JSONs).
WHEELS ?=
OUT ?= runs/gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m bnonly_dist.gpu_check $(if $(WHEELS),--wheels "$(WHEELS)") --out "$(OUT)"

# On a machine with the registry (and this project installed): the wheel folder for gpu-check,
# from requirements/gpu-wheels.txt, checked by an offline install here; its last line names the
# Python it is for. NODE_PYTHON: the node's major.minor (default this Python's; gpu-check names
# it when the folder does not match); SPLIT_MIB: also cut it into parts of that size.
NODE_PYTHON ?=
SPLIT_MIB ?= 0
gpu-wheels: setup
	@test -n "$(WHEELS)" || { echo "make gpu-wheels: set WHEELS=dir (a new folder)"; exit 2; }
	@echo "make gpu-wheels: for Python $(or $(NODE_PYTHON),$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'))"
	$(BIN)/python -m bnonly_dist.perf.wheels "$(WHEELS)" $(if $(NODE_PYTHON),--python-version $(NODE_PYTHON)) --split-mib $(SPLIT_MIB)

cluster-up:      # a real Slurm on this machine (node1, node2); needs root
	bash slurm/local-cluster/up.sh

cluster-down:
	bash slurm/local-cluster/down.sh
