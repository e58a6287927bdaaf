# Two entry points do all the set-up on a fresh machine:
#   make demo   -- create .venv, install, run `rnndiag check` on a bundled sample model
#   make test   -- create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt 'torch==2.13.0' numpy
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rnndiag check --batch sample_models/adding_batch.safetensors \
	  sample_models/rnn_tanh_vanishing.safetensors sample_models/lstm_healthy.safetensors \
	  sample_models/rnn_relu_exploding.safetensors sample_models/gru_bidir_2layer.pt; \
	  echo "rnndiag exit code: $$? (0 healthy, 1 vanishing/exploding found, 2 unusable input)"

# pytest exits 5 when it collected no test; treat that as the failure it is.
test: $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check rnndiag tests sample_models bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/bench_startup.py
	$(BIN)/python bench/bench_check.py

clean:
	rm -rf $(VENV) build *.egg-info
