# Two commands after `git clone` (see README): `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow test-eval bench experiment reproduce-reference

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel lies on disk, any other spec may pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## The main job on built-in defaults (replaces the previous runs/demo: moelab's own files only).
run: $(STAMP)
	$(BIN)/moelab demo --overwrite

## The default test suite (slow tests excluded), on up to 4 worker processes.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

## Slow tests only (torch.compile, larger shapes).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n auto --maxprocesses 4

## lm-evaluation-harness on a compressed checkpoint (installs the optional eval extra).
test-eval: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[eval]'
	$(BIN)/python -m pytest -q tests/test_lm_eval.py

bench: $(STAMP)
	$(BIN)/moelab bench layer

## The equal-compute comparison of seven architectures, 3 seeds each (~2 hours on 2 CPU cores).
experiment: $(STAMP)
	bash experiments/equal_compute/run.sh

## Retrain the shipped reference models from their run files and check the weights are the
## shipped ones, byte for byte (about an hour on 2 CPU cores; runs/reproduce-<name>).
reproduce-reference: $(STAMP)
	for name in ref-8e-top2 ref-32e-top4-shared; do \
	  $(BIN)/moelab train configs/reference/$$name.yaml --out runs/reproduce-$$name --overwrite --quiet && \
	  cmp runs/reproduce-$$name/model/model.safetensors src/moelab/assets/models/$$name/model.safetensors && \
	  echo "$$name: the shipped weights, byte for byte" || exit 1; \
	done
