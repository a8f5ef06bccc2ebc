# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install dev clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

## demo: corpus (the stdlib on this machine) -> tokenizer -> shards -> ~4 min of CPU training -> eval, samples, compute summary
##       extra flags: make demo ARGS="--train.max_time 60"
demo: $(VENV)/.installed
	$(BIN)/lmforge demo $(ARGS)

## test: the whole suite (GPU-only tests skip themselves without a GPU)
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) lmforge-work .pytest_cache
