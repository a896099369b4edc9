# Two set-up commands (README): `make demo` runs the built-in default, `make test` runs the tests.
# Both create .venv and install wsld into it first; on Debian/Ubuntu they also install the
# Fashion-MNIST files (apt package dataset-fashion-mnist) when they are missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo train test venv data clean

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

data: $(FMNIST)
$(FMNIST):
	@if command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not found at $(FMNIST): see README (set data.data_path to a folder with the 4 IDX files)"; exit 1; \
	fi

# the main job: the reference comparison (teacher / CE / KD / WSLD / WSLD with weights fixed at 1) on
# the built-in Fashion-MNIST, balanced, long-tailed and small-data, 3 seeds, report in runs/demo
# (about half an hour on 2 CPU cores; docs/demo.md has the measured time)
demo: venv data
	$(BIN)/wsld demo

# the built-in default run alone: WSLD on Fashion-MNIST, and the same student alone (CE) beside it
train: venv data
	$(BIN)/wsld train

test: venv data
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
