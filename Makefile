# The README's commands. `make serve` and `make test` install first (once) into .venv.
VENV    ?= .venv
PYTHON  ?= python3
PORT    ?= 8000
ARGS    ?=
BIN     := $(VENV)/bin

# torch and torchvision must come as a matching pair (a mismatched torchvision fails to import).
ifeq ($(shell uname -m),aarch64)
TORCH_PAIR ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install serve classify bench bench-quick test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PAIR)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

serve: install  ## the built-in model on http://127.0.0.1:$(PORT)
	$(BIN)/timmserve serve --port $(PORT) $(ARGS)

classify: install  ## classify the test photos with a running server
	$(BIN)/timmserve classify tests/data/*.jpg --url http://127.0.0.1:$(PORT)

bench: install  ## the full ladder on the built-in model (9 rungs; the earlier 7 took 16 minutes on 2 cores)
	$(BIN)/timmserve bench --out results $(ARGS)

bench-quick: install  ## baseline, best and default, short timings
	$(BIN)/timmserve bench --quick --out results $(ARGS)

test: install
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
