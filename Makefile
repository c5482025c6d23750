# One-command set-up: `make demo` and `make test` each create or reuse .venv,
# install the project and the offline assets, then do their job.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
FG     := $(VENV)/bin/finegrained
# The CUDA builds a GPU user wants; on the build machines pip takes them from local files.
TORCH_VERSION       := 2.14.1
TORCHVISION_VERSION := 0.29.1
PIP_VERSION         := 26.3
# Every package at the version the tests passed with (refreshed by `make lock`).
CONSTRAINTS := constraints.txt
STAMP  := $(VENV)/.finegrained-installed
DEMO   := runs/demo

.PHONY: setup assets demo test clean lock docs docs-serve

setup: $(STAMP) assets

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	@touch $(STAMP)

# A new lock: the newest releases setup.cfg admits, in a fresh venv, frozen into $(CONSTRAINTS). Run `make test`
# with it (it reinstalls .venv from the new file) and commit it only if the tests pass.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q pip==$(PIP_VERSION)
	.venv-lock/bin/python -m pip install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	sed -n '/^#/p' $(CONSTRAINTS) > $(CONSTRAINTS).new
	.venv-lock/bin/python -m pip freeze --exclude-editable >> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock
	@echo "wrote $(CONSTRAINTS); now run make test and commit it if the tests pass"

assets:
	@bash scripts/install-assets.sh

demo: setup
	$(FG) fit --config recipes/demo.yaml
	$(FG) test --config recipes/demo.yaml --ckpt_path $(DEMO)/checkpoints/best.ckpt
	$(FG) export --ckpt $(DEMO)/checkpoints/best.ckpt --format onnx --out $(DEMO)/demo.onnx
	$(FG) export --ckpt $(DEMO)/checkpoints/best.ckpt --format hf --out $(DEMO)/hf --runs-csv $(DEMO)/runs.csv
	$(FG) data samples --config recipes/demo.yaml --split test --n 8 --out $(DEMO)/samples
	$(FG) predict-images --model $(DEMO)/demo.onnx $(DEMO)/samples --csv $(DEMO)/predictions.csv
	$(FG) bench-table --out $(DEMO)/bench_fashion_mnist
	$(FG) report --ckpt $(DEMO)/checkpoints/best.ckpt --config recipes/demo.yaml --out $(DEMO)/report
	@echo
	@echo "Demo outputs:"
	@echo "  checkpoints      $(DEMO)/checkpoints/{best,last}.ckpt"
	@echo "  logs + config    $(DEMO)/lightning_logs/"
	@echo "  ONNX model       $(DEMO)/demo.onnx (+ $(DEMO)/demo.onnx.json manifest)"
	@echo "  Hub folder       $(DEMO)/hf/ (model card README.md; serve it: .venv/bin/finegrained serve --model $(DEMO)/hf)"
	@echo "  sample images    $(DEMO)/samples/"
	@echo "  predictions      $(DEMO)/predictions.csv"
	@echo "  head table       $(DEMO)/bench_fashion_mnist.md (printed above)"
	@echo "  TensorBoard      .venv/bin/tensorboard --logdir runs/"
	@echo "  report           $(DEMO)/report/index.html (open it in a browser)"

# One worker per core (pytest-xdist); each handing its tests to whichever worker is free.
test: setup
	$(PY) -m pytest -q -n auto --dist worksteal

# The documentation site (Material for MkDocs; the API reference from the docstrings), built into site/.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(DEMO) .pytest_cache site
