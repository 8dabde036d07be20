# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/captioner demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/matmul.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/reader.py
	$(BIN)/python bench/attention_step.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/decode.py --model transformer
	$(BIN)/python bench/mfu.py
	$(BIN)/python bench/caption.py
	$(BIN)/python bench/scst.py
	$(BIN)/python bench/finite_check.py
	$(BIN)/python bench/random_features.py
	$(BIN)/python bench/s3.py  # a local S3 server (moto) against a local store
	$(BIN)/python bench/faults.py  # the real full and read-only disks need root
	$(BIN)/python bench/batch_log.py

bench-gpu: $(STAMP)  # on a CUDA machine; writes bench/gpu-results.txt
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) .pytest_cache
