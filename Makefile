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

# the main job: `wsld compare` on the built-in Fashion-MNIST (teacher / CE / KD / WSLD / WSLD with weights
# fixed at 1, every value searched on held-out training images, 3 seeds), report in runs/demo; extra
# arguments pass through: make demo ARGS=--quick (a pipeline check, in runs/demo-quick), ARGS="--out runs/demo2"
demo: venv data
	$(BIN)/wsld demo $(ARGS)

# the built-in default run alone: WSLD on Fashion-MNIST, and the same student alone (CE) beside it
train: venv data
	$(BIN)/wsld train

test: venv data
	$(BIN)/python -m pytest -q

# removes what `make` built (the venv, build leftovers); never runs/, which holds your results
# (delete a run with rm -rf runs/NAME)
clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
